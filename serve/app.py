"""The FastAPI app: OpenAI, vLLM tokenize and SageMaker routes, health and metrics, around one ``AsyncLLM``.

The model loads in a background thread when the app starts, so the server answers at once:
``/ping`` and ``/health`` say 503 until the model is ready, and generation routes refuse
with 503 meanwhile. On shutdown the app stops accepting requests, lets those in flight
finish within the drain timeout, aborts the rest and stops the engine.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

import neuron_llm
from neuron_llm.engine.async_llm import AsyncLLM
from neuron_llm.llm import LLM
from neuron_llm.loader import resolve_model_path
from neuron_llm.serve import openai_routes, sagemaker_routes, tokenize_routes
from neuron_llm.serve.auth import RequireApiKey
from neuron_llm.serve.body_limit import LimitBody
from neuron_llm.serve.errors import install_error_handlers
from neuron_llm.serve.metrics import ServerMetrics
from neuron_llm.serve.settings import ServeSettings
from neuron_llm.serve.state import ServedModel, ServerState, get_state, model_name

logger = logging.getLogger(__name__)

_DRAIN_POLL_S = 0.05
"""How soon the drain notices a stop signal."""

METRICS_UPDATE_S = 1.0
"""How often the metrics take in the engine's latency samples between scrapes: the engine
keeps only the latest ``MAX_KEPT_LATENCIES`` of each kind, which a busy server would
otherwise outrun between two scrapes."""


def create_app(
    settings: ServeSettings,
    load: Callable[[], LLM] | None = None,
    on_load_failure: Callable[[], None] | None = None,
) -> FastAPI:
    """The server's app.

    Args:
        settings: the model and server settings.
        load: builds the ``LLM``, in a background thread; default ``LLM(**settings.llm_options())``.
        on_load_failure: called on the event loop if loading fails (a CLI stops the server).
    """
    state = ServerState(settings, ServerMetrics())
    load = load or functools.partial(LLM, **settings.llm_options())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _load_in_background(state, load, asyncio.get_running_loop(), on_load_failure)
        # The drain starts when a stop signal marks the server draining, while the server
        # still holds the connections: requests still running at the drain timeout are then
        # answered (a 503, or an error event in a stream) before the connections close.
        drain = asyncio.create_task(_drain_when_asked(state))
        updates = asyncio.create_task(_update_metrics(state))
        yield
        state.start_draining()
        await drain
        updates.cancel()

    app = FastAPI(
        title="neuron-llm",
        version=neuron_llm.__version__,
        description="OpenAI-compatible and SageMaker endpoints for a Llama model.",
        lifespan=lifespan,
    )
    app.state.server = state
    # Middleware added later runs earlier: CountRequests counts every answer, CORS answers a
    # browser's preflight (which carries no key), then the key is checked, then the body's size.
    app.add_middleware(LimitBody, max_bytes=settings.max_request_bytes, metrics=state.metrics)
    if settings.api_key is not None:
        app.add_middleware(RequireApiKey, api_key=settings.api_key, metrics=state.metrics)
    if origins := settings.cors_origins():
        # Browsers send the key themselves (an Authorization header), never a cookie: no credentials.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            expose_headers=["Retry-After"],
        )
    install_error_handlers(app, state.metrics)
    app.include_router(openai_routes.router)
    app.include_router(sagemaker_routes.router)
    app.include_router(tokenize_routes.router)
    app.add_api_route("/health", health, methods=["GET"], responses={503: {"description": "not ready"}})
    app.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)  # load balancers' probes
    app.add_api_route("/metrics", metrics, methods=["GET"], response_class=Response)
    app.add_api_route("/version", version, methods=["GET"])
    return app


async def health(request: Request) -> JSONResponse:
    """``{"status": "loading" | "ready" | "draining" | "failed"}``; 200 only when ready."""
    status = get_state(request).status
    return JSONResponse({"status": status}, status_code=200 if status == "ready" else 503)


async def version() -> dict[str, str]:
    """``{"version": ...}``: this package's version, as vLLM's ``/version`` answers."""
    return {"version": neuron_llm.__version__}


async def metrics(request: Request) -> Response:
    """Prometheus metrics in the text exposition format."""
    state = get_state(request)
    if state.model is not None:
        state.metrics.update(state.model.engine.stats())
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _load_in_background(
    state: ServerState,
    load: Callable[[], LLM],
    loop: asyncio.AbstractEventLoop,
    on_failure: Callable[[], None] | None,
) -> None:
    def loaded(llm: LLM, name: str) -> None:
        if state.is_draining:  # stopped while loading
            llm.shutdown()
            return
        state.model = ServedModel(name, llm, AsyncLLM(llm.engine, state.settings.max_waiting_requests))
        logger.info(
            "serving %s (max_model_len=%d, weights %.1f MiB)", name, state.model.max_model_len, llm.weight_bytes / 2**20
        )
        if state.model.max_model_len < llm.config.max_model_len:
            logger.warning(
                "the KV pool holds %d tokens of one sequence, fewer than max_model_len=%d: requests are limited "
                "to %d tokens (raise --num-kv-blocks or lower --max-model-len)",
                state.model.max_model_len,
                llm.config.max_model_len,
                state.model.max_model_len,
            )

    def failed(error: Exception) -> None:
        if state.is_draining:
            # Stopped while loading: a stop signal sent to the process group (Ctrl-C, systemd)
            # also ends tensor-parallel ranks still starting, which fails the load.
            logger.info("loading stopped with the server: %s", error)
            return
        if isinstance(error, (ValueError, OSError)):  # refused input (a path, a checkpoint): the message says it
            logger.error("loading the model failed: %s", error)
        else:
            logger.error("loading the model failed", exc_info=error)
        state.load_error = f"loading the model failed: {error}"
        if on_failure is not None:
            on_failure()

    def run() -> None:
        try:
            llm = load()
            name = model_name(state.settings, resolve_model_path(state.settings.model))
        except Exception as e:  # any failure to load is reported by /ping and /health, not raised
            _call_soon(loop, failed, e)
            return
        _call_soon(loop, loaded, llm, name)

    # A daemon thread, unlike asyncio.to_thread, does not keep a stopping process alive.
    threading.Thread(target=run, name="neuron-llm-load", daemon=True).start()


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: object) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        logger.warning("the server stopped before the model finished loading")


async def _update_metrics(state: ServerState) -> None:
    while True:
        await asyncio.sleep(METRICS_UPDATE_S)
        if state.model is not None:
            state.metrics.update(state.model.engine.stats())


async def _drain_when_asked(state: ServerState) -> None:
    while state.draining_since is None:
        await asyncio.sleep(_DRAIN_POLL_S)
    await _drain(state)


async def _drain(state: ServerState) -> None:
    state.start_draining()
    model = state.model
    if model is None:
        return
    await model.engine.shutdown(state.drain_time_left())
    model.llm.shutdown()
