#!/usr/bin/env bash
# Run a job longer than one device call (600 s) on the GPU machine: `start` copies the
# checkout to /root/bg/NAME/tree and runs the job there in a process session of its own,
# which runs on until the machine goes back; later calls, each made within the machine's
# idle release (30 s) of the one before, `wait` on it. The copy keeps the job's code fixed
# while the next calls' checkouts arrive.
#   bash scripts/gpu_background.sh start NAME 'command ...'   # BG_OUT=/root/bg/NAME/out
#   bash scripts/gpu_background.sh wait NAME SECONDS          # at most SECONDS, then
#       prints the log's tail and packs BG_OUT into $OUT/NAME.tgz (whether or not done)
#   bash scripts/gpu_background.sh stop NAME                  # ends the job's session
# /root/bg/NAME/rc holds the job's exit status once it has ended.
set -uo pipefail
action=${1:?usage: bash scripts/gpu_background.sh start|wait|stop NAME ...}
name=${2:?usage: bash scripts/gpu_background.sh start|wait|stop NAME ...}
dir=/root/bg/$name
case $action in
  start)
    job=${3:?start needs the command as one argument}
    [ ! -e "$dir" ] || { echo "$dir exists: pick another NAME or remove it" >&2; exit 1; }
    mkdir -p "$dir/out" && cp -a . "$dir/tree"
    # shellcheck disable=SC2016
    setsid bash -c 'cd "$1/tree"; export BG_OUT="$1/out"; unset OUT; bash -c "$2";
      echo $? > "$1/rc"' _ "$dir" "$job" </dev/null >"$dir/log" 2>&1 &
    echo $! > "$dir/pid"
    echo "started $name (session $(cat "$dir/pid")); log in $dir/log"
    ;;
  wait)
    limit=${3:?wait needs SECONDS}
    for _ in $(seq 1 "$limit"); do [ -f "$dir/rc" ] && break; sleep 1; done
    tail -n "${TAIL:-40}" "$dir/log"
    if [ -f "$dir/rc" ]; then echo "$name ended: status $(cat "$dir/rc")"; else echo "$name still running"; fi
    [ -z "${OUT:-}" ] || tar czf "$OUT/$name.tgz" -C "$dir" out log
    ;;
  stop)
    kill -TERM -- "-$(cat "$dir/pid")" 2>/dev/null
    echo "stopped $name"
    ;;
  *) echo "usage: bash scripts/gpu_background.sh start|wait|stop NAME ..." >&2; exit 2 ;;
esac
