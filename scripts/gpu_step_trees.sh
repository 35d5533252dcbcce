#!/usr/bin/env bash
# The engine alone at the same step shapes on two or more commits: an A/B of a change to
# what the engine runs (scripts/gpu_step_pairs.sh sets one tree against vLLM).
# Here, pack each commit's tree (results left out) into .trees/<name>, git-ignored through
# .git/info/exclude, and carry it with the device call:
#   bash scripts/gpu_step_trees.sh pack main my-branch         -> carry [".trees"]
# There (a GPU machine; the engine alone needs no wheels):
#   SHAPES="40x1100+2x1024 40x1100+4x1024" bash scripts/gpu_step_trees.sh run
# Each round runs every tree in turn, each tree its own copy's scripts/gpu_step_pairs.sh
# (SYSTEMS=splitserve) at every shape, into ${BG_OUT:-${OUT:-/tmp/steps}}/<name>/r<round>/
# (sw_splitserve_<shape>.json and .log; the JSON records the tree's commit). REPEAT (2:
# rounds, so that a tree's figures do not follow the order the device ran them in), and
# STEP_ARGS, OURS_ARGS and STEP_S pass to gpu_step_pairs.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
case ${1:?usage: bash scripts/gpu_step_trees.sh pack REF... | run} in
  pack)
    shift
    [ $# -ge 1 ] || { echo "name the commits to pack, e.g.: pack main my-branch" >&2; exit 2; }
    grep -qx '/.trees/' .git/info/exclude 2>/dev/null || echo /.trees/ >> .git/info/exclude
    rm -rf .trees && mkdir -p .trees
    for ref in "$@"; do
      sha=$(git rev-parse --verify -q "$ref^{commit}") ||
        { echo "no commit $ref: name a branch, tag or hash" >&2; exit 2; }
      name=${ref//[^A-Za-z0-9_.-]/_}
      mkdir -p ".trees/$name"
      git archive "$sha" -- . ':!benchmarks/results' | tar x -C ".trees/$name"
      echo "$sha" > ".trees/$name/.commit"
      echo "$name: $sha"
    done
    du -sh .trees
    ;;
  run)
    out=$(realpath -m "${BG_OUT:-${OUT:-/tmp/steps}}")
    ls -d .trees/*/ >/dev/null 2>&1 || { echo "no .trees here: pack them and carry .trees" >&2; exit 2; }
    status=0
    for round in $(seq 1 "${REPEAT:-2}"); do
      for tree in .trees/*/; do
        name=$(basename "$tree")
        (cd "$tree" && BG_OUT="$out/$name/r$round" PKG="/tmp/pkg_$name" SYSTEMS=splitserve \
          REPEAT=1 SPLITSERVE_GIT_COMMIT="$(cat .commit)" bash scripts/gpu_step_pairs.sh) ||
          status=$?
      done
    done
    exit $status
    ;;
  *) echo "usage: bash scripts/gpu_step_trees.sh pack REF... | run" >&2; exit 2 ;;
esac
