#!/usr/bin/env bash
# Start one splitserve node per GPU on this host: the first --prefill GPUs get prefill
# nodes, the next --decode GPUs decode nodes. Logs and pid files go to --log-dir; stop
# them with scripts/stop_nodes.sh --log-dir DIR.
#
#   scripts/start_nodes.sh --model dummy:llama-3.1-8b --redis redis://10.0.0.5:6379/0 \
#       --prefill 2 --decode 2 [--host 0.0.0.0 --advertise-host 10.0.0.7] [-- extra node flags]
set -euo pipefail
model="" redis="" prefill=0 decode="" host=127.0.0.1 advertise="" log_dir=.run/nodes
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model=$2; shift 2 ;;
    --redis) redis=$2; shift 2 ;;
    --prefill) prefill=$2; shift 2 ;;
    --decode) decode=$2; shift 2 ;;
    --host) host=$2; shift 2 ;;
    --advertise-host) advertise=$2; shift 2 ;;
    --log-dir) log_dir=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "start_nodes.sh: unknown flag $1 (see the header of this script)" >&2; exit 2 ;;
  esac
done
[ -n "$model" ] && [ -n "$redis" ] || { echo "start_nodes.sh: --model and --redis are required" >&2; exit 2; }
num_gpus=0
command -v nvidia-smi >/dev/null && num_gpus=$(nvidia-smi --list-gpus | wc -l)
[ -n "$decode" ] || decode=$((num_gpus - prefill))
if [ "$((prefill + decode))" -gt "$num_gpus" ] || [ "$decode" -lt 1 ]; then
  echo "start_nodes.sh: $prefill prefill + $decode decode nodes need that many GPUs; this host has $num_gpus" >&2
  exit 2
fi
mkdir -p "$log_dir"
extra=("$@")
[ -n "$advertise" ] && extra+=(--advertise-host "$advertise")
gpu=0
logs=()
start() {  # role
  local log="$log_dir/$1-gpu$gpu.log"
  logs+=("$log")
  python3 -m splitserve.launch.cli "$1" --model "$model" --redis "$redis" --host "$host" \
    --device "cuda:$gpu" "${extra[@]}" >"$log" 2>&1 &
  echo $! >"$log_dir/$1-gpu$gpu.pid"
  echo "started $1 node on cuda:$gpu (pid $!, log $log)"
  gpu=$((gpu + 1))
}
for _ in $(seq 1 "$prefill"); do start prefill; done
for _ in $(seq 1 "$decode"); do start decode; done
for log in "${logs[@]}"; do
  for _ in $(seq 1 600); do
    grep -q "listening on" "$log" && break
    sleep 1
  done
  grep -h "listening on" "$log" || { echo "a node did not start: see $log" >&2; exit 1; }
done
