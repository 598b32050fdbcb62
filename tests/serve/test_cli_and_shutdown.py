"""The ``serve`` commands' settings, and a real server process draining on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from neuron_llm.engine.async_llm import AsyncLLM, EngineClosedError
from neuron_llm.sampling_params import SamplingParams
from neuron_llm.serve.app import _drain
from neuron_llm.serve.cli import add_serve_parser, run_serve, sagemaker_defaults, sagemaker_main
from neuron_llm.serve.metrics import ServerMetrics
from neuron_llm.serve.server import ANSWER_ABORTED_S
from neuron_llm.serve.settings import LOG_LEVELS, ServeSettings
from neuron_llm.serve.state import ServedModel, ServerState
from tests.serve.conftest import make_slow_llm, wait_for

PROCESS_TIMEOUT_S = 240.0


def test_serve_command_line_becomes_settings() -> None:
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "my/model", "--port", "9000", "--max-model-len", "128", "--api-key", "k"])
    assert args.run is run_serve
    settings = ServeSettings.from_args(args)
    assert (settings.model, settings.port, settings.max_model_len, settings.api_key) == ("my/model", 9000, 128, "k")
    assert settings.host == "127.0.0.1" and settings.max_num_seqs is None
    # The key's flag is visible to ps; the variable is not. The flag wins where both are set.
    assert ServeSettings.from_args(args, {"NEURON_LLM_API_KEY": "env"}).api_key == "k"
    without_flag = parser.parse_args(["serve", "my/model"])
    assert ServeSettings.from_args(without_flag, {"NEURON_LLM_API_KEY": "env"}).api_key == "env"
    assert ServeSettings.from_args(without_flag, {}).api_key is None
    assert settings.llm_options() == {
        "model": "my/model",
        "dtype": "auto",
        "device": None,
        "tensor_parallel_size": None,
        "max_model_len": 128,
    }
    timed = parser.parse_args(["serve", "my/model", "--tensor-parallel-size", "2", "--distributed-timeout", "90.5"])
    assert ServeSettings.from_args(timed).llm_options()["distributed_timeout"] == 90.5


def test_environment_becomes_settings_and_refuses_unknown_names() -> None:
    settings = ServeSettings.from_env(
        {
            "NEURON_LLM_MODEL": "/opt/ml/model",
            "NEURON_LLM_MAX_NUM_SEQS": "8",
            "NEURON_LLM_MAX_NUM_BATCHED_TOKENS": "256",
            "NEURON_LLM_DISTRIBUTED_TIMEOUT": "1800",
            "NEURON_LLM_CONTEXT_BUCKETS": "1024,4096",
            "PATH": "/bin",
        },
        host="0.0.0.0",
        port=8080,
    )
    assert settings.llm_options()["max_num_batched_tokens"] == 256
    assert settings.llm_options()["distributed_timeout"] == 1800.0
    assert settings.llm_options()["context_buckets"] == [1024, 4096]
    with pytest.raises(ValueError, match="context_buckets='4k': must be comma-separated integers"):
        ServeSettings.from_env({"NEURON_LLM_CONTEXT_BUCKETS": "4k"})
    assert (settings.model, settings.max_num_seqs, settings.host, settings.port) == (
        "/opt/ml/model",
        8,
        "0.0.0.0",
        8080,
    )
    with pytest.raises(ValueError, match="NEURON_LLM_MAX_TOKENS"):
        ServeSettings.from_env({"NEURON_LLM_MAX_TOKENS": "8"})
    with pytest.raises(ValueError, match="NEURON_LLM_PORT='http'"):
        ServeSettings.from_env({"NEURON_LLM_PORT": "http"})
    with pytest.raises(ValueError, match="max_waiting_requests"):
        ServeSettings(max_waiting_requests=0)
    for timeout in ("0", "inf", "1e300"):
        message = f"distributed_timeout={float(timeout)}: must be a number of seconds > 0"
        with pytest.raises(ValueError, match=re.escape(message)):
            ServeSettings.from_env({"NEURON_LLM_DISTRIBUTED_TIMEOUT": timeout})
    # Checked before the port opens, not in the load that follows (minutes, in a container).
    with pytest.raises(ValueError, match="dtype='int4' is not supported"):
        ServeSettings.from_env({"NEURON_LLM_DTYPE": "int4"})
    with pytest.raises(ValueError, match="quantization='int3': must be one of"):
        ServeSettings.from_env({"NEURON_LLM_QUANTIZATION": "int3"})
    # uvicorn's levels, trace included, are the ones taken; logging knows trace by number only.
    assert LOG_LEVELS[ServeSettings(log_level="trace").log_level] < logging.DEBUG
    with pytest.raises(ValueError, match="log_level='verbose': must be one of critical, error"):
        ServeSettings.from_env({"NEURON_LLM_LOG_LEVEL": "verbose"})


def test_the_sagemaker_command_listens_where_sagemaker_says() -> None:
    assert sagemaker_defaults({})["port"] == 8080
    # SageMaker sends SIGKILL 30 s after SIGTERM: the drain and its answers fit in that.
    assert sagemaker_defaults({})["drain_timeout"] + ANSWER_ABORTED_S < 30
    # Multi-container endpoints and inference pipelines give each container its port.
    defaults = sagemaker_defaults({"SAGEMAKER_BIND_TO_PORT": "9001"})
    assert ServeSettings.from_env({}, **defaults).port == 9001
    assert ServeSettings.from_env({"NEURON_LLM_PORT": "9002"}, **sagemaker_defaults({})).port == 9002
    # Listening elsewhere, the container would fail SageMaker's pings.
    with pytest.raises(ValueError, match="NEURON_LLM_PORT=9002 but SAGEMAKER_BIND_TO_PORT=9001: SageMaker sends"):
        sagemaker_defaults({"SAGEMAKER_BIND_TO_PORT": "9001", "NEURON_LLM_PORT": "9002"})
    sagemaker_defaults({"SAGEMAKER_BIND_TO_PORT": "9001", "NEURON_LLM_PORT": "09001"})  # the same port
    with pytest.raises(ValueError, match="SAGEMAKER_BIND_TO_PORT='http': not a port number"):
        sagemaker_defaults({"SAGEMAKER_BIND_TO_PORT": "http"})


@pytest.mark.parametrize("unpacked", [False, True])
def test_the_sagemaker_command_refuses_an_empty_model_dir_rather_than_serve_the_default_model(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, unpacked: bool
) -> None:
    model_dir = tmp_path / "model"
    if unpacked:
        model_dir.mkdir()  # an endpoint without model_data: the directory, empty
    monkeypatch.setattr("neuron_llm.serve.settings.SAGEMAKER_MODEL_DIR", model_dir)
    monkeypatch.setattr("neuron_llm.serve.server.run_server", _never_runs)
    with pytest.raises(SystemExit) as refused:
        sagemaker_main([])
    assert refused.value.code == 2
    assert f"{model_dir} is missing or empty: SageMaker unpacks the model's model_data there" in capsys.readouterr().err


def test_the_sagemaker_command_warns_of_settings_sagemaker_defeats_or_does_not_read(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    environ = {
        "NEURON_LLM_MODEL": "my/model",
        "NEURON_LLM_API_KEY": "s3cret",
        "NEURON_LLM_DRAIN_TIMEOUT": "120",
        "NEURON_LLM_HOST": "127.0.0.1",
        "NEURON_LLM_PDL": "0",  # the library's own switch, not refused as an unknown setting
        "SM_NUM_GPUS": "4",
        "HF_NUM_CORES": "2",
    }
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(ServeSettings, "check_model", lambda settings: None)
    monkeypatch.setattr("neuron_llm.serve.server.run_server", lambda settings: 0)
    with caplog.at_level(logging.WARNING), pytest.raises(SystemExit) as served:
        sagemaker_main([])
    assert served.value.code == 0
    assert "InvokeEndpoint does not pass the Authorization header on" in caplog.text
    assert "NEURON_LLM_DRAIN_TIMEOUT=120: SageMaker kills the container 30 s after SIGTERM" in caplog.text
    assert "NEURON_LLM_HOST=127.0.0.1: SageMaker sends pings and requests to the container's address" in caplog.text
    assert "SM_NUM_GPUS is not read by this container; set NEURON_LLM_TENSOR_PARALLEL_SIZE" in caplog.text
    assert "HF_NUM_CORES is not read by this container; set NEURON_LLM_TENSOR_PARALLEL_SIZE" in caplog.text


@pytest.mark.parametrize(
    ("host", "warns"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("10.0.0.7", False),
    ],
)
def test_the_sagemaker_host_warning_is_for_loopback_addresses_only(host: str, warns: bool) -> None:
    from neuron_llm.serve.cli import _is_loopback

    assert _is_loopback(host) == warns


def test_speculative_config_is_passed_on_and_checked_before_loading() -> None:
    settings = ServeSettings.from_env({"NEURON_LLM_SPECULATIVE_CONFIG": '{"num_speculative_tokens": 3}'})
    assert settings.llm_options()["speculative_config"] == '{"num_speculative_tokens": 3}'
    with pytest.raises(ValueError, match="speculative_config: unknown key"):
        ServeSettings.from_env({"NEURON_LLM_SPECULATIVE_CONFIG": '{"num_speculative_tokens": 3, "k": 1}'})


def test_sampling_features_are_passed_on_as_names_and_checked_before_loading() -> None:
    settings = ServeSettings.from_env({"NEURON_LLM_SAMPLING_FEATURES": "logprobs, penalties"})
    assert settings.llm_options()["sampling_features"] == ["logprobs", "penalties"]
    assert "sampling_features" not in ServeSettings().llm_options()
    with pytest.raises(ValueError, match=r"sampling_features: unknown \['top_k'\]"):
        ServeSettings.from_env({"NEURON_LLM_SAMPLING_FEATURES": "logprobs,top_k"})


def test_a_seed_is_passed_on_to_the_llm() -> None:
    # vLLM's --seed: the engine's unseeded requests then sample the same tokens each start.
    assert ServeSettings.from_env({"NEURON_LLM_SEED": "7"}).llm_options()["seed"] == 7
    assert "seed" not in ServeSettings().llm_options()
    with pytest.raises(ValueError, match=r"seed=18446744073709551616: must be in"):
        ServeSettings.from_env({"NEURON_LLM_SEED": str(2**64)})


def test_port_must_be_one_a_socket_can_take() -> None:
    with pytest.raises(ValueError, match="port=65536: must be <= 65535"):
        ServeSettings.from_env({"NEURON_LLM_PORT": "65536"})


def test_an_empty_api_key_is_refused() -> None:
    # Taken, it would refuse requests without a key but let through "Authorization: Bearer".
    with pytest.raises(ValueError, match="api_key='': empty; leave it unset"):
        ServeSettings.from_env({"NEURON_LLM_API_KEY": ""})


@pytest.mark.parametrize("name", ["", "  "])
def test_an_empty_served_model_name_is_refused(name: str) -> None:
    # Taken, /v1/models would list a model no client can name.
    with pytest.raises(ValueError, match="served_model_name=.*: empty; leave it unset"):
        ServeSettings(served_model_name=name)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"HF_MODEL_ID": "meta-llama/Llama-3.1-8B-Instruct"}, "HF_MODEL_ID set: this container does not download"),
        ({"NEURON_LLM_MODEL": "/nonexistent/model"}, "model path /nonexistent/model does not exist"),
    ],
)
def test_the_sagemaker_command_refuses_a_model_it_cannot_serve_before_listening(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], environ: dict[str, str], message: str
) -> None:
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("neuron_llm.serve.server.run_server", _never_runs)
    with pytest.raises(SystemExit) as refused:
        sagemaker_main([])
    assert refused.value.code == 2
    assert message in capsys.readouterr().err


def test_the_sagemaker_command_ends_quietly_on_a_bad_port_or_ctrl_c(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SAGEMAKER_BIND_TO_PORT", "http")
    with pytest.raises(SystemExit) as refused:
        sagemaker_main([])
    assert refused.value.code == 2  # as every other bad setting
    assert "SAGEMAKER_BIND_TO_PORT='http': not a port number" in capsys.readouterr().err
    monkeypatch.delenv("SAGEMAKER_BIND_TO_PORT")
    monkeypatch.setenv("NEURON_LLM_MODEL", "my/model")

    def interrupted(settings: ServeSettings) -> None:
        raise KeyboardInterrupt  # Ctrl-C while a large model file is being checked

    monkeypatch.setattr(ServeSettings, "check_model", interrupted)
    monkeypatch.setattr("neuron_llm.serve.server.run_server", _never_runs)
    with pytest.raises(SystemExit) as stopped:
        sagemaker_main([])
    assert stopped.value.code == 130


def _never_runs(settings: ServeSettings) -> int:
    raise AssertionError("the server started")


def test_the_sagemaker_command_takes_no_arguments_and_lists_its_variables(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        sagemaker_main(["--port", "9000"])
    assert refused.value.code == 2
    assert "takes no arguments (--port 9000): set NEURON_LLM_* variables" in capsys.readouterr().err
    with pytest.raises(SystemExit) as helped:
        sagemaker_main(["--help"])
    assert helped.value.code == 0
    listed = capsys.readouterr().out
    assert re.search(r"NEURON_LLM_PORT +port to listen on \[8080\]", listed)
    assert re.search(r"NEURON_LLM_MODEL +HF directory, .gguf file or compiled artifact \[/opt/ml/model\]", listed)
    assert "SmolLM2" not in listed  # the container never serves the package's default model


@pytest.mark.parametrize("command", ["main(['serve', 'my/model'])", "sagemaker_main([])"])
def test_serving_without_the_serve_extra_says_how_to_get_it(command: str) -> None:
    script = (
        "import sys; sys.modules['uvicorn'] = None\n"  # as if not installed
        "from neuron_llm.cli import main\nfrom neuron_llm.serve.cli import sagemaker_main\n"
        f"sys.exit({command})"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)
    assert result.returncode == 2, result.stderr
    assert "serving needs the serve extra (uvicorn is missing): pip install 'neuron-llm[serve]'" in result.stderr


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["{tmp}/nope"], r"model path .*nope does not exist"),
        (
            ["{model}", "--max-model-len", "100000"],
            r"max_model_len=100000 exceeds the model's context \(max_position_embeddings",
        ),
        (["{model}", "--sampling-features", "logprobs"], r"sampling_features=\['logprobs'\] on device='cpu'"),
        (["{model}", "--context-buckets", "64"], r"context_buckets=\[64\] on device='cpu': only the XLA device"),
    ],
)
def test_serve_refuses_a_model_it_cannot_load_before_opening_a_port(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], message: str
) -> None:
    from neuron_llm.cli import main

    argv = [a.format(tmp=tmp_path, model=model_dir) for a in arguments]
    assert main(["serve", *argv, "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err
    assert re.search(f"^neuron-llm: error: {message}", err), err
    assert "Uvicorn running" not in err


def test_serve_on_a_busy_port_exits_before_the_model_loads(
    model_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from neuron_llm.cli import main

    loads: list[object] = []
    monkeypatch.setattr("neuron_llm.serve.app._load_in_background", lambda *args: loads.append(args))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(SystemExit) as failed:
            main(["serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port)])
    assert failed.value.code == 3  # uvicorn's status for a failed start
    assert "address already in use" in capsys.readouterr().err.lower()
    assert not loads


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def _server_process(model_dir: Path, log: Path, drain_timeout: float) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A server process, started as a SageMaker container's `serve` command is, and its URL;
    killed on leaving if it has not exited."""
    port = _free_port()
    env = {
        **os.environ,
        "NEURON_LLM_MODEL": str(model_dir),
        "NEURON_LLM_HOST": "127.0.0.1",
        "NEURON_LLM_PORT": str(port),
        "NEURON_LLM_DTYPE": "float32",
        "NEURON_LLM_MAX_MODEL_LEN": "512",
        "NEURON_LLM_NUM_KV_BLOCKS": "2048",
        "NEURON_LLM_DRAIN_TIMEOUT": str(drain_timeout),
        "NEURON_LLM_LOG_LEVEL": "warning",
        "OMP_NUM_THREADS": "1",
    }
    with log.open("w") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "neuron_llm.serve"], env=env, stderr=log_file)
    try:
        yield process, f"http://127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_under_torchrun_rank_0_serves_the_other_ranks_run_its_steps_and_a_stop_drains(
    model_dir: Path, tmp_path: Path
) -> None:
    # Every rank runs the serve command: one server may listen, on rank 0. torchrun forwards a
    # SIGTERM to every rank; the others leave it to rank 0, which drains before they stop.
    port = _free_port()
    env = {
        **os.environ,
        "NEURON_LLM_MODEL": str(model_dir),
        "NEURON_LLM_PORT": str(port),
        "NEURON_LLM_DTYPE": "float32",
        "NEURON_LLM_MAX_MODEL_LEN": "512",
        "NEURON_LLM_NUM_KV_BLOCKS": "512",
        "NEURON_LLM_TENSOR_PARALLEL_SIZE": "2",
        "NEURON_LLM_LOG_LEVEL": "warning",
        # Two ranks take about 14 s for the 800 tokens on an idle two-core machine: the default
        # 30 s drain leaves too little room under load.
        "NEURON_LLM_DRAIN_TIMEOUT": "120",
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    log = tmp_path / "server.log"
    with log.open("w") as log_file:
        process = subprocess.Popen(
            [*command, "-m", "neuron_llm.serve"], env=env, stderr=log_file, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    ranks: list[int] = []
    try:
        wait_for(lambda: _ping(url) == 200, "the server never became ready", timeout=PROCESS_TIMEOUT_S)
        ranks = [
            int(pid) for pid in subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True).stdout.split()
        ]
        body = {"prompt": "Hello", "max_tokens": 5, "ignore_eos": True, "temperature": 0.0}
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=PROCESS_TIMEOUT_S)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 5

        stream = {**body, "n": 2, "max_tokens": 400, "stream": True}
        events: list[str] = []
        with httpx.stream("POST", f"{url}/v1/completions", json=stream, timeout=PROCESS_TIMEOUT_S) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    if len(events) == 1:
                        process.send_signal(signal.SIGTERM)
        process.wait(timeout=PROCESS_TIMEOUT_S)
    finally:
        for pid in [process.pid, *ranks]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait()
    assert "address already in use" not in log.read_text()
    assert events[-1] == "[DONE]", events[-2:]
    finish_reasons = [c["finish_reason"] for event in events[:-1] for c in json.loads(event)["choices"]]
    assert sorted(reason for reason in finish_reasons if reason) == ["length"] * 2


