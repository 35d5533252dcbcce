#!/usr/bin/env bash
# Source on a GPU machine whose image lacks some packages: installs the wheels carried in
# .whl/ into ${SITE:-/tmp/site} and makes the checkout importable as `splitserve`.
set -e
SITE=${SITE:-/tmp/site}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl
fi
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/splitserve
export PYTHONPATH=/tmp/pkg:$SITE${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 NIXL_LOG_LEVEL=WARN
set +e
