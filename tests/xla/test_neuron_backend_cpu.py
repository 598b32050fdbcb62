"""The neuron backend's static-shape ops equal the torch reference on plain CPU tensors."""

from __future__ import annotations

import random

import pytest
import torch

from neuron_llm import ops
from neuron_llm.backends import neuron
from neuron_llm.backends.neuron import NeuronBackend
from neuron_llm.backends.torch_backend import TorchBackend
from neuron_llm.config import ModelConfig
from neuron_llm.models.llama import LlamaForCausalLM
from neuron_llm.ops.metadata import AttentionMetadata

BLOCK_SIZE = 4
NUM_BLOCKS = 64
MAX_BLOCKS_PER_SEQ = 8


def random_batch(
    query_lens: list[int],
    seq_lens: list[int],
    num_padding_tokens: int,
    num_padding_seqs: int,
    seed: int,
) -> AttentionMetadata:
    """Metadata over distinct, shuffled blocks (never the null block), padded as a bucket would be."""
    rng = random.Random(seed)
    free = list(range(1, NUM_BLOCKS))
    rng.shuffle(free)
    tables = []
    for seq_len in seq_lens:
        num_blocks = -(-seq_len // BLOCK_SIZE)
        tables.append([free.pop() for _ in range(num_blocks)])
    return AttentionMetadata.build(
        query_lens,
        seq_lens,
        tables,
        BLOCK_SIZE,
        "cpu",
        num_padded_tokens=sum(query_lens) + num_padding_tokens,
        num_padded_seqs=len(seq_lens) + num_padding_seqs,
        max_blocks_per_seq=MAX_BLOCKS_PER_SEQ,
    )


def random_pool(num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, head_dim)
    return torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)


# (query_lens, seq_lens): decode, whole prompts, chunked prefill over cached context, mixes,
# lengths on and just past block boundaries, and a context that fills the block table.
BATCHES = [
    ([1], [1]),
    ([1, 1, 1], [5, 8, 9]),
    ([7], [7]),
    ([4, 5], [4, 5]),
    ([3, 1, 6], [11, 16, 6]),
    ([5, 1, 1, 4], [13, 4, 17, 32]),
    ([32], [32]),
    ([2, 9], [9, 25]),
]