def test_sigterm_finishes_requests_in_flight_then_exits(model_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with _server_process(model_dir, log, drain_timeout=60) as (process, url):
        wait_for(lambda: _ping(url) == 200, "the server never became ready", timeout=PROCESS_TIMEOUT_S)
        body = {"prompt": "Hello", "n": 4, "max_tokens": 480, "ignore_eos": True, "temperature": 0.0, "stream": True}
        events: list[str] = []
        first_event = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=PROCESS_TIMEOUT_S) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line.removeprefix("data: "))
                        first_event.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first_event.wait(timeout=PROCESS_TIMEOUT_S)
        process.send_signal(signal.SIGTERM)
        num_events_at_signal = len(events)
        wait_for(lambda: _ping(url) != 200, "new requests were still accepted after SIGTERM")
        reader.join(timeout=PROCESS_TIMEOUT_S)
        assert process.wait(timeout=PROCESS_TIMEOUT_S) == 0, log.read_text()
    assert len(events) > num_events_at_signal + 1, "the request ended before the signal: nothing was drained"
    assert events[-1] == "[DONE]"
    finish_reasons = [c["finish_reason"] for event in events[:-1] for c in json.loads(event)["choices"]]
    assert sorted(reason for reason in finish_reasons if reason) == ["length"] * 4


