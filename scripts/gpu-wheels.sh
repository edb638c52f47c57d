#!/usr/bin/env bash
# Download the wheels scripts/gpu-smoke.sh installs, on a machine WITH registry access.
#
#   scripts/gpu-wheels.sh                 # -> .gpu-wheels/ for CPython 3.12 on x86-64 Linux
#   PY_VERSION=3.11 scripts/gpu-wheels.sh # match the GPU machine's python
#
# Copy the checkout (with .gpu-wheels/) to the GPU machine and run scripts/gpu-smoke.sh there.
# Versions are the ones uv.lock pins where it pins one; the list is scripts/gpu-wheels.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${GPU_WHEELS:-.gpu-wheels}"
PY_VERSION="${PY_VERSION:-3.12}"
PIP="${PIP:-python3 -m pip}"

# name==version from uv.lock for every listed package (a bare name when the lock lacks it).
specs=$(python3 - <<'PYEOF'
import re, tomllib
lock = {p["name"]: p.get("version") for p in tomllib.load(open("uv.lock", "rb")).get("package", [])}
for line in open("scripts/gpu-wheels.txt"):
    name = line.split("#")[0].strip()
    if name:
        version = lock.get(re.sub(r"[-_.]+", "-", name).lower())
        print(f"{name}=={version}" if version else name)
PYEOF
)
mkdir -p "$DEST"
# shellcheck disable=SC2086
$PIP download --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform any -d "$DEST" $specs
echo "gpu-wheels: $(ls "$DEST"/*.whl | wc -l) wheels in $DEST for CPython $PY_VERSION"
