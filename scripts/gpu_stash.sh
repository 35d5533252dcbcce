#!/usr/bin/env bash
# Carry vLLM's pieces (../shared/vllm) and the serving wheels (.whl/, from
# scripts/fetch_gpu_wheels.sh) to a GPU machine in calls that each fit beside the checkout
# (a device call carries at most 64 MiB, the checkout included), then install them there.
#   here:  bash scripts/gpu_stash.sh split
#          -> .stash/c.00 ... (git-ignored through .git/info/exclude) and the calls to make
#   there: bash scripts/gpu_stash.sh keep      (each call but the last, carrying one chunk:
#                                               moves the carried chunks to /root/stash)
#          bash scripts/gpu_stash.sh install   (the last call, carrying the last chunk:
#                                               joins and checks the chunks, installs vLLM
#                                               into /tmp/site, the wheels into
#                                               /tmp/site_splitserve)
# The machine stays warm only 30 s after a call: make the calls one after the other. Later
# calls on the same machine: `NO_WHEELS=1 bash scripts/gpu_serving.sh splitserve` (and
# `... vllm`, which finds /tmp/site installed).
set -euo pipefail
cd "$(dirname "$0")/.."
stash=/root/stash
case ${1:?usage: bash scripts/gpu_stash.sh split|keep|install} in
  split)
    vllm=${VLLM_DIR:-../shared/vllm}
    ls .whl/*.whl >/dev/null || { echo "no .whl/: run scripts/fetch_gpu_wheels.sh first" >&2; exit 1; }
    grep -qx '/.stash/' .git/info/exclude 2>/dev/null || echo /.stash/ >> .git/info/exclude
    rm -rf .stash && mkdir -p .stash
    # What of the checkout is here (a device call copies the working tree): with the
    # results moved aside for the carrying calls (mv benchmarks/results /tmp/results;
    # back after the last), it is 3 MB and three chunks do
    checkout=$( (git ls-files -z | xargs -0 stat -c %s 2>/dev/null || true) |
      awk '{s += $1} END {print s + 0}')
    chunk=$(( 64 * 1048576 - checkout - 2 * 1048576 ))  # 2 MiB for scripts carried beside
    [ "$chunk" -gt 1048576 ] || { echo "the checkout ($checkout bytes) leaves no room to carry" >&2; exit 1; }
    tar cf .stash/all.tar -C "$vllm" piece.00 piece.01 serve_piece.00 \
      install_on_gpu.sh install_serve_on_gpu.sh serve_vllm.sh -C "$PWD" .whl
    sha256sum .stash/all.tar | cut -d' ' -f1 > .stash/all.sha
    split -b "$chunk" -d -a 2 .stash/all.tar .stash/c.
    rm .stash/all.tar
    chunks=(.stash/c.*)
    last=${chunks[-1]}
    echo "$(( ${#chunks[@]} )) chunks of at most $(( chunk / 1048576 )) MiB; calls, one after the other:"
    for c in "${chunks[@]}"; do
      if [ "$c" = "$last" ]; then
        echo "  carry [\"$c\", \".stash/all.sha\"]: bash scripts/gpu_stash.sh install"
      else
        echo "  carry [\"$c\"]: bash scripts/gpu_stash.sh keep"
      fi
    done
    ;;
  keep)
    mkdir -p "$stash" && mv .stash/c.* "$stash"/ && ls "$stash"
    ;;
  install)
    mkdir -p "$stash" && mv .stash/c.* "$stash"/
    cat "$stash"/c.* > /tmp/all.tar
    [ "$(sha256sum /tmp/all.tar | cut -d' ' -f1)" = "$(cat .stash/all.sha)" ] ||
      { echo "the joined chunks do not match .stash/all.sha: a chunk is missing or stale" >&2; ls -l "$stash" >&2; exit 3; }
    tar xf /tmp/all.tar -C "$stash" && rm -f /tmp/all.tar "$stash"/c.*
    mkdir -p .carry && cp "$stash"/install_on_gpu.sh "$stash"/install_serve_on_gpu.sh "$stash"/serve_vllm.sh .carry/
    SKIP_CHECKS=1 bash .carry/install_on_gpu.sh | tail -1
    bash .carry/install_serve_on_gpu.sh | tail -1
    python3 /tmp/vllmcarry_unpacked/vllmcarry/make_llama_dir.py /tmp/llama31-8b-dummy >/dev/null
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site_splitserve "$stash"/.whl/*.whl
    echo "vLLM in /tmp/site, the wheels in /tmp/site_splitserve"
    ;;
  *) echo "usage: bash scripts/gpu_stash.sh split|keep|install" >&2; exit 2 ;;
esac
