"""``LLM.beam_search`` against every continuation scored by transformers in float64."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from neuron_llm.beam_search import BeamSearchParams
from tests.engine.conftest import FakeBar, all_blocks_free, make_llm

VOCAB = 8
EOS = 3
PROMPTS = [[1, 5, 2, 7, 4], [6, 0]]


def save_model(path: Path, **overrides: object) -> tuple[torch.nn.Module, Path]:
    """A tiny random Llama of ``VOCAB`` tokens (every continuation can be enumerated), as float64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    fields = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "initializer_range": 0.2,
        "eos_token_id": None,
        "bos_token_id": None,
        "pad_token_id": None,
    }
    config = LlamaConfig(**{**fields, **overrides})
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return model.double(), path


def sequence_logprob(model: torch.nn.Module, prompt: list[int], continuation: list[int]) -> float:
    """log p(continuation | prompt) under ``model``, in float64."""
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        logprobs = model(ids).logits[0].log_softmax(-1)
    positions = range(len(prompt) - 1, len(prompt) + len(continuation) - 1)
    return sum(logprobs[p, token].item() for p, token in zip(positions, continuation, strict=True))


def test_two_steps_as_wide_as_the_vocabulary_find_the_best_continuations(tmp_path: Path) -> None:
    """With a beam per token, two steps keep every first token, so the beams are the best of all
    VOCAB**2 two-token continuations, scored as transformers scores them."""
    model, path = save_model(tmp_path / "model")
    llm = make_llm(path)
    params = BeamSearchParams(beam_width=VOCAB, max_tokens=2, ignore_eos=True)
    outputs = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS], params)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        scored = sorted(
            (
                (sequence_logprob(model, prompt, list(pair)), list(pair))
                for pair in itertools.product(range(VOCAB), repeat=2)
            ),
            reverse=True,
        )
        assert [s.tokens for s in output.sequences] == [prompt + pair for _, pair in scored[:VOCAB]]
        for sequence, (expected, _) in zip(output.sequences, scored, strict=False):
            assert sequence.cum_logprob == pytest.approx(expected, abs=1e-4)
            assert sequence.finish_reason == "length" and sequence.text is None
            assert len(sequence.logprobs) == 2 and all(len(top) == VOCAB for top in sequence.logprobs)
    assert all_blocks_free(llm)


@pytest.mark.parametrize("include_stop_str_in_output", [False, True])
def test_beams_end_at_eos_and_rank_by_their_length_penalized_score(
    tmp_path: Path, include_stop_str_in_output: bool
) -> None:
    model, path = save_model(tmp_path / "model", eos_token_id=EOS)
    llm = make_llm(path)
    length_penalty = 0.5
    params = BeamSearchParams(
        beam_width=4,
        max_tokens=6,
        length_penalty=length_penalty,
        include_stop_str_in_output=include_stop_str_in_output,
    )
    [output] = llm.beam_search({"prompt_token_ids": PROMPTS[0]}, params)
    prompt = PROMPTS[0]
    assert len(output.sequences) == 4
    scores = []
    for sequence in output.sequences:
        assert sequence.tokens[: len(prompt)] == prompt
        generated = sequence.tokens[len(prompt) :]
        if sequence.finish_reason == "stop":
            assert sequence.stop_reason == EOS
            assert (generated[-1:] == [EOS]) == include_stop_str_in_output
            scored = generated if include_stop_str_in_output else [*generated, EOS]
        else:
            assert sequence.finish_reason == "length" and len(generated) == params.max_tokens
            scored = generated
        assert EOS not in scored[:-1]  # no beam goes on past an EOS
        assert len(sequence.logprobs) == len(scored)
        assert sequence.cum_logprob == pytest.approx(sequence_logprob(model, prompt, scored), abs=1e-4)
        scores.append(sequence.cum_logprob / len(scored) ** length_penalty)
    assert scores == sorted(scores, reverse=True)
    assert any(s.finish_reason == "stop" for s in output.sequences), "the test should see an EOS end a beam"


@pytest.mark.parametrize(
    ("options", "longest"),
    [
        ({"max_model_len": 8}, 8),
        # 3 usable blocks of 4 hold 12 tokens of K/V: a beam of 12 tokens is the longest prompt.
        ({"num_kv_blocks": 4}, 13),
        ({"enable_chunked_prefill": False, "max_num_batched_tokens": 9}, 10),
    ],
)
def test_a_beam_ends_at_the_longest_prompt_the_engine_takes(
    tmp_path: Path, options: dict[str, object], longest: int
) -> None:
    _, path = save_model(tmp_path / "model")
    llm = make_llm(path, **options)
    [output] = llm.beam_search({"prompt_token_ids": PROMPTS[0]}, BeamSearchParams(beam_width=2, max_tokens=10))
    assert [len(s.tokens) for s in output.sequences] == [longest, longest]
    assert {s.finish_reason for s in output.sequences} == {"length"}
    assert all_blocks_free(llm)


def test_prompts_searched_in_groups_find_the_same_beams(tmp_path: Path) -> None:
    """Groups bounded by concurrency_limit, or by a pool too small for every prompt's beams at once."""
    _, path = save_model(tmp_path / "model")
    prompts = [{"prompt_token_ids": p} for p in [*PROMPTS, [2, 2, 2], [7, 1, 0, 4]]]
    params = BeamSearchParams(beam_width=3, max_tokens=5)
    together = make_llm(path).beam_search(prompts, params)
    small = make_llm(path, num_kv_blocks=12)
    assert len(small._beam_search_groups([p["prompt_token_ids"] for p in prompts], params, 255, None)) > 1
    for outputs in (
        make_llm(path).beam_search(prompts, params, concurrency_limit=np.int64(1)),
        small.beam_search(prompts, params),
    ):
        for output, expected in zip(outputs, together, strict=True):
            assert [s.tokens for s in output.sequences] == [s.tokens for s in expected.sequences]
            for sequence, other in zip(output.sequences, expected.sequences, strict=True):
                assert sequence.cum_logprob == pytest.approx(other.cum_logprob, abs=1e-4)
    assert all_blocks_free(small)


def test_the_progress_bar_counts_every_step(tmp_path: Path) -> None:
    """Steps a group's beams did not take (all ended at EOS) count too, so the bar ends full."""
    _, path = save_model(tmp_path / "model", eos_token_id=EOS)
    llm = make_llm(path)

    bars: list[FakeBar] = []
    params = BeamSearchParams(beam_width=2, max_tokens=40)
    llm.beam_search(
        [{"prompt_token_ids": p} for p in PROMPTS],
        params,
        use_tqdm=lambda **kwargs: bars.append(FakeBar(**kwargs)) or bars[-1],
        concurrency_limit=1,
    )
    assert (bars[0].total, bars[0].n, bars[0].closed) == (80, 80, True)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"beam_width": 11, "max_tokens": 4}, "at most 10"),
        ({"beam_width": 0, "max_tokens": 4}, "beam_width=0"),
        ({"beam_width": 2, "max_tokens": 0}, "max_tokens=0"),
        ({"beam_width": 2, "max_tokens": 4, "temperature": 0.7}, "raw log-probabilities"),
        ({"beam_width": 2, "max_tokens": 4, "length_penalty": float("nan")}, "finite"),
        ({"beam_width": 2, "max_tokens": 4, "ignore_eos": 1}, "True or False"),
        ({"beam_width": True, "max_tokens": 4}, "beam_width=True"),
    ],
)
def test_bad_params_are_refused_by_name(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BeamSearchParams(**fields)
    assert BeamSearchParams(beam_width=np.int64(2), max_tokens=np.int32(3)).beam_width == 2


def test_a_bad_prompt_is_named_before_any_runs(tmp_path: Path) -> None:
    _, path = save_model(tmp_path / "model")
    llm = make_llm(path, max_model_len=8)
    params = BeamSearchParams(beam_width=2, max_tokens=2)
    with pytest.raises(ValueError, match=r"prompt 1: .*not in the vocabulary"):
        llm.beam_search([{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [1, VOCAB]}], params)
    with pytest.raises(
        ValueError, match=r"prompt 0: a prompt of 8 tokens leaves no room for output within max_model_len=8"
    ):
        llm.beam_search({"prompt_token_ids": list(range(8))}, params)
    with pytest.raises(ValueError, match="BeamSearchParams"):
        llm.beam_search({"prompt_token_ids": [1, 2]}, {"beam_width": 2})
    with pytest.raises(ValueError, match="concurrency_limit=0"):
        llm.beam_search({"prompt_token_ids": [1, 2]}, params, concurrency_limit=0)
    assert all_blocks_free(llm)
