"""Run configs: the shipped example loads, unknown keys and bad values are named, overrides apply; inference
server keys that would be ignored are refused, and the child server gets the ones set as `mmref serve` flags."""

from pathlib import Path

import pytest

from mmref.trainer.cli import build_parser
from mmref.trainer.inference import load_served_model
from mmref.trainer.run_config import ConfigError, load_run_config, parse_override
from mmref.trainer.serve_process import serve_flags

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


@pytest.mark.parametrize(("overrides", "mode"), [
    ([], "in_process"), (["inference.engine='vllm'"], "child"), (["inference.process='child'"], "child"),
    (["inference.url='http://host:8000'", "inference.engine='vllm'"], "url"),
])
def test_inference_mode_defaults_by_engine(overrides, mode):
    assert load_run_config(EXAMPLE, overrides).inference.mode == mode


@pytest.mark.parametrize(("overrides", "needle"), [
    (["inference.gpu_memory_utilization=0.5"], "gpu_memory_utilization applies to inference.engine = 'vllm' only"),
    (["inference.tensor_parallel_size=2", "inference.process='child'"], "tensor_parallel_size applies to"),
    (["inference.engine='vllm'", "inference.process='in_process'"], "runs in a server process"),
    (["inference.url='http://h:1'", "inference.max_model_len=512"], "inference.max_model_len sets up a server"),
    (["inference.url='http://h:1'", "inference.process='child'"], "inference.process sets up a server"),
    (["inference.url='http://h:1'", "inference.port=9000"], "inference.port sets up a server"),
])
def test_inference_keys_that_would_be_ignored_are_refused(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_run_config(EXAMPLE, overrides)


def test_child_server_flags_carry_the_runs_server_keys_and_pixel_limits():
    config = load_run_config(EXAMPLE, ["inference.engine='vllm'", "inference.gpu_memory_utilization=0.4",
                                       "inference.tensor_parallel_size=2", "inference.max_model_len=4096",
                                       "model.max_pixels=50176"])
    assert serve_flags(config.inference, config.model, "bfloat16") == [
        "--min-pixels", str(config.model.min_pixels), "--max-pixels", "50176", "--dtype", "bfloat16",
        "--max-model-len", "4096",
        "--gpu-memory-utilization", "0.4", "--tensor-parallel-size", "2"]
    assert build_parser().parse_args(["serve", "--store", "s", *serve_flags(config.inference, config.model, "float32")])


def test_transformers_server_refuses_vllm_settings_before_loading_anything():
    with pytest.raises(ValueError, match="gpu_memory_utilization: vLLM engine settings, but the engine is"):
        load_served_model("no-such-dir", vllm_args={"gpu_memory_utilization": 0.5})
