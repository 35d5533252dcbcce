#!/usr/bin/env bash
# Disaggregated prefill on two GPUs of one host: a prefill node on cuda:0 pushes KV into
# a decode node on cuda:1 (dummy:llama-3.1-8b, bf16); TTFT split into its phases for
# prompts of 128 to 8,192 tokens. Writes JSON into ${OUT:-benchmarks/results}.
source scripts/device_env.sh
out=${OUT:-benchmarks/results}
mkdir -p "$out"
timeout 500 python3 -m splitserve.benchmarks.disagg --model dummy:llama-3.1-8b --device cuda \
  --dtype bfloat16 --kv-cache-memory-gib 40 --max-num-batched-tokens 8192 \
  --lengths 128,512,2048,8192 --reps 3 --out "$out/disagg_h200x2_llama8b.json"
