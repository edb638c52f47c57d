"""A model directory is the model: its processor config gives the layout spec, and each broken part is named."""

import json

import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from mmref.client.envs.color_codeword import QUESTION
from mmref.renderers import ImageStore, layout_spec, make_ref
from mmref.renderers.contract import verify_ref
from mmref.renderers.errors import ContractMismatchError
from mmref.renderers.layout import spec_from_image_processor
from mmref.renderers.tokenizer import tiny_tokenizer
from mmref.trainer.errors import IncompleteModelDirError, ModelDirError, ProcessorConfigError, UnsupportedModelError
from mmref.trainer.models import TinySize, build_tiny_model, vision_token_ids
from mmref.trainer.policy import inspect_model_dir, load_policy
from mmref.trainer.environments import run_environment
from mmref.trainer.policy_setup import build_policy
from mmref.trainer.task_tokenizer import RL_SPECIALS, task_tokenizer
from mmref.trainer.run_config import load_run_config
from mmref.trainer.tiny_dir import write_tiny_model_dir
from trainer_cases import DIR_MAX_PIXELS as MAX_PIXELS, DIR_MIN_PIXELS as MIN_PIXELS, sharded_qwen_dir


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return sharded_qwen_dir(tmp_path_factory.mktemp("qwen") / "model")


@pytest.fixture(scope="module")
def qwen_policy(qwen_dir):
    return load_policy(qwen_dir)


@pytest.fixture
def small_dir(tmp_path):
    """A sharded tiny model with a 20-token vocabulary: cheap to copy and break."""
    tokenizer = tiny_tokenizer(("red",), specials=RL_SPECIALS, alphabet="red ")
    return write_tiny_model_dir("qwen2-vl", tmp_path / "model", tokenizer=tokenizer, max_shard_size="50KB")


