#!/usr/bin/env bash
# Stop the nodes scripts/start_nodes.sh started (SIGTERM: they deregister and drain).
set -euo pipefail
log_dir=.run/nodes
[ "${1:-}" = "--log-dir" ] && log_dir=$2
for pid_file in "$log_dir"/*.pid; do
  [ -e "$pid_file" ] || continue
  pid=$(cat "$pid_file")
  kill -TERM "$pid" 2>/dev/null && echo "stopping pid $pid ($(basename "$pid_file" .pid))"
  rm -f "$pid_file"
done
wait 2>/dev/null || true
