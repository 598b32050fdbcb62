"""Deploy a model artifact on S3 to a SageMaker real-time endpoint running neuron-llm's container.

    python serve/sagemaker/deploy.py \\
        --image-uri 123456789012.dkr.ecr.us-east-1.amazonaws.com/neuron-llm:neuron \\
        --model-data s3://my-bucket/llama/model.tar.gz \\
        --role arn:aws:iam::123456789012:role/SageMakerExecutionRole \\
        --instance-type ml.inf2.xlarge --num-kv-blocks 1024 --max-model-len 4096 \\
        --max-num-batched-tokens 256 --max-num-seqs 8 --endpoint-name llama-inf2 --smoke-test

Before running it:

1. Build the image for the instance type and push it to ECR: ``serve/Dockerfile.neuron``
   for inf2/trn1/trn2 instances, ``serve/Dockerfile`` for GPU instances (ml.g5, ml.g6,
   ml.p4d, ml.p5, ...).
2. Upload the model as a ``model.tar.gz`` whose top level holds a Hugging Face directory's
   files (or one GGUF file); SageMaker unpacks it into /opt/ml/model, which the container's
   ``serve`` command serves. On Neuron, neuronx-cc compiles the step graphs while the
   container warms up, within the startup timeout below. Or upload an artifact that
   ``neuron-llm compile`` wrote with the image's library versions (on an instance of the
   kind it will run on): it loads without compiling, and the options given here must be
   the ones it was compiled with.
3. ``pip install "sagemaker>=2.199,<3"`` (the SDK's 2.x ``Model`` API, which 3.x removed) and
   have AWS credentials allowed to create models and endpoints.

The container is configured only through ``NEURON_LLM_*`` environment variables (see
``serve/settings.py``); ``--env KEY=VALUE`` passes any other one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

NEURON_FAMILIES = ("ml.inf2.", "ml.trn1.", "ml.trn1n.", "ml.trn2.")
GPU_FAMILIES = ("ml.g4dn.", "ml.g5.", "ml.g6.", "ml.g6e.", "ml.p4d.", "ml.p4de.", "ml.p5.", "ml.p5e.", "ml.p5en.")
STARTUP_TIMEOUT_S = 1800
"""Time SageMaker gives the container to answer /ping with 200: loading a large model takes minutes."""


def device_for_instance(instance_type: str) -> str:
    """The ``NEURON_LLM_DEVICE`` of an instance type: "xla" on Neuron instances, "cuda" on GPU ones."""
    if instance_type.startswith(NEURON_FAMILIES):
        return "xla"
    if instance_type.startswith(GPU_FAMILIES):
        return "cuda"
    raise ValueError(
        f"instance_type={instance_type!r}: not a Neuron ({', '.join(NEURON_FAMILIES)}) "
        f"or GPU ({', '.join(GPU_FAMILIES)}) instance type"
    )


def container_env(args: argparse.Namespace) -> dict[str, str]:
    """The container's environment: the server's settings as ``NEURON_LLM_*`` variables.

    Raises ``ValueError`` for settings the container would refuse at startup, and for those
    it cannot serve: on Neuron the KV pool's size must be given (the device's memory is not
    queried), tensor parallelism does not run (it runs over torch.distributed on CPUs and
    GPUs only), and the step's token budget must be chosen (the prefill attention gathers
    each token's whole context there, so the engine's default of 2048 tokens is too many).
    """
    from neuron_llm.serve.settings import ServeSettings

    device = device_for_instance(args.instance_type)
    if device == "xla":
        for flag, value, why in (
            ("--num-kv-blocks", args.num_kv_blocks, "the Neuron device's memory is not queried"),
            (
                "--max-num-batched-tokens",
                args.max_num_batched_tokens,
                "prefill gathers each token's whole context there; a few hundred tokens, e.g. 256",
            ),
        ):
            if value is None:
                raise ValueError(f"{flag} is needed on {args.instance_type}: {why}")
        if args.tensor_parallel_size not in (None, 1):
            raise ValueError(
                f"--tensor-parallel-size {args.tensor_parallel_size}: tensor parallelism does not run on Neuron yet"
            )
    env = {"NEURON_LLM_DEVICE": device}
    # Each left unset takes the artifact's own (or the server's default).
    names = ("tensor_parallel_size", "num_kv_blocks", "max_model_len", "max_num_seqs", "max_num_batched_tokens")
    for name in (*names, "served_model_name"):
        if getattr(args, name) is not None:
            env[f"NEURON_LLM_{name.upper()}"] = str(getattr(args, name))
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--env {item!r}: expected KEY=VALUE")
        if key in env:
            raise ValueError(f"--env {key}: already set from the instance type or a flag")
        env[key] = value
    # As the container's `serve` will read them: an unknown or bad setting fails here, not at startup.
    ServeSettings.from_env(env)
    return env


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-uri", required=True, help="the pushed neuron-llm image in ECR")
    parser.add_argument("--model-data", required=True, help="s3://.../model.tar.gz holding the artifact")
    parser.add_argument("--role", required=True, help="SageMaker execution role ARN (reads the artifact and image)")
    parser.add_argument("--instance-type", required=True, help="e.g. ml.inf2.xlarge, ml.trn1.2xlarge, ml.g5.xlarge")
    parser.add_argument("--endpoint-name", required=True)
    parser.add_argument("--instance-count", type=int, default=1)
    parser.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=None,
        help="devices to split the model across (default: 1, or the artifact's)",
    )
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size in blocks (needed on Neuron)")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="most sequences in one step")
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=None, help="most tokens in one step (needed on Neuron)"
    )
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--env", action="append", default=[], help="extra container variable KEY=VALUE (repeatable)")
    parser.add_argument("--smoke-test", action="store_true", help="send one TGI-style request once deployed")
    return parser


def deploy(args: argparse.Namespace) -> None:
    """Create the SageMaker model and endpoint (waiting until it is in service)."""
    try:
        from sagemaker.deserializers import JSONDeserializer
        from sagemaker.model import Model
        from sagemaker.predictor import Predictor
        from sagemaker.serializers import JSONSerializer
    except ImportError as e:
        raise SystemExit(f'the SageMaker SDK 2.x is needed: pip install "sagemaker>=2.199,<3" ({e})') from e

    model = Model(
        image_uri=args.image_uri,
        model_data=args.model_data,
        role=args.role,
        env=container_env(args),
        predictor_cls=Predictor,
    )
    predictor = model.deploy(
        initial_instance_count=args.instance_count,
        instance_type=args.instance_type,
        endpoint_name=args.endpoint_name,
        container_startup_health_check_timeout=STARTUP_TIMEOUT_S,
        serializer=JSONSerializer(),
        deserializer=JSONDeserializer(),
    )
    print(f"endpoint {args.endpoint_name} is in service")
    if args.smoke_test:
        reply = predictor.predict({"inputs": "The capital of France is", "parameters": {"max_new_tokens": 16}})
        print(reply)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        container_env(args)  # refuse a bad instance type or --env before touching AWS
    except ValueError as e:
        print(f"deploy: error: {e}", file=sys.stderr)
        return 2
    deploy(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
