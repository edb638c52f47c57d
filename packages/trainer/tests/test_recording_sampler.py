"""RecordingSampler: the logprobs of what was sampled, under the mask, one step of memory."""

import pytest
import torch

from mmref.trainer.inference.sampling import RecordingSampler
from mmref.trainer.logprobs import masked_log_softmax

BANNED = [3, 7]


def run(sampler, raw_steps, prompt_len=2, seed=0):
    """Drive the sampler as ``generate`` does: scores -> sample -> append; returns sequences."""
    torch.manual_seed(seed)
    sequences = torch.zeros((raw_steps[0].shape[0], prompt_len), dtype=torch.long)
    for raw in raw_steps:
        scores = sampler(sequences, raw.clone())
        token = torch.multinomial(scores.softmax(-1), 1)
        sequences = torch.cat([sequences, token], dim=1)
    return sequences


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8)])
def test_logprobs_are_the_masked_tempered_distribution_at_the_sampled_tokens(temperature, top_p):
    raw = [torch.randn(4, 12) * 3 for _ in range(5)]
    sampler = RecordingSampler(BANNED, temperature, top_p)
    sequences = run(sampler, raw)
    got = sampler.finish(sequences)
    sampled = sequences[:, 2:]
    expected = torch.stack([masked_log_softmax(r / temperature, BANNED) for r in raw], 1).gather(-1, sampled[..., None])[..., 0]
    assert got.shape == (4, 5) and torch.allclose(got, expected)
    assert not torch.isin(sampled, torch.tensor(BANNED)).any()


def test_top_p_samples_only_from_the_nucleus_and_keeps_one_step_of_memory():
    raw = [torch.tensor([[5.0, 4.0, 0.0, 9.0, -1.0, -2.0, 1.0, 9.0]]).repeat(64, 1) for _ in range(3)]
    sampler = RecordingSampler(BANNED, 1.0, 0.9)
    run(sampler, raw)
    # 3 and 7 are banned: p(0) ~ 0.72, p(1) ~ 0.27 make the 0.9 nucleus {0, 1}.
    assert sampler._last.shape == (64, 8)
    sequences = run(RecordingSampler(BANNED, 1.0, 0.9), raw, seed=1)
    assert set(sequences[:, 2:].flatten().tolist()) <= {0, 1}


def test_finish_without_steps_is_empty():
    assert RecordingSampler(BANNED, 1.0, 1.0).finish(torch.zeros((2, 3), dtype=torch.long)).shape == (2, 0)
