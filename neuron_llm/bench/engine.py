"""End-to-end GPU figures of the engine on a random-weight Llama of a real shape.

Every case builds the model with fresh random weights (no real 8B weights are reachable;
speed does not depend on their values, as long as they are not zeros), runs it through the
engine as a user would (scheduler, CUDA graphs, sampling, token read-back), and reports
beside the anchors of the same run: the batch-1 decode floor (weight bytes over the copy
bandwidth) and transformers' ``generate`` on the same shape.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from neuron_llm.config import (
    CacheConfig,
    DeviceConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from neuron_llm.engine.llm_engine import LLMEngine
from neuron_llm.loader import default_dtype
from neuron_llm.models.llama import LlamaForCausalLM
from neuron_llm.parallel.executor import UniprocExecutor
from neuron_llm.quant import quantize_model
from neuron_llm.sampling_params import SamplingParams
from neuron_llm.worker import StepInput, make_worker

LLAMA3_8B: dict[str, Any] = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
}
"""Llama-3-8B's shape (``config.json`` keys)."""


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile of ``values``: the smallest value that at least
    ``q`` percent of them do not exceed."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def llama3_8b_shape(num_layers: int | None = None) -> tuple[dict[str, Any], ModelConfig]:
    """Llama-3-8B's ``config.json`` keys, with ``num_layers`` layers when given, and its ModelConfig."""
    hf_config = dict(LLAMA3_8B)
    if num_layers is not None:
        hf_config["num_hidden_layers"] = num_layers
    return hf_config, ModelConfig.from_hf_config(hf_config)


def random_llama(config: ModelConfig, dtype: torch.dtype, device: str, seed: int = 0) -> LlamaForCausalLM:
    """A Llama of ``config`` with weights drawn from N(0, 0.02) (norm weights 1), built on ``device``."""
    generator = torch.Generator(device).manual_seed(seed)
    with default_dtype(dtype), torch.device(device):
        model = LlamaForCausalLM(config)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        else:
            param.data.normal_(0.0, 0.02, generator=generator)
    return model.eval().requires_grad_(False)


def random_llama_builder(config: ModelConfig, weights: str | None = None) -> Callable[[], LlamaForCausalLM]:
    """An ``EngineCase.build``: a bf16 ``random_llama`` on the GPU, quantized with the preset
    ``weights`` unless it is None or "bf16"."""

    def build() -> LlamaForCausalLM:
        model = random_llama(config, torch.bfloat16, "cuda")
        if weights not in (None, "bf16"):
            quantize_model(model, weights)
        return model

    return build


@dataclass
class EngineCase:
    """An engine over a model built by ``build``, and the settings it runs with."""

    build: Callable[[], LlamaForCausalLM]
    model_config: ModelConfig
    dtype: torch.dtype = torch.bfloat16
    device: str = "cuda"
    max_model_len: int = 8192
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    num_kv_blocks: int = 4096
    enforce_eager: bool = False
    max_prefill_graph_tokens: int = DeviceConfig.max_prefill_graph_tokens

    def engine(self) -> LLMEngine:
        config = EngineConfig(
            model=self.model_config,
            device=DeviceConfig(
                self.device,
                self.dtype,
                enforce_eager=self.enforce_eager,
                max_prefill_graph_tokens=self.max_prefill_graph_tokens,
            ),
            cache=CacheConfig(num_kv_blocks=self.num_kv_blocks, enable_prefix_caching=False),
            scheduler=SchedulerConfig(
                max_model_len=self.max_model_len,
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=self.max_num_batched_tokens,
            ),
        )
        model = self.build()
        executor = UniprocExecutor(config, lambda config, rank, world: make_worker(model, config))
        engine = LLMEngine(config, executor, tokenizer=None, eos_token_ids=())
        engine.runner.warm_up()
        return engine


def random_prompts(count: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (count, length), generator=generator).tolist()


def timed_steps(
    engine: LLMEngine,
    prompts: list[list[int]],
    max_tokens: int,
    output_kind: str = "cumulative",
    sampling: dict[str, Any] | None = None,
) -> list[float]:
    """Seconds of every engine step while generating ``max_tokens`` tokens for each prompt,
    greedy unless ``sampling`` gives other ``SamplingParams`` fields."""
    fields = {"temperature": 0.0} | (sampling or {})
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, output_kind=output_kind, **fields)
    for prompt in prompts:
        engine.add_request(prompt, params)
    times = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return times


