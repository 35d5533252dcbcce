#!/usr/bin/env bash
# The engines alone at the same step shapes: benchmarks/step_windows.py for splitserve and
# for vLLM, one process each, on a GPU machine where scripts/gpu_stash.sh installed vLLM
# (/tmp/site) and the wheels (/tmp/site_splitserve); a job for scripts/gpu_background.sh:
#   SHAPES="12x4200+3x4096 48x1150+1x1024" bash scripts/gpu_step_pairs.sh
# A shape is BATCHxCONTEXT+PROMPTSxPROMPT: BATCH requests decoding at CONTEXT tokens, and
# PROMPTS fresh prompts of PROMPT tokens added at once in each window (--prompts). Writes
# ${BG_OUT:-/tmp/steps}/sw_<system>_<shape>.json and .log. SYSTEMS ("splitserve vllm"),
# STEP_ARGS (more step_windows flags for both, e.g. --profile --clocks), OURS_ARGS (more for
# splitserve only, e.g. --dummy-weights uniform: vLLM's draw), STEP_S (300: each run's
# limit), SPLITSERVE_GIT_COMMIT (the commit the JSON records: the device copy has no .git),
# REPEAT (1: how many times the systems alternate at each shape, e.g. 2 runs splitserve,
# vllm, splitserve, vllm, naming the files ..._r1, ..._r2: what follows the engine and not
# the order the device ran them in).
set -uo pipefail
out=${BG_OUT:-/tmp/steps}
mkdir -p "$out"
# shellcheck disable=SC1091
SITE=/tmp/site_splitserve NO_WHEELS=1 source scripts/device_env.sh
ours=(--engine splitserve --model dummy:llama-3.1-8b --device cuda --dtype bfloat16
  --kv-cache-memory-gib 30 --max-num-batched-tokens 8192 --no-prefix-caching)
status=0
for shape in ${SHAPES:?set SHAPES, e.g. "12x4200+3x4096"}; do
  decode=${shape%%+*} fresh=${shape#*+}
  args=(--batch "${decode%%x*}" --context "${decode#*x}" --prompts "${fresh%%x*}"
    --prompt "${fresh#*x}")
  for round in $(seq 1 "${REPEAT:-1}"); do
    for system in ${SYSTEMS:-splitserve vllm}; do
      name="sw_${system}_${shape/+/_}"
      [ "${REPEAT:-1}" = 1 ] || name="${name}_r${round}"
      if [ "$system" = vllm ]; then
        # shellcheck disable=SC2016
        cmd=(bash -c 'source /tmp/site/vllm_env.sh && exec python3 -m splitserve.benchmarks.step_windows "$@"'
          _ --engine vllm --model /tmp/llama31-8b-dummy)
      else
        # shellcheck disable=SC2206
        cmd=(python3 -m splitserve.benchmarks.step_windows "${ours[@]}" ${OURS_ARGS:-})
      fi
      # shellcheck disable=SC2086
      timeout "${STEP_S:-300}" "${cmd[@]}" "${args[@]}" ${STEP_ARGS:-} --out "$out/$name.json" \
        >"$out/$name.log" 2>&1 || status=$?
      echo "$(date -u +%H:%M:%S) $name: $(tail -n 1 "$out/$name.log")"
    done
  done
done
exit $status
