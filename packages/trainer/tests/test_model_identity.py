"""model_identity: equal for the same directory anywhere, different for another config or init."""

import json
import shutil

from mmref.trainer.model_identity import model_identity
from mmref.trainer.task_tokenizer import task_tokenizer
from mmref.trainer.tiny_dir import write_tiny_model_dir


def _tiny(path, seed=0):
    return write_tiny_model_dir("qwen2-vl", path, tokenizer=task_tokenizer(None), seed=seed)


def test_identity_is_independent_of_where_the_directory_lives(tmp_path):
    first = _tiny(tmp_path / "a")
    copy = shutil.copytree(first, tmp_path / "elsewhere" / "model")
    assert model_identity(first) == model_identity(copy)


def test_identity_ignores_how_config_was_saved_but_not_what_it_says(tmp_path):
    model = _tiny(tmp_path / "a")
    before = model_identity(model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "transformers_version": "0.0.0"}))
    assert model_identity(model) == before
    (model / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    assert model_identity(model) != before


def test_another_random_init_has_another_identity(tmp_path):
    assert model_identity(_tiny(tmp_path / "a", seed=0)) != model_identity(_tiny(tmp_path / "b", seed=1))
