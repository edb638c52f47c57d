"""Our requests in vLLM's types (pure translation; vLLM itself is not needed)."""

import importlib.util
from types import SimpleNamespace

import pytest

from mmref.trainer.inference.api import SamplingParams
from mmref.trainer.inference.serving import load_served_model
from mmref.trainer.inference.validate import RequestError
from mmref.trainer.inference.vllm_engine import BANNED_LOGIT_BIAS, choices_from_output, collapse_image_pads, \
    sampling_kwargs, tokens_prompt


def test_tokens_prompt_keys_images_by_sha256_and_gives_each_one_pad_for_vllm_to_expand():
    ids, types = [1, 5, 9, 9, 9, 6, 5, 9, 9, 6, 2], [0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0]
    prompt = tokens_prompt(ids, types, ["img-a", "img-b"], ["a" * 64, "b" * 64])
    assert prompt == {"prompt_token_ids": [1, 5, 9, 6, 5, 9, 6, 2], "multi_modal_data": {"image": ["img-a", "img-b"]},
                      "multi_modal_uuids": {"image": ["a" * 64, "b" * 64]}}
    assert tokens_prompt([1], [0], [], []) == {"prompt_token_ids": [1]}
    with pytest.raises(ValueError, match="2 images but 1 hashes"):
        tokens_prompt([1], [0], ["x", "y"], ["a" * 64])
    with pytest.raises(ValueError, match="1 images but 2 runs of image pads"):
        tokens_prompt(ids, types, ["img-a"], ["a" * 64])


def test_collapse_keeps_the_first_pad_of_each_run():
    assert collapse_image_pads([7, 9, 9, 9, 8], [0, 1, 1, 1, 0]) == [7, 9, 8]
    assert collapse_image_pads([9, 9, 8, 9], [1, 1, 0, 1]) == [9, 8, 9]
    with pytest.raises(ValueError, match="3 token ids but 2 token types"):
        collapse_image_pads([1, 2, 3], [0, 0])


def test_sampling_bans_image_tokens_and_merges_stops():
    kwargs = sampling_kwargs(SamplingParams(n=4, temperature=0.7, max_tokens=9, stop_token_ids=[7], seed=3),
                             banned_token_ids=[151655, 151652], stop_token_ids=[151645])
    assert kwargs["logit_bias"] == {151655: BANNED_LOGIT_BIAS, 151652: BANNED_LOGIT_BIAS}
    assert kwargs["stop_token_ids"] == [7, 151645] and kwargs["n"] == 4 and kwargs["logprobs"] == 0


def test_top_p_below_one_is_refused_as_vllm_would_report_truncated_logprobs():
    with pytest.raises(RequestError, match="top_p=0.9 is not supported by the vllm engine"):
        sampling_kwargs(SamplingParams(top_p=0.9), banned_token_ids=[], stop_token_ids=[])


def test_choices_from_request_output():
    step = lambda token, lp: {token: SimpleNamespace(logprob=lp)}  # noqa: E731
    output = SimpleNamespace(outputs=[
        SimpleNamespace(token_ids=[5, 151645], logprobs=[step(5, -0.5), step(151645, -0.1)], finish_reason="stop"),
        SimpleNamespace(token_ids=[6], logprobs=[step(6, -2.0)], finish_reason="length"),
    ])
    choices = choices_from_output(output)
    assert [(c.token_ids, c.logprobs, c.finish_reason) for c in choices] == [
        ([5, 151645], [-0.5, -0.1], "stop"), ([6], [-2.0], "length")]


def test_serving_with_vllm_without_the_extra_says_how_to_get_it():
    pytest.importorskip("torch")
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed: integration-tests/test_vllm_e2e.py covers the engine")
    with pytest.raises(ValueError, match="needs the 'vllm' extra"):
        load_served_model("tiny-qwen2-vl", engine="vllm")


def test_unknown_engine_is_named():
    with pytest.raises(ValueError, match="unknown engine 'sglang'"):
        load_served_model("tiny-qwen2-vl", engine="sglang")
