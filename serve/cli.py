"""Starting the server: ``neuron-llm serve [MODEL]`` for people, ``serve`` for SageMaker containers.

``neuron-llm serve`` takes its settings as flags and listens on 127.0.0.1:8000 unless told
otherwise. ``serve`` (what SageMaker runs: ``docker run IMAGE serve``) takes them from
``NEURON_LLM_*`` environment variables and listens on 0.0.0.0:8080; it serves the artifact
SageMaker unpacked in /opt/ml/model when no model is set.

This module stays light (no web framework, no torch) so that a command line can add the
``serve`` command without paying for the server's imports until it runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from neuron_llm.serve.settings import LOG_LEVELS, ServeSettings, default_sagemaker_model

_LOG_FORMAT = "%(levelname)s:     %(name)s: %(message)s"


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``serve`` command to a command line's subparsers; it runs ``run_serve``."""
    parser = subparsers.add_parser(
        "serve",
        help="serve a model over HTTP (OpenAI-compatible and SageMaker routes)",
        description="Serve a model over HTTP: /v1/completions, /v1/chat/completions, /v1/models, "
        "/ping, /invocations, /health, /metrics.",
    )
    model_help = ServeSettings.__dataclass_fields__["model"].metadata["help"]
    parser.add_argument("model", nargs="?", default=None, help=model_help)
    ServeSettings.add_arguments(parser)
    parser.set_defaults(run=run_serve)
    return parser


def run_serve(args: argparse.Namespace) -> int:
    """Serve with the settings parsed by the ``serve`` parser; returns the exit status."""
    from neuron_llm.serve.server import run_server

    settings = ServeSettings.from_args(args)
    logging.basicConfig(level=LOG_LEVELS[settings.log_level], format=_LOG_FORMAT)
    return run_server(settings)


def sagemaker_main() -> None:
    """The ``serve`` console command: settings from the environment, 0.0.0.0:8080 by default."""
    from neuron_llm.serve.server import run_server

    try:
        settings = ServeSettings.from_env(os.environ, host="0.0.0.0", port=8080, model=default_sagemaker_model())
    except ValueError as e:
        print(f"serve: error: {e}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=LOG_LEVELS[settings.log_level], format=_LOG_FORMAT)
    sys.exit(run_server(settings))
