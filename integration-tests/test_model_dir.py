"""A user's model directory end to end: `mmref rl`/`sft`/`serve` run from it, refs carry its processor
config's fingerprint, and a directory that cannot be used is one line on stderr and exit code 2."""

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console
from transformers import AutoImageProcessor

from mmref.renderers import layout_spec, make_ref
from mmref.renderers.layout import spec_from_image_processor
from mmref.renderers.render import CHAT_TEMPLATE_FILES
from mmref.trainer.cli import main
from mmref.trainer.models import TINY_FAMILIES
from mmref.trainer.inference import load_served_model
from mmref.trainer.policy import load_policy
from mmref.trainer.orchestrator import Orchestrator
from mmref.trainer.run_config import load_run_config
from inference_cases import app_and_store, client, picture, prompt_with_images
from trainer_cases import DIR_MAX_PIXELS, sharded_qwen_dir

CONFIG = str(Path(__file__).resolve().parents[1] / "examples" / "color-codeword.toml")
SMALL = ["--set", "rollout.prompts_per_step=2", "--set", "rollout.group_size=2", "--set", "train.nproc=0"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return sharded_qwen_dir(tmp_path_factory.mktemp("user") / "Qwen2-VL-tiny")


@pytest.fixture
def broken_dir(tmp_path, model_dir):
    """The user's directory without its image processor config (a partial download)."""
    broken = shutil.copytree(model_dir, tmp_path / "partial")
    (broken / "preprocessor_config.json").unlink()
    return broken


def dir_fingerprint(path) -> str:
    return spec_from_image_processor("qwen2-vl", AutoImageProcessor.from_pretrained(path)).fingerprint


@pytest.mark.timeout(300)
def test_rl_trains_from_the_dir_and_every_stage_uses_its_processor_config(tmp_path, model_dir):
    # The built-in defaults set no pixel overrides: the run takes the directory's own limits.
    overrides = [f"model.path='{model_dir}'", f"output_dir='{tmp_path / 'orch'}'"]
    config = load_run_config(None, overrides)
    orch = Orchestrator(config, tmp_path / "orch", Console(quiet=True))
    expected = dir_fingerprint(model_dir)
    assert orch.renderer.spec.fingerprint == orch.served.spec.fingerprint == expected
    assert expected != layout_spec("qwen2-vl").fingerprint and orch.spec.max_pixels == DIR_MAX_PIXELS
    out = tmp_path / "run"
    assert main(["rl", "--max-steps", "2", "--output-dir", str(out), "--set", f"model.path='{model_dir}'", *SMALL]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1] and all(m["loss_tokens"] > 0 for m in metrics)
    assert json.loads((out / "checkpoints" / "step_2" / "mmref.json").read_text())["weight_version"] == 2


@pytest.mark.timeout(300)
def test_sft_trains_from_the_dir_and_exports_a_dir_with_the_same_layout(tmp_path, model_dir):
    out = tmp_path / "sft"
    assert main(["sft", "--max-steps", "1", "--output-dir", str(out), "--set", f"model.path='{model_dir}'",
                 "--set", "rollout.prompts_per_step=1"]) == 0
    exported = out / "checkpoints" / "sft"
    assert dir_fingerprint(exported) == dir_fingerprint(model_dir)
    assert load_policy(exported).tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151_655


def test_server_of_the_dir_refuses_a_ref_made_with_the_default_spec(model_dir):
    served = load_served_model(str(model_dir))
    app, store = app_and_store(served)
    assert served.spec.fingerprint == dir_fingerprint(model_dir)

    async def generate(ref):
        ids, slots = prompt_with_images([ref])
        async with client(app) as c:
            return await c.post("/inference/v1/generate", json={"token_ids": ids, "images": slots,
                                                                 "sampling": {"max_tokens": 1}})
    stored = store.put_image(picture(1, size=(400, 300)))
    assert asyncio.run(generate(make_ref(served.spec, stored))).status_code == 200
    refused = asyncio.run(generate(make_ref(layout_spec("qwen2-vl"), stored)))
    assert refused.status_code == 400 and "layout drift" in refused.json()["error"]["message"]


def _job(tmp_path, model_path) -> str:
    job = {"family": "qwen2-vl", "store_root": str(tmp_path), "pub_address": "tcp://127.0.0.1:1",
           "ready_address": "tcp://127.0.0.1:2", "steps": 1, "model_path": str(model_path)}
    (tmp_path / "job.json").write_text(json.dumps(job))
    return str(tmp_path / "job.json")


@pytest.mark.parametrize("command", ["rl", "sft", "serve", "train"])
def test_cli_names_what_the_dir_lacks_in_one_line_and_exits_2(tmp_path, broken_dir, capsys, command):
    argv = {"rl": ["rl", CONFIG, "--output-dir", str(tmp_path / "o"), "--set", f"model.path='{broken_dir}'"],
            "sft": ["sft", CONFIG, "--output-dir", str(tmp_path / "o"), "--set", f"model.path='{broken_dir}'"],
            "serve": ["serve", "--model", str(broken_dir), "--store", str(tmp_path / "store")],
            "train": ["train", _job(tmp_path, broken_dir)]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith(f"mmref {command}: ") and "no preprocessor_config.json" in err and str(broken_dir) in err


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_init_writes_a_dir_that_loads_as_its_family_with_the_published_layout(tmp_path, family):
    assert main(["init", f"tiny-{family}", str(tmp_path / "m")]) == 0
    policy = load_policy(tmp_path / "m")
    assert policy.family == family and policy.spec == layout_spec(family)
    if family in CHAT_TEMPLATE_FILES:  # qwen3.5's published template is not shipped: its dir has none
        assert (tmp_path / "m" / "chat_template.jinja").read_text() == policy.tokenizer.chat_template


def test_init_refuses_an_unknown_model_name(tmp_path, capsys):
    assert main(["init", "tiny-llava", str(tmp_path / "m")]) == 2
    assert "tiny-qwen2.5-vl" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_train_names_an_unreadable_or_invalid_job_in_one_line(tmp_path, capsys):
    (tmp_path / "bad.json").write_text(json.dumps({"family": "qwen2-vl", "steps": 0}))
    assert main(["train", str(tmp_path / "bad.json")]) == 2
    assert main(["train", str(tmp_path / "missing.json")]) == 2
    bad, missing = capsys.readouterr().err.strip().splitlines()
    assert "steps: Input should be greater than or equal to 1" in bad and "store_root: Field required" in bad
    assert missing == f"mmref train: job {tmp_path / 'missing.json'}: No such file or directory"
