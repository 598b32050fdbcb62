"""The tensor-parallel layers against their unsharded forms.

In one process: what each rank's parameters hold, which slice of the checkpoint tensor each
rank reads, and the grouped-query mapping when KV heads are split or replicated. Over two
gloo processes on the CPU: each layer's output equals the unsharded layer's.
"""

from __future__ import annotations

import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from neuron_llm.config import ModelConfig
from neuron_llm.loader.weights import load_weights
from neuron_llm.parallel import (
    ColumnParallelLinear,
    ParallelLMHead,
    Partition,
    RowParallelLinear,
    VocabParallelEmbedding,
    destroy_distributed,
    init_distributed,
    kv_head_partition,
)
from neuron_llm.worker import num_kv_heads_per_rank

WORLD_SIZE = 2
TIMEOUT_S = 45.0


class RecordingSource:
    """A ``TensorSource`` over an in-memory tensor that records every index it is read with."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.shape = tuple(tensor.shape)
        self.reads: list[object] = []

    def __getitem__(self, index: object) -> torch.Tensor:
        self.reads.append(index)
        return self.tensor[index].clone()


class Holder(nn.Module):
    """Gives layers checkpoint-style names so they load through ``load_weights``."""

    def __init__(self, **layers: nn.Module) -> None:
        super().__init__()
        for name, layer in layers.items():
            self.add_module(name, layer)


def test_partition_bounds() -> None:
    assert [Partition(i, 2).bounds(8) for i in range(2)] == [(0, 4), (4, 8)]
    assert [Partition(i, 2).padded_bounds(7) for i in range(2)] == [(0, 4, 4), (4, 7, 4)]
    # More parts than rows to spare: the trailing parts are all padding.
    assert [Partition(i, 4).padded_bounds(5) for i in range(4)] == [(0, 2, 2), (2, 4, 2), (4, 5, 2), (5, 5, 2)]
    with pytest.raises(ValueError, match="cannot split 7 into 2 equal parts"):
        Partition(0, 2).bounds(7)
    with pytest.raises(ValueError, match=r"index=2 must be in \[0, count=2\)"):
        Partition(2, 2)


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_reads_and_holds_only_its_slice(rank: int) -> None:
    torch.manual_seed(0)
    column, row = torch.randn(8, 6), torch.randn(6, 8)
    vocab = torch.randn(7, 6)  # 7 rows: rank 0 holds 0..3, rank 1 holds 4..6 and one padding row
    sources = {
        "column.weight": RecordingSource(column),
        "row.weight": RecordingSource(row),
        "embedding.weight": RecordingSource(vocab),
        "head.weight": RecordingSource(vocab),
    }
    partition = Partition(rank, WORLD_SIZE)
    holder = Holder(
        column=ColumnParallelLinear(6, 8, partition),
        row=RowParallelLinear(8, 6, partition),
        embedding=VocabParallelEmbedding(7, 6, partition),
        head=ParallelLMHead(6, 7, partition),
    )
    load_weights(holder, sources.items())

    half = slice(4 * rank, 4 * rank + 4)
    assert sources["column.weight"].reads == [half]
    assert torch.equal(holder.column.weight, column[half])
    assert sources["row.weight"].reads == [(slice(None), half)]
    assert torch.equal(holder.row.weight, row[:, half])
    vocab_rows = [slice(0, 4), slice(4, 7)][rank]
    for name in ("embedding", "head"):
        weight = getattr(holder, name).weight
        assert sources[f"{name}.weight"].reads == [vocab_rows]
        assert weight.shape == (4, 6)
        num_real = vocab_rows.stop - vocab_rows.start
        assert torch.equal(weight[:num_real], vocab[vocab_rows])
        assert not weight[num_real:].any()


def test_a_checkpoint_tensor_of_the_wrong_shape_is_refused() -> None:
    holder = Holder(column=ColumnParallelLinear(6, 8, Partition(0, 2)))
    with pytest.raises(ValueError, match=r"column.weight: checkpoint shape \(8, 5\) does not match .* \(8, 6\)"):
        load_weights(holder, [("column.weight", RecordingSource(torch.zeros(8, 5)))])


def test_a_sharded_layer_refuses_to_run_without_its_group() -> None:
    layer = RowParallelLinear(8, 6, Partition(0, 2))
    with pytest.raises(RuntimeError, match="sharded for 2 ranks runs in a tensor-parallel group of 1"):
        layer(torch.zeros(1, 4))


GQA_SHAPES = [
    # (num_heads, num_kv_heads, world_size): split KV heads, then replicated ones.
    (8, 8, 4),
    (8, 4, 2),
    (8, 2, 2),
    (8, 2, 4),
    (8, 2, 8),
    (8, 1, 2),
    (12, 3, 6),
    (16, 4, 8),
]


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "world_size"), GQA_SHAPES)
def test_each_rank_holds_the_kv_heads_its_query_heads_read(num_heads: int, num_kv_heads: int, world_size: int) -> None:
    group_size = num_heads // num_kv_heads
    config = _model_config(num_heads, num_kv_heads)
    holders: dict[int, list[int]] = {kv: [] for kv in range(num_kv_heads)}
    for rank in range(world_size):
        query_start, query_end = Partition(rank, world_size).bounds(num_heads)
        kv_start, kv_end = kv_head_partition(rank, world_size, num_kv_heads).bounds(num_kv_heads)
        assert kv_end - kv_start == num_kv_heads_per_rank(config, world_size)
        # On the rank, attention maps local query head i to local KV head i // local_group_size.
        local_group_size = (query_end - query_start) // (kv_end - kv_start)
        for local_head, head in enumerate(range(query_start, query_end)):
            assert kv_start + local_head // local_group_size == head // group_size, (rank, head)
        for kv in range(kv_start, kv_end):
            holders[kv].append(rank)
    # Every KV head is held, each by the same number of ranks.
    assert {len(ranks) for ranks in holders.values()} == {max(1, world_size // num_kv_heads)}


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "world_size"), [(8, 2, 4), (8, 1, 4), (8, 4, 2)])
def test_sharded_attention_heads_equal_the_unsharded_ones(num_heads: int, num_kv_heads: int, world_size: int) -> None:
    head_dim, hidden_size, num_tokens = 4, 16, 5
    torch.manual_seed(0)
    hidden = torch.randn(num_tokens, hidden_size)
    widths = {"q": num_heads * head_dim, "k": num_kv_heads * head_dim, "v": num_kv_heads * head_dim}
    weights = {name: torch.randn(width, hidden_size) for name, width in widths.items()}
    expected = _causal_gqa(*(hidden @ weights[name].T for name in "qkv"), head_dim)

    outputs = []
    for rank in range(world_size):
        partitions = {"q": Partition(rank, world_size)}
        partitions["k"] = partitions["v"] = kv_head_partition(rank, world_size, num_kv_heads)
        projected = []
        for name in "qkv":
            layer = ColumnParallelLinear(hidden_size, weights[name].shape[0], partitions[name])
            layer.weight.weight_loader(layer.weight, RecordingSource(weights[name]))
            projected.append(layer(hidden))
        outputs.append(_causal_gqa(*projected, head_dim))
    # Rank r computes query heads [r * num_heads / world_size, ...): concatenated in rank order.
    # fp32 tolerance: a shard's matmul may block its sums differently (it does with one thread).
    torch.testing.assert_close(torch.cat(outputs, dim=0), expected, rtol=1e-4, atol=1e-5)


def _causal_gqa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Causal attention of one sequence; query head h reads KV head h // group_size. Returns [heads, tokens, dim]."""
    query, key, value = (x.view(x.shape[0], -1, head_dim).transpose(0, 1) for x in (query, key, value))
    group_size = query.shape[0] // key.shape[0]
    key, value = key.repeat_interleave(group_size, dim=0), value.repeat_interleave(group_size, dim=0)
    return F.scaled_dot_product_attention(query, key, value, is_causal=True)


