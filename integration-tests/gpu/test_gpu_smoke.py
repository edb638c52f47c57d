"""GPU smoke (marker ``gpu``; skipped without CUDA): the code of ``scripts/gpu-smoke.sh``.

``uv run pytest -m gpu integration-tests/gpu -s`` prints the smoke's JSON line, for the README.
"""

import json

import pytest
import torch

from mmref.trainer.smoke import smoke

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]


@pytest.mark.timeout(900)
def test_smoke_runs_tiny_and_real_width_models_on_cuda(tmp_path):
    result = smoke("cuda", tiny_only=False, steps=3, root=tmp_path)
    print("\n" + json.dumps(result))
    assert result["errors"] == []
    assert [r["model"] for r in result["runs"]] == ["tiny", "qwen2.5-vl-3b-width"]
    assert all(r["steps"] == 3 and r["peak_gpu_mem_gb"] > 0 and r["tokens_per_s"] > 0 for r in result["runs"])
