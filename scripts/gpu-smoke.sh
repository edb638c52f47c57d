#!/usr/bin/env bash
# The GPU smoke run, from a plain checkout, installing nothing from the network.
#
#   scripts/gpu-smoke.sh                 # tiny model, then Qwen2.5-VL-3B width; one JSON line
#   scripts/gpu-smoke.sh --dry-run       # print what it would install and the PYTHONPATH, then stop
#   scripts/gpu-smoke.sh --install-only  # install, print, stop
#   scripts/gpu-smoke.sh --device cpu --tiny-only   # other arguments go to python -m mmref.trainer.smoke
#
# Needs: CUDA, a python with torch and transformers (PYTHON, default python3), and the wheels
# of scripts/gpu-wheels.sh in .gpu-wheels/ (GPU_WHEELS). Wheels of packages that python already
# has are skipped; the rest go into .gpu-site/ (GPU_TARGET) with pip --no-index --no-deps (or, for a
# python without pip, unzipped there: a wheel is a zip of its site-packages files).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WHEELS="${GPU_WHEELS:-.gpu-wheels}"
TARGET="${GPU_TARGET:-.gpu-site}"
case "$TARGET" in /*) ;; *) TARGET="$PWD/$TARGET" ;; esac
DRY_RUN=0
INSTALL_ONLY=0
args=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --install-only) INSTALL_ONLY=1 ;;
    *) args+=("$arg") ;;
  esac
done

missing=()
for whl in "$WHEELS"/*.whl; do
  [ -e "$whl" ] || continue
  dist="$(basename "$whl" | cut -d- -f1)"
  if "$PYTHON" -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "$dist" 2>/dev/null; then
    echo "gpu-smoke: has $dist"
  else
    missing+=("$whl")
    echo "gpu-smoke: install $(basename "$whl")"
  fi
done
export PYTHONPATH="$TARGET:$PWD/packages/renderers/src:$PWD/packages/client/src:$PWD/packages/trainer/src"
echo "gpu-smoke: PYTHONPATH=$PYTHONPATH"
if [ "$DRY_RUN" = 1 ]; then exit 0; fi

rm -rf "$TARGET"
mkdir -p "$TARGET"
if [ "${#missing[@]}" -gt 0 ]; then
  if "$PYTHON" -m pip --version >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --target "$TARGET" "${missing[@]}"
  else
    for whl in "${missing[@]}"; do "$PYTHON" -m zipfile -e "$whl" "$TARGET"; done
  fi
fi
if [ "$INSTALL_ONLY" = 1 ]; then exit 0; fi
"$PYTHON" -c 'import mmref.trainer.smoke' || {
  echo "gpu-smoke: mmref does not import with these wheels; run scripts/gpu-wheels.sh on a machine with registry access (PY_VERSION = this python's)" >&2
  exit 2
}
# Under 8 minutes by design: 3 steps per model; the timeout keeps a hang from eating the slot.
exec timeout "${GPU_SMOKE_TIMEOUT:-480}" "$PYTHON" -m mmref.trainer.smoke "${args[@]}"
