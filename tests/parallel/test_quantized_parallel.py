"""Quantized models under tensor parallelism: each rank's 8-bit shard, and TP=2 logits beside TP=1's."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from neuron_llm.config import CacheConfig, EngineConfig, ParallelConfig
from neuron_llm.loader import load_model
from neuron_llm.loader.hf_dir import read_model_config
from neuron_llm.parallel import make_executor, shard_model
from neuron_llm.parallel.layers import Partition
from neuron_llm.parallel.quantized import Int8RowParallelLinear, column_parallel, row_parallel
from neuron_llm.quant import LinearFormat, QuantConfig, load_any_format, quantize_model, save_quantized_checkpoint
from neuron_llm.quant.formats import quantize_int8
from neuron_llm.quant.layers import Int8Linear
from neuron_llm.quant.policy import ALL_LINEARS
from neuron_llm.worker import Worker
from tests.parallel.test_tensor_parallel import TIMEOUT_S, run_steps

# hidden 64 and intermediate 128: each rank's input block of o_proj (32) and down_proj (64)
# holds whole groups of 32. The usual 0.02 initialization keeps quantization error from
# being amplified layer after layer, as the tiny fixture's 0.2 would.
MODEL = {"initializer_range": 0.02, "vocab_size": 96}
GROUPED = QuantConfig.for_scheme("int8", group_size=32)


def test_shards_read_their_rows_columns_and_scales_of_the_checkpoint() -> None:
    generator = torch.Generator().manual_seed(0)
    q, group_scale = quantize_int8(torch.randn(8, 64, generator=generator), group_size=16)
    _, channel_scale = quantize_int8(torch.randn(8, 64, generator=generator))
    for rank in (0, 1):
        partition = Partition(rank, 2)
        column = column_parallel(LinearFormat("int8", group_size=16), 64, 8, partition)
        column.weight.weight_loader(column.weight, q)
        column.weight_scale.weight_loader(column.weight_scale, group_scale)
        rows = slice(4 * rank, 4 * rank + 4)
        assert torch.equal(column.weight, q[rows]) and torch.equal(column.weight_scale, group_scale[rows])

        row = row_parallel(LinearFormat("int8", group_size=16), 64, 8, partition)
        row.weight.weight_loader(row.weight, q)
        row.weight_scale.weight_loader(row.weight_scale, group_scale)
        assert isinstance(row, Int8RowParallelLinear) and row.partition == partition
        assert torch.equal(row.weight, q[:, 32 * rank : 32 * rank + 32])
        assert torch.equal(row.weight_scale, group_scale[:, 2 * rank : 2 * rank + 2])

        per_channel = row_parallel(LinearFormat("w8a8"), 64, 8, partition)
        per_channel.weight_scale.weight_loader(per_channel.weight_scale, channel_scale)
        assert torch.equal(per_channel.weight_scale, channel_scale)  # every row's scale, on every rank
    with pytest.raises(ValueError, match="group_size=48 does not divide each rank's 32 input features"):
        row_parallel(LinearFormat("int8", group_size=48), 64, 8, Partition(0, 2))
    with pytest.raises(ValueError, match=r"unsharded shape \(8, 64\)"):
        column.weight.weight_loader(column.weight, q[:, :60])


def test_quantizing_on_load_quantizes_each_shard_from_its_own_slice(
    save_tiny_llama: Callable[..., tuple[Any, Path]],
) -> None:
    _, path = save_tiny_llama(**MODEL)
    full = load_model(path, dtype=torch.float32, device="cpu").model
    shard = load_model(path, dtype=torch.float32, device="cpu", shard=lambda m: shard_model(m, 1, 2)).model
    quantize_model(shard, "int8")
    layer = shard.model.layers[0]
    q_proj, o_proj = layer.self_attn.q_proj, layer.self_attn.o_proj
    assert type(q_proj) is Int8Linear and isinstance(o_proj, Int8RowParallelLinear)
    assert o_proj.partition == Partition(1, 2)
    full_layer = full.model.layers[0].self_attn
    expected_q, expected_scale = quantize_int8(full_layer.q_proj.weight[32:])  # rank 1's rows
    assert torch.equal(q_proj.weight, expected_q) and torch.equal(q_proj.weight_scale, expected_scale)
    expected_o, expected_o_scale = quantize_int8(full_layer.o_proj.weight[:, 32:])  # rank 1's columns
    assert torch.equal(o_proj.weight, expected_o) and torch.equal(o_proj.weight_scale, expected_o_scale)

    # Groups of 128 would be cut at rank 1's 32 columns: refused as a checkpoint's would be
    # (quantized anyway, the shards saved in an artifact could not be loaded back).
    shard = load_model(path, dtype=torch.float32, device="cpu", shard=lambda m: shard_model(m, 1, 2)).model
    with pytest.raises(ValueError, match="group_size=128 does not divide each rank's 32 input features"):
        quantize_model(shard, QuantConfig.for_scheme("int8", group_size=128))


def build_worker(
    model_dir: str, quantization: QuantConfig | None, config: EngineConfig, rank: int, world_size: int
) -> Worker:
    shard = functools.partial(shard_model, rank=rank, world_size=world_size) if world_size > 1 else None
    loaded = load_any_format(model_dir, dtype=torch.float32, device="cpu", quantization=quantization, shard=shard)
    return Worker(loaded.model, config, 16)


def logits(model_dir: Path, quantization: QuantConfig | None, tensor_parallel_size: int) -> list[torch.Tensor]:
    config = EngineConfig(
        model=read_model_config(model_dir),
        parallel=ParallelConfig(tensor_parallel_size=tensor_parallel_size),
        cache=CacheConfig(block_size=4),
    )
    factory = functools.partial(build_worker, str(model_dir), quantization)
    with make_executor(config, factory, timeout_s=TIMEOUT_S) as executor:
        return run_steps(executor, config.model.vocab_size)


def max_relative_error(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    return max(((a - e).abs().max() / e.abs().max()).item() for a, e in zip(actual, expected, strict=True))


# From a checkpoint every rank has the checkpoint's weights and scales: int8 weight-only
# is TP=1 up to the order of the sums. w8a8 also quantizes each rank's block of o_proj's
# and down_proj's input with that block's own per-token scale, a finer quantization than
# TP=1's (measured: 0.8% of the largest logit).
# One KV head: both ranks hold a replica of quantized k_proj and v_proj (kv_head_partition).
@pytest.mark.parametrize(
    ("recipe", "num_kv_heads", "tolerance"),
    [(GROUPED, 2, 1e-5), (GROUPED, 1, 1e-5), (QuantConfig.for_scheme("w8a8"), 2, 0.02)],
)
def test_a_quantized_checkpoint_over_two_ranks_gives_one_rank_logits(
    recipe: QuantConfig,
    num_kv_heads: int,
    tolerance: float,
    save_tiny_llama: Callable[..., tuple[Any, Path]],
    tmp_path: Path,
) -> None:
    _, path = save_tiny_llama(**MODEL, num_key_value_heads=num_kv_heads)
    loaded = load_model(path, dtype=torch.float32, device="cpu")
    quantize_model(loaded.model, recipe)
    out = tmp_path / "quantized"
    save_quantized_checkpoint(loaded.model, loaded.config, out, source=path, tokenizer=None, dtype=torch.float32)
    expected = logits(out, None, 1)
    assert max_relative_error(logits(out, None, 2), expected) <= tolerance


def test_quantizing_on_load_over_two_ranks_stays_near_the_16bit_model(
    save_tiny_llama: Callable[..., tuple[Any, Path]],
) -> None:
    # Each rank quantizes its own shard: compared with the unquantized model, as on one device
    # (measured: 4.7% of the largest logit over two ranks, 5.3% on one).
    _, path = save_tiny_llama(**MODEL)
    fp8_all = QuantConfig.for_scheme("fp8", policy=ALL_LINEARS)
    unquantized = logits(path, None, 1)
    one_rank = max_relative_error(logits(path, fp8_all, 1), unquantized)
    two_ranks = max_relative_error(logits(path, fp8_all, 2), unquantized)
    assert 0 < two_ranks <= 1.5 * one_rank, (one_rank, two_ranks)


def test_llm_serves_a_quantized_checkpoint_over_two_ranks(
    save_tiny_llama: Callable[..., tuple[Any, Path]], tmp_path: Path
) -> None:
    from neuron_llm import LLM, SamplingParams

    _, path = save_tiny_llama()  # the peaked logits of the 0.2 initialization: no near-ties
    loaded = load_model(path, dtype=torch.float32, device="cpu")
    quantize_model(loaded.model, GROUPED)
    out = tmp_path / "int8"
    save_quantized_checkpoint(loaded.model, loaded.config, out, source=path, tokenizer=None, dtype=torch.float32)
    prompts = [{"prompt_token_ids": [3, 1, 4, 1, 5]}, {"prompt_token_ids": [9, 2, 6]}]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    options = {"dtype": "float32", "num_kv_blocks": 32, "block_size": 4, "max_model_len": 64}
    one = [o.outputs[0].token_ids for o in LLM(model=str(out), **options).generate(prompts, params)]
    two_ranks = LLM(model=str(out), tensor_parallel_size=2, **options)
    try:
        two = [o.outputs[0].token_ids for o in two_ranks.generate(prompts, params)]
        assert two_ranks.weight_bytes < LLM(model=str(out), **options).weight_bytes  # rank 0 holds half
    finally:
        two_ranks.shutdown()
    assert two == one


def test_a_quantized_lm_head_is_refused_rather_than_sharded_as_16bit(
    save_tiny_llama: Callable[..., tuple[Any, Path]],
) -> None:
    from neuron_llm.quant.layers import empty_quantized_linear

    _, path = save_tiny_llama(**MODEL)
    model = load_model(path, dtype=torch.float32, device="cpu").model
    model.lm_head = empty_quantized_linear(LinearFormat("int8"), 64, 96, bias=False)
    with pytest.raises(ValueError, match="quantizes lm_head, which is not sharded in 8 bits"):
        shard_model(model, 0, 2)
