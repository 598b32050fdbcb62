"""A tiny random Llama checkpoint shared by the engine tests, and helpers to drive the engine."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from neuron_llm.llm import LLM
from neuron_llm.outputs import RequestOutput

VOCAB_SIZE = 256


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        # Peaked logits keep greedy picks far from ties, so reduction order cannot flip them.
        initializer_range=0.2,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def make_llm(model_dir: Path, **options: Any) -> LLM:
    options = {"num_kv_blocks": 256, "block_size": 4, "max_model_len": 256, **options}
    return LLM(model=str(model_dir), dtype="float32", **options)


def random_prompts(count: int, seed: int, min_len: int = 3, max_len: int = 40) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (count,), generator=generator).tolist()
    return [torch.randint(0, VOCAB_SIZE, (n,), generator=generator).tolist() for n in lengths]


def all_blocks_free(llm: LLM) -> bool:
    """Whether every usable KV block is back in the pool."""
    manager = llm.engine.scheduler.block_manager
    return manager.num_free_blocks == manager.num_usable_blocks


def run_all(llm: LLM, arrivals: dict[int, list[tuple[str, list[int], Any]]]) -> dict[str, RequestOutput]:
    """Step the engine, adding each ``(request_id, prompt, params)`` at its arrival step; the
    finished outputs, those of "delta" requests joined."""
    finished: dict[str, RequestOutput] = {}
    joined: dict[str, RequestOutput] = {}
    step = 0
    while arrivals or llm.engine.has_unfinished_requests():
        for request_id, prompt, params in arrivals.pop(step, []):
            llm.engine.add_request(prompt, params, request_id=request_id)
            if getattr(params, "output_kind", None) == "delta":
                joined[request_id] = RequestOutput(request_id, None, [], None, [], finished=False)
        for output in llm.engine.step():
            if output.request_id in joined:
                output = joined[output.request_id] = joined[output.request_id].add(output)
            if output.finished:
                assert output.request_id not in finished, "a request finished twice"
                finished[output.request_id] = output
        step += 1
    return finished


def same_logprobs(got: list | None, want: list | None) -> bool:
    if got is None or want is None:
        return got is want
    return len(got) == len(want) and all(
        (g is None and w is None)
        or (
            g.keys() == w.keys()
            and all(g[t].rank == w[t].rank and g[t].logprob == pytest.approx(w[t].logprob, abs=1e-4) for t in g)
        )
        for g, w in zip(got, want)
    )


def assert_same_outputs(ours: dict, expected: dict) -> None:
    """Same requests, tokens, finish and stop reasons, and logprobs (to 1e-4) in both runs."""
    assert ours.keys() == expected.keys()
    for request_id, want in expected.items():
        got = ours[request_id]
        assert same_logprobs(got.prompt_logprobs, want.prompt_logprobs), request_id
        for g, w in zip(got.outputs, want.outputs, strict=True):
            assert (g.token_ids, g.finish_reason, g.stop_reason) == (w.token_ids, w.finish_reason, w.stop_reason)
            assert same_logprobs(g.logprobs, w.logprobs), request_id


class OracleProposer:
    """Proposes what plain greedy decoding wrote after each known prompt, spoilt as asked:
    "right" (every proposal kept), "wrong" (none kept) or "mixed" (a kept prefix, then a
    wrong token), so that each path of the rejection sampler runs on a model that never repeats."""

    def __init__(
        self, continuations: dict[tuple[int, ...], list[int]], quality: str, k: int, vocab_size: int = VOCAB_SIZE
    ) -> None:
        self.continuations, self.quality, self.k, self.vocab_size = continuations, quality, k, vocab_size

    def propose(self, token_ids: Sequence[int]) -> list[int]:
        for prompt, written in self.continuations.items():
            if tuple(token_ids[: len(prompt)]) == prompt:
                done = len(token_ids) - len(prompt)
                proposal = list(written[done : done + self.k])
                for i in range(len(proposal)):
                    if self.quality == "wrong" or (self.quality == "mixed" and (done + i) % 3 == 2):
                        proposal[i] = (proposal[i] + 1) % self.vocab_size
                return proposal
        return []


class FakeBar:
    """The parts of tqdm's interface a progress bar is used by, counting what it is told."""

    def __init__(self, total: int, **_: object) -> None:
        self.total, self.n, self.closed = total, 0, False

    def update(self, count: int) -> None:
        self.n += count

    def close(self) -> None:
        self.closed = True
