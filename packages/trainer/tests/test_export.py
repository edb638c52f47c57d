"""Step exports: written when due, replaced atomically, the newest ``keep_last`` kept by step number."""

import dataclasses
import json

from mmref.renderers.tokenizer import tiny_tokenizer
from mmref.trainer.export import StepExports
from mmref.trainer.policy import inspect_model_dir, load_policy
from mmref.trainer.task_tokenizer import RL_SPECIALS
from mmref.trainer.tiny_dir import write_tiny_model_dir


def exports(tmp_path, every, keep_last, max_steps):
    tokenizer = tiny_tokenizer(("red",), specials=RL_SPECIALS, alphabet="red ")
    policy = load_policy(write_tiny_model_dir("qwen2-vl", tmp_path / "model", tokenizer=tokenizer))
    return StepExports(tmp_path / "checkpoints", policy.model, policy.tokenizer, policy.processor, policy.family,
                       every=every, keep_last=keep_last, max_steps=max_steps)


def test_due_every_n_steps_and_after_the_last(tmp_path):
    five = exports(tmp_path, every=2, keep_last=None, max_steps=5)
    assert [n for n in range(1, 6) if five.due(n)] == [2, 4, 5]
    assert [n for n in range(1, 6) if dataclasses.replace(five, every=0).due(n)] == [5]


def test_keep_last_drops_the_oldest_by_step_number_not_by_name(tmp_path):
    run = exports(tmp_path, every=1, keep_last=2, max_steps=12)
    for step in (8, 9, 10):
        assert run.after_step(step).name == f"step_{step}"
    assert [p.name for p in run.existing()] == ["step_9", "step_10"]
    assert json.loads((run.root / "step_10" / "mmref.json").read_text())["weight_version"] == 10
    assert inspect_model_dir(run.root / "step_10").spec == inspect_model_dir(tmp_path / "model").spec
    assert not any(p.name.endswith(".tmp") for p in run.root.iterdir())
