"""`mmref rl` exports `checkpoints/step_N` model directories that transformers loads on its own."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

from mmref.trainer.checkpoint import weight_files
from mmref.trainer.cli import main

CONFIG = str(Path(__file__).resolve().parents[1] / "examples" / "color-codeword.toml")
SMALL = ["--set", "rollout.prompts_per_step=2", "--set", "rollout.group_size=2"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("nproc", [0, 1], ids=["in-process", "1-rank"])
def test_every_n_steps_and_the_last_are_exported_and_only_keep_last_stay(tmp_path, nproc):
    out = tmp_path / "run"
    assert main(["rl", CONFIG, "--max-steps", "3", "--output-dir", str(out), *SMALL, "--set", f"train.nproc={nproc}",
                 "--set", "checkpoint.every=2", "--set", "checkpoint.keep_last=1",
                 "--set", "model.max_pixels=6272"]) == 0
    checkpoints = out / "checkpoints"
    # step_2 was written, then dropped; in process the engine took tensors, so there is no "latest" file
    assert sorted(p.name for p in checkpoints.iterdir()) == (["latest", "state", "step_3"] if nproc else ["state", "step_3"])
    assert [p.name for p in (checkpoints / "state").iterdir()] == ["step_3"]  # the resumable state: the newest only
    step = checkpoints / "step_3"
    model = AutoModelForImageTextToText.from_pretrained(step)
    tokenizer, processor = AutoTokenizer.from_pretrained(step), AutoImageProcessor.from_pretrained(step)
    assert processor.size["longest_edge"] == 6272  # the run's override, not the model directory's 12544
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id
    assert tokenizer.chat_template and (step / "generation_config.json").exists()
    assert json.loads((step / "mmref.json").read_text()) == {"family": "qwen2-vl", "weight_version": 3}
    if nproc:  # what the server loaded after step 3, in the train dtype (float32 on CPU)
        served = {name: t for path in weight_files(checkpoints / "latest") for name, t in load_file(path).items()}
        exported = model.state_dict()
        assert served and all(torch.equal(tensor, exported[name]) for name, tensor in served.items())