def test_requests_left_at_the_drain_timeout_are_answered_before_the_server_exits(
    model_dir: Path, tmp_path: Path
) -> None:
    """With no time to finish, a whole request gets a 503 in OpenAI's shape and a stream an
    error event and [DONE], not a cut connection or the web server's plain-text 500."""
    log = tmp_path / "server.log"
    long = {"prompt": "Hello", "n": 4, "max_tokens": 480, "ignore_eos": True, "temperature": 0.0}
    answers: dict[str, Any] = {}
    with _server_process(model_dir, log, drain_timeout=0) as (process, url):
        wait_for(lambda: _ping(url) == 200, "the server never became ready", timeout=PROCESS_TIMEOUT_S)

        def whole() -> None:
            answers["whole"] = httpx.post(f"{url}/v1/completions", json=long, timeout=PROCESS_TIMEOUT_S)

        def streamed() -> None:
            with httpx.stream("POST", f"{url}/v1/completions", json={**long, "stream": True}) as response:
                answers["events"] = [line for line in response.iter_lines() if line.startswith("data: ")]

        readers = [threading.Thread(target=whole), threading.Thread(target=streamed)]
        for reader in readers:
            reader.start()
        running = "neuron_llm_num_requests_running"
        wait_for(lambda: _metric(url, running) == 8, "both requests never ran", timeout=PROCESS_TIMEOUT_S)
        process.send_signal(signal.SIGTERM)
        for reader in readers:
            reader.join(timeout=PROCESS_TIMEOUT_S)
        assert process.wait(timeout=PROCESS_TIMEOUT_S) == 0, log.read_text()
    assert answers["whole"].status_code == 503, answers["whole"].text
    assert answers["whole"].json()["error"]["code"] == "shutting_down"
    events = [line.removeprefix("data: ") for line in answers["events"]]
    assert json.loads(events[-2])["error"]["code"] == "shutting_down" and events[-1] == "[DONE]"


