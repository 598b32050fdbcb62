"""Each worker dispatches its steps to its own backend, whatever else the process uses."""

from __future__ import annotations

import threading
from typing import Any

import torch

from neuron_llm import ops
from neuron_llm.backends.torch_backend import TorchBackend
from neuron_llm.sampling_params import SamplingParams
from tests.engine.conftest import make_llm, random_prompts


class Refusing(TorchBackend):
    name = "refusing"

    def linear(self, *args: Any) -> torch.Tensor:
        raise AssertionError("an op went to a backend its engine does not use")

    paged_attention = linear


def test_using_backend_holds_for_its_thread_and_block() -> None:
    default, inner = ops.active_backend(), TorchBackend()
    seen = []
    with ops.using_backend(inner):
        assert ops.active_backend() is inner
        other = threading.Thread(target=lambda: seen.append(ops.active_backend()))
        other.start()
        other.join()
    assert seen == [default]
    assert ops.active_backend() is default


def test_an_engine_keeps_its_backend_when_the_process_default_changes(tiny_model_dir) -> None:
    """A second engine (or a script) choosing another backend does not reach the first one's steps."""
    llm = make_llm(tiny_model_dir)
    request = {"prompt_token_ids": random_prompts(1, seed=3)[0]}
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    expected = llm.generate(request, greedy)[0].outputs[0].token_ids
    previous = ops.active_backend()
    ops.use_backend(Refusing())
    try:
        assert llm.generate(request, greedy)[0].outputs[0].token_ids == expected
    finally:
        ops.use_backend(previous)
