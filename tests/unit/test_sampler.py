from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from neuron_llm.sample import (
    RowState,
    SamplingBatch,
    compute_prompt_logprobs,
    make_generator,
    process_logits,
    sample,
)
from neuron_llm.sampling_params import SamplingParams


def _rows(params: Sequence[SamplingParams], output_ids: Sequence[Sequence[int]] | None = None) -> list[RowState]:
    outputs = output_ids or [[] for _ in params]
    return [
        RowState(p, prompt_token_ids=[], output_token_ids=out, generator=make_generator(p.seed, "cpu"))
        for p, out in zip(params, outputs)
    ]


def _sample_rows(logits: torch.Tensor, rows: list[RowState], eos_token_ids: Sequence[int] = ()) -> list[int]:
    batch = SamplingBatch.build(rows, logits.shape[1], "cpu", eos_token_ids)
    return sample(logits, batch).token_ids.tolist()


def _frequencies(token_ids: list[int], vocab_size: int) -> torch.Tensor:
    counts = torch.bincount(torch.tensor(token_ids), minlength=vocab_size).double()
    return counts / counts.sum()


def _logits_of(probs: list[float], num_rows: int) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float32).log().expand(num_rows, -1).contiguous()


def test_temperature_zero_is_argmax_whatever_the_other_settings() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    params = [SamplingParams(temperature=0.0, top_k=5, top_p=0.1, min_p=0.9, seed=i) for i in range(6)]
    assert _sample_rows(logits, _rows(params)) == logits.argmax(dim=1).tolist()


def test_top_k_1_equals_greedy() -> None:
    torch.manual_seed(1)
    logits = torch.randn(64, 100)
    tokens = _sample_rows(logits, _rows([SamplingParams(temperature=1.5, top_k=1)] * 64))
    assert tokens == logits.argmax(dim=1).tolist()


def test_greedy_and_sampled_rows_mix() -> None:
    torch.manual_seed(2)
    logits = torch.randn(2, 30)
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=1, seed=5)]
    assert _sample_rows(logits, _rows(params)) == logits.argmax(dim=1).tolist()


def _seeded_run(seed: int, logits_per_step: list[torch.Tensor], others: list[SamplingParams], row: int) -> list[int]:
    """Tokens of a seeded row over several steps, placed at ``row`` among ``others``."""
    target = SamplingParams(seed=seed)
    params = others[:row] + [target] + others[row:]
    rows = _rows(params)
    tokens = []
    for step_logits in logits_per_step:
        # The target row sees the same logits whatever the batch; the others see noise.
        logits = torch.randn(len(params), step_logits.shape[0])
        logits[row] = step_logits
        tokens.append(_sample_rows(logits, rows)[row])
    return tokens


def test_seed_reproduces_tokens_and_ignores_the_rest_of_the_batch() -> None:
    torch.manual_seed(3)
    steps = [torch.randn(1000) * 0.5 for _ in range(12)]
    alone = _seeded_run(7, steps, [], 0)
    assert _seeded_run(7, steps, [], 0) == alone
    mixed = [SamplingParams(), SamplingParams(seed=8), SamplingParams(temperature=0.0), SamplingParams(seed=7)]
    assert _seeded_run(7, steps, mixed, 2) == alone
    assert _seeded_run(7, steps, mixed[:1] * 9, 5) == alone
    assert len(set(alone)) > 1, "the steps should not all give one token"


def test_different_seeds_give_different_tokens() -> None:
    torch.manual_seed(4)
    steps = [torch.zeros(1000) for _ in range(10)]
    assert _seeded_run(1, steps, [], 0) != _seeded_run(2, steps, [], 0)


@pytest.mark.parametrize(
    ("kwargs", "support"),
    [
        ({"top_k": 2}, {0, 1}),
        ({"top_p": 0.65}, {0, 1}),
        ({"top_p": 0.8}, {0, 1, 2}),
        ({"min_p": 0.15}, {0, 1, 2, 3}),
        ({"min_p": 0.3}, {0, 1, 2}),
        ({"min_p": 0.5}, {0, 1}),
        ({"top_k": 3, "top_p": 0.5}, {0, 1}),
        # vLLM v1's order: min-p keeps {0, 1}, whose renormalized mass top-p then measures
        # (0.57 for token 0); top-p first would keep {0, 1}, and min-p both of them.
        ({"top_p": 0.5, "min_p": 0.5}, {0}),
    ],
)
def test_truncation_keeps_exactly_the_expected_tokens(kwargs: dict[str, float], support: set[int]) -> None:
    probs = [0.4, 0.3, 0.15, 0.1, 0.05]
    torch.manual_seed(5)
    tokens = _sample_rows(_logits_of(probs, 4000), _rows([SamplingParams(**kwargs)] * 4000))
    assert set(tokens) == support
    # Within the kept set, the tokens keep their relative probabilities.
    kept = torch.tensor([probs[t] if t in support else 0.0 for t in range(5)], dtype=torch.float64)
    assert (_frequencies(tokens, 5) - kept / kept.sum()).abs().sum() / 2 < 0.04


