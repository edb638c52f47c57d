"""The GPU smoke run: a few RL steps of the main job per model, one JSON line of figures.

    python -m mmref.trainer.smoke                          # CUDA: tiny model, then Qwen2.5-VL-3B width
    python -m mmref.trainer.smoke --device cpu --tiny-only  # the same code in ~20 s on a laptop

Each model is written as a model directory (random init) and trained by ``run_rl`` on
color-codeword: on CUDA with one torchrun rank (FSDP2 on NCCL), on CPU in process. Rollouts
sample from vLLM (the run's child ``mmref serve --engine vllm``) where ``vllm`` imports, else from the
in-process transformers engine. The line printed last::

    {"device": "cuda", "engine": "vllm", "runs": [{"model": "tiny", "steps": 3, "step_s": {...},
     "tokens_per_s": ..., "images_per_s": ..., "peak_gpu_mem_gb": ..., "mismatch_kl": ...,
     "sync_s_per_gb": ..., "wall_s": ...}, ...], "errors": []}

``sync_s_per_gb``: seconds from the trainer's step end to the server holding the weights
(``sync_s``, else the server's load time) per GB of the model directory's weights.
``peak_gpu_mem_gb``: the device's peak memory in use (every process) during the run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from mmref.client.environment import vocabulary_of
from mmref.trainer.environments import run_environment
from mmref.trainer.models import TinySize
from mmref.trainer.policy_setup import TASK_PIXELS
from mmref.trainer.rl import run_rl
from mmref.trainer.run_config import RunConfig, load_run_config
from mmref.trainer.task_tokenizer import task_tokenizer
from mmref.trainer.tiny_dir import write_tiny_model_dir

# Qwen2.5-VL-3B's widths (text hidden 2048, 16 heads, 2 kv heads, MLP 11008; vision tower
# 1280 wide, 32 deep, 16 heads) with 4 decoder layers instead of 36: ~0.8 B parameters.
QWEN25_VL_3B_WIDTH = TinySize(hidden_size=2048, num_layers=4, num_heads=16, num_kv_heads=2, intermediate_size=11008,
                              vision_hidden=1280, vision_depth=32, vision_heads=16)
STEP_SPLIT = ("step_s", "rollout_s", "train_s", "trainer_s", "transport_s", "weight_load_s")


@dataclass(frozen=True)
class SmokeModel:
    """One model the smoke run trains."""

    name: str
    family: str
    size: TinySize


MODELS = (SmokeModel("tiny", "qwen2-vl", TinySize()), SmokeModel("qwen2.5-vl-3b-width", "qwen2.5-vl", QWEN25_VL_3B_WIDTH))


def vllm_available() -> bool:
    """Whether ``vllm`` imports here (then rollouts sample from a vLLM server)."""
    try:
        importlib.import_module("vllm")
        return True
    except Exception:  # ImportError, or a broken build raising anything at import
        return False


def smoke_config(model_dir: Path, out: Path, device: str, steps: int, engine: str) -> RunConfig:
    """color-codeword on ``model_dir`` for ``steps`` steps: a torchrun rank on CUDA, in process on CPU; vLLM as
    the run's child server (its output in ``<out>/inference.log``)."""
    overrides = [f"output_dir='{out}'", f"model.path='{model_dir}'", f"max_steps={steps}", f"device='{device}'",
                 "rollout.prompts_per_step=4", "rollout.group_size=4", f"train.nproc={1 if device == 'cuda' else 0}",
                 f"store='{out / 'store'}'", f"inference.engine='{engine}'"]
    return load_run_config(None, overrides)


def write_model(model: SmokeModel, directory: Path) -> Path:
    """``model`` as a random-init model directory with color-codeword's vocabulary and image sizes."""
    config = load_run_config(None, [f"output_dir='{directory}'"])
    tokenizer = task_tokenizer(vocabulary_of(run_environment(config)))
    return write_tiny_model_dir(model.family, directory / "model", tokenizer=tokenizer, size=model.size, **TASK_PIXELS)


def summarize(name: str, history: list[dict[str, Any]], weights_bytes: int, peak_bytes: int | None,
              wall_s: float) -> dict[str, Any]:
    """One run's figures from its ``metrics.jsonl`` records (means over steps, the first one excluded if more)."""
    steady = history[1:] or history  # step 0 pays for start-up: compile, caches, the first load

    def mean(key: str) -> float | None:
        values = [m[key] for m in steady if key in m]
        return statistics.fmean(values) if values else None

    sync = [m.get("sync_s", m.get("weight_load_s")) for m in steady]
    sync = [s for s in sync if s is not None]
    return {"model": name, "steps": len(history), "step_s": {k: mean(k) for k in STEP_SPLIT},
            "tokens_per_s": mean("tokens_per_s"), "images_per_s": mean("images_per_s"),
            "peak_gpu_mem_gb": None if peak_bytes is None else peak_bytes / 1e9,
            "mismatch_kl": mean("mismatch_kl"),
            "sync_s_per_gb": statistics.fmean(sync) / (weights_bytes / 1e9) if sync and weights_bytes else None,
            "wall_s": wall_s}


@contextmanager
def peak_device_memory(device: str, every_s: float = 0.1) -> Iterator[list[int]]:
    """Samples the device's memory in use (all processes) while the block runs; yields ``[peak bytes]``."""
    peak = [0]
    if device != "cuda":
        yield peak
        return
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            free, total = torch.cuda.mem_get_info()
            peak[0] = max(peak[0], total - free)
            done.wait(every_s)

    thread = threading.Thread(target=sample, daemon=True, name="smoke-memory")
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join()


def run_model(model: SmokeModel, root: Path, device: str, steps: int, engine: str) -> dict[str, Any]:
    """Write ``model``, train it ``steps`` steps, return its figures."""
    directory = root / model.name
    model_dir = write_model(model, directory)
    weights_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    out = directory / "run"
    start = time.perf_counter()
    with peak_device_memory(device) as peak:
        run_rl(smoke_config(model_dir, out, device, steps, engine), Console(quiet=True))
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summarize(model.name, history, weights_bytes, peak[0] if device == "cuda" else None,
                     time.perf_counter() - start)


def smoke(device: str, tiny_only: bool, steps: int, root: Path) -> dict[str, Any]:
    """Every model's run (a failure is recorded in ``errors`` and the next model still runs)."""
    engine = "vllm" if vllm_available() else "transformers"
    runs, errors = [], []
    for model in MODELS[:1] if tiny_only else MODELS:
        try:
            runs.append(run_model(model, root, device, steps, engine))
        except Exception as exc:  # the line reports it; the exit code says the smoke failed
            errors.append(f"{model.name}: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
    return {"device": device, "engine": engine, "torch": torch.__version__, "runs": runs, "errors": errors}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmref.trainer.smoke", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny-only", action="store_true", help="only the tiny model (the CPU test)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", help="where the model directories and runs go (default: a new temp dir)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"device": "cuda", "runs": [], "errors": ["torch.cuda.is_available() is False"]}))
        return 1
    root = Path(args.out or tempfile.mkdtemp(prefix="mmref-smoke-"))
    result = smoke(args.device, args.tiny_only, args.steps, root)
    print(json.dumps(result), flush=True)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
