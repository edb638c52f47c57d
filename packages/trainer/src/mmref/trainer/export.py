"""Writing a model directory: the standalone Hugging Face layout ``policy.load_policy`` (and transformers) reads.

    export_model_dir(policy.model, policy.tokenizer, policy.processor, "runs/x/checkpoints/step_10")

writes ``config.json``, ``generation_config.json``, safetensors (sharded above
``max_shard_size``, with ``model.safetensors.index.json``), the tokenizer, the image
processor's ``preprocessor_config.json`` (pixel overrides included) and the chat template,
into a temporary sibling that is renamed into place, so a reader never sees half a directory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase


def export_model_dir(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, processor: Any,
                     directory: str | Path, chat_template: str | None = None,
                     max_shard_size: str | int = "2GB", state_dict: dict | None = None) -> Path:
    """Write a loadable model directory atomically and return it.

    ``chat_template`` is written as ``chat_template.jinja`` when the tokenizer carries none;
    ``state_dict`` (full tensors) replaces the model's own, e.g. weights gathered from shards.
    """
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=max_shard_size, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if chat_template is not None and not (tmp / "chat_template.jinja").exists():
        (tmp / "chat_template.jinja").write_text(chat_template)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory
