"""The run's environment from ``[env]``: args from TOML and overrides, the ablation, and the task's tokenizer."""

from pathlib import Path

import pytest

from mmref.client.environment import Vocabulary
from mmref.client.envs.color_codeword import QUESTION, SYSTEM_PROMPT, ColorCodewordEnv
from mmref.client.errors import EnvLoadError
from mmref.renderers.tokenizer import tiny_tokenizer
from mmref.trainer.environments import EVAL_SEED_BASE, eval_episodes, run_environment
from mmref.trainer.run_config import load_run_config
from mmref.trainer.task_tokenizer import RL_SPECIALS, task_tokenizer

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def test_env_args_come_from_the_toml_table_and_overrides():
    config = load_run_config(EXAMPLES / "learnability.toml", ["env.args.colors=3"])
    assert config.env.name == "color-codeword" and config.env.args["colors"] == 3 and config.env.args["turns"] == 1
    source = run_environment(config)
    assert source.config.colors == 3 and not source.config.system_prompt


def test_ablate_images_asks_the_factory_for_blank_images_and_refuses_one_without_that_option(tmp_path, monkeypatch):
    config = load_run_config(EXAMPLES / "learnability.toml", ["env.ablate_images=true"])
    episode = run_environment(config).episode(3)
    assert isinstance(episode, ColorCodewordEnv) and episode.config.blank_images
    (tmp_path / "plain_env_mod.py").write_text(
        "class E:\n    def reset(self):\n        return []\n    def step(self, text):\n        return [], 0.0, True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = load_run_config(None, ["env.name='plain_env_mod:E'", "env.ablate_images=true"])
    with pytest.raises(EnvLoadError, match="'plain_env_mod:E' has no blank_images option"):
        run_environment(config)


def test_color_codeword_vocabulary_builds_the_tokenizer_the_task_had_before_plugins():
    # Before environments were plug-ins, rl.py built this tokenizer from the task's own constants.
    words = ("red", "green", "blue", "yellow")
    roles = ("system", "user", "assistant", "codeword")
    text = SYSTEM_PROMPT + QUESTION + "".join(words + roles) + " \n"
    before = tiny_tokenizer(words + roles, specials=RL_SPECIALS, alphabet="".join(sorted(set(text))))
    config = load_run_config(EXAMPLES / "color-codeword.toml")
    after = task_tokenizer(run_environment(config).vocabulary())
    assert after.backend_tokenizer.to_str() == before.backend_tokenizer.to_str()


def test_answer_words_are_single_tokens_and_no_vocabulary_encodes_any_text():
    tokenizer = task_tokenizer(Vocabulary(words=("left", "right"), prompt_words=("which",), text="Which way?"))
    assert [len(tokenizer.encode(w)) for w in ("left", "right", " which")] == [1, 1, 1]
    anything = task_tokenizer(None)
    assert anything.decode(anything.encode("Ünïcode & 42!")) == "Ünïcode & 42!"


def test_eval_episodes_of_a_seeded_env_use_seeds_training_never_draws_and_a_dataset_uses_its_split(tmp_path):
    source = run_environment(load_run_config(EXAMPLES / "learnability.toml"))
    episodes = eval_episodes(source, "eval", 3)
    assert [e.seed for e in episodes] == [EVAL_SEED_BASE, EVAL_SEED_BASE + 1, EVAL_SEED_BASE + 2]
    assert EVAL_SEED_BASE >= 2**31  # the orchestrator draws training seeds with randrange(2**31)
    rows = "".join(f'{{"question": "q{i}", "answer": "a", "image": "", "split": "{s}"}}\n'
                   for i, s in enumerate(["train", "eval", "train", "eval"]))
    (tmp_path / "d.jsonl").write_text(rows)
    config = load_run_config(None, ["env.name='dataset'", f"env.args={{path='{tmp_path / 'd.jsonl'}', "
                                    "image_column='', split_column='split'}"])
    source = run_environment(config)
    assert [e.row["question"] for e in eval_episodes(source, "eval", 5)] == ["q1", "q3"]
    assert [e.row["question"] for e in eval_episodes(source, "train", 1)] == ["q0"]
