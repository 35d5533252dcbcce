#!/usr/bin/env bash
# The engine on one GPU. Parts (PARTS, default all four, in this order):
#   tests     the gpu-marked kernel tests at model shapes, and the engine's GPU tests
#             (fp32 greedy tokens vs transformers and the CPU path, CUDA-graph decode vs
#             eager, bf16 vs fp32)
#   steps     engine_steps on dummy:llama-3.1-8b in bf16: decode and prefill step costs
#             against the copy and matmul ceilings measured in the same run
#   profiles  torch.profiler over graph-replayed decode steps at batch 1, 64 and 256
#   offline   engine_offline at batch 1 and the offline workload (OFFLINE_PROMPTS
#             prompts, default 2000, of 1024 tokens, 256 out) against the roofline
# Writes JSON and logs into ${OUT:-benchmarks/results/engine}.
source scripts/device_env.sh
out=${OUT:-benchmarks/results/engine}
mkdir -p "$out"
parts=${PARTS:-tests steps profiles offline}
model=(--model dummy:llama-3.1-8b --device cuda --dtype bfloat16)
xdist=()
python3 -c 'import xdist' 2>/dev/null && xdist=(-n 8)
if [[ $parts == *tests* ]]; then
  timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider "${xdist[@]}" \
    tests/test_kernels_attention.py tests/test_kernels_norm_rope.py tests/test_kernels_model.py \
    2>&1 | tail -n 3
  timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_engine_gpu.py 2>&1 | tail -n 3
fi
if [[ $parts == *steps* ]]; then
  timeout 300 python3 -m splitserve.benchmarks.engine_steps "${model[@]}" --kv-cache-memory-gib 80 \
    --max-num-batched-tokens 16384 --out "$out/engine_steps.json" 2>&1 | tail -n 6
fi
if [[ $parts == *profiles* ]]; then
  for case in 1x512 64x2048 256x2048; do
    timeout 150 python3 -m splitserve.benchmarks.profile_decode "${model[@]}" \
      --kv-cache-memory-gib 80 --batch "${case%x*}" --context "${case#*x}" \
      --max-num-batched-tokens 16384 >"$out/profile_decode_b${case%x*}.log" 2>&1
    head -n 1 "$out/profile_decode_b${case%x*}.log"
  done
fi
offline() {  # name, extra flags
  local name=$1; shift
  timeout 400 python3 -m splitserve.benchmarks.engine_offline "${model[@]}" --kv-cache-memory-gib 80 \
    --roofline --out "$out/engine_offline_$name.json" "$@" 2>&1 | tail -n 2
}
if [[ $parts == *offline* ]]; then
  offline b1_512in_128out --num-prompts 1 --input-len 512 --output-len 128 --warmup-prompts 1
  n=${OFFLINE_PROMPTS:-2000}
  offline "${n}x1024in_256out" --num-prompts "$n" --input-len 1024 --output-len 256 \
    --max-num-seqs 256 --max-num-batched-tokens 8192 --warmup-prompts 2
fi
