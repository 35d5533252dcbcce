#!/usr/bin/env bash
# KV transfer benchmark on two GPUs of one host (issue targets: Llama-3.1-8B shape,
# 4,096-token prompt, allocator-given ids, 1 and 8 chunk pushes, against the torch
# peer-copy ceiling measured in the same run). Writes JSON into ${OUT:-benchmarks/results}.
source scripts/device_env.sh
out=${OUT:-benchmarks/results}
nvidia-smi topo -m
for ids in allocator random; do
  for chunks in 1 8; do
    python3 -m splitserve.benchmarks.kv_transfer --model-shape llama-3.1-8b --tokens 4096 \
      --block-size 16 --chunks "$chunks" --ids "$ids" --device cuda --reps 20 \
      --out "$out/kv_transfer_h200x2_${ids}_${chunks}chunk.json" || echo "FAILED ids=$ids chunks=$chunks"
  done
done
