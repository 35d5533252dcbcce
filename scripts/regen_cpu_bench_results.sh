#!/usr/bin/env bash
# Regenerates the committed CPU benchmark results that the README quotes, with the same
# workloads and flags as the README documents:
#   benchmarks/results/bench_example_cpu/   the worked example: a `splitserve up` cluster of
#                                           the tiny model, shared-prefix sweep at 4-32 req/s
#   benchmarks/results/pd_ratio_cpu_tiny/   1P1D against two aggregated replicas (0P2D)
# Every rate and every warm-up sends fresh prompts (`splitserve bench`'s default), so the
# prefix cache serves only the shared system prompts of the worked example; each point's
# cached-prompt fraction is in its summary.json.
#
# Run it on an otherwise idle machine (the nodes share its cores with the client), from the
# repository root, in the project's environment:
#   scripts/regen_cpu_bench_results.sh            # the full runs, about 20 min on 2 cores
#   SMOKE=1 OUT_ROOT=/tmp/regen scripts/regen_cpu_bench_results.sh   # a 2-minute check
#   PART=example (or PART=pd_ratio) scripts/regen_cpu_bench_results.sh   # one of the two
# On a bigger host, pin it to two cores with the threads to match (what the committed results
# used):  OMP_NUM_THREADS=2 taskset -c 0,1 scripts/regen_cpu_bench_results.sh
# SMOKE=1 keeps every flag but shrinks the counts and the rate lists. Each result folder gets a
# run.json: the command, git commit (SPLITSERVE_GIT_COMMIT overrides it in a copy without .git),
# the CPU, the cores this process may use, and the date.
set -euo pipefail

PY=${PYTHON:-python}
OUT_ROOT=${OUT_ROOT:-benchmarks/results}
if [[ "${SMOKE:-0}" == 1 ]]; then
  EXAMPLE_RATES=4,8 EXAMPLE_REQUESTS=12 PD_RATES=6,10 PD_REQUESTS=10 PD_WARMUP=5
else
  EXAMPLE_RATES=4,8,16,24,32 EXAMPLE_REQUESTS=150 PD_RATES=${PD_RATES:-2,3,4,5,6}
  PD_REQUESTS=${PD_REQUESTS:-150} PD_WARMUP=${PD_WARMUP:-100}
fi

free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_ready() {  # $1: router URL; waits until /v1/models answers (at most 10 min)
  "$PY" - "$1" <<'EOF'
import sys, time, urllib.request
deadline = time.monotonic() + 600
while True:
    try:
        urllib.request.urlopen(sys.argv[1] + "/v1/models", timeout=5).read()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("the cluster did not answer /v1/models within 10 minutes")
        time.sleep(1)
EOF
}

UP_PID=""
stop_up() {
  if [[ -n "$UP_PID" ]]; then
    kill -INT "$UP_PID" 2>/dev/null || true
    wait "$UP_PID" || true
    UP_PID=""
  fi
}
trap stop_up EXIT

bench_example() {
  local out="$OUT_ROOT/bench_example_cpu" port
  port=$(free_port)
  # The built-in tiny model, served as tiny-llama (what `splitserve up` ran by default).
  local model
  model=$("$PY" -c 'from splitserve.launch.up_cmd import tiny_model_dir; print(tiny_model_dir())')
  "$PY" -m splitserve.launch.cli up --model "$model" --served-model-name tiny-llama \
    --port "$port" --cpu &
  UP_PID=$!
  wait_ready "http://127.0.0.1:$port"
  rm -rf "$out"
  "$PY" -m splitserve.launch.cli bench sweep --url "http://127.0.0.1:$port" --model tiny-llama \
    --workload shared-prefix --num-prefixes 4 --prefix-len 256 --input-len 64 --output-len 32 \
    --num-requests "$EXAMPLE_REQUESTS" --arrival poisson --rates "$EXAMPLE_RATES" \
    --slo ttft=300ms,tpot=50ms --seed 0 --ignore-eos --no-progress --output-dir "$out"
  stop_up
}

pd_ratio() {
  local out="$OUT_ROOT/pd_ratio_cpu_tiny"
  rm -rf "$out"
  "$PY" -m splitserve.benchmarks.pd_ratio --cpu --configs 1P1D,0P2D --scale 0.25 \
    --rates-prompt-heavy "$PD_RATES" --rates-decode-heavy "$PD_RATES" \
    --num-requests "$PD_REQUESTS" --warmup-requests "$PD_WARMUP" \
    --slo ttft:p90=200ms,tpot:p90=20ms --out-dir "$out"
  # Per-request logs are not committed for this experiment (the summaries are).
  find "$out" -name requests.jsonl -delete
}

provenance() {  # $1: the result folder, $2: seconds the part took
  "$PY" - "$1" "$2" <<'EOF2'
import json, os, sys
from splitserve.benchmarks.results_io import provenance
run = provenance("cpu")
run["command"] = "scripts/regen_cpu_bench_results.sh (PART=%s)" % os.environ.get("PART", "all")
run["cores"] = len(os.sched_getaffinity(0))
run["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
run["wall_s"] = int(sys.argv[2])
open(os.path.join(sys.argv[1], "run.json"), "w").write(json.dumps(run, indent=2) + "\n")
EOF2
}

start=$(date +%s)
if [[ "${PART:-all}" != pd_ratio ]]; then
  bench_example
  provenance "$OUT_ROOT/bench_example_cpu" $(($(date +%s) - start))
  echo "bench_example_cpu done after $(($(date +%s) - start)) s"
fi
if [[ "${PART:-all}" != example ]]; then
  part_start=$(date +%s)
  pd_ratio
  provenance "$OUT_ROOT/pd_ratio_cpu_tiny" $(($(date +%s) - part_start))
  echo "pd_ratio_cpu_tiny done after $(($(date +%s) - start)) s"
fi