def with_scheduling(engine: LLMEngine, async_scheduling: bool) -> LLMEngine:
    """An engine over ``engine``'s worker (its graphs captured already) with async scheduling on or off.

    Use one engine at a time: each has its own scheduler over the one KV pool.
    """
    scheduler = dataclasses.replace(engine.config.scheduler, async_scheduling=async_scheduling)
    config = dataclasses.replace(engine.config, scheduler=scheduler)
    return LLMEngine(config, engine.runner.executor, tokenizer=None, eos_token_ids=())


class ReplayProposer:
    """Proposes what a run wrote after the prompt, or (``spoil``) the token after it in the
    vocabulary: speculative decoding with every proposal kept, its ceiling, or with every
    one refused, its cost when proposals miss."""

    def __init__(self, prompt_len: int, written: list[int], spoil: bool, vocab_size: int, k: int) -> None:
        self.prompt_len, self.written, self.spoil, self.vocab_size, self.k = prompt_len, written, spoil, vocab_size, k

    def propose(self, token_ids: Sequence[int]) -> list[int]:
        done = len(token_ids) - self.prompt_len
        proposal = self.written[done : done + self.k]
        return [(t + 1) % self.vocab_size for t in proposal] if self.spoil else proposal


def with_speculation(engine: LLMEngine, proposer: ReplayProposer) -> LLMEngine:
    """An engine over ``engine``'s worker verifying ``proposer``'s proposals (async scheduling off)."""
    scheduler = dataclasses.replace(engine.config.scheduler, async_scheduling=False)
    speculative = SpeculativeConfig(num_speculative_tokens=proposer.k)
    config = dataclasses.replace(engine.config, scheduler=scheduler, speculative=speculative)
    speculating = LLMEngine(config, engine.runner.executor, tokenizer=None, eos_token_ids=())
    speculating.proposer = proposer
    return speculating