def _penalized_reference(
    logits: list[float], prompt: list[int], output: list[int], params: SamplingParams
) -> list[float]:
    result = []
    for token, logit in enumerate(logits):
        value = float(logit)
        if token in prompt or token in output:
            r = params.repetition_penalty
            value = value / r if value > 0 else value * r
        count = output.count(token)
        value -= params.frequency_penalty * count + params.presence_penalty * (count > 0)
        result.append(value)
    return result


def test_penalties_follow_the_formulas() -> None:
    torch.manual_seed(6)
    logits = torch.randn(4, 12) * 3
    prompt, output = [1, 2, 9], [2, 3, 3, 3, 7]
    params = [
        SamplingParams(repetition_penalty=1.7),
        SamplingParams(frequency_penalty=0.6, presence_penalty=-0.4),
        SamplingParams(repetition_penalty=0.8, frequency_penalty=-1.1, presence_penalty=1.5),
        SamplingParams(),
    ]
    rows = [RowState(p, prompt, output) for p in params]
    processed = process_logits(logits, SamplingBatch.build(rows, 12, "cpu")).double()
    for i, p in enumerate(params):
        expected = torch.tensor(_penalized_reference(logits[i].tolist(), prompt, output, p), dtype=torch.float64)
        torch.testing.assert_close(processed[i], expected, rtol=1e-6, atol=1e-6)
    assert not torch.equal(processed[0], logits[0].double()), "the penalty must change something"


def test_logit_bias_is_added_before_the_penalties_for_its_row_only() -> None:
    torch.manual_seed(11)
    logits = torch.randn(3, 10) * 2
    prompt, output = [1], [4, 4]
    params = [
        SamplingParams(logit_bias={4: 2.5, 7: -100.0}, repetition_penalty=1.3, frequency_penalty=0.5),
        SamplingParams(temperature=0.0, logit_bias={9: 0.75}),
        SamplingParams(),
    ]
    rows = [RowState(p, prompt, output) for p in params]
    processed = process_logits(logits, SamplingBatch.build(rows, 10, "cpu")).double()
    for i, p in enumerate(params):
        biased = logits[i].double().clone()
        for token_id, bias in (p.logit_bias or {}).items():
            biased[token_id] += bias
        expected = torch.tensor(_penalized_reference(biased.tolist(), prompt, output, p), dtype=torch.float64)
        torch.testing.assert_close(processed[i], expected, rtol=1e-6, atol=1e-6)
    static = SamplingBatch.build_static(rows, 10, "cpu", num_rows=5)
    torch.testing.assert_close(process_logits(torch.cat([logits, logits[:2]]), static)[:3].double(), processed)


def test_a_bias_of_100_forces_a_token_and_of_minus_100_bans_one() -> None:
    logits = torch.randn(64, 16) * 4
    argmax = logits.argmax(dim=1)
    forced = [SamplingParams(temperature=t, logit_bias={5: 100.0}, seed=i) for i, t in enumerate([0.0, 1.0] * 32)]
    assert _sample_rows(logits, _rows(forced)) == [5] * 64
    banned = [SamplingParams(temperature=0.0, logit_bias={int(argmax[i]): -100.0}) for i in range(64)]
    tokens = torch.tensor(_sample_rows(logits, _rows(banned)))
    assert (tokens != argmax).all()
    assert torch.equal(tokens, logits.scatter(1, argmax[:, None], float("-inf")).argmax(dim=1))


def test_allowed_token_ids_keep_only_those_tokens_with_their_biases() -> None:
    torch.manual_seed(3)
    logits = torch.randn(4, 12) * 3
    params = [
        SamplingParams(allowed_token_ids=[2, 7, 9], logit_bias={7: 1.5, 4: 50.0}),
        SamplingParams(temperature=0.0, allowed_token_ids=[int(logits[1].argmin())]),
        SamplingParams(),
        SamplingParams(temperature=0.0, logit_bias={1: 2.0}),
    ]
    rows = [RowState(p, [1], []) for p in params]
    processed = process_logits(logits, SamplingBatch.build(rows, 12, "cpu"))
    expected = torch.full((12,), float("-inf"))
    expected[[2, 7, 9]] = logits[0, [2, 7, 9]] + torch.tensor([0.0, 1.5, 0.0])  # 4's bias: not allowed
    torch.testing.assert_close(processed[0], expected)
    torch.testing.assert_close(processed[2:3], logits[2:3])
    assert processed[3, 1] == logits[3, 1] + 2.0
    for _ in range(30):
        tokens = _sample_rows(logits, _rows(params))
        assert tokens[0] in (2, 7, 9) and tokens[1] == int(logits[1].argmin())


