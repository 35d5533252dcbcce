#!/usr/bin/env bash
# Source on a GPU machine whose image lacks some packages: installs the wheels carried in
# .whl/ into ${SITE:-/tmp/site} (not with NO_WHEELS=1) and makes the checkout importable
# as `splitserve`.
set -e
SITE=${SITE:-/tmp/site}
if [ -z "${NO_WHEELS:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl
fi
PKG=${PKG:-/tmp/pkg}  # holds the link `splitserve` -> this checkout
mkdir -p "$PKG" && ln -sfn "$PWD" "$PKG/splitserve"
export PYTHONPATH=$PKG:$SITE${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 NIXL_LOG_LEVEL=WARN
set +e
