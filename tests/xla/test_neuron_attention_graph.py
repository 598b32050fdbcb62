"""The neuron backend's attention graph holds one chunk of each token's context at a time, and
computes on the XLA device what the torch reference does."""

from __future__ import annotations

import math
import re

import pytest

torch_xla = pytest.importorskip("torch_xla")

import torch

from neuron_llm.backends import neuron
from neuron_llm.backends.neuron import NeuronBackend
from neuron_llm.backends.torch_backend import TorchBackend
from neuron_llm.ops.metadata import AttentionMetadata

pytestmark = pytest.mark.xla

NUM_TOKENS, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 64, 4, 2, 8
BLOCK_SIZE, MAX_BLOCKS_PER_SEQ, NUM_BLOCKS = 16, 32, 40
CONTEXT = BLOCK_SIZE * MAX_BLOCKS_PER_SEQ
ARRAY = re.compile(r"\b(?:pred|[suf]\d+|bf16)\[([\d,]*)\]")


def largest_array(hlo_text: str) -> int:
    """Elements of the largest array any instruction of the module produces or takes."""
    return max(math.prod(int(d) for d in dims.split(",") if d) for dims in ARRAY.findall(hlo_text))


@pytest.mark.parametrize("chunk_keys", [CONTEXT, 64])
def test_attention_graph_holds_a_chunk_of_context_not_the_row(chunk_keys: int, monkeypatch) -> None:
    monkeypatch.setattr(neuron, "CHUNK_KEYS", chunk_keys)
    device = torch_xla.device()
    # A prefill chunk of 40 tokens over 400 cached ones and a decode, padded to the bucket.
    metadata = AttentionMetadata.build(
        [40, 1], [440, 30], [list(range(1, 29)), [29, 30]], BLOCK_SIZE, device,
        num_padded_tokens=NUM_TOKENS, num_padded_seqs=4, max_blocks_per_seq=MAX_BLOCKS_PER_SEQ,
    )  # fmt: skip
    cache_shape = (NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    key_cache, value_cache = torch.randn(cache_shape).to(device), torch.randn(cache_shape).to(device)
    query = torch.randn(NUM_TOKENS, NUM_HEADS, HEAD_DIM).to(device)

    out = NeuronBackend().paged_attention(query, key_cache, value_cache, metadata, scale=0.3)
    largest = largest_array(torch_xla._XLAC._get_xla_tensors_hlo([out]))
    on_cpu = AttentionMetadata.build(
        [40, 1], [440, 30], [list(range(1, 29)), [29, 30]], BLOCK_SIZE, "cpu",
        num_padded_tokens=NUM_TOKENS, num_padded_seqs=4, max_blocks_per_seq=MAX_BLOCKS_PER_SEQ,
    )  # fmt: skip
    expected = TorchBackend().paged_attention(query.cpu(), key_cache.cpu(), value_cache.cpu(), on_cpu, scale=0.3)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5)

    whole_rows = NUM_TOKENS * CONTEXT * NUM_KV_HEADS * HEAD_DIM
    if chunk_keys == CONTEXT:
        assert largest == whole_rows, "one chunk must gather every token's whole row"
    else:
        assert largest <= NUM_TOKENS * chunk_keys * NUM_KV_HEADS * HEAD_DIM < whole_rows
