"""Forward checks, the policy loss, a full step on each tiny model, and checkpoint round trips."""

import dataclasses

import pytest
import torch

from mmref.renderers import ImageStore
from mmref.renderers.errors import SlotError
from mmref.trainer.checkpoint import load_weights_into, read_checkpoint_meta, save_checkpoint
from mmref.trainer.errors import ImageTokenMismatchError
from mmref.trainer.forward import forward_row, vision_tower
from mmref.trainer.loss import policy_loss
from mmref.trainer.materialize import Materializer
from mmref.trainer.models import build_tiny_model, image_token_ids_of
from mmref.trainer.pack import MicroBatch, pack
from mmref.trainer.run_config import TrainConfig
from mmref.trainer.step import PolicyTrainer, StepMetrics, frozen_copy
from trainer_cases import FAMILIES, IMAGE_TOKENS, PAD, make_sample, processor, small_spec


@pytest.fixture
def store(tmp_path):
    return ImageStore(tmp_path / "store")


def trainer_for(family, store, model=None, **config):
    model = model or build_tiny_model(family)
    return PolicyTrainer(model, store=store, spec=small_spec(family), processor=processor(family),
                         config=TrainConfig(lr=1e-2, **config), image_token_ids=image_token_ids_of(model))


def materialized(store, sample, family="qwen2-vl"):
    return Materializer(store, small_spec(family), processor(family)).materialize(pack([sample], 4096))[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_one_step_is_finite_reaches_the_vision_tower_and_changes_weights(family, store):
    samples = [make_sample(store, family, 3, [(i, (64, 48))], 4, sampled=3, advantage=(-1) ** i, logprob=-11.0)
               for i in range(4)]
    trainer = trainer_for(family, store)
    vision = vision_tower(trainer.model).patch_embed.proj.weight
    before = vision.detach().clone()
    metrics = trainer.step([MicroBatch(0, pack(samples, 4096))])
    assert all(torch.isfinite(torch.tensor(v)) for v in dataclasses.astuple(metrics))
    assert metrics.loss_tokens == 12 and metrics.images_processed == 4 and metrics.grad_norm > 0
    assert not torch.equal(vision.detach(), before)


def test_pad_count_that_disagrees_with_grids_fails_before_the_vision_tower(store):
    sample = make_sample(store, "qwen2-vl", 3, [(1, (64, 48))], 2)
    batch = materialized(store, sample)
    broken = dataclasses.replace(batch, image_grid_thw=batch.image_grid_thw * torch.tensor([[1, 2, 1]]))
    with pytest.raises(ImageTokenMismatchError, match=rf"{sample.images[0].length} image-pad tokens \(id {PAD}\).*"
                                                      rf"{sample.images[0].length * 2} features; assets: "):
        forward_row(build_tiny_model("qwen2-vl"), broken, None, IMAGE_TOKENS, 2)


def test_sampled_image_tokens_are_rejected_or_masked(store):
    sample = make_sample(store, "qwen2-vl", 3, [(1, (64, 48))], 3)
    batch = materialized(store, sample)
    start = sample.images[0].offset - 1  # <|vision_start|> marked as sampled: a corrupted trace
    mask = batch.loss_mask.clone()
    mask[start] = True
    corrupted = dataclasses.replace(batch, loss_mask=mask)
    model = build_tiny_model("qwen2-vl")
    with pytest.raises(ImageTokenMismatchError, match=f"positions \\[{start}\\]"):
        forward_row(model, corrupted, model.model.get_rope_index, IMAGE_TOKENS, 2)
    out = forward_row(model, corrupted, model.model.get_rope_index, IMAGE_TOKENS, 2, sampled_image_tokens="mask")
    assert out.masked_sampled_image_tokens == 1 and not out.loss_mask.any()


def test_logprobs_never_put_mass_on_image_tokens(store):
    sample = make_sample(store, "qwen2-vl", 3, [(1, (64, 48))], 3, sampled=3)
    model = build_tiny_model("qwen2-vl")
    out = forward_row(model, materialized(store, sample), model.model.get_rope_index, IMAGE_TOKENS, 2, positions="all")
    banned = torch.isin(torch.tensor(sample.token_ids[1:]), torch.tensor(sorted(IMAGE_TOKENS)))
    assert banned.sum() == sample.images[0].length + 2  # pads, vision start and end
    assert torch.isinf(out.logprobs[banned]).all() and torch.isfinite(out.logprobs[~banned]).all()


def test_policy_loss_clips_asymmetrically_and_counts():
    logp = torch.tensor([0.0, 0.0, 0.0, -5.0], requires_grad=True)
    inference = torch.log(torch.tensor([0.5, 2.0, 1.0, 1.0]))  # ratios 2.0, 0.5, 1.0, ~0
    advantages = torch.tensor([1.0, -1.0, 1.0, 1.0])
    mask = torch.tensor([True, True, True, False])
    out = policy_loss(logp, inference, advantages, mask, torch.zeros(4), clip_low=0.2, clip_high=0.28)
    # token 0: min(2*1, 1.28*1) = 1.28; token 1: min(0.5*-1, 0.8*-1) = -0.8; token 2: 1.0
    assert out.loss_sum.item() == pytest.approx(-(1.28 - 0.8 + 1.0))
    assert (out.tokens, out.clipped) == (3, 2)
    out.loss_sum.backward()
    assert logp.grad[0] == 0 and logp.grad[3] == 0 and logp.grad[2] != 0


def test_policy_loss_kl_term_is_zero_at_the_reference():
    logp = torch.tensor([-1.0, -2.0])
    mask = torch.tensor([True, True])
    base = policy_loss(logp, logp, torch.ones(2), mask, torch.zeros(2))
    with_kl = policy_loss(logp, logp, torch.ones(2), mask, torch.zeros(2), kl_coef=0.5, ref_logprobs=logp)
    assert with_kl.loss_sum.item() == pytest.approx(base.loss_sum.item())
    far = policy_loss(logp, logp, torch.ones(2), mask, torch.zeros(2), kl_coef=0.5, ref_logprobs=logp - 1)
    assert far.loss_sum.item() > base.loss_sum.item()


def test_checkpoint_round_trip_reproduces_logprobs(store, tmp_path):
    sample = make_sample(store, "qwen2-vl", 3, [(1, (64, 48))], 4, sampled=3, advantage=1.0, logprob=-11.0)
    trainer = trainer_for("qwen2-vl", store)
    trainer.step([MicroBatch(0, pack([sample], 4096))])
    path = save_checkpoint(trainer.model, tmp_path / "ckpt" / "step-1", "qwen2-vl", weight_version=1)
    assert read_checkpoint_meta(path) == {"family": "qwen2-vl", "weight_version": 1}
    fresh = build_tiny_model("qwen2-vl", seed=123)
    assert load_weights_into(fresh, path) == 1
    batch = materialized(store, sample)
    trainer.model.eval()
    with torch.no_grad():
        a = forward_row(trainer.model, batch, trainer.rope_index, IMAGE_TOKENS, 2, positions="all").logprobs
        b = forward_row(fresh, batch, fresh.model.get_rope_index, IMAGE_TOKENS, 2, positions="all").logprobs
    finite = torch.isfinite(a)
    assert torch.allclose(a[finite], b[finite], atol=1e-6)


def test_combined_rank_metrics_average_loss_weight_per_token_means_and_add_counts():
    def part(loss, entropy, tokens, images, forward_s):
        return StepMetrics(loss=loss, entropy=entropy, clip_fraction=entropy / 10, mismatch_kl=0.0, ref_kl=0.0,
                           tis_weight=entropy / 2, tis_capped_fraction=0.0, grad_norm=2.0, loss_tokens=tokens,
                           images_processed=images, missing_images=0, masked_sampled_image_tokens=0, lr=1e-3,
                           materialize_s=0.1, forward_s=forward_s, backward_s=0.2,
                           optimizer_s=0.01)

    combined = StepMetrics.combine([part(1.0, 3.0, 30, 2, 0.5), part(3.0, 1.0, 10, 1, 0.7)])
    assert combined.loss == 2.0  # each rank's loss is over global tokens / world size
    assert combined.entropy == (3.0 * 30 + 1.0 * 10) / 40
    assert combined.clip_fraction == pytest.approx(combined.entropy / 10)
    assert combined.tis_weight == pytest.approx(combined.entropy / 2)
    assert (combined.loss_tokens, combined.images_processed, combined.forward_s) == (40, 3, 0.7)


def _corrupt(row, kind: str):
    """``row`` with one slot fault: a pad outside every slot, a pad missing from a slot, or a shifted slot."""
    ids, slot = list(row.token_ids), row.images[0]
    if kind == "stray pad":
        ids[1] = PAD
    elif kind == "missing pad":
        ids[slot.offset + 1] = 7
    else:
        return dataclasses.replace(row, images=[slot.shifted(1), *row.images[1:]])
    return dataclasses.replace(row, token_ids=ids)


@pytest.mark.parametrize("path", ["in-process", "after the wire"])
@pytest.mark.parametrize("kind", ["stray pad", "missing pad", "shifted slot"])
def test_slot_faults_fail_naming_row_and_asset_before_the_vision_tower(store, kind, path):
    samples = [make_sample(store, "qwen2-vl", 3, [(i, (64, 48))], 2, sampled=2, advantage=1.0) for i in range(2)]
    rows = pack(samples, len(samples[0]))  # one sample per row
    bad = MicroBatch(4, [rows[0], _corrupt(rows[1], kind)])
    trainer = trainer_for("qwen2-vl", store)
    calls = []
    trainer.model.model.visual.register_forward_hook(lambda *_: calls.append(1))
    with pytest.raises(SlotError, match=rf"step 4 micro-batch 0 row 1: .*{rows[1].images[0].ref.asset}"):
        if path == "in-process":
            trainer.step([bad])
        else:  # what a rank does with what it receives
            trainer.prepare([MicroBatch.from_wire(bad.to_wire())])
    assert calls == [] and trainer.materializer.stats.images_processed == 0


def test_the_forward_reads_input_ids_not_the_slots(store):
    sample = make_sample(store, "qwen2-vl", 3, [(1, (64, 48))], 2)
    batch = materialized(store, sample)
    stray = batch.input_ids.clone()
    stray[0, 0] = PAD
    with pytest.raises(SlotError, match="trainer forward, row: 1 image-pad tokens .* outside every image slot"):
        forward_row(build_tiny_model("qwen2-vl"), dataclasses.replace(batch, input_ids=stray), None, IMAGE_TOKENS, 2)


def test_samples_sharing_all_but_their_sampled_last_token_train_exactly_as_separate_rows(store):
    """A GRPO group with one-token answers is one sequence with branches: same loss, metrics and gradients."""
    prompt = make_sample(store, "qwen2-vl", 3, [(7, (64, 48))], 3, sampled=1)
    n = len(prompt)

    def answer(token: int, advantage: float, logprob: float):
        ids = prompt.token_ids[:-1] + [token]
        return dataclasses.replace(prompt, token_ids=ids, advantages=[0.0] * (n - 1) + [advantage],
                                   inference_logprobs=[0.0] * (n - 1) + [logprob])

    group = [answer(t, a, lp) for t, a, lp in [(300, 1.5, -4.0), (301, -0.5, -5.0), (300, 1.5, -4.0), (302, -0.5, -3.0)]]
    other = make_sample(store, "qwen2-vl", 5, [(8, (40, 40))], 2, sampled=2, advantage=0.7, logprob=-2.0)
    samples = group + [other]
    shared, separate = pack(samples, 4096), pack(samples, 4096, share=False)
    assert sum(map(len, shared)) == len(prompt) + len(other) and sum(len(r.branch_positions) for r in shared) == 3
    results = []
    for rows in (shared, separate):
        torch.manual_seed(0)
        trainer = trainer_for("qwen2-vl", store, entropy_coef=0.01)
        metrics = trainer.step([MicroBatch(0, rows)])
        grads = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
        results.append((metrics, grads))
    (a, grad_a), (b, grad_b) = results
    assert a.loss_tokens == b.loss_tokens == 6
    for name in ("loss", "entropy", "clip_fraction", "mismatch_kl", "grad_norm"):
        assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-5, abs=1e-6), name
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-4, atol=1e-6)


def test_kl_coef_needs_a_reference_and_holds_the_policy_near_it(store):
    with pytest.raises(ValueError, match="kl_coef > 0 needs a frozen reference"):
        trainer_for("qwen2-vl", store, kl_coef=0.1)
    samples = [make_sample(store, "qwen2-vl", 3, [(i, (64, 48))], 4, sampled=3, advantage=(-1) ** i, logprob=-11.0)
               for i in range(4)]
    batch = MicroBatch(0, pack(samples, 4096))

    def drift(kl_coef: float) -> list[float]:
        model = build_tiny_model("qwen2-vl")
        trainer = PolicyTrainer(model, store=store, spec=small_spec("qwen2-vl"), processor=processor("qwen2-vl"),
                                config=TrainConfig(lr=1e-2, kl_coef=kl_coef), image_token_ids=IMAGE_TOKENS,
                                reference=frozen_copy(model))
        return [trainer.step([batch]).ref_kl for _ in range(6)]

    free, held = drift(0.0), drift(5.0)
    assert free[0] == held[0] == 0.0  # the first step scores the policy at the reference's weights
    assert free[-1] > 0 and held[-1] < 0.5 * free[-1]