def _metric(url: str, name: str) -> float:
    try:
        text = httpx.get(f"{url}/metrics", timeout=5).text
    except httpx.TransportError:
        return -1.0
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    return values[0] if values else -1.0


def test_the_engine_drains_for_what_is_left_of_the_timeout(model_dir: Path) -> None:
    """uvicorn's wait for open connections and the engine's for its requests share one drain timeout."""
    llm = make_slow_llm(model_dir)
    params = SamplingParams(max_tokens=400, ignore_eos=True, temperature=0.0)

    async def run() -> float:
        state = ServerState(ServeSettings(drain_timeout=30.0), ServerMetrics())
        state.model = ServedModel("m", llm, AsyncLLM(llm.engine))
        outputs = state.model.engine.generate([1, 2, 3], params)
        await anext(outputs)
        state.draining_since = time.monotonic() - 29.5  # as if uvicorn had waited that long
        start = time.monotonic()
        await _drain(state)
        with pytest.raises(EngineClosedError):
            async for _ in outputs:
                pass
        return time.monotonic() - start

    assert asyncio.run(run()) < 10.0
    assert not llm.engine.has_unfinished_requests()


def _ping(url: str) -> int:
    """``/ping``'s status, or 0 when nothing listens."""
    try:
        return httpx.get(f"{url}/ping", timeout=5).status_code
    except httpx.TransportError:
        return 0


@pytest.mark.parametrize("is_draining", [False, True])
def test_a_load_failing_while_the_server_stops_is_no_load_failure(is_draining: bool) -> None:
    # A stop signal sent to the process group also ends tensor-parallel ranks still starting:
    # that failed load is part of the stop, not an error that makes the server exit 1.
    from neuron_llm.serve.app import _load_in_background

    state = ServerState(ServeSettings(), ServerMetrics())
    failures: list[None] = []

    def broken_load() -> Any:
        raise RuntimeError("neuron-llm-rank-1 exited with code -15")

    async def main() -> None:
        if is_draining:
            state.start_draining()
        _load_in_background(state, broken_load, asyncio.get_running_loop(), lambda: failures.append(None))
        for _ in range(200):
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert (state.load_error is None) == is_draining
    assert len(failures) == int(not is_draining)
