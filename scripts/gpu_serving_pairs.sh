#!/usr/bin/env bash
# Both systems, one workload at a time, for a job longer than one device call (started by
# scripts/gpu_background.sh): for each WORKLOAD:RATES in PAIRS, vLLM and then splitserve
# through scripts/gpu_serving.sh, each into $BG_OUT/<workload>/<system> (or <SYSTEM_NAME>);
# a lease cut short keeps whole pairs. Merge after with
# `python -m splitserve.benchmarks.serving_report merge`.
#   PAIRS="1024x256:12,16,20,24 4096x256:4" SPLITSERVE_GIT_COMMIT=... NO_WHEELS=1 \
#     bash scripts/gpu_serving_pairs.sh
# SYSTEMS (default "vllm splitserve") sets the order within a pair: "splitserve vllm" finds
# a node that cannot start before vLLM's half is spent. Other env (SECONDS_PER_RATE,
# MIN_REQUESTS, NUM_WARMUP, DRAIN_S, NODE_ARGS, SYSTEM_NAME with one system in SYSTEMS)
# passes to gpu_serving.sh; CALL_S, each
# run's budget there, defaults to 1,500 s here.
set -uo pipefail
export CALL_S=${CALL_S:-1500}
# SYSTEM_NAME (gpu_serving.sh) names every system's rows: one system at a time only.
if [ -n "${SYSTEM_NAME:-}" ] && [ "$(echo ${SYSTEMS:-vllm splitserve} | wc -w)" -gt 1 ]; then
  echo "SYSTEM_NAME=$SYSTEM_NAME would name every system's rows: set SYSTEMS to one system" >&2
  exit 2
fi
status=0
for pair in ${PAIRS:?set PAIRS, e.g. "1024x256:12,16 4096x256:4"}; do
  workload=${pair%%:*} rates=${pair#*:}
  for system in ${SYSTEMS:-vllm splitserve}; do
    echo "$(date -u +%H:%M:%S) $system $workload at $rates req/s"
    RESULTS=${BG_OUT:-/tmp/pairs}/$workload/${SYSTEM_NAME:-$system} \
      WORKLOADS=$workload RATES=$rates \
      bash scripts/gpu_serving.sh "$system" || status=$?
  done
done
echo "$(date -u +%H:%M:%S) done"
exit $status