def test_bad_words_ban_a_last_token_where_the_output_ends_in_the_rest() -> None:
    logits = torch.zeros(5, 10)
    params = SamplingParams(temperature=0.0, bad_words=["unused: the rows carry the token ids"])
    words = [[3], [5, 6], [1, 2, 8]]
    outputs = [[], [5], [0, 1, 2], [1], [6, 5, 1, 2]]
    rows = [RowState(params, [5, 1, 2], output, None, words) for output in outputs]
    # The prompt does not count (vLLM): a 2-token word's prefix must be generated.
    assert [row.banned_token_ids() for row in rows] == [[3], [3, 6], [3, 8], [3], [3, 8]]
    processed = process_logits(logits + 50.0 * (torch.arange(10) == 8), SamplingBatch.build(rows, 10, "cpu"))
    assert processed[2, 8] == processed[4, 8] == -float("inf") and processed[1, 8] == 50.0
    assert (processed[:, 3] == -float("inf")).all()
    # A ban wins over any bias or allowance of the same token.
    forced = SamplingParams(temperature=0.0, logit_bias={3: 100.0}, allowed_token_ids=[3, 4], bad_words=["x"])
    assert _sample_rows(logits[:1], [RowState(forced, [], [], None, [[3]])]) == [4]
    static = SamplingBatch.build_static(rows, 10, "cpu", num_rows=8)
    torch.testing.assert_close(
        process_logits(torch.cat([logits, logits[:3]]) + 50.0 * (torch.arange(10) == 8), static)[:5], processed
    )


def test_a_row_whose_constraints_forbid_every_token_is_told_apart_from_the_rest() -> None:
    eos, vocab = 0, 10
    allowed = SamplingParams(allowed_token_ids=[3, 4], bad_words=["x"])
    held = SamplingParams(allowed_token_ids=[0, 3], bad_words=["x"], min_tokens=3)
    only_eos = np.zeros(vocab, dtype=bool)
    only_eos[eos] = True
    rows = [
        RowState(allowed, [], [3], None, [[3, 3], [3, 4]]),  # both continuations of 3 banned
        RowState(allowed, [], [4], None, [[3, 3], [3, 4]]),  # after 4 nothing is banned
        RowState(allowed, [], [3], None, [[3, 3]]),  # 4 is left
        RowState(held, [], [3], None, [[3, 3]]),  # EOS held back, 3 banned
        RowState(held, [], [3, 4, 5], None, [[3, 3]]),  # min_tokens met: EOS left
        RowState(SamplingParams(bad_words=["x"]), [], [], None, [[t] for t in range(vocab)]),  # a whole-vocabulary ban
        RowState(SamplingParams(min_tokens=2), [], [], None, (), only_eos),  # the grammar allows only EOS
        RowState(SamplingParams(allowed_token_ids=[5]), [], [], None, (), only_eos),
        RowState(SamplingParams(), [], [], None, (), only_eos),
    ]
    expected = [True, False, False, True, False, True, True, True, False]
    assert [row.forbids_every_token(vocab, [eos]) for row in rows] == expected
    # Without min_tokens holding EOS back, the held row has EOS left; the first has still none.
    assert not rows[3].forbids_every_token(vocab, [eos], hold_ends=False)
    assert rows[0].forbids_every_token(vocab, [eos], hold_ends=False)
    # Exactly the rows whose processed logits are all -inf.
    processed = process_logits(torch.randn(len(rows), vocab), SamplingBatch.build(rows, vocab, "cpu", [eos]))
    assert (processed == -float("inf")).all(dim=1).tolist() == expected


