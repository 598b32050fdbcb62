"""What can be checked here of the deployment files: Dockerfiles' inputs, deploy.py's settings."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

SERVE_DIR = Path(__file__).resolve().parents[2] / "serve"
REPO = SERVE_DIR.parent


def _deploy_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy", SERVE_DIR / "sagemaker" / "deploy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.neuron"])
def test_dockerfiles_copy_what_exists_and_run_serve_on_8080(dockerfile: str) -> None:
    text = (SERVE_DIR / dockerfile).read_text()
    sources = [line.split()[1:-1] for line in text.splitlines() if line.startswith("COPY ")]
    assert sources and all((REPO / source).exists() for group in sources for source in group)
    assert 'CMD ["serve"]' in text and "EXPOSE 8080" in text
    assert re.search(r'pip install "?\.\[serve', text)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--env", "NEURON_LLM_MAX_NUM_SEQ=8"], "unknown setting(s) NEURON_LLM_MAX_NUM_SEQ"),
        (["--env", "NEURON_LLM_MAX_NUM_BATCHED_TOKENS=lots"], "NEURON_LLM_MAX_NUM_BATCHED_TOKENS='lots'"),
        (["--env", "NEURON_LLM_DEVICE=cpu"], "--env NEURON_LLM_DEVICE: already set from the instance type or a flag"),
        (["--num-kv-blocks", "1"], "num_kv_blocks=1: must be >= 2"),
        (["--max-model-len", "0"], "max_model_len=0: must be >= 1"),
    ],
)
def test_deploy_refuses_what_the_container_would_refuse_at_startup(
    options: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    deploy = _deploy_module()
    required = ["--image-uri", "img", "--model-data", "s3://b/m.tar.gz", "--role", "arn", "--endpoint-name", "e"]
    assert deploy.main([*required, "--instance-type", "ml.g5.2xlarge", *options]) == 2
    assert message in capsys.readouterr().err


def test_the_cuda_image_has_the_c_compiler_triton_builds_launchers_with() -> None:
    text = (SERVE_DIR / "Dockerfile").read_text()
    assert re.search(r"apt-get install [^\n]*\bgcc libc6-dev\b", text)


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.neuron"])
def test_the_images_take_an_artifacts_dtype_and_the_port_sagemaker_gives(name: str) -> None:
    text = (SERVE_DIR / name).read_text()
    # A fixed NEURON_LLM_DTYPE would refuse every artifact compiled in another dtype ("auto" takes its own).
    assert "NEURON_LLM_DTYPE" not in text
    assert "LABEL com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true" in text


def test_deploy_sets_the_device_from_the_instance_type(capsys: pytest.CaptureFixture[str]) -> None:
    deploy = _deploy_module()
    required = ["--image-uri", "img", "--model-data", "s3://b/m.tar.gz", "--role", "arn", "--endpoint-name", "e"]
    neuron = [*required, "--instance-type", "ml.inf2.24xlarge", "--num-kv-blocks", "512"]
    args = deploy.build_parser().parse_args(
        [*neuron, "--max-num-batched-tokens", "256", "--env", "NEURON_LLM_DRAIN_TIMEOUT=5"]
    )
    assert deploy.container_env(args) == {
        "NEURON_LLM_DEVICE": "xla",
        "NEURON_LLM_NUM_KV_BLOCKS": "512",
        "NEURON_LLM_MAX_NUM_BATCHED_TOKENS": "256",
        "NEURON_LLM_DRAIN_TIMEOUT": "5",
    }
    # What the Neuron container cannot serve is refused before anything reaches AWS.
    assert deploy.main([*required, "--instance-type", "ml.inf2.24xlarge"]) == 2
    assert deploy.main(neuron) == 2  # no --max-num-batched-tokens
    trn1 = [*required, "--instance-type", "ml.trn1.2xlarge", "--num-kv-blocks", "64", "--max-num-batched-tokens", "256"]
    assert deploy.main([*trn1, "--tensor-parallel-size", "2"]) == 2
    assert "--tensor-parallel-size 2: tensor parallelism does not run on Neuron yet" in capsys.readouterr().err
    gpu = deploy.build_parser().parse_args([*required, "--instance-type", "ml.g5.2xlarge", "--max-model-len", "4096"])
    assert deploy.container_env(gpu)["NEURON_LLM_DEVICE"] == "cuda"
    assert deploy.container_env(gpu)["NEURON_LLM_MAX_MODEL_LEN"] == "4096"
    # Left unset, a tensor-parallel artifact's own size stands (a set one must equal it).
    assert "NEURON_LLM_TENSOR_PARALLEL_SIZE" not in deploy.container_env(gpu)
    tp = [*required, "--instance-type", "ml.g5.12xlarge", "--tensor-parallel-size", "4"]
    tp = deploy.build_parser().parse_args(tp)
    assert deploy.container_env(tp)["NEURON_LLM_TENSOR_PARALLEL_SIZE"] == "4"
    assert deploy.main([*required, "--instance-type", "ml.m5.large"]) == 2