def _model_config(num_heads: int, num_kv_heads: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=16,
        hidden_size=num_heads * 4,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=4,
    )


def test_parallel_layers_equal_unsharded_layers_over_two_ranks() -> None:
    port = _free_port()
    context = mp.start_processes(
        _check_layers_on_rank, args=(port,), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    # join() raises with the rank's traceback when an assertion fails inside it.
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the ranks did not finish within {TIMEOUT_S} s")


def _check_layers_on_rank(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    init_distributed(WORLD_SIZE, rank, "gloo", f"tcp://127.0.0.1:{port}", timeout_s=TIMEOUT_S)
    try:
        _check_layers(Partition(rank, WORLD_SIZE))
    finally:
        destroy_distributed()


def _check_layers(partition: Partition) -> None:
    # Same seed on every rank: the same full weights and inputs, of which each rank loads its part.
    torch.manual_seed(0)
    hidden_size, intermediate_size, vocab_size = 6, 8, 7
    up, down = torch.randn(intermediate_size, hidden_size), torch.randn(hidden_size, intermediate_size)
    vocab = torch.randn(vocab_size, hidden_size)
    x = torch.randn(3, hidden_size)
    input_ids = torch.tensor([0, 3, 4, 6, 6, 1])  # ids of both ranks, including the last (padded) shard

    column = ColumnParallelLinear(hidden_size, intermediate_size, partition)
    row = RowParallelLinear(intermediate_size, hidden_size, partition)
    embedding = VocabParallelEmbedding(vocab_size, hidden_size, partition)
    head = ParallelLMHead(hidden_size, vocab_size, partition)
    for layer, weight in ((column, up), (row, down), (embedding, vocab), (head, vocab)):
        layer.weight.weight_loader(layer.weight, RecordingSource(weight))

    torch.testing.assert_close(row(column(x)), F.linear(F.linear(x, up), down), rtol=1e-5, atol=1e-6)
    assert torch.equal(embedding(input_ids), F.embedding(input_ids, vocab))
    logits = head(x)
    assert logits.shape == (3, vocab_size)
    torch.testing.assert_close(logits, F.linear(x, vocab), rtol=1e-5, atol=1e-6)
    # A tied head shares the embedding's padded shard and gathers the same logits.
    head.weight = embedding.weight
    torch.testing.assert_close(head(x), F.linear(x, vocab), rtol=1e-5, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
