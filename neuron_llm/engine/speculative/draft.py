"""Draft-model proposals (vLLM's "draft_model"): a smaller model that shares the target's
tokenizer decodes each sequence's next tokens greedily, and the target verifies them.

The draft is an engine of its own (prefix caching on), so it keeps no state per target
request: each proposal is a draft request of the whole sequence so far, whose full blocks the
draft's prefix cache still holds from the last proposal for that sequence. Only the last
partial block and the tokens the target added are prefilled again, then k - 1 decode steps
run, for every proposing sequence of the step in one batch. Greedy drafts are point masses,
which the rejection sampler assumes.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from neuron_llm.config import EngineConfig
from neuron_llm.loader import ModelInfo, load_model_info
from neuron_llm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from neuron_llm.llm import LLM


def read_draft_model(config: EngineConfig, tokenizer: PreTrainedTokenizerBase | None) -> ModelInfo:
    """The draft model's info (``config.speculative.model``), checked against the model's
    vocabulary and ``tokenizer`` without loading weights: ``ValueError`` or
    ``FileNotFoundError`` naming the draft."""
    speculative = config.speculative
    assert speculative is not None and speculative.model is not None
    name = _draft_name(config)
    try:
        info = load_model_info(speculative.model)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"{name}: {e}") from e
    vocab, draft_vocab = config.model.vocab_size, info.config.vocab_size
    if draft_vocab != vocab:
        raise ValueError(
            f"{name} has a vocabulary of {draft_vocab} tokens, the model {vocab}: "
            "a draft must share the model's tokenizer"
        )
    both = tokenizer is not None and info.tokenizer is not None
    if both and info.tokenizer.get_vocab() != tokenizer.get_vocab():
        # As many tokens but other ones: proposals would be lossless, and nearly all refused.
        raise ValueError(f"{name}'s tokenizer maps tokens to other ids than the model's: a draft must share it")
    return info


def _draft_name(config: EngineConfig) -> str:
    assert config.speculative is not None
    return f"speculative_config: draft model {config.speculative.model}"


class DraftModelProposer:
    """Proposes up to ``num_speculative_tokens`` tokens by decoding them with a draft model.

    Its KV pool has ``num_kv_blocks`` blocks (the model's pool size: it holds as many tokens,
    each smaller for a smaller draft), and it runs steps of the model's sizes (sequences and
    tokens); on the XLA device it compiles its own buckets' graphs at its warm-up.
    A draft with a shorter context than ``max_model_len`` drafts only within its own. Given the
    model's ``tokenizer``, a draft that has one must map every token to the same id.

    It runs whole on ``device`` (None: the config's), which under tensor parallelism is rank
    0's: only the model is sharded, and the other ranks wait while rank 0 drafts.
    """

    def __init__(
        self,
        config: EngineConfig,
        num_kv_blocks: int,
        tokenizer: PreTrainedTokenizerBase | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        from neuron_llm.llm import LLM  # the draft is built as any model is

        speculative = config.speculative
        assert speculative is not None and speculative.model is not None
        name = _draft_name(config)
        self.num_tokens = speculative.num_speculative_tokens
        info = read_draft_model(config, tokenizer)  # checked before its weights load
        self.max_model_len = min(config.max_model_len, info.config.max_context_len)
        # On the XLA device, the model's context lengths that fit the draft's (its own is added).
        lengths = config.device.context_buckets
        context_buckets = None if lengths is None else [length for length in lengths if length < self.max_model_len]
        try:
            self.llm: LLM = LLM(
                speculative.model,
                device=str(config.device.device if device is None else device),
                dtype=config.device.dtype,
                quantization=speculative.quantization,
                backend=config.device.backend,
                enforce_eager=config.device.enforce_eager,
                context_buckets=context_buckets,
                # Its attention, not the int8 matmul: the draft need not be quantized so.
                nki_kernels=[k for k in config.device.nki_kernels if k == "decode_attention"],
                max_model_len=self.max_model_len,
                block_size=config.cache.block_size,
                num_kv_blocks=num_kv_blocks,
                enable_prefix_caching=True,
                max_num_seqs=config.scheduler.max_num_seqs,
                # The model's step sizes: on the XLA device, its buckets (graphs) too. Chunked
                # prefill stays on: a draft request is the whole sequence so far, longer than
                # any prompt the model took whole.
                max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
                async_scheduling=False,
                # Draft requests set every sampling field: its defaults would only add graphs.
                generation_config="vllm",
            )
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from e
        except torch.OutOfMemoryError as e:
            # The model's weights and pool took their share (memory_fraction) before it.
            raise ValueError(
                f"{name} does not fit in the device memory the model left: lower memory_fraction "
                f"(now {config.cache.memory_fraction}) to leave room for the draft's weights and pool"
            ) from e
        self.engine = self.llm.engine
        self._ids = itertools.count()

    def propose(self, token_ids: Sequence[int]) -> list[int]:
        (proposal,) = self.propose_all([token_ids], [self.num_tokens])
        return proposal

    def propose_all(self, sequences: Sequence[Sequence[int]], rooms: Sequence[int]) -> list[list[int]]:
        """Each sequence's greedy continuation by the draft, decoded in one batch: up to
        ``num_speculative_tokens`` tokens and its room (the most the model can verify), fewer
        where it nears the draft's ``max_model_len``."""
        request_ids: list[str | None] = []
        try:
            for token_ids, room in zip(sequences, rooms, strict=True):
                num_tokens = min(self.num_tokens, room, self.max_model_len - len(token_ids))
                if num_tokens < 1:
                    request_ids.append(None)
                    continue
                request_ids.append(f"draft-{next(self._ids)}")
                params = SamplingParams(
                    temperature=0.0, max_tokens=num_tokens, ignore_eos=True, output_kind="final_only"
                )
                self.engine.add_request([int(t) for t in token_ids], params, request_id=request_ids[-1])
            proposals: dict[str, list[int]] = {}
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        proposals[output.request_id] = list(output.outputs[0].token_ids)
                for _, error in self.engine.take_failures():
                    raise error
        except BaseException:
            # A failed draft step must not leave requests holding the draft's blocks.
            for request_id in request_ids:
                if request_id is not None:
                    self.engine.abort(request_id)
            raise
        self.engine.stats()  # the draft's latencies are nobody's metrics: drop them
        return [[] if request_id is None else proposals[request_id] for request_id in request_ids]