def test_min_tokens_masks_eos_and_stop_tokens_until_met() -> None:
    eos, stop = 0, 5
    logits = torch.zeros(5, 8)
    logits[:, eos] = logits[:, stop] = 30.0
    params = SamplingParams(min_tokens=3, stop_token_ids=[stop])
    ignore_eos = SamplingParams(min_tokens=3, stop_token_ids=[stop], ignore_eos=True)
    rows = [
        RowState(params, [1], [4, 4]),  # 2 < 3 generated: both masked
        RowState(params, [1], [4, 4, 4]),  # met
        # ignore_eos only keeps EOS from ending the sequence: min_tokens holds it back too (vLLM).
        RowState(ignore_eos, [1], []),
        RowState(SamplingParams(temperature=0.0, min_tokens=1, ignore_eos=True), [1], []),
        RowState(ignore_eos, [1], [4, 4, 4]),  # met
    ]
    processed = process_logits(logits, SamplingBatch.build(rows, 8, "cpu", eos_token_ids=[eos]))
    inf = float("inf")
    assert processed[0, eos] == -inf and processed[0, stop] == -inf
    assert processed[1, eos] == 30.0 and processed[1, stop] == 30.0
    assert processed[2, eos] == -inf and processed[2, stop] == -inf
    assert processed[3, eos] == -inf and processed[3, stop] == 30.0
    assert processed[4, eos] == 30.0 and processed[4, stop] == 30.0
    torch.manual_seed(7)
    for _ in range(20):
        tokens = _sample_rows(logits, rows, eos_token_ids=[eos])
        assert tokens[0] not in (eos, stop) and tokens[1] in (eos, stop) and tokens[2] not in (eos, stop)
        assert tokens[3] == stop and tokens[4] in (eos, stop)


def test_logprobs_are_raw_log_softmax_with_ranks() -> None:
    torch.manual_seed(8)
    logits = torch.randn(5, 40) * 2
    params = [
        SamplingParams(logprobs=3, temperature=0.5, repetition_penalty=1.5, top_k=10),
        SamplingParams(logprobs=0, top_p=0.3),
        SamplingParams(temperature=0.0),
        SamplingParams(logprobs=5, presence_penalty=2.0),
        SamplingParams(logprobs=1, seed=3, min_p=0.2),
    ]
    rows = [RowState(p, [1, 2], [3, 4], make_generator(p.seed, "cpu")) for p in params]
    batch = SamplingBatch.build(rows, 40, "cpu")
    output = sample(logits, batch)
    assert output.logprobs is not None and batch.num_logprobs == 5
    raw = logits.double().log_softmax(dim=1)
    tokens = output.token_ids
    torch.testing.assert_close(output.logprobs.token_logprobs.double(), raw.gather(1, tokens[:, None])[:, 0])
    order = raw.argsort(dim=1, descending=True)
    expected_ranks = (order == tokens[:, None]).nonzero()[:, 1] + 1
    assert output.logprobs.token_ranks.tolist() == expected_ranks.tolist()
    assert output.logprobs.top_token_ids.tolist() == order[:, :5].tolist()
    torch.testing.assert_close(output.logprobs.top_logprobs.double(), raw.gather(1, order[:, :5]))

    dicts = output.logprobs.to_dicts([p.logprobs for p in params])
    assert output.logprobs.to_host().to_dicts([p.logprobs for p in params]) == dicts
    assert dicts[2] is None
    for row, entry in enumerate(dicts):
        if entry is None:
            continue
        wanted = {tokens[row].item(), *order[row, : params[row].logprobs].tolist()}
        assert set(entry) == wanted
        assert entry[tokens[row].item()].rank == expected_ranks[row].item()
        for token_id, logprob in entry.items():
            assert logprob.logprob == pytest.approx(raw[row, token_id].item(), abs=1e-5)


def test_tied_tokens_take_the_last_of_their_ranks() -> None:
    """As vLLM counts: a token's rank is the number of tokens at least as likely as it."""
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5], [1.0, 2.0, 2.0, 2.0, 0.5]])
    result = compute_prompt_logprobs(logits, torch.tensor([2, 0]), num_top=2)
    assert result.token_ranks.tolist() == [3, 4]
    # In the dicts a scored token among the top ones has its place there as its rank.
    first, second = result.to_dicts([2, 2])
    top = result.top_token_ids[0].tolist()
    assert {token: first[token].rank for token in top} == {top[0]: 1, top[1]: 2}
    assert second[0].rank == 4


def test_no_logprobs_requested_returns_none() -> None:
    logits = torch.randn(2, 10)
    output = sample(logits, SamplingBatch.build(_rows([SamplingParams()] * 2), 10, "cpu"))
    assert output.logprobs is None and output.token_ids.shape == (2,)


