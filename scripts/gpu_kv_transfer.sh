#!/usr/bin/env bash
# KV transfer benchmark on two GPUs of one host (issue targets: Llama-3.1-8B shape,
# 4,096-token prompt, allocator-given ids, 1 and 8 chunk pushes, against the torch
# peer-copy ceiling measured in the same run), over descriptor size caps. Writes JSON
# into ${OUT:-benchmarks/results}.
source scripts/device_env.sh
out=${OUT:-benchmarks/results}
nvidia-smi topo -m | head -4
run() {  # ids chunks max_desc_mib
  python3 -m splitserve.benchmarks.kv_transfer --model-shape llama-3.1-8b --tokens 4096 \
    --block-size 16 --chunks "$2" --ids "$1" --device cuda --reps 30 --max-desc-mib "$3" \
    --out "$out/kv_transfer_h200x2_${1}_${2}chunk_desc${3}mib.json" \
    | tail -2 | sed "s/^/[$1 chunks=$2 desc=${3}MiB] /" || echo "FAILED $*"
}
for desc in 0 32 8; do
  for chunks in 1 8; do run allocator "$chunks" "$desc"; done
done
run random 1 0
run random 8 0
