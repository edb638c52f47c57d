"""The learning-rate schedule: warmup, decay shapes, and the rate each step actually used."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mmref.renderers import ImageStore
from mmref.trainer.lr_schedule import lr_factor
from mmref.trainer.models import build_tiny_model
from mmref.trainer.pack import MicroBatch, pack
from mmref.trainer.run_config import TrainConfig
from mmref.trainer.step import PolicyTrainer
from trainer_cases import IMAGE_TOKENS, make_sample, processor, small_spec


@given(total=st.integers(2, 200), warmup=st.integers(0, 20), decay=st.sampled_from(["constant", "linear", "cosine"]),
       min_ratio=st.floats(0, 1))
def test_warmup_rises_to_the_peak_then_decay_never_rises_and_ends_at_min_ratio(total, warmup, decay, min_ratio):
    warmup = min(warmup, total - 1)
    factors = [lr_factor(s, total_steps=total, warmup_steps=warmup, decay=decay, min_ratio=min_ratio)
               for s in range(total)]
    assert all(0 < f <= 1 for f in factors[:warmup])
    assert factors[:warmup] == sorted(factors[:warmup])
    assert factors[warmup] == 1.0  # the peak, on the first step after warmup
    after = factors[warmup:]
    assert all(a >= b - 1e-12 for a, b in zip(after, after[1:]))
    decays = decay != "constant" and len(after) > 1
    assert factors[-1] == pytest.approx(min_ratio if decays else 1.0)


def test_each_step_reports_and_uses_the_scheduled_rate(tmp_path):
    store = ImageStore(tmp_path / "store")
    config = TrainConfig(lr=1e-2, warmup_steps=2, lr_decay="linear", min_lr_ratio=0.1)
    trainer = PolicyTrainer(build_tiny_model("qwen2-vl"), store=store, spec=small_spec("qwen2-vl"),
                            processor=processor("qwen2-vl"), config=config, image_token_ids=IMAGE_TOKENS,
                            total_steps=5)
    batch = MicroBatch(0, pack([make_sample(store, "qwen2-vl", 3, [(0, (64, 48))], 4, sampled=3, advantage=1.0,
                                            logprob=-11.0)], 4096))
    rates = [trainer.step([batch]).lr for _ in range(5)]
    assert rates == pytest.approx([5e-3, 1e-2, 1e-2, 5.5e-3, 1e-3])