def test_prompt_logprobs_equal_a_direct_gather() -> None:
    torch.manual_seed(9)
    logits = torch.randn(7, 30)
    prompt = torch.tensor([3, 9, 9, 0, 29, 4, 4, 17])
    result = compute_prompt_logprobs(logits, prompt[1:], num_top=4)
    expected = torch.log_softmax(logits, dim=1)
    torch.testing.assert_close(result.token_logprobs, expected.gather(1, prompt[1:, None])[:, 0])
    ranks = [int((expected[i] > expected[i, prompt[i + 1]]).sum()) + 1 for i in range(7)]
    assert result.token_ranks.tolist() == ranks
    torch.testing.assert_close(result.top_logprobs, expected.topk(4, dim=1).values)


def test_more_logprobs_than_the_vocabulary_give_all_of_it() -> None:
    logits = torch.randn(2, 6)
    batch = SamplingBatch.build(_rows([SamplingParams(logprobs=20), SamplingParams(logprobs=2)]), 6, "cpu")
    output = sample(logits, batch)
    assert output.logprobs is not None
    whole, two = output.logprobs.to_dicts([20, 2])
    assert sorted(whole) == list(range(6)) and len(two) in (2, 3)  # the sampled token may be outside the two
    prompt = compute_prompt_logprobs(logits, torch.tensor([1, 5]), num_top=20)
    assert prompt.top_token_ids.shape == (2, 6)


@pytest.mark.parametrize(("temperature", "seeded"), [(0.5, False), (2.0, False), (0.7, True)])
def test_sampling_distribution_approaches_softmax_over_temperature(temperature: float, seeded: bool) -> None:
    # Total variation between the empirical and the target distribution over 8 tokens;
    # with 20000 draws its typical value is about 0.005, so 0.02 fails only on a real bias.
    num_draws = 20000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 1.5])
    target = torch.softmax(logits.double() / temperature, dim=0)
    torch.manual_seed(10)
    params = [SamplingParams(temperature=temperature, seed=i if seeded else None) for i in range(num_draws)]
    tokens = _sample_rows(logits.expand(num_draws, -1).contiguous(), _rows(params))
    assert (_frequencies(tokens, 8) - target).abs().sum() / 2 < 0.02


def test_logits_are_not_modified() -> None:
    logits = torch.randn(3, 16)
    before = logits.clone()
    params = [
        SamplingParams(repetition_penalty=2.0, top_k=3, min_tokens=2),
        SamplingParams(),
        SamplingParams(top_p=0.5),
    ]
    rows = [RowState(p, [0, 1], [2]) for p in params]
    sample(logits, SamplingBatch.build(rows, 16, "cpu", eos_token_ids=[1]))
    assert torch.equal(logits, before)


def test_min_p_of_one_keeps_only_the_most_likely_token() -> None:
    torch.manual_seed(0)
    logits = torch.randn(64, 50) * 2
    assert _sample_rows(logits, _rows([SamplingParams(min_p=1.0)] * 64)) == logits.argmax(dim=1).tolist()


def test_min_p_reads_the_probabilities_after_temperature() -> None:
    # At temperature 0.5 the probabilities 0.4, 0.3, 0.15, 0.1, 0.05 become p^2 / sum(p^2): 0.516,
    # 0.290, 0.073...; min-p 0.3 keeps those above 0.155 (tokens 0 and 1). Before temperature it
    # would keep those above 0.12, token 2 among them.
    torch.manual_seed(1)
    logits = _logits_of([0.4, 0.3, 0.15, 0.1, 0.05], 4000)
    tokens = _sample_rows(logits, _rows([SamplingParams(temperature=0.5, min_p=0.3)] * 4000))
    assert set(tokens) == {0, 1}


def test_unseeded_rows_beside_a_seeded_one_sample_the_softmax() -> None:
    num_rows = 20000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 1.5])
    torch.manual_seed(2)
    rows = _rows([SamplingParams(seed=1)] + [SamplingParams()] * num_rows)
    tokens = _sample_rows(logits.expand(num_rows + 1, -1).contiguous(), rows)[1:]
    total_variation = (_frequencies(tokens, 8) - torch.softmax(logits.double(), 0)).abs().sum() / 2
    assert total_variation < 0.02


def test_a_zero_noise_draw_never_picks_a_removed_token(monkeypatch: pytest.MonkeyPatch) -> None:
    # exponential_ may return 0; logits / 0 would be NaN for a removed token, and argmax picks NaN.
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda self, *args, **kwargs: self.zero_())
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0]] * 8)
    tokens = _sample_rows(logits, _rows([SamplingParams(top_k=1)] * 4 + [SamplingParams(top_k=2, seed=3)] * 4))
    assert all(token in (0, 1) for token in tokens) and tokens[:4] == [0] * 4
