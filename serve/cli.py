"""Starting the server: ``neuron-llm serve [MODEL]`` for people, ``serve`` for SageMaker containers.

``neuron-llm serve`` takes its settings as flags and listens on 127.0.0.1:8000 unless told
otherwise. ``serve`` (what SageMaker runs: ``docker run IMAGE serve``) takes them from
``NEURON_LLM_*`` environment variables and listens on 0.0.0.0:8080; it serves the artifact
SageMaker unpacked in /opt/ml/model when no model is set.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from types import FrameType

import uvicorn

from neuron_llm.serve.app import create_app
from neuron_llm.serve.settings import ServeSettings, default_sagemaker_model
from neuron_llm.serve.state import ServerState


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, marking the app as draining on SIGTERM/SIGINT so new requests get 503."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self._state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Unlike uvicorn's own, this does not raise the signal again once shut down, so a
        # server that drained cleanly exits with status 0.
        self._state.is_draining = True
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


def serve(settings: ServeSettings) -> int:
    """Run the server until SIGTERM or SIGINT, then drain; returns the exit status (1 if loading failed)."""
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
        # In-flight requests get this long once the listening socket closes; the engine's own
        # drain afterwards then finds nothing left, or aborts what uvicorn gave up on.
        timeout_graceful_shutdown=settings.drain_timeout,  # type: ignore[arg-type]
    )
    server = _DrainingServer(config, state)
    server.run()
    return 1 if state.load_error is not None else 0


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``serve`` command to a command line's subparsers; it runs ``run_serve``."""
    parser = subparsers.add_parser(
        "serve",
        help="serve a model over HTTP (OpenAI-compatible and SageMaker routes)",
        description="Serve a model over HTTP: /v1/completions, /v1/chat/completions, /v1/models, "
        "/ping, /invocations, /health, /metrics.",
    )
    parser.add_argument("model", nargs="?", default=None, help=ServeSettings.__dataclass_fields__["model"].metadata["help"])
    ServeSettings.add_arguments(parser)
    parser.set_defaults(run=run_serve)
    return parser


def run_serve(args: argparse.Namespace) -> int:
    """Serve with the settings parsed by the ``serve`` parser; returns the exit status."""
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    return serve(ServeSettings.from_args(args))


def sagemaker_main() -> None:
    """The ``serve`` console command: settings from the environment, 0.0.0.0:8080 by default."""
    try:
        settings = ServeSettings.from_env(os.environ, host="0.0.0.0", port=8080, model=default_sagemaker_model())
    except ValueError as e:
        print(f"serve: error: {e}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    sys.exit(serve(settings))
