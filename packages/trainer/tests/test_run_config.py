"""Run configs: the shipped example loads, unknown keys and bad values are named, overrides apply."""

from pathlib import Path

import pytest

from mmref.trainer.run_config import ConfigError, load_run_config, parse_override

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "color-codeword.toml"


def test_example_config_loads():
    config = load_run_config(EXAMPLE)
    assert config.env.name == "color-codeword" and config.model.family == "qwen2-vl"


def test_overrides_are_parsed_as_toml_and_applied():
    config = load_run_config(EXAMPLE, ["rollout.group_size=4", "env.ablate_images=true", "output_dir=out/x"])
    assert (config.rollout.group_size, config.env.ablate_images, config.output_dir) == (4, True, "out/x")
    assert parse_override("train.lr = 1e-4") == ("train.lr", 1e-4)


@pytest.mark.parametrize("override,needle", [
    ("rollout.grup_size=4", "rollout.grup_size: Extra inputs are not permitted"),
    ("rollout.group_size=1", "rollout.group_size: Input should be greater than or equal to 2"),
    ("model.family='llava'", "model.family"),
    ("model.min_pixels=999999", "min_pixels 999999 > max_pixels"),
    ("nonsense", "section.key=value"),
])
def test_bad_keys_and_values_are_named(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_run_config(EXAMPLE, [override])


def test_missing_and_malformed_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("max_steps = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_run_config(tmp_path / "bad.toml")
