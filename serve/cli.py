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
import dataclasses
import ipaddress
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence

from neuron_llm.help_format import DefaultsHelpFormatter
from neuron_llm.serve.settings import (
    ENV_PREFIX,
    LIBRARY_VARIABLES,
    LOG_LEVELS,
    ServeSettings,
    check_sagemaker_model,
    default_sagemaker_model,
)

logger = logging.getLogger(__name__)

_LOG_FORMAT = "%(levelname)s:     %(name)s: %(message)s"


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``serve`` command to a command line's subparsers; it runs ``run_serve``."""
    parser = subparsers.add_parser(
        "serve",
        help="serve a model over HTTP (OpenAI-compatible and SageMaker routes)",
        description="Serve a model over HTTP: /v1/completions, /v1/chat/completions, /v1/models, "
        "/tokenize, /detokenize, /version, /ping, /invocations, /health, /metrics.",
        formatter_class=DefaultsHelpFormatter,
    )
    model_help = ServeSettings.__dataclass_fields__["model"].metadata["help"]
    parser.add_argument("model", nargs="?", default=None, help=model_help)
    ServeSettings.add_arguments(parser)
    parser.set_defaults(run=run_serve)
    return parser


def run_serve(args: argparse.Namespace) -> int:
    """Serve with the settings parsed by the ``serve`` parser; returns the exit status."""
    run_server = _server()
    settings = ServeSettings.from_args(args)
    settings.check_model()
    logging.basicConfig(level=LOG_LEVELS[settings.log_level], format=_LOG_FORMAT)
    return run_server(settings)


SAGEMAKER_PORT_VARIABLE = "SAGEMAKER_BIND_TO_PORT"
"""Where SageMaker tells a container of a multi-container endpoint or an inference pipeline to listen."""


def sagemaker_defaults(environ: dict[str, str]) -> dict[str, object]:
    """The ``serve`` command's settings before ``NEURON_LLM_*``: /opt/ml/model on 0.0.0.0, port
    8080 unless SageMaker names one (then ``NEURON_LLM_PORT`` may not name another)."""
    port = environ.get(SAGEMAKER_PORT_VARIABLE, "8080")
    if not port.isdigit():
        raise ValueError(f"{SAGEMAKER_PORT_VARIABLE}={port!r}: not a port number")
    ours = environ.get(f"{ENV_PREFIX}PORT")
    if SAGEMAKER_PORT_VARIABLE in environ and ours is not None and not (ours.isdigit() and int(ours) == int(port)):
        raise ValueError(
            f"{ENV_PREFIX}PORT={ours} but {SAGEMAKER_PORT_VARIABLE}={port}: SageMaker sends this container's "
            f"pings and requests to port {port}; unset {ENV_PREFIX}PORT"
        )
    return {
        "host": "0.0.0.0",
        "port": int(port),
        "model": default_sagemaker_model(),
        "drain_timeout": SAGEMAKER_DRAIN_TIMEOUT_S,
    }


SAGEMAKER_DRAIN_TIMEOUT_S = 20.0
"""SageMaker kills a container 30 s after its SIGTERM: the drain and the answers to the requests
it aborts (``server.ANSWER_ABORTED_S``) fit in that."""

OTHER_CONTAINERS_MODEL_VARIABLES = ("HF_MODEL_ID", "HF_MODEL_REVISION", "OPTION_MODEL_ID")
"""Hugging Face TGI's and LMI's model choices: taken silently, another model would be served."""
OTHER_CONTAINERS_SETTINGS = {
    "SM_NUM_GPUS": "NEURON_LLM_TENSOR_PARALLEL_SIZE",
    "OPTION_TENSOR_PARALLEL_DEGREE": "NEURON_LLM_TENSOR_PARALLEL_SIZE",
    "MAX_TOTAL_TOKENS": "NEURON_LLM_MAX_MODEL_LEN",
    "OPTION_MAX_MODEL_LEN": "NEURON_LLM_MAX_MODEL_LEN",
    "MAX_BATCH_PREFILL_TOKENS": "NEURON_LLM_MAX_NUM_BATCHED_TOKENS",
    "MAX_INPUT_TOKENS": "NEURON_LLM_MAX_MODEL_LEN",
    "MAX_INPUT_LENGTH": "NEURON_LLM_MAX_MODEL_LEN",
    "MAX_BATCH_SIZE": "NEURON_LLM_MAX_NUM_SEQS",
    "HF_NUM_CORES": "NEURON_LLM_TENSOR_PARALLEL_SIZE",
    "OPTION_N_POSITIONS": "NEURON_LLM_MAX_MODEL_LEN",
    "OPTION_MAX_ROLLING_BATCH_SIZE": "NEURON_LLM_MAX_NUM_SEQS",
}
"""Their sizing variables, which this container does not read, and its own of the same meaning."""


