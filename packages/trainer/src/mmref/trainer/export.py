"""Writing a model directory: the standalone Hugging Face layout ``policy.load_policy`` (and transformers) reads.

    export_model_dir(policy.model, policy.tokenizer, policy.processor, "runs/x/checkpoints/step_10")

writes ``config.json``, ``generation_config.json``, safetensors (sharded above
``max_shard_size``, with ``model.safetensors.index.json``), the tokenizer, the image
processor's ``preprocessor_config.json`` (pixel overrides included) and the chat template,
into a temporary sibling that is renamed into place, so a reader never sees half a directory.
``StepExports`` decides when a run writes one (``checkpoint.every``, the last step) and how
many it keeps (``checkpoint.keep_last``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase


def export_model_dir(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, processor: Any,
                     directory: str | Path, chat_template: str | None = None,
                     max_shard_size: str | int = "2GB", meta: dict | None = None) -> Path:
    """Write a loadable model directory atomically and return it.

    ``chat_template`` is written as ``chat_template.jinja`` when the tokenizer carries none;
    ``meta`` as ``mmref.json`` (family, weight version: what ``mmref serve`` reports).
    """
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if chat_template is not None and not (tmp / "chat_template.jinja").exists():
        (tmp / "chat_template.jinja").write_text(chat_template)
    if meta is not None:
        (tmp / "mmref.json").write_text(json.dumps(meta))
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


@dataclass(frozen=True)
class StepExports:
    """A run's ``checkpoints/step_N`` exports of ``model``: every ``every`` steps and after ``max_steps``.

    In a torchrun run ``model`` is the served model, which holds the weights rank 0 wrote for
    the server (the orchestrator keeps no other copy); in process it is the trained model itself.
    With ``every=2, max_steps=5``: step_2, step_4, step_5.
    """

    root: Path
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    processor: Any
    family: str
    every: int
    keep_last: int | None
    max_steps: int

    def due(self, steps_done: int) -> bool:
        return steps_done == self.max_steps or (self.every > 0 and steps_done % self.every == 0)

    def after_step(self, steps_done: int) -> Path | None:
        """Write ``step_<steps_done>`` if due (then drop all but the newest ``keep_last``); its path or None."""
        if not self.due(steps_done):
            return None
        path = export_model_dir(self.model, self.tokenizer, self.processor, self.root / f"step_{steps_done}",
                                meta={"family": self.family, "weight_version": steps_done})
        if self.keep_last is not None:
            for old in self.existing()[: -self.keep_last]:
                shutil.rmtree(old)
        return path

    def existing(self) -> list[Path]:
        """The ``step_N`` directories under ``root``, oldest first."""
        steps = [p for p in self.root.glob("step_*") if re.fullmatch(r"step_\d+", p.name) and p.is_dir()]
        return sorted(steps, key=lambda p: int(p.name.removeprefix("step_")))
