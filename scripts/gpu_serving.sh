#!/usr/bin/env bash
# Serving on one H200, splitserve against vLLM (issue 12), one system per device call:
#   bash scripts/gpu_serving.sh splitserve   # carry [".whl"] (scripts/fetch_gpu_wheels.sh)
#   bash scripts/gpu_serving.sh vllm         # carry vLLM's pieces (../shared/vllm/README.md):
#       calls before this one leave .carry/piece.00 and piece.01 in /root/stash (each a
#       call of its own: with the checkout a piece passes the 64 MiB a call carries); this
#       one carries .carry/{serve_piece.00,install_on_gpu.sh,install_serve_on_gpu.sh,
#       serve_vllm.sh} (and piece.01 too, if it fits: a piece carried is stashed first);
#       or scripts/gpu_stash.sh installs vLLM and the wheels in the calls before this one
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
#   (the commit recorded in the rows: the device copy has no .git), RESULTS, PYTHON,
#   VLLM_KEEP (1: leave vLLM serving for the next call; see the vllm branch), SYSTEM_NAME
#   (the system's name in the rows and run folders, the system by default: another name
#   keeps a run of splitserve with other NODE_ARGS apart from the default's, e.g.
#   SYSTEM_NAME=splitserve-split NODE_ARGS=--node-arg=--split-context-prefill, to set
#   against it with `serving_report compare --system splitserve-split --baseline
#   splitserve`), THREAD_CPU
#   (1: sample the served processes' CPU per thread beside the bench,
#   benchmarks/thread_cpu.py, every THREAD_CPU_INTERVAL_S=5 s, into
#   $RESULTS/threads/<system>.jsonl).
# A dry run of the splitserve call on a CPU machine (tests/test_bench_serving.py does this):
#   CPU_DRY_RUN=1 NO_WHEELS=1 PYTHON=.venv/bin/python WORKLOADS=32x4 RATES=4 \
#     RESULTS=/tmp/serving bash scripts/gpu_serving.sh splitserve
set -uo pipefail
system=${1:?usage: bash scripts/gpu_serving.sh splitserve|vllm}
name=${SYSTEM_NAME:-$system}
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

start_thread_cpu() {  # $@: which processes (thread_cpu's --program / --match)
  [ -n "${THREAD_CPU:-}" ] || return 0
  mkdir -p "$results/threads"
  "${PYTHON:-python3}" -m splitserve.benchmarks.thread_cpu "$@" \
    --interval-s "${THREAD_CPU_INTERVAL_S:-5}" --duration-s "${CALL_S:-560}" \
    --out "$results/threads/$name.jsonl" >"$results/threads/$name.log" 2>&1 &
  sampler=$!
}

stop_thread_cpu() {  # SIGTERM ends the sampler after its current interval
  [ -n "${sampler:-}" ] || return 0
  kill -TERM "$sampler" 2>/dev/null
  wait "$sampler" 2>/dev/null
  return 0
}

stop_vllm() {  # SIGINT (vLLM's own shutdown), then KILL; a kept server's whole group too
  local pid=$1 group=${2:-}
  kill -INT "$pid" 2>/dev/null
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  kill -KILL "$pid" 2>/dev/null
  [ -n "$group" ] && kill -KILL -- "-$group" 2>/dev/null
  return 0
}

case $system in
  splitserve)
    SITE=/tmp/site_splitserve source scripts/device_env.sh
    # The node's own defaults, as a user starts it: on this GPU 8,192 batched tokens per
    # step, 1,024 sequences and a KV pool of what 90% of the memory leaves (those of
    # `vllm serve` on a GPU of 70 GiB or more); bf16, the checkpoint's dtype.
    engine=(--model dummy:llama-3.1-8b)
    [ -n "${CPU_DRY_RUN:-}" ] && engine=(--cpu --node-arg=--dtype=float32)
    start_thread_cpu --match router --match decode
    # shellcheck disable=SC2086
    bench --system "$name" "${engine[@]}" ${NODE_ARGS:-}
    status=$?
    stop_thread_cpu
    ;;
  vllm)
    # VLLM_KEEP=1: start the server in a process session of its own, so that it outlives
    # this device call, and leave it running; a later call on the same warm machine
    # (within its idle release) then loads it with no start-up, its rows marked as not
    # first after start. A call without VLLM_KEEP stops it at the end, as it stops one it
    # started (do that before a splitserve call: both take 90% of the GPU's memory).
    port=8100 pidfile=/tmp/vllm_server.pid warm=()
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      VLLM_PID=$(cat "$pidfile") warm=(--warm-server)
      echo "vLLM already serving (pid $VLLM_PID), left by an earlier call with VLLM_KEEP=1"
    else
      rm -f "$pidfile" "$pidfile.group"
      if [ ! -f /tmp/site/vllm_env.sh ]; then
        mkdir -p /root/stash
        for piece in .carry/piece.01 .carry/serve_piece.00; do
          [ ! -f "$piece" ] || cp "$piece" /root/stash/
        done
        bash .carry/install_on_gpu.sh && bash .carry/install_serve_on_gpu.sh ||
          { echo "vLLM install failed: were piece.00 and piece.01 left in /root/stash by the calls before?"; exit 1; }
      fi
      serve=.carry/serve_vllm.sh  # or where scripts/gpu_stash.sh install left it
      [ -f "$serve" ] || serve=/root/stash/serve_vllm.sh
      if [ -n "${VLLM_KEEP:-}" ]; then
        setsid bash -c "echo \$\$ > $pidfile.group; source $serve $port;
          echo \$VLLM_PID > $pidfile; wait" </dev/null >/tmp/vllm_start.log 2>&1 &
        for _ in $(seq 1 450); do [ -f "$pidfile" ] && break; sleep 1; done
        VLLM_PID=$(cat "$pidfile" 2>/dev/null)
        cat /tmp/vllm_start.log
      else
        source "$serve" "$port"
      fi
    fi
    kill -0 "${VLLM_PID:-0}" 2>/dev/null || exit 1  # serve_vllm.sh printed why
    SITE=/tmp/site_splitserve source scripts/device_env.sh  # the bench client: no wheels needed
    start_thread_cpu --program vllm --match llama-8b
    bench --system "$name" --url "http://127.0.0.1:$port" ${warm[@]+"${warm[@]}"}
    status=$?
    stop_thread_cpu
    if [ -z "${VLLM_KEEP:-}" ]; then
      stop_vllm "$VLLM_PID" "$(cat "$pidfile.group" 2>/dev/null)"
      rm -f "$pidfile" "$pidfile.group"
    fi
    ;;
  *) echo "unknown system $system: pick splitserve or vllm"; exit 2 ;;
esac
if [ -n "${OUT:-}" ] && [ -d "$results" ]; then
  name=$(basename "$results")
  tar czf "$OUT/$name.tgz" -C "$(dirname "$results")" "$name"
  cp "$results/summary.md" "$OUT/$name.summary.md" 2>/dev/null
fi
exit $status
