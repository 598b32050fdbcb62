"""Turning logits into tokens: the batched sampler and its per-step inputs."""

from neuron_llm.sample.sampler import (
    PADDING_ROW,
    LogprobsTensors,
    RowState,
    SamplerOutput,
    SamplingBatch,
    compute_prompt_logprobs,
    make_generator,
    process_logits,
    sample,
)

__all__ = [
    "PADDING_ROW",
    "LogprobsTensors",
    "RowState",
    "SamplerOutput",
    "SamplingBatch",
    "compute_prompt_logprobs",
    "make_generator",
    "process_logits",
    "sample",
]