def _greedy_run(engine: LLMEngine, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    """The tokens of one greedy request and the seconds of each engine step."""
    engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    times, written = [], []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        written = next((o.outputs[0].token_ids for o in engine.step() if o.finished), written)
        times.append(time.perf_counter() - start)
    return written, times


def _kept_continuation(
    engine: LLMEngine, prompt: list[int], written: list[int], k: int, max_tokens: int, max_rounds: int = 64
) -> tuple[list[int], int]:
    """The continuation that a ``k``-proposal engine writes when proposed it, and the rounds to find it.

    A verification step's bf16 logits round apart from a decode step's, so plain decoding's
    tokens are not always kept: a near tie among a random model's flat logits can flip. Each
    round proposes the previous round's output, which moves the first refusal later, as the
    rows before a refused proposal do not depend on it.
    """
    for rounds in range(1, max_rounds + 1):
        proposer = ReplayProposer(len(prompt), written, False, engine.config.model.vocab_size, k)
        output, _ = _greedy_run(with_speculation(engine, proposer), prompt, max_tokens)
        if output == written[:max_tokens]:
            return written, rounds
        written = output
    raise RuntimeError(f"no continuation kept every proposal after {max_rounds} rounds")


def speculative_decode(
    engine: LLMEngine, prompt_len: int, max_tokens: int, vocab_size: int, ks: Sequence[int] = (2, 4)
) -> dict[str, Any]:
    """Seconds per token of one sequence decoding with ``k`` proposals a step, each kept or
    each refused, beside plain decoding with async scheduling off (which speculation needs),
    the prefill step excluded; each setting run twice, in order and then reversed. Also the
    worker's seconds for a step of ``k + 1`` tokens over one of 1 (graph replay to token),
    which bounds the speedup of every proposal kept at ``(k + 1) / ratio``.
    """
    (prompt,) = random_prompts(1, prompt_len, vocab_size)
    plain = with_scheduling(engine, False)
    written, _ = _greedy_run(plain, prompt, max_tokens)
    engines = {"plain": plain}
    rounds: dict[str, int] = {}
    for k in ks:
        kept, rounds[f"k={k}, kept"] = _kept_continuation(engine, prompt, written, k, max_tokens)
        engines[f"k={k}, kept"] = with_speculation(engine, ReplayProposer(prompt_len, kept, False, vocab_size, k))
        engines[f"k={k}, refused"] = with_speculation(engine, ReplayProposer(prompt_len, written, True, vocab_size, k))
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    steps: dict[str, int] = {}
    for order in (list(engines), list(reversed(engines))):
        for name in order:
            timed_steps(engines[name], [prompt], 8)  # first-use costs
            _, times = _greedy_run(engines[name], prompt, max_tokens)
            seconds[name].append(sum(times[1:]) / (max_tokens - 1))
            steps[name] = len(times) - 1
    context = prompt_len + max_tokens // 2
    decode_step = worker_step_time(engine, context)
    return {
        name: {"s_per_token": statistics.mean(seconds[name]), "decode_steps": steps[name]}
        | ({"rounds_to_keep_all": rounds[name]} if name in rounds else {})
        for name in engines
    } | {
        "worker_step_ratio": {
            f"{k + 1} tokens over 1": worker_step_time(engine, context, query_len=k + 1) / decode_step for k in ks
        }
    }


def decode_latency(engine: LLMEngine, prompt_len: int, max_tokens: int, vocab_size: int) -> dict[str, float]:
    """Median seconds per decode step of one sequence (the first step, its prefill, excluded).

    ``sync_s_per_token`` is the same with async scheduling off (alternated with the engine
    as configured, twice); ``model_s_per_token`` times the worker alone on the same shape
    (inputs staged, graph replayed, greedy token read back).
    """
    prompts = random_prompts(1, prompt_len, vocab_size)
    engines = {"decode_s_per_token": engine, "sync_s_per_token": with_scheduling(engine, False)}
    decode: dict[str, list[float]] = {name: [] for name in engines}
    for order in (list(engines), list(reversed(engines))):
        for name in order:
            timed_steps(engines[name], prompts, 8)  # first-use costs
            decode[name] += timed_steps(engines[name], prompts, max_tokens)[1:]
    return {
        **{name: statistics.median(times) for name, times in decode.items()},
        "decode_s_p90": percentile(decode["decode_s_per_token"], 90),
        "model_s_per_token": worker_step_time(engine, prompt_len + max_tokens // 2),
    }


def sampled_decode(
    engine: LLMEngine, prompt_len: int, max_tokens: int, vocab_size: int, settings: dict[str, dict[str, Any] | None]
) -> dict[str, list[float]]:
    """Median seconds per decode step of one sequence under each of ``settings`` (name ->
    ``sampling`` of ``timed_steps``), the settings run in order and then reversed."""
    prompts = random_prompts(1, prompt_len, vocab_size)
    results: dict[str, list[float]] = {name: [] for name in settings}
    for order in (list(settings), list(reversed(settings))):
        for name in order:
            timed_steps(engine, prompts, 8, sampling=settings[name])  # first-use costs
            results[name].append(
                statistics.median(timed_steps(engine, prompts, max_tokens, sampling=settings[name])[1:])
            )
    return results


def step_input(engine: LLMEngine, context: int, query_len: int = 1) -> StepInput:
    """One sequence's step at ``context`` tokens computing the last ``query_len`` of them (1: a
    decode step; ``context``: a whole prompt's prefill), padded to the engine's bucket for it.

    The tokens are random: a GPU's matmul rate depends on the data (identical rows draw less
    power and run faster), so a prefill of one repeated token would flatter every format.
    """
    runner = engine.runner
    bucket = runner.buckets.select(query_len, 1, is_decode=query_len == 1)
    block_size = engine.config.cache.block_size
    (input_ids,) = random_prompts(1, query_len, engine.config.model.vocab_size)
    return StepInput(
        input_ids=input_ids,
        positions=list(range(context - query_len, context)),
        query_lens=[query_len],
        seq_lens=[context],
        block_tables=[list(range(1, 1 + -(-context // block_size)))],
        logits_indices=[query_len - 1] + [0] * (bucket.num_seqs - 1),
        num_padded_tokens=bucket.num_tokens,
        num_padded_seqs=bucket.num_seqs,
        max_blocks_per_seq=runner.buckets.max_blocks_per_seq,
    )


def worker_step_time(engine: LLMEngine, context: int, query_len: int = 1, repeats: int = 50) -> float:
    """Median seconds of one sequence's step (``step_input``) through the worker, from staging
    to the token on the host."""
    step = step_input(engine, context, query_len)
    worker = engine.runner.executor.worker
    times = []
    for _ in range(repeats + 3):
        start = time.perf_counter()
        worker.execute(step)[0].argmax().item()
        times.append(time.perf_counter() - start)
    return statistics.median(times[3:])


def few_rows(engine: LLMEngine, prompt_len: int, max_tokens: int, vocab_size: int, batch: int = 16) -> dict[str, Any]:
    """Steps of a few rows, which run other kernels than batch 1's (int8: 16-row tiles, not the
    GEMV): the worker's seconds for a step of 5 tokens over one of 1 (speculation's verification
    of 4), and ``batch_throughput`` of ``batch`` sequences."""
    context = prompt_len + max_tokens // 2
    ratio = worker_step_time(engine, context, query_len=5) / worker_step_time(engine, context)
    return {"worker_step_ratio": ratio, "batch": batch} | batch_throughput(
        engine, batch, prompt_len, max_tokens, vocab_size
    )


def batch_throughput(
    engine: LLMEngine,
    batch: int,
    prompt_len: int,
    max_tokens: int,
    vocab_size: int,
    sampling: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Output tokens/s of ``batch`` prompts submitted at once, wall time from submission to the last token;
    ``decode_tokens_per_s`` the batch over its median decode step (its prefill steps left out, as
    ``decode_latency`` leaves out batch 1's); ``..._sync`` the same with async scheduling off.
    Greedy unless ``sampling`` (as ``timed_steps``). Every prompt must leave room for ``max_tokens``."""
    prompts = random_prompts(batch, prompt_len, vocab_size, seed=1)
    if prompt_len + max_tokens > engine.config.max_model_len:
        # Requests would stop early, and the count of tokens below would be too high.
        raise ValueError(f"{prompt_len} + {max_tokens} tokens exceed max_model_len={engine.config.max_model_len}")
    num_prefill_steps = -(-batch * prompt_len // engine.config.scheduler.max_num_batched_tokens)
    results = {}
    for name, run in (("", engine), ("_sync", with_scheduling(engine, False))):
        # The whole batch once first, so that kernels compiled for its shapes (its prefill
        # chunks, a sampling kernel for its rows) compile outside the timed run.
        timed_steps(run, prompts, 2, sampling=sampling)
        if torch.device(run.config.device.device).type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        times = timed_steps(run, prompts, max_tokens, sampling=sampling)
        seconds = time.perf_counter() - start
        results |= {
            f"output_tokens_per_s{name}": batch * max_tokens / seconds,
            f"decode_tokens_per_s{name}": batch / statistics.median(times[num_prefill_steps:]),
            f"seconds{name}": seconds,
        }
    return results | {"steps": len(times)}


def prefill_time(engine: LLMEngine, prompt_len: int, vocab_size: int, repeats: int = 5) -> dict[str, float]:
    """Median seconds from a ``prompt_len``-token prompt's first step to its one token: the step
    that prefills it and samples, and with async scheduling the next, which reads the token."""
    times = []
    for seed in range(repeats + 1):
        times.append(sum(timed_steps(engine, random_prompts(1, prompt_len, vocab_size, seed=seed), 1)))
    seconds = statistics.median(times[1:])
    return {"prefill_s": seconds, "prefill_tokens_per_s": prompt_len / seconds}


@contextmanager
def released() -> Iterator[None]:
    """Free what a case left on the GPU when it ends, before the next one builds its model."""
    try:
        yield
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def transformers_generate(
    hf_config: dict[str, Any], batch: int, prompt_len: int, max_tokens: int, *, seed: int = 0
) -> dict[str, float]:
    """transformers' eager ``generate`` (dynamic cache, greedy) on a random model of the same shape.

    Returns seconds per decode token at this batch (from the difference of a run of
    ``max_tokens`` and one of a single token, so the prefill cancels) and output tokens/s.
    """
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM as HFLlama

    config = LlamaConfig(**{k: v for k, v in hf_config.items() if k not in ("model_type", "architectures")})
    config.eos_token_id = None
    config.pad_token_id = 0
    with default_dtype(torch.bfloat16), torch.device("cuda"):
        model = HFLlama(config).eval()
    generator = torch.Generator("cuda").manual_seed(seed)
    for param in model.parameters():
        param.data.normal_(0.0, 0.02, generator=generator) if param.dim() > 1 else param.data.fill_(1.0)
    ids = torch.tensor(random_prompts(batch, prompt_len, config.vocab_size, seed=2), device="cuda")

    def run(new_tokens: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    run(4)
    short, full = run(1), run(max_tokens)
    return {
        "decode_s_per_token": (full - short) / (max_tokens - 1),
        "output_tokens_per_s": batch * max_tokens / full,
    }
