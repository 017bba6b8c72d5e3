#!/usr/bin/env bash
# The GPU check on an offline node, with the node's own Python and torch:
#   scripts/gpu_check.sh OUT_DIR [gpu_check.py options, e.g. --dry-run]
# installs the wheels of $WHEELHOUSE (default: wheelhouse/ of this checkout, made by `make wheelhouse` on a connected
# machine) with pip --no-index into a temporary folder, puts the checkout and that folder on PYTHONPATH, and runs
# scripts/gpu_check.py, which writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md after every check.
# $PYTHON picks the interpreter (default python3); the whole run is stopped after $GPU_CHECK_TIMEOUT s (480).
set -euo pipefail
if [[ $# -lt 1 || $1 == -* ]]; then
    echo "usage: scripts/gpu_check.sh OUT_DIR [gpu_check.py options]" >&2
    exit 2
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$1
shift
PY=${PYTHON:-python3}
WHEELHOUSE=${WHEELHOUSE:-$ROOT/wheelhouse}
TARGET=$(mktemp -d "${TMPDIR:-/tmp}/dml-gpu-check.XXXXXX")
trap 'rm -rf "$TARGET"' EXIT
shopt -s nullglob
wheels=("$WHEELHOUSE"/*.whl)
if [[ ${#wheels[@]} -gt 0 ]]; then
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check --target "$TARGET" \
        "${wheels[@]}"
else
    echo "gpu_check.sh: no wheels in $WHEELHOUSE (make wheelhouse on a connected machine); using $PY's packages" >&2
fi
export PYTHONPATH="$ROOT:$TARGET${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
rc=0
timeout --signal=TERM --kill-after=20 "${GPU_CHECK_TIMEOUT:-480}" "$PY" "$ROOT/scripts/gpu_check.py" --out "$OUT" "$@" \
    || rc=$?
[[ $rc -eq 124 ]] && echo "gpu_check.sh: stopped after ${GPU_CHECK_TIMEOUT:-480} s; $OUT holds the rows measured" >&2
exit $rc