def test_sharded_dir_loads_with_its_processor_configs_fingerprint(qwen_dir, qwen_policy):
    index = json.loads((qwen_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    policy = qwen_policy
    theirs = spec_from_image_processor("qwen2-vl", AutoImageProcessor.from_pretrained(qwen_dir))
    assert (policy.family, policy.spec.min_pixels, policy.spec.max_pixels) == ("qwen2-vl", MIN_PIXELS, MAX_PIXELS)
    assert policy.spec.fingerprint == theirs.fingerprint != layout_spec("qwen2-vl").fingerprint
    assert len(policy.tokenizer) == 151_669 and policy.tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151_655
    assert policy.model.config.image_token_id == 151_655 and policy.tokenizer.chat_template


def test_run_config_pixel_override_applies_on_top_of_the_dir(qwen_dir):
    policy = inspect_model_dir(qwen_dir, max_pixels=16 * 28 * 28)
    assert (policy.spec.min_pixels, policy.spec.max_pixels) == (MIN_PIXELS, 16 * 28 * 28)
    assert policy.processor.size["longest_edge"] == 16 * 28 * 28


def test_ref_made_with_the_default_spec_is_refused_by_the_dirs_spec(qwen_policy, tmp_path):
    spec = qwen_policy.spec
    stored = ImageStore(tmp_path).put_image(Image.new("RGB", (300, 200), "red"))
    verify_ref(make_ref(spec, stored), spec, stage="trainer")
    with pytest.raises(ContractMismatchError, match="max_pixels 12845056 \\(ref\\) != 37632"):
        verify_ref(make_ref(layout_spec("qwen2-vl"), stored), spec, stage="trainer")


def test_rl_default_dir_is_the_tiny_model_and_task_tokenizer_of_before(tmp_path):
    """The learning runs' starting point: same weights for the seed, same token ids, same RNG state after."""
    config = load_run_config(None, [f"output_dir='{tmp_path}'", "model.seed=3"])
    vocabulary = run_environment(config).vocabulary()
    policy = build_policy(config, vocabulary)
    after_load = torch.get_rng_state()
    tokenizer = task_tokenizer(vocabulary)  # the tokenizer of before plug-ins: see test_environments
    size = TinySize(hidden_size=config.model.hidden_size, num_layers=config.model.num_layers,
                    vision_depth=config.model.vision_depth)
    before = build_tiny_model("qwen2-vl", seed=3, vocab_size=len(tokenizer), size=size,
                              token_ids=vision_token_ids(tokenizer))
    assert torch.equal(after_load, torch.get_rng_state())
    ours = policy.model.state_dict()
    assert all(torch.equal(tensor, ours[name]) for name, tensor in before.state_dict().items())
    sample = f"<|im_start|>user\n{QUESTION}<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n {vocabulary.words[0]}"
    assert policy.tokenizer(sample).input_ids == tokenizer(sample).input_ids
    assert policy.tokenizer.decode([0, 1, 2]) == tokenizer.decode([0, 1, 2])
    assert policy.spec == layout_spec("qwen2-vl", min_pixels=56 * 56, max_pixels=112 * 112)


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _drop_a_shard(d):
    shards = sorted(set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values()))
    (d / shards[-1]).unlink()


BROKEN = {
    "no config": (lambda d: (d / "config.json").unlink(), IncompleteModelDirError, "no config.json"),
    "no weights": (lambda d: [p.unlink() for p in d.glob("model*.safetensors*")], IncompleteModelDirError,
                   "no model.safetensors or pytorch_model.bin"),
    "a shard missing": (_drop_a_shard, IncompleteModelDirError, "weight shard\\(s\\) that are missing: model-000"),
    "no tokenizer": (lambda d: (d / "tokenizer.json").unlink(), IncompleteModelDirError, "no tokenizer.json"),
    "no processor config": (lambda d: (d / "preprocessor_config.json").unlink(), IncompleteModelDirError,
                            "no preprocessor_config.json"),
    "another model's tokenizer": (lambda d: _edit_json(d / "config.json", image_token_id=3), ModelDirError,
                                  "<\\|image_pad\\|> at id 13 but config.json image_token_id is 3"),
    "untrainable family": (lambda d: _edit_json(d / "config.json", model_type="llava"), UnsupportedModelError,
                           "model_type 'llava' has no trainable mmref family"),
    "no resize": (lambda d: _edit_json(d / "preprocessor_config.json", do_resize=False), ProcessorConfigError,
                  "do_resize False \\(processor config\\) != True \\(layout math\\)"),
    "patch off the tower": (lambda d: _edit_json(d / "preprocessor_config.json", patch_size=16), ProcessorConfigError,
                            "patch_size 16 but config.json vision_config patch_size is 14"),
    "foreign processor": (lambda d: _edit_json(d / "preprocessor_config.json",
                                               image_processor_type="SiglipImageProcessor"),
                          ProcessorConfigError, "'SiglipImageProcessor' is not a Qwen-VL image processor"),
    "no normalize": (lambda d: _edit_json(d / "preprocessor_config.json", do_normalize=False), ProcessorConfigError,
                   "do_normalize False"),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_each_broken_dir_is_a_typed_error_naming_what_is_wrong(small_dir, case):
    load_policy(small_dir)  # the intact directory loads
    breaks, error, needle = BROKEN[case]
    breaks(small_dir)
    with pytest.raises(error, match=needle) as info:
        load_policy(small_dir)
    assert "\n" not in str(info.value)


def test_a_path_that_is_not_a_directory_is_named(tmp_path):
    with pytest.raises(IncompleteModelDirError, match="does not exist.*mmref init"):
        load_policy(tmp_path / "nope")


def test_export_of_a_loaded_dir_loads_again_with_the_override_written(small_dir, tmp_path):
    from mmref.trainer.export import export_model_dir

    policy = load_policy(small_dir, min_pixels=28 * 28, max_pixels=8 * 28 * 28)
    out = export_model_dir(policy.model, policy.tokenizer, policy.processor, tmp_path / "out")
    again = load_policy(out)
    assert again.spec == policy.spec and again.spec.max_pixels == 8 * 28 * 28
    assert not (tmp_path / "out.tmp").exists() and (out / "chat_template.jinja").exists()