def _check_other_containers_variables(environ: Mapping[str, str]) -> None:
    """Refuse the TGI/LMI variables that choose a model; warn of the sizing ones, unread here."""
    chosen = [name for name in OTHER_CONTAINERS_MODEL_VARIABLES if name in environ]
    if chosen:
        raise ValueError(
            f"{', '.join(chosen)} set: this container does not download models; it serves the model "
            "SageMaker unpacked in /opt/ml/model (model_data), or NEURON_LLM_MODEL's path"
        )
    for name, ours in OTHER_CONTAINERS_SETTINGS.items():
        if name in environ:
            logger.warning("%s is not read by this container; set %s instead", name, ours)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"  # a name: only this one is sure to resolve to the loopback


def _warn_of_settings_sagemaker_defeats(settings: ServeSettings) -> None:
    if _is_loopback(settings.host):
        logger.warning(
            "%sHOST=%s: SageMaker sends pings and requests to the container's address, so a server "
            "listening only on its loopback fails every health check; unset %sHOST",
            ENV_PREFIX,
            settings.host,
            ENV_PREFIX,
        )
    if settings.api_key is not None:
        # InvokeEndpoint passes on only the headers of its API: no Authorization reaches us.
        logger.warning(
            "%sAPI_KEY is set: behind a SageMaker endpoint every request is then refused, since "
            "InvokeEndpoint does not pass the Authorization header on (IAM guards the endpoint)",
            ENV_PREFIX,
        )
    if settings.drain_timeout > SAGEMAKER_DRAIN_TIMEOUT_S:
        logger.warning(
            "%sDRAIN_TIMEOUT=%g: SageMaker kills the container 30 s after SIGTERM, and the requests still "
            "running then end without their error event (the default, %g s, leaves time to send it)",
            ENV_PREFIX,
            settings.drain_timeout,
            SAGEMAKER_DRAIN_TIMEOUT_S,
        )


def sagemaker_main(argv: Sequence[str] | None = None) -> None:
    """The ``serve`` console command: settings from the environment, 0.0.0.0:8080 by default
    (``SAGEMAKER_BIND_TO_PORT``'s port where SageMaker sets it)."""
    try:
        defaults = sagemaker_defaults(dict(os.environ))
    except ValueError as e:
        print(f"serve: error: {e}", file=sys.stderr)
        sys.exit(2)
    parser = argparse.ArgumentParser(
        prog="serve",
        description="Serve a model as a SageMaker container does, with settings from the environment.",
        epilog=_environment_help(defaults),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _, extra = parser.parse_known_args(argv)
    if extra:
        # A flag taken silently would leave the server running with settings nobody asked for.
        parser.error(
            f"takes no arguments ({' '.join(extra)}): set NEURON_LLM_* variables, "
            "or run `neuron-llm serve`, which takes flags"
        )
    try:
        run_server = _server()
        settings = ServeSettings.from_env(os.environ, **defaults)
        logging.basicConfig(level=LOG_LEVELS[settings.log_level], format=_LOG_FORMAT)
        _check_other_containers_variables(os.environ)
        _warn_of_settings_sagemaker_defeats(settings)
        check_sagemaker_model(settings.model)
        settings.check_model()  # before the port opens: a missing model fails in one line
    except (ValueError, ImportError, OSError) as e:
        parser.exit(2, f"serve: error: {e}\n")
    except KeyboardInterrupt:
        sys.exit(130)  # 128 + SIGINT, as a shell reports it; stopped before the server started
    sys.exit(run_server(settings))


def _server() -> Callable[[ServeSettings], int]:
    """``run_server``, or an ImportError saying which extra brings the web server."""
    try:
        from neuron_llm.serve.server import run_server
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] == "neuron_llm":
            raise  # a module of ours: a bug, not a missing extra
        raise ImportError(
            f"serving needs the serve extra ({e.name} is missing): pip install 'neuron-llm[serve]'"
        ) from e
    return run_server


_SAGEMAKER_MODEL_HELP = "HF directory, .gguf file or compiled artifact"
"""The model setting's help here: the container serves /opt/ml/model, never the package's default model."""


def _environment_help(defaults: dict[str, object]) -> str:
    lines = ["settings (environment variables):"]
    for f in dataclasses.fields(ServeSettings):
        default = defaults.get(f.name, f.default)
        shown = "" if default is None else f" [{default}]"
        help = _SAGEMAKER_MODEL_HELP if f.name == "model" else f.metadata["help"]
        lines.append(f"  {ENV_PREFIX}{f.name.upper():<26} {help}{shown}")
    lines += [f"  {name:<37} {help}" for name, help in LIBRARY_VARIABLES.items()]
    return "\n".join(lines)
