#!/usr/bin/env bash
# Serving on one H200, splitserve against vLLM (issue 12), one system per device call:
#   bash scripts/gpu_serving.sh splitserve   # carry [".whl"] (scripts/fetch_gpu_wheels.sh)
#   bash scripts/gpu_serving.sh vllm         # carry vLLM's pieces (../shared/vllm/README.md):
#       a call before this one leaves .carry/piece.00 in /root/stash; this one carries
#       .carry/{piece.01,serve_piece.00,install_on_gpu.sh,install_serve_on_gpu.sh,serve_vllm.sh}
# Both serve dummy Llama-3.1-8B in bf16 with prefix caching off, and are loaded by
# benchmarks/serving.py with the same prompts (one bench run per workload and rate, fresh
# prompts per rate). Results merge into $RESULTS (summary.json, summary.md, runs/), which
# comes back as $OUT/<name of $RESULTS>.tgz (serving_h200.tgz by default) beside its table,
# $OUT/<name>.summary.md, so that calls with other RESULTS in one device call keep apart.
# Either unpack it over the checkout (tar xzf ... -C
# benchmarks/results) before the next call, so that the next call's rows merge with these,
# or unpack each call's archive apart and merge them after:
#   python -m splitserve.benchmarks.serving_report merge benchmarks/results/serving_h200 A B
# Env (defaults): WORKLOADS (1024x256,4096x256), RATES (2,4,8,16,24,32),
#   SECONDS_PER_RATE (30: requests = rate x this, at least MIN_REQUESTS=50), NUM_WARMUP
#   (0: uncounted requests sent first at each rate),
#   CALL_S (560: the whole command's budget; rates that would not fit, reckoned as
#   requests / rate + DRAIN_S (45) seconds, are left out and printed), NODE_ARGS (extra
#   splitserve node flags, e.g. --node-arg=--stream-interval=4), SPLITSERVE_GIT_COMMIT
#   (the commit recorded in the rows: the device copy has no .git), RESULTS, PYTHON.
# A dry run of the splitserve call on a CPU machine (tests/test_bench_serving.py does this):
#   CPU_DRY_RUN=1 NO_WHEELS=1 PYTHON=.venv/bin/python WORKLOADS=32x4 RATES=4 \
#     RESULTS=/tmp/serving bash scripts/gpu_serving.sh splitserve
set -uo pipefail
system=${1:?usage: bash scripts/gpu_serving.sh splitserve|vllm}
started=$(date +%s)
results=${RESULTS:-benchmarks/results/serving_h200}
export SPLITSERVE_GIT_COMMIT=${SPLITSERVE_GIT_COMMIT:-unknown}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

bench() {  # the remaining budget, less a minute for stopping the server and packing up
  local left=$(( ${CALL_S:-560} - ($(date +%s) - started) - 60 ))
  timeout $(( left + 45 )) "${PYTHON:-python3}" -m splitserve.benchmarks.serving \
    --workloads "${WORKLOADS:-1024x256,4096x256}" --rates "${RATES:-2,4,8,16,24,32}" \
    --seconds-per-rate "${SECONDS_PER_RATE:-30}" --num-requests "${MIN_REQUESTS:-50}" \
    --num-warmup "${NUM_WARMUP:-0}" \
    --deadline-s "$left" --drain-s "${DRAIN_S:-45}" --out-dir "$results" "$@"
}

case $system in
  splitserve)
    SITE=/tmp/site_splitserve source scripts/device_env.sh
    # The node's own defaults, as a user starts it: on this GPU 8,192 batched tokens per
    # step, 1,024 sequences and a KV pool of what 90% of the memory leaves (those of
    # `vllm serve` on a GPU of 70 GiB or more); bf16, the checkpoint's dtype.
    engine=(--model dummy:llama-3.1-8b)
    [ -n "${CPU_DRY_RUN:-}" ] && engine=(--cpu --node-arg=--dtype=float32)
    # shellcheck disable=SC2086
    bench --system splitserve "${engine[@]}" ${NODE_ARGS:-}
    status=$?
    ;;
  vllm)
    if [ ! -f /tmp/site/vllm_env.sh ]; then
      mkdir -p /root/stash && cp .carry/piece.01 .carry/serve_piece.00 /root/stash/ &&
        bash .carry/install_on_gpu.sh && bash .carry/install_serve_on_gpu.sh ||
        { echo "vLLM install failed: was piece.00 left in /root/stash by the call before?"; exit 1; }
    fi
    source .carry/serve_vllm.sh 8100
    kill -0 "$VLLM_PID" 2>/dev/null || exit 1  # serve_vllm.sh printed why
    SITE=/tmp/site_splitserve source scripts/device_env.sh  # the bench client: no wheels needed
    bench --system vllm --url http://127.0.0.1:8100
    status=$?
    kill -INT "$VLLM_PID" 2>/dev/null; wait "$VLLM_PID" 2>/dev/null
    ;;
  *) echo "unknown system $system: pick splitserve or vllm"; exit 2 ;;
esac
if [ -n "${OUT:-}" ] && [ -d "$results" ]; then
  name=$(basename "$results")
  tar czf "$OUT/$name.tgz" -C "$(dirname "$results")" "$name"
  cp "$results/summary.md" "$OUT/$name.summary.md" 2>/dev/null
fi
exit $status
