"""Running the app under uvicorn, marking it as draining as soon as a stop signal arrives."""

from __future__ import annotations

import signal
from types import FrameType

import uvicorn

from neuron_llm.llm import LLM
from neuron_llm.parallel.state import torchrun_env
from neuron_llm.serve.app import create_app
from neuron_llm.serve.settings import ServeSettings
from neuron_llm.serve.state import ServerState

ANSWER_ABORTED_S = 5.0
"""Time past the drain timeout for the requests it aborted to get their answers out."""


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, marking the app as draining on SIGTERM/SIGINT so new requests get 503."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self._state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Unlike uvicorn's own, this does not raise the signal again once shut down, so a
        # server that drained cleanly exits with status 0.
        self._state.start_draining()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


def run_server(settings: ServeSettings) -> int:
    """Serve until SIGTERM or SIGINT, then drain; returns the exit status (1 if loading failed).

    Under torchrun, rank 0 serves the routes and each other rank runs rank 0's steps: it
    builds its share of the model and exits once rank 0 shuts down.
    """
    env = torchrun_env()
    if env is not None and env.rank > 0:
        LLM(**settings.llm_options())  # raises SystemExit(0) when rank 0 is done
        raise AssertionError("a torchrun rank above 0 never gets an LLM")
    server: _DrainingServer | None = None

    def stop() -> None:
        assert server is not None
        server.should_exit = True

    app = create_app(settings, on_load_failure=stop)
    state: ServerState = app.state.server
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # The app's drain gives requests in flight drain_timeout, then ends the rest with an
        # answer; uvicorn waits that long and a little more before it cuts connections.
        timeout_graceful_shutdown=settings.drain_timeout + ANSWER_ABORTED_S,  # type: ignore[arg-type]
    )
    server = _DrainingServer(config, state)
    # Bound before the app starts, so that a busy port fails at once (uvicorn's exit status
    # 3), before the model's load begins: uvicorn alone binds after startup, and exits mid-load.
    server.run(sockets=[config.bind_socket()])
    return 1 if state.load_error is not None else 0
