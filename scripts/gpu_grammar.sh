#!/usr/bin/env bash
# Constrained decoding on one GPU (issue 16), splitserve against vLLM in one call:
#   bash scripts/gpu_grammar.sh splitserve vllm tests
# carrying .carry/{piece.01,install_on_gpu.sh,make_llama_dir.py} (a call before this one
# leaves piece.00 in /root/stash: ../shared/vllm/README.md) and, in .whl/, the wheels of
# scripts/fetch_gpu_wheels.sh that the engine with grammars needs: grpcio, protobuf, xgrammar,
# apache-tvm-ffi, pydantic (xgrammar imports it), pydantic-core, annotated-types,
# typing-inspection, typing-extensions, and jsonschema with its dependencies for the tests.
# vLLM's structured-output checks import lm-format-enforcer, which vLLM's pieces lack: the
# vllm part also needs, in .whl_vllm/, lm-format-enforcer==0.11.3 and interegular==0.3.3.
# Both measure benchmarks/grammar_overhead.py (batch 64, a JSON schema on every row against
# none) on the same model directory: Llama-3.1-8B's config and a Llama-3-sized tokenizer
# (make_llama_dir.py), random bf16 weights. `tests` runs the GPU tests of structured output.
# JSON goes to ${RESULTS:-benchmarks/results/structured_output_h200}.
# Env: SPLITSERVE_GIT_COMMIT (the commit recorded: the device copy has no .git).
set -uo pipefail
[ $# -gt 0 ] || { echo "usage: bash scripts/gpu_grammar.sh vllm|splitserve|tests ..."; exit 2; }
results=${RESULTS:-benchmarks/results/structured_output_h200}
model=/tmp/llama31-8b-dummy
mkdir -p "$results"
[ -f $model/config.json ] || python3 .carry/make_llama_dir.py $model >/dev/null || exit 1
bench=(-m splitserve.benchmarks.grammar_overhead --model $model --batch 64 --input-len 256
  --output-len 256)

run_tests() {
  SITE=/tmp/site_splitserve source scripts/device_env.sh
  timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_structured_output_gpu.py 2>&1 | tail -n 3
}

run_splitserve() {
  SITE=/tmp/site_splitserve source scripts/device_env.sh
  timeout 300 python3 "${bench[@]}" --engine splitserve --load-format dummy --device cuda \
    --dtype bfloat16 --kv-cache-memory-gib 40 --out "$results/grammar_splitserve.json" \
    2>&1 | tail -n 2
}

run_vllm() {  # in a subshell: vLLM's environment stays out of the splitserve run
  if [ ! -f /tmp/site/vllm_env.sh ]; then
    mkdir -p /root/stash && cp .carry/piece.01 /root/stash/ && bash .carry/install_on_gpu.sh ||
      { echo "vLLM install failed: was piece.00 left in /root/stash by the call before?"; return 1; }
  fi
  if ls .whl_vllm/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      .whl_vllm/*.whl || return 1
  fi
  source /tmp/site/vllm_env.sh
  SITE=/tmp/site_none NO_WHEELS=1 source scripts/device_env.sh
  timeout 400 python3 "${bench[@]}" --engine vllm --out "$results/grammar_vllm.json" \
    2>&1 | tail -n 2
}

for system in "$@"; do
  case $system in
    tests) (run_tests) ;;
    splitserve) (run_splitserve) ;;
    vllm) (run_vllm) ;;
    *) echo "unknown part $system: vllm, splitserve or tests"; exit 2 ;;
  esac
done
