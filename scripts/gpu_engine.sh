#!/usr/bin/env bash
# The engine on one GPU: GPU correctness tests (fp32 greedy tokens vs transformers and the
# CPU path with the Triton backend; bf16 vs fp32), then offline throughput on
# dummy:llama-3.1-8b in bf16 (batch 1, and a reduced form of the workload).
# Writes JSON into ${OUT:-benchmarks/results}.
source scripts/device_env.sh
out=${OUT:-benchmarks/results}
mkdir -p "$out"
python3 -m pytest -q -p no:cacheprovider -p no:benchmark -m gpu tests/test_engine_gpu.py 2>&1 | tail -n 15
bench() {  # name, extra flags
  local name=$1; shift
  timeout 240 python3 -m splitserve.benchmarks.engine_offline --model dummy:llama-3.1-8b \
    --device cuda --dtype bfloat16 --kv-cache-memory-gib 40 --out "$out/engine_offline_$name.json" "$@" \
    2>&1 | tail -n 2 || echo "FAILED $name"
}
bench b1_512in_128out --num-prompts 1 --input-len 512 --output-len 128 --warmup-prompts 1
bench 500x1024in_256out --num-prompts 500 --input-len 1024 --output-len 256 \
  --max-num-seqs 256 --max-num-batched-tokens 8192 --warmup-prompts 2
