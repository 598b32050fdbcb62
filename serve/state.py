"""What the routes share: the served model once loaded, and whether the server is draining."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from transformers import PreTrainedTokenizerBase

from neuron_llm.detokenizer import TokenTexts
from neuron_llm.engine.async_llm import AsyncLLM
from neuron_llm.llm import LLM
from neuron_llm.serve.errors import ModelNotFoundError, UnavailableError
from neuron_llm.serve.metrics import ServerMetrics
from neuron_llm.serve.settings import ServeSettings


@dataclass
class ServedModel:
    """The loaded model, its engine and the limits requests are checked against."""

    name: str
    llm: LLM
    engine: AsyncLLM
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        return self.llm.tokenizer

    @property
    def token_texts(self) -> TokenTexts:
        """The engine's cache of each token's text, which logprobs name tokens by."""
        return self.llm.engine.token_texts

    @property
    def max_model_len(self) -> int:
        """The context length requests get: the engine's ``max_model_len``, or less where the KV
        pool holds fewer tokens of one sequence."""
        return self.llm.engine.scheduler.max_seq_len

    @property
    def scores_full_context(self) -> bool:
        """Whether a prompt as long as ``max_model_len`` may be scored (``max_tokens`` 0): only
        where the model's context sets that length, not the KV pool, which must hold the prompt."""
        scheduler = self.llm.engine.scheduler
        return scheduler.max_seq_len == scheduler.max_model_len

    @property
    def max_prompt_len(self) -> int | None:
        """The longest prompt one step takes whole where prompts are not chunked (None: chunked)."""
        scheduler = self.llm.config.scheduler
        return None if scheduler.enable_chunked_prefill else scheduler.max_num_batched_tokens

    @property
    def vocab_size(self) -> int:
        return self.llm.config.model.vocab_size

    def check_name(self, requested: str | None) -> None:
        """Raise ``ModelNotFoundError`` unless ``requested`` is None or this model's name."""
        if requested is not None and requested != self.name:
            raise ModelNotFoundError(requested, self.name)


@dataclass
class ServerState:
    """The app's state; ``model`` is None until the background load finishes."""

    settings: ServeSettings
    metrics: ServerMetrics
    model: ServedModel | None = None
    load_error: str | None = None
    draining_since: float | None = None
    """``time.monotonic()`` when shutdown began; None while serving."""

    @property
    def is_draining(self) -> bool:
        return self.draining_since is not None

    def start_draining(self) -> None:
        """Refuse new requests from now on; the drain timeout runs from the first call."""
        if self.draining_since is None:
            self.draining_since = time.monotonic()

    def drain_time_left(self) -> float:
        """Seconds left of the drain timeout: uvicorn's wait for open connections and the
        engine's for its requests share it, so shutdown never takes twice as long."""
        elapsed = 0.0 if self.draining_since is None else time.monotonic() - self.draining_since
        return max(0.0, self.settings.drain_timeout - elapsed)

    @property
    def status(self) -> str:
        """One of "loading", "ready", "draining", "failed"."""
        if self.load_error is not None:
            return "failed"
        if self.is_draining:
            return "draining"
        if self.model is None:
            return "loading"
        return "ready" if self.model.engine.is_ready else "failed"

    def ready_model(self) -> ServedModel:
        """The served model; raises ``UnavailableError`` (503) while loading, draining or failed."""
        status = self.status
        if status == "ready":
            assert self.model is not None
            return self.model
        reasons = {
            "loading": ("the model is still loading; retry shortly", "model_loading"),
            "draining": ("the server is shutting down", "shutting_down"),
            "failed": (f"the model is not available: {self.load_error or 'the engine stopped'}", "model_failed"),
        }
        message, code = reasons[status]
        raise UnavailableError(message, code=code)


def get_state(request: Request) -> ServerState:
    """The ``ServerState`` of the app serving ``request``."""
    return request.app.state.server


def model_name(settings: ServeSettings, source: Path) -> str:
    """The name clients use for the model: the configured one, else the model's file or folder name."""
    if settings.served_model_name:
        return settings.served_model_name
    return source.stem if source.is_file() else source.name
