"""The color-codeword environment: rewards, turn structure, ablation, determinism."""

import base64
import io
import random

import pytest
from PIL import Image

from mmref.client.envs.color_codeword import (
    COLORS,
    ColorCodewordConfig,
    ColorCodewordEnv,
    draw_shape_image,
    score_answer,
)


def image_of(message):
    url = message["content"][0]["image_url"]["url"]
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def test_perfect_answers_score_one_and_episode_has_configured_turns():
    env = ColorCodewordEnv(ColorCodewordConfig(turns=3), seed=1)
    messages = env.reset()
    assert [m["role"] for m in messages] == ["system", "user"]
    for turn in range(3):
        new, reward, done = env.step(env.targets[-1].upper() + ".")
        assert done == (turn == 2) and len(new) == (0 if done else 1)
    assert reward == 1.0


def test_wrong_and_partial_answers_give_fractional_reward():
    env = ColorCodewordEnv(ColorCodewordConfig(turns=2), seed=2)
    env.reset()
    env.step(env.targets[-1])
    _, reward, done = env.step("nothing")
    assert done and reward == 0.5


def test_step_after_end_is_an_error():
    env = ColorCodewordEnv(ColorCodewordConfig(turns=1), seed=0)
    env.reset()
    env.step("red")
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step("red")


def test_image_shows_the_target_colour_and_blank_ablation_does_not():
    env = ColorCodewordEnv(ColorCodewordConfig(turns=1), seed=5)
    image = image_of(env.reset()[1])
    assert COLORS[env.targets[0]] in {c for _, c in image.getcolors(1 << 16)}
    blank = ColorCodewordEnv(ColorCodewordConfig(turns=1, blank_images=True), seed=5)
    blank_image = image_of(blank.reset()[1])
    assert blank_image.size == image.size and len(blank_image.getcolors()) == 1


def test_sizes_vary_and_seeds_are_deterministic():
    sizes = {draw_shape_image(random.Random(s), "red", 40 + s, 50).size for s in range(5)}
    assert len(sizes) == 5
    a, b = ColorCodewordEnv(seed=9), ColorCodewordEnv(seed=9)
    assert a.reset() == b.reset() and a.targets == b.targets


@pytest.mark.parametrize("kwargs", [dict(colors=1), dict(colors=99), dict(turns=0), dict(min_side=100, max_side=50)])
def test_bad_config_is_named(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs)).split("_")[0]):
        ColorCodewordConfig(**kwargs)


def test_score_answer_uses_first_word_only():
    assert score_answer(" Red, obviously", "red") == 1.0
    assert score_answer("it is red", "red") == 0.0
    assert score_answer("", "red") == 0.0
