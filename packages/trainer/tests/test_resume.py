"""Resumable state: a saved and reloaded trainer continues exactly, draws and data position round-trip,
states commit atomically, and a run directory or config that does not fit is refused."""

import json
import random

import pytest
import torch

from mmref.client.envs.dataset.order import DataOrder
from mmref.renderers import ImageStore
from mmref.trainer.errors import ResumeError, RunDirError
from mmref.trainer.lr_schedule import lr_factor
from mmref.trainer.models import build_tiny_model
from mmref.trainer.pack import MicroBatch, pack
from mmref.trainer.resume import DrawState, RunStates, StatePlan, load_model_weights, load_trainer_state, \
    open_run_files, save_trainer_state
from mmref.trainer.run_config import RunConfig, TrainConfig, load_run_config
from mmref.trainer.step import PolicyTrainer
from trainer_cases import IMAGE_TOKENS, make_sample, processor, small_spec

# Warmup, cosine decay and weight decay: a trainer that lost its scheduler or Adam moments drifts by ~1e-3.
CONFIG = TrainConfig(lr=1e-2, warmup_steps=2, lr_decay="cosine", min_lr_ratio=0.1, weight_decay=0.1)
STEPS = 6


@pytest.fixture
def store(tmp_path):
    return ImageStore(tmp_path / "store")


def trainer_of(store, seed: int) -> PolicyTrainer:
    return PolicyTrainer(build_tiny_model("qwen2-vl", seed=seed), store=store, spec=small_spec("qwen2-vl"),
                         processor=processor("qwen2-vl"), config=CONFIG, image_token_ids=IMAGE_TOKENS,
                         total_steps=STEPS)


def batches(store) -> list[list[MicroBatch]]:
    """One micro-batch per step, each with its own images and advantages."""
    steps = []
    for step in range(STEPS):
        samples = [make_sample(store, "qwen2-vl", 3, [(10 * step + i, (64, 48))], 4, sampled=3,
                               advantage=(-1) ** (i + step) * (1 + step / 4), logprob=-11.0) for i in range(2)]
        steps.append([MicroBatch(step, pack(samples, 4096))])
    return steps


def max_weight_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_three_steps_saved_and_reloaded_then_three_more_equal_six_straight_steps(store, tmp_path):
    data = batches(store)
    straight = trainer_of(store, seed=0)
    for step in data[:3]:
        straight.step(step)
    save_trainer_state(straight, tmp_path / "state")
    saved = {name: p.detach().clone() for name, p in straight.model.named_parameters()}
    for step in data[3:]:
        straight.step(step)
    resumed = trainer_of(store, seed=1)  # other initial weights: everything must come from the state
    load_trainer_state(resumed, tmp_path / "state")
    assert resumed.scheduler.last_epoch == 3 and resumed.optimizer.param_groups[0]["lr"] == pytest.approx(
        CONFIG.lr * lr_factor(3, total_steps=STEPS, warmup_steps=2, decay="cosine", min_ratio=0.1))
    for step in data[3:]:
        resumed.step(step)
    assert max_weight_diff(straight.model, resumed.model) <= 1e-6
    served = build_tiny_model("qwen2-vl", seed=2)
    load_model_weights(served, tmp_path / "state")  # the serve model takes the weights only
    assert all(torch.equal(p, saved[name]) for name, p in served.named_parameters())


def test_draws_and_data_position_round_trip_through_json():
    rng, order = random.Random(5), DataOrder(size=7, seed=3)
    torch.manual_seed(11)
    for _ in range(9):
        rng.random(), order.next(), torch.rand(1)
    saved = DrawState.from_json(json.loads(json.dumps(DrawState.capture(rng, order).to_json())))
    expected = ([rng.random() for _ in range(3)], [order.next() for _ in range(10)], torch.rand(3))
    other_rng, other_order = random.Random(0), DataOrder(size=7, seed=3)
    saved.restore(other_rng, other_order)
    assert ([other_rng.random() for _ in range(3)], [other_order.next() for _ in range(10)]) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])


def commit_fake_state(states: RunStates, steps_done: int, config: RunConfig) -> None:
    pending = states.root / f"step_{steps_done}.tmp"
    pending.mkdir(parents=True)
    (pending / ".metadata").write_bytes(b"")
    states.commit(steps_done, config, DrawState.capture(random.Random(0), object()))


def test_commit_renames_the_pending_state_into_place_and_keeps_only_the_newest(tmp_path):
    states, config = RunStates(tmp_path / "state"), load_run_config(None, ["max_steps=6"])
    with pytest.raises(ResumeError, match="nothing to resume"):
        states.latest()
    (tmp_path / "state" / "step_4.tmp").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no trainer state"):
        states.commit(4, config, DrawState.capture(random.Random(0), object()))
    states.clear_pending()
    for steps_done in (2, 4):
        commit_fake_state(states, steps_done, config)
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["step_4"]
    latest = states.latest()
    assert (latest.steps_done, latest.config["max_steps"]) == (4, 6)
    plan = states.plan(config, latest)
    assert (plan.start_step, plan.resume_from, plan.due(5), plan.due(6)) == (4, str(latest.path), False, True)


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.hidden_size=32"], r"model is .*\"hidden_size\": 32.* but the saved run has .*\"hidden_size\": 64"),
    (["env.name='other'"], r"env is .* but the saved run has"),
    (["max_steps=4"], r"max_steps = 4 leaves nothing to run; raise it \(--max-steps 5 or more\)"),
])
def test_a_state_of_another_run_or_with_no_steps_left_is_a_one_line_resume_error(tmp_path, overrides, message):
    states = RunStates(tmp_path / "state")
    commit_fake_state(states, 4, load_run_config(None, ["max_steps=6"]))
    states.latest().check_fits(load_run_config(None, ["max_steps=9", "train.lr=1e-4", "train.nproc=2"]))
    with pytest.raises(ResumeError, match=message) as error:
        states.latest().check_fits(load_run_config(None, ["max_steps=6", *overrides]))
    assert "\n" not in str(error.value)


def test_a_new_run_refuses_a_directory_with_records_and_a_resumed_one_appends(tmp_path):
    files = (tmp_path / "metrics.jsonl", tmp_path / "rollouts.jsonl")
    open_run_files(tmp_path, files, "new")
    files[0].write_text('{"step": 0}\n')
    with pytest.raises(RunDirError, match=r"already holds a run \(metrics.jsonl\); pass --resume .* --output-dir"):
        open_run_files(tmp_path, files, "new")
    with pytest.raises(RunDirError, match=r"already holds a run \(metrics.jsonl\); choose a new --output-dir$"):
        open_run_files(tmp_path, files, "new", resumable=False)  # mmref sft: no --resume to offer
    open_run_files(tmp_path, files, "resume")
    assert files[0].read_text() == '{"step": 0}\n'
    open_run_files(tmp_path, files, "replace")
    assert files[0].read_text() == ""


def test_the_plan_is_due_every_n_steps_and_after_the_last():
    plan = StatePlan(root="s", every=2, max_steps=5)
    assert [n for n in range(1, 6) if plan.due(n)] == [2, 4, 5]
    assert [n for n in range(1, 6) if StatePlan(root="s", max_steps=5).due(n)] == [5]
