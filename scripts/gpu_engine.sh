#!/usr/bin/env bash
# The engine on one GPU: GPU correctness tests (fp32 greedy tokens vs transformers and the
# CPU path with the Triton backend, CUDA-graph decode vs eager; bf16 vs fp32), then on
# dummy:llama-3.1-8b in bf16: step costs against the measured ceilings (engine_steps),
# decode profiles, and offline throughput against the roofline (engine_offline).
# Writes JSON and logs into ${OUT:-benchmarks/results/engine}. SKIP_TESTS=1 skips the tests;
# OFFLINE_PROMPTS sets the offline workload's size (default 2000, the issue's).
source scripts/device_env.sh
out=${OUT:-benchmarks/results/engine}
mkdir -p "$out"
model=(--model dummy:llama-3.1-8b --device cuda --dtype bfloat16)
if [ -z "$SKIP_TESTS" ]; then
  timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_engine_gpu.py 2>&1 | tail -n 5
fi
timeout 300 python3 -m splitserve.benchmarks.engine_steps "${model[@]}" --kv-cache-memory-gib 80 \
  --max-num-batched-tokens 16384 --out "$out/engine_steps.json" 2>&1 | tail -n 8
for batch in 1 64; do
  ctx=$([ "$batch" = 1 ] && echo 512 || echo 2048)
  timeout 120 python3 -m splitserve.benchmarks.profile_decode "${model[@]}" --kv-cache-memory-gib 30 \
    --batch "$batch" --context "$ctx" --max-num-batched-tokens 16384 >"$out/profile_decode_b$batch.log" 2>&1
  head -n 3 "$out/profile_decode_b$batch.log"
done
offline() {  # name, extra flags
  local name=$1; shift
  timeout 400 python3 -m splitserve.benchmarks.engine_offline "${model[@]}" --kv-cache-memory-gib 80 \
    --roofline --out "$out/engine_offline_$name.json" "$@" 2>&1 | tail -n 3
}
offline b1_512in_128out --num-prompts 1 --input-len 512 --output-len 128 --warmup-prompts 1
n=${OFFLINE_PROMPTS:-2000}
offline "${n}x1024in_256out" --num-prompts "$n" --input-len 1024 --output-len 256 \
  --max-num-seqs 256 --max-num-batched-tokens 8192 --warmup-prompts 2
