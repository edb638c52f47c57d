"""``mmref rl`` on plug-in environments: the README's example by import path, and environments that raise."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mmref.trainer.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "examples" / "learnability.toml")
SMALL = ["--max-steps", "2", "--set", "train.nproc=0", "--set", "rollout.prompts_per_step=4",
         "--set", "rollout.group_size=2", "--set", "env.args={}"]

FLAKY = '''
class Flaky:
    made = 0

    def __init__(self, seed, mode="every-other"):
        Flaky.made += 1
        self.fail = mode == "always" or Flaky.made % 2 == 0

    def reset(self):
        return [{"role": "user", "content": "say yes"}]

    def step(self, text):
        if self.fail:
            raise ZeroDivisionError("the scorer divided by zero")
        return [], 1.0, True
'''


def readme_environment() -> str:
    """The Python block of the README's "Your own task" section."""
    section = (ROOT / "README.md").read_text().split("## Your own task", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


@pytest.fixture
def module_dir(tmp_path, monkeypatch):
    """A temp dir on sys.path for a test's environment module (forgotten afterwards)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("readme_task", "flaky_env"):
        sys.modules.pop(name, None)


def metrics_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(300)
def test_the_readme_environment_runs_by_import_path_and_the_viewer_shows_its_question(module_dir, tmp_path):
    code = readme_environment()
    assert len(code.strip().splitlines()) <= 25  # "a complete environment of about 20 lines"
    (module_dir / "readme_task.py").write_text(code)
    out = tmp_path / "run"
    assert main(["rl", CONFIG, "--output-dir", str(out), *SMALL, "--set", "env.name=readme_task:RedSide"]) == 0
    metrics = metrics_of(out)
    assert [(m["step"], m["rollouts"], m["rollouts_dropped"]) for m in metrics] == [(0, 8, 0), (1, 8, 0)]
    turns = [json.loads(line)["turns"][0] for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert turns and all(t["user_text"] == "Which side is the red square on?" and len(t["images"]) == 1
                         for t in turns)


@pytest.mark.timeout(300)
def test_an_environment_that_raises_loses_its_groups_counted_and_logged_not_the_run(module_dir, tmp_path):
    (module_dir / "flaky_env.py").write_text(FLAKY)
    out = tmp_path / "run"
    assert main(["rl", CONFIG, "--output-dir", str(out), *SMALL, "--set", "env.name=flaky_env:Flaky"]) == 0
    # the factory's probe is episode 1; then every second episode (a group of 2) raises
    assert [(m["rollouts"], m["rollouts_dropped"]) for m in metrics_of(out)] == [(4, 4), (4, 4)]
    log = (out / "env_errors.log").read_text()
    assert log.count("ZeroDivisionError: the scorer divided by zero") >= 4 and "Traceback" in log


@pytest.mark.timeout(300)
def test_a_step_whose_every_group_failed_ends_the_run_with_the_cause(module_dir, tmp_path, capsys):
    (module_dir / "flaky_env.py").write_text(FLAKY)
    out = tmp_path / "run"
    assert main(["rl", CONFIG, "--output-dir", str(out), *SMALL, "--set", "env.name=flaky_env:Flaky",
                 "--set", "env.args={mode='always'}"]) == 1
    err = capsys.readouterr().err
    assert "EnvFailedError" in err and "every one of 4 groups failed" in err and "divided by zero" in err


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """A small dataset written by the shapes example's generator: 12 train and 4 eval rows."""
    data = tmp_path_factory.mktemp("shapes")
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_shapes_dataset.py"), str(data), "--rows", "12",
                    "--eval-rows", "4", "--tasks", "colour", "count"], check=True, capture_output=True, timeout=120)
    return data / "data.jsonl"


def shapes_args(shapes: Path, steps: int) -> list[str]:
    return [str(ROOT / "examples" / "shapes-dataset.toml"), "--max-steps", str(steps), "--set", "train.nproc=0",
            "--set", "rollout.prompts_per_step=4", "--set", f"env.args.path='{shapes}'"]


@pytest.mark.timeout(300)
def test_the_shapes_example_generates_a_dataset_that_rl_and_sft_train_on(shapes, tmp_path):
    rows = [json.loads(line) for line in shapes.read_text().splitlines()]
    assert [r["split"] for r in rows].count("eval") == 4 and all(len(r["images"]) == 2 for r in rows)
    assert {r["answer"] for r in rows if r["task"] == "count"} <= {"A", "B"}
    assert main(["rl", *shapes_args(shapes, 1), "--output-dir", str(tmp_path / "rl")]) == 0
    turns = [json.loads(line)["turns"][0] for line in (tmp_path / "rl" / "rollouts.jsonl").read_text().splitlines()]
    assert all(len(t["images"]) == 2 and t["user_text"].endswith("?") for t in turns)
    assert json.loads((tmp_path / "rl" / "checkpoints" / "data_position.json").read_text())["position"] == {
        "epoch": 0, "index": 4}  # one step of 4 prompts: 4 rows drawn
    assert main(["sft", *shapes_args(shapes, 1), "--output-dir", str(tmp_path / "sft")]) == 0
    assert (tmp_path / "sft" / "checkpoints" / "sft" / "model.safetensors").exists()


@pytest.mark.timeout(300)
def test_greedy_eval_is_in_the_metrics_and_mmref_eval_of_the_last_checkpoint_repeats_it_exactly(shapes, tmp_path):
    evals = ["--set", "eval.every=2", "--set", "eval.before_training=true", "--set", "eval.num_examples=4"]
    assert main(["rl", *shapes_args(shapes, 3), "--output-dir", str(tmp_path / "rl"), *evals]) == 0
    logged = [(m["step"], [(e["weight_version"], e["rollouts"]) for e in m.get("evals", [])])
              for m in metrics_of(tmp_path / "rl")]
    assert logged == [(0, [(0, 4)]), (1, [(2, 4)]), (2, [(3, 4)])]  # before training, every 2 steps, after the last
    last = metrics_of(tmp_path / "rl")[-1]["evals"][0]
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(["eval", *shapes_args(shapes, 1), "--output-dir", str(out), "--set", "eval.num_examples=4",
                     "--checkpoint", str(tmp_path / "rl" / "checkpoints" / "step_3")]) == 0
        replies = sorted(json.loads(line)["turns"][0]["completion"] for line in
                         (out / "eval" / "rollouts.jsonl").read_text().splitlines())
        runs.append((json.loads((out / "eval" / "eval.json").read_text()), replies))
    assert runs[0] == runs[1] and runs[0][0] == last  # temperature 0: the same weights answer alike
