"""The static sampling batch the XLA worker samples from, checked on plain CPU tensors.

Its counter-based noise must sample the right distribution, keep seeded rows reproducible
and independent of the batch, and leave greedy rows at the argmax, like the eager batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from neuron_llm.sample import RowState, SamplingBatch, make_generator, sample
from neuron_llm.sample.sampler import bits_to_uniform, counter_noise
from neuron_llm.sampling_params import MAX_LOGPROBS, SamplingParams


def _rows(params: Sequence[SamplingParams], device: str = "cpu") -> list[RowState]:
    return [RowState(p, [], [], make_generator(p.seed, device)) for p in params]


def _sample_static(logits: torch.Tensor, rows: list[RowState], num_rows: int) -> list[int]:
    """Sample ``rows`` with a static batch of ``num_rows``; ``logits`` holds at least ``len(rows)`` rows."""
    padded = (
        torch.cat([logits, logits[:1].expand(num_rows - logits.shape[0], -1)]) if num_rows > len(logits) else logits
    )
    batch = SamplingBatch.build_static(rows, logits.shape[1], "cpu", num_rows)
    return sample(padded, batch).token_ids[: len(rows)].tolist()


def _frequencies(token_ids: list[int], vocab_size: int) -> torch.Tensor:
    counts = torch.bincount(torch.tensor(token_ids), minlength=vocab_size).double()
    return counts / counts.sum()


def test_counter_noise_is_exponential_and_a_function_of_the_keys() -> None:
    keys = torch.randint(-(2**31), 2**31, (64, 2), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    noise = counter_noise(keys, 4096)
    assert noise.shape == (64, 4096) and noise.dtype == torch.float32
    assert torch.equal(noise, counter_noise(keys.clone(), 4096))
    assert bool((noise > 0).all()) and bool(torch.isfinite(noise).all())
    # Exp(1): mean 1, variance 1, P(E > 1) = 1/e; over 262144 draws, a few thousandths off.
    assert noise.double().mean().item() == pytest.approx(1.0, abs=0.01)
    assert noise.double().var().item() == pytest.approx(1.0, abs=0.02)
    assert (noise > 1).double().mean().item() == pytest.approx(0.3679, abs=0.005)
    # Neighbouring tokens and rows whose keys differ in one bit are uncorrelated.
    flipped = keys.clone()
    flipped[:, 1] ^= 1
    other = counter_noise(flipped, 4096)
    assert abs(torch.corrcoef(torch.stack([noise.flatten(), other.flatten()]))[0, 1].item()) < 0.01
    assert abs(torch.corrcoef(torch.stack([noise[:, :-1].flatten(), noise[:, 1:].flatten()]))[0, 1].item()) < 0.01


def test_counter_uniforms_are_never_0_or_1() -> None:
    # u = 1 would give noise 0: the token would win its race, a masked one as 0 / 0 (NaN).
    extremes = torch.tensor([0, 1, 0x7FFFFF, 0xFFFFFF, 0x7FFFFFFF, -1, -(2**31)], dtype=torch.int32)
    uniform = bits_to_uniform(extremes)
    assert bool((uniform > 0).all()) and bool((uniform < 1).all())
    assert bool((-uniform.log() > 0).all())


def test_a_masked_token_never_wins_the_static_race() -> None:
    """top_k=1 leaves one token: over 4,000 rows of a 49,152-token vocabulary (about 12 noise
    values of 0 with 24-bit uniforms) every draw is that token."""
    vocab_size, num_rows = 49152, 2000
    logits = torch.zeros(num_rows, vocab_size)
    logits[:, 5] = 3.0
    params = [SamplingParams(temperature=1.0, top_k=1)] * num_rows
    for _ in range(2):
        assert set(_sample_static(logits, _rows(params), num_rows)) == {5}


@pytest.mark.parametrize(("temperature", "kwargs"), [(0.7, {}), (1.5, {}), (1.0, {"top_k": 3}), (1.0, {"top_p": 0.6})])
def test_static_sampling_distribution_approaches_the_target(temperature: float, kwargs: dict) -> None:
    # Total variation over 8 tokens; with 20000 draws its typical value is about 0.005.
    num_draws = 20000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 1.5])
    target = torch.softmax(logits.double() / temperature, dim=0)
    kept = target.argsort(descending=True)
    if "top_k" in kwargs:
        kept = kept[: kwargs["top_k"]]
    if "top_p" in kwargs:
        mass = target[kept].cumsum(0)
        kept = kept[: int((mass < kwargs["top_p"]).sum()) + 1]
    target = torch.zeros_like(target).index_copy_(0, kept, target[kept])
    target /= target.sum()
    params = [SamplingParams(temperature=temperature, seed=i, **kwargs) for i in range(num_draws)]
    tokens = _sample_static(logits.expand(num_draws, -1).contiguous(), _rows(params), num_draws)
    assert (_frequencies(tokens, 8) - target).abs().sum() / 2 < 0.02


def test_seeded_rows_are_reproducible_and_batch_independent() -> None:
    torch.manual_seed(3)
    steps = [torch.randn(1000) * 0.5 for _ in range(12)]

    def run(others: list[SamplingParams], row: int, num_rows: int) -> list[int]:
        params = others[:row] + [SamplingParams(temperature=0.9, top_p=0.95, seed=7)] + others[row:]
        rows = _rows(params)
        tokens = []
        for step_logits in steps:
            logits = torch.randn(len(params), 1000)
            logits[row] = step_logits
            tokens.append(_sample_static(logits, rows, num_rows)[row])
        return tokens

    alone = run([], 0, 1)
    assert run([], 0, 1) == alone
    mixed = [SamplingParams(), SamplingParams(seed=8), SamplingParams(temperature=0.0), SamplingParams(top_k=5)]
    assert run(mixed, 2, 8) == alone
    assert run(mixed[:1] * 9, 5, 16) == alone
    assert len(set(alone)) > 1, "the steps should not all give one token"


def test_greedy_rows_and_padding_take_the_argmax() -> None:
    torch.manual_seed(4)
    logits = torch.randn(6, 50)
    params = [SamplingParams(temperature=0.0, top_k=5, top_p=0.1, min_p=0.9, seed=i) for i in range(3)]
    params += [SamplingParams(top_k=1, seed=5), SamplingParams(top_k=1), SamplingParams(temperature=0.0)]
    batch = SamplingBatch.build_static(_rows(params), 50, "cpu", 8)
    padded = torch.cat([logits, logits[:2]])
    assert sample(padded, batch).token_ids.tolist() == padded.argmax(dim=1).tolist()


def test_static_batch_shapes_depend_only_on_its_row_count() -> None:
    """Whatever the rows ask for, the common parts have the same shapes: one graph on XLA."""
    mixes = [
        [],
        [SamplingParams(temperature=0.0)],
        [SamplingParams(seed=1), SamplingParams(top_k=4, top_p=0.5, min_p=0.1, temperature=0.3)],
        [SamplingParams()] * 4,
    ]
    shapes = set()
    for params in mixes:
        batch = SamplingBatch.build_static(_rows(params), 32, "cpu", 4)
        assert batch.penalties is None and batch.min_tokens_mask is None and batch.num_logprobs is None
        assert not batch.is_all_greedy and not batch.generators
        parts = (batch.temperature, batch.is_greedy, batch.top_k, batch.top_p, batch.min_p, batch.noise_keys)
        shapes.add(tuple((tuple(t.shape), t.dtype) for t in parts))  # type: ignore[union-attr]
    assert len(shapes) == 1
    with pytest.raises(ValueError, match="exceed"):
        SamplingBatch.build_static(_rows([SamplingParams()] * 5), 32, "cpu", 4)


def test_optional_parts_are_dense_and_logprobs_always_take_the_most() -> None:
    params = [
        SamplingParams(logprobs=1, repetition_penalty=1.3),
        SamplingParams(min_tokens=2, stop_token_ids=[7]),
    ]
    rows = [RowState(params[0], [1, 2], [3]), RowState(params[1], [1], [])]
    batch = SamplingBatch.build_static(rows, 32, "cpu", 4, eos_token_ids=[0])
    assert batch.num_logprobs == MAX_LOGPROBS
    assert batch.penalties is not None and batch.penalties.output_counts.shape == (4, 32)
    assert batch.min_tokens_mask is not None and batch.min_tokens_mask.shape == (4, 32)
    assert batch.min_tokens_mask.nonzero().tolist() == [[1, 0], [1, 7]]
