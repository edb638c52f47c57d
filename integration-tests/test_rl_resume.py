"""``mmref rl --resume``: 3 steps + resume + 3 steps is the 6-step run (in process), a 2-rank run resumes
its sharded state, and a directory or config that does not fit is one line and exit 2."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmref.renderers import ImageStore
from mmref.trainer.checkpoint import weight_files
from mmref.trainer.cli import main
from mmref.trainer.lr_schedule import lr_factor
from mmref.trainer.models import image_token_ids_of
from mmref.trainer.policy import load_policy
from mmref.trainer.resume import load_trainer_state
from mmref.trainer.run_config import TrainConfig, load_run_config
from mmref.trainer.step import PolicyTrainer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "examples" / "color-codeword.toml")
# max_async = 0 and one request at a time: every engine batch is one request, so a seeded run samples alike.
# A constant lr: a decaying schedule spans max_steps, so a 3-step run would decay faster than a 6-step one.
DETERMINISTIC = ["--set", "rollout.prompts_per_step=2", "--set", "rollout.group_size=2", "--set", "max_async=0",
                 "--set", "rollout.concurrency=1", "--set", "train.nproc=0", "--set", 'train.lr_decay="constant"']


def rl(out: Path, steps: int, *extra: str) -> int:
    return main(["rl", CONFIG, "--max-steps", str(steps), "--output-dir", str(out), *extra])


def metrics_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def served_weights(out: Path) -> dict[str, torch.Tensor]:
    """The weights the run ended with: what rank 0 wrote for the server (live module names), or in process
    (the engine took tensors, no file) the last step export."""
    latest = out / "checkpoints" / "latest"
    last = latest if latest.exists() else max((out / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))
    return {name: tensor for path in weight_files(last) for name, tensor in load_file(path).items()}


@pytest.mark.timeout(600)
def test_three_steps_then_resume_for_three_more_equals_six_straight_steps_in_process(tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert rl(straight, 6, *DETERMINISTIC) == 0
    assert rl(resumed, 3, *DETERMINISTIC) == 0
    rollouts = (resumed / "rollouts.jsonl").read_text()
    assert [p.name for p in (resumed / "checkpoints" / "state").iterdir()] == ["step_3"]
    capsys.readouterr()
    # Refused before anything is built or written: a second run into the directory, a resume of other settings.
    assert rl(resumed, 6, *DETERMINISTIC) == 2
    assert "already holds a run (metrics.jsonl, rollouts.jsonl); pass --resume" in capsys.readouterr().err
    assert rl(resumed, 6, *DETERMINISTIC, "--resume", "--set", "model.hidden_size=32") == 2
    assert "model is " in capsys.readouterr().err
    assert rl(resumed, 3, *DETERMINISTIC, "--resume") == 2
    assert "max_steps = 3 leaves nothing to run" in capsys.readouterr().err
    assert rl(resumed, 6, *DETERMINISTIC, "--resume") == 0
    assert (resumed / "rollouts.jsonl").read_text().startswith(rollouts)  # appended to, never truncated
    first, second = metrics_of(straight), metrics_of(resumed)
    assert [m["step"] for m in second] == list(range(6))
    assert [m["reward_mean"] for m in second] == [m["reward_mean"] for m in first]
    assert [m["loss"] for m in second] == pytest.approx([m["loss"] for m in first], abs=1e-6)
    assert second[3]["off_policy_lag"] == 0  # step 3 sampled from the restored weights, version 3
    a, b = served_weights(straight), served_weights(resumed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert [p.name for p in (resumed / "checkpoints" / "state").iterdir()] == ["step_6"]


@pytest.mark.timeout(300)
def test_a_two_rank_run_resumes_its_sharded_model_optimizer_and_schedule(tmp_path):
    out = tmp_path / "run"
    ranks = ["--set", "rollout.prompts_per_step=2", "--set", "rollout.group_size=2", "--set", "max_async=0",
             "--set", "train.nproc=2", "--set", "train.warmup_steps=4"]
    assert rl(out, 1, *ranks) == 0
    assert rl(out, 2, *ranks, "--resume") == 0
    metrics = metrics_of(out)
    assert [(m["step"], m["ranks"]) for m in metrics] == [(0, 2), (1, 2)]
    assert metrics[1]["off_policy_lag"] == 0  # the server sampled step 1 from the restored weights (version 1)
    lr = load_run_config(CONFIG).train.lr
    assert metrics[1]["lr"] == pytest.approx(lr * lr_factor(1, total_steps=2, warmup_steps=4, decay="constant",
                                                            min_ratio=0.0))  # warmup went on at step 1
    # The state the two ranks wrote (shards) loads in one process: the weights rank 0 served, Adam at step 2.
    state = out / "checkpoints" / "state" / "step_2"
    policy = load_policy(out / "model", min_pixels=3136, max_pixels=12544)
    trainer = PolicyTrainer(policy.model, store=ImageStore(out / "store"), spec=policy.spec,
                            processor=policy.processor, config=TrainConfig(lr=lr, warmup_steps=4),
                            image_token_ids=image_token_ids_of(policy.model), total_steps=2)
    load_trainer_state(trainer, state)
    served = served_weights(out)
    loaded = trainer.model.state_dict()
    assert max((served[k] - loaded[k]).abs().max().item() for k in served) == 0.0
    steps = {float(s["step"]) for s in trainer.optimizer.state.values()}
    assert steps == {2.0} and trainer.scheduler.last_epoch == 2


@pytest.mark.timeout(300)
def test_a_resumed_dataset_run_draws_the_rows_after_the_saved_position(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    colours = ["red", "green", "blue"]
    for i, colour in enumerate(colours):
        Image.new("RGB", (56, 56), colour).save(data / f"{colour}.png")
    rows = [(c, "train") for c in colours * 4] + [(c, "eval") for c in colours]  # 12 train rows
    (data / "data.jsonl").write_text("".join(json.dumps({"images": [f"{c}.png"], "question": "Which colour?",
                                                         "answer": c, "split": split}) + "\n" for c, split in rows))
    out = tmp_path / "run"
    args = [str(ROOT / "examples" / "shapes-dataset.toml"), "--output-dir", str(out), "--set", "train.nproc=0",
            "--set", "rollout.prompts_per_step=4", "--set", f"env.args.path='{data / 'data.jsonl'}'"]
    assert main(["rl", *args, "--max-steps", "1"]) == 0
    state = json.loads((out / "checkpoints" / "state" / "step_1" / "run.json").read_text())
    assert state["draws"]["data_position"] == {"epoch": 0, "index": 4}
    assert main(["rl", *args, "--max-steps", "2", "--resume"]) == 0
    # Rows 4..7 were drawn after the resume: a fresh position would stand at index 4 again.
    assert json.loads((out / "checkpoints" / "data_position.json").read_text()) == {
        "step": 1, "position": {"epoch": 0, "index": 8}}
    assert [m["step"] for m in metrics_of(out)] == [0, 1]


def test_sft_into_a_directory_with_an_earlier_runs_metrics_is_refused_and_keeps_them(tmp_path, capsys):
    (tmp_path / "sft_metrics.jsonl").write_text('{"step": 0}\n')
    assert main(["sft", CONFIG, "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("already holds a run (sft_metrics.jsonl); choose a new --output-dir") and "\n" not in err
    assert (tmp_path / "sft_metrics.jsonl").read_text() == '{"step": 0}\n'