@pytest.mark.parametrize("query_lens, seq_lens", BATCHES)
@pytest.mark.parametrize("num_padding_tokens, num_padding_seqs", [(0, 0), (5, 2)])
@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (6, 2), (4, 1)])
# The whole row in one chunk; chunks of one block; three blocks, the last chunk cut short.
@pytest.mark.parametrize("chunk_keys", [512, BLOCK_SIZE, 3 * BLOCK_SIZE])
def test_paged_attention_matches_torch(
    query_lens: list[int],
    seq_lens: list[int],
    num_padding_tokens: int,
    num_padding_seqs: int,
    num_heads: int,
    num_kv_heads: int,
    chunk_keys: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(neuron, "CHUNK_KEYS", chunk_keys)
    torch.manual_seed(len(seq_lens) * 100 + num_padding_tokens)
    head_dim = 8
    metadata = random_batch(query_lens, seq_lens, num_padding_tokens, num_padding_seqs, seed=sum(seq_lens))
    key_cache, value_cache = random_pool(num_kv_heads, head_dim, torch.float32)
    query = torch.randn(metadata.slot_mapping.shape[0], num_heads, head_dim)

    expected = TorchBackend().paged_attention(query, key_cache, value_cache, metadata, scale=0.3)
    actual = NeuronBackend().paged_attention(query, key_cache, value_cache, metadata, scale=0.3)

    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert (actual[sum(query_lens) :] == 0).all(), "padding rows must be zeros"


@pytest.mark.parametrize("chunk_keys", [512, 2 * BLOCK_SIZE])
def test_paged_attention_bf16_close_to_torch(chunk_keys: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(neuron, "CHUNK_KEYS", chunk_keys)
    torch.manual_seed(1)
    metadata = random_batch([3, 1, 6], [11, 16, 6], num_padding_tokens=2, num_padding_seqs=1, seed=3)
    key_cache, value_cache = random_pool(2, 16, torch.bfloat16)
    query = torch.randn(metadata.slot_mapping.shape[0], 8, 16).to(torch.bfloat16)

    expected = TorchBackend().paged_attention(query.float(), key_cache.float(), value_cache.float(), metadata, 0.25)
    actual = NeuronBackend().paged_attention(query, key_cache, value_cache, metadata, 0.25)

    assert actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("chunk_keys", [512, BLOCK_SIZE])
def test_padding_tokens_stay_finite_over_an_empty_null_block(chunk_keys: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch of only padding (every row masked but slot 0) gives zeros, not NaN."""
    monkeypatch.setattr(neuron, "CHUNK_KEYS", chunk_keys)
    metadata = AttentionMetadata.build(
        [1], [1], [[5]], BLOCK_SIZE, "cpu", num_padded_tokens=4, num_padded_seqs=3, max_blocks_per_seq=2
    )
    key_cache, value_cache = random_pool(2, 8, torch.float32)
    query = torch.randn(4, 2, 8)

    out = NeuronBackend().paged_attention(query, key_cache, value_cache, metadata, scale=1.0)

    assert torch.isfinite(out).all()
    assert (out[1:] == 0).all()


def test_write_kv_cache_matches_torch() -> None:
    torch.manual_seed(2)
    metadata = random_batch([3, 1, 6], [11, 16, 6], num_padding_tokens=3, num_padding_seqs=1, seed=7)
    num_tokens = metadata.slot_mapping.shape[0]
    key, value = torch.randn(num_tokens, 2, 8), torch.randn(num_tokens, 2, 8)
    initial = random_pool(2, 8, torch.float32)
    pools = {}
    for backend in (TorchBackend(), NeuronBackend()):
        key_cache, value_cache = initial[0].clone(), initial[1].clone()
        backend.write_kv_cache(key, value, key_cache, value_cache, metadata.slot_mapping)
        pools[backend.name] = (key_cache, value_cache)

    real_tokens = 10
    for expected, actual in zip(pools["torch"], pools["neuron"]):
        # The null block takes whichever padding token wins; every other slot must agree.
        torch.testing.assert_close(actual[1:], expected[1:], rtol=0, atol=0)
    key_cache = pools["neuron"][0].view(-1, 2, 8)
    torch.testing.assert_close(key_cache[metadata.slot_mapping[:real_tokens]], key[:real_tokens])


def test_llama_forward_matches_torch_backend() -> None:
    """Chunked prefill then decode of a tiny random Llama: same logits with either backend."""
    config = ModelConfig(
        vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=8,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    steps = [
        # (query_lens, seq_lens, tables): a prompt and a first chunk, then the second chunk + a decode.
        ([6, 5], [6, 5], [[3, 4], [7, 9, 2]]),
        ([1, 5], [7, 10], [[3, 4], [7, 9, 2]]),
    ]
    logits = {}
    for backend in (TorchBackend(), NeuronBackend()):
        shape = (12, BLOCK_SIZE, 2, 8)
        caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(2)]
        with ops.using_backend(backend):
            logits[backend.name] = [run_step(model, caches, *step) for step in steps]
    for expected, actual in zip(logits["torch"], logits["neuron"]):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def run_step(
    model: LlamaForCausalLM,
    caches: list[tuple[torch.Tensor, torch.Tensor]],
    query_lens: list[int],
    seq_lens: list[int],
    tables: list[list[int]],
) -> torch.Tensor:
    """All-position logits of one flat step padded by 3 tokens and 1 sequence."""
    num_tokens = sum(query_lens) + 3
    metadata = AttentionMetadata.build(
        query_lens, seq_lens, tables, BLOCK_SIZE, "cpu", num_padded_tokens=num_tokens, num_padded_seqs=3,
        max_blocks_per_seq=4,
    )  # fmt: skip
    positions = [p for q, n in zip(query_lens, seq_lens) for p in range(n - q, n)] + [0] * 3
    input_ids = torch.arange(num_tokens) * 7 % model.config.vocab_size
    with torch.no_grad():
        hidden = model(input_ids, torch.tensor(positions), caches, metadata)
        return model.compute_logits(hidden)[: sum(query_lens)]


@pytest.mark.parametrize("scheme", ["int8", "int8-g32", "fp8", "w8a8"])
def test_quantized_linears_in_one_piece_match_the_tiled_reference(scheme: str) -> None:
    from neuron_llm.quant import reference
    from neuron_llm.quant.formats import quantize_fp8_weight, quantize_int8

    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 5, 64), torch.randn(48, 64), torch.randn(48)
    tiles = 64 * 16  # three tiles of rows in the reference
    if scheme.startswith("int8"):
        group_size = 32 if scheme == "int8-g32" else None
        q, scale = quantize_int8(weight, group_size)
        expected = reference.int8_linear(x, q, scale, bias, group_size, tile_elements=tiles)
        actual = NeuronBackend().int8_linear(x, q, scale, bias, group_size)
    elif scheme == "fp8":
        q, scale = quantize_fp8_weight(weight)
        expected = reference.fp8_linear(x, q, scale, bias, 1200.0, tile_elements=tiles)
        actual = NeuronBackend().fp8_linear(x, q, scale, bias, 1200.0)
    else:
        q, scale = quantize_int8(weight)
        expected = reference.w8a8_linear(x, q, scale, bias, tile_elements=tiles)
        actual = NeuronBackend().w8a8_linear(x, q, scale, bias)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
