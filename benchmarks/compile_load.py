"""Compile once, then load: the artifact's load time beside loading the source model, in one run.

    python benchmarks/compile_load.py --device cuda --dtype bfloat16 --random-llama3-8b --quantization int8
    python benchmarks/compile_load.py --device cpu          # the default model (a Q4_1 GGUF)

Three fresh processes, so that nothing compiled stays in memory between them: (1) ``LLM`` on
the source model, with an empty Triton cache (the anchor: what every start costs without an
artifact); (2) ``neuron-llm compile``'s ``compile_artifact``; (3) ``LLM`` on the artifact.
Each reports its seconds from the call to a warmed-up engine, and greedy tokens of one
prompt, which must be equal. The artifact's run also counts the compiler-cache files it
added (0 when every graph was found compiled: ``LLM.compiled_at_load``).
``--random-llama3-8b`` first writes a Hugging Face directory of random Llama-3-8B weights
(``--layers`` to cut it). Files are read through the page cache in every run alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPT = list(range(100, 164))


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "device": args.device,
        "dtype": args.dtype,
        "quantization": args.quantization,
        "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs,
    }


def _greedy(llm: Any) -> list[int]:
    from neuron_llm import SamplingParams

    output = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    return list(output[0].outputs[0].token_ids)


def run_phase(phase: str, args: argparse.Namespace) -> dict[str, Any]:
    """One phase, in this (fresh) process."""
    from neuron_llm import LLM
    from neuron_llm.compile.build import compile_artifact

    start = time.perf_counter()
    if phase == "source":
        llm = LLM(args.model, **_engine_options(args))
        seconds = time.perf_counter() - start
        result = {"seconds": seconds, "tokens": _greedy(llm)}
    elif phase == "compile":
        manifest = compile_artifact(args.model, args.artifact, **_engine_options(args))
        result = {"seconds": time.perf_counter() - start, "graph_files": len(manifest["graphs"])}
    else:
        llm = LLM(args.artifact)
        seconds = time.perf_counter() - start
        result = {"seconds": seconds, "tokens": _greedy(llm), "cache_files_added": len(llm.compiled_at_load)}
    if phase != "compile":
        llm.shutdown()
    return result


def write_random_llama3_8b(path: Path, layers: int | None, device: str) -> None:
    """A Hugging Face directory of random Llama-3-8B-shaped bf16 weights (our names are HF's)."""
    import torch
    from safetensors.torch import save_file

    from neuron_llm.bench.engine import llama3_8b_shape, random_llama

    hf_config, config = llama3_8b_shape(layers)
    model = random_llama(config, torch.bfloat16, device)
    path.mkdir(parents=True)
    tensors = {name: param.detach().cpu().contiguous() for name, param in model.named_parameters()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({**hf_config, "torch_dtype": "bfloat16"}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="source model (default: the default model)")
    parser.add_argument("--random-llama3-8b", action="store_true", help="write and use random Llama-3-8B weights")
    parser.add_argument("--layers", type=int, default=None, help="with --random-llama3-8b: this many layers")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=None, help="where the model copies go (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here too")
    parser.add_argument("--phase", choices=("source", "compile", "artifact"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--artifact", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase is not None:
        print(json.dumps(run_phase(args.phase, args)))
        return

    workdir = Path(tempfile.mkdtemp(prefix="compile_load_", dir=args.workdir))
    try:
        argv = [a for a in sys.argv[1:] if a != "--random-llama3-8b"]
        if args.random_llama3_8b:
            source = workdir / "source"
            write_random_llama3_8b(source, args.layers, args.device)
            argv += ["--model", str(source)]
        artifact = workdir / "artifact"
        results = {}
        for phase in ("source", "compile", "artifact"):
            # The source run compiles into an empty cache of its own, as a fresh machine would.
            env = {**os.environ, "TRITON_CACHE_DIR": str(workdir / f"triton-{phase}")}
            done = subprocess.run(
                [sys.executable, __file__, *argv, "--phase", phase, "--artifact", str(artifact)],
                env=env,
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise SystemExit(f"the {phase} phase failed:\n{done.stderr}")
            results[phase] = json.loads(done.stdout.strip().splitlines()[-1])
            print(phase, results[phase], file=sys.stderr)
        size = sum(p.stat().st_size for p in (artifact / "weights").iterdir())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report = {
        "device": args.device,
        "host": platform.node(),
        "model": "random Llama-3-8B shape" if args.random_llama3_8b else (args.model or "default"),
        "layers": args.layers,
        "options": _engine_options(args),
        "weights_bytes": size,
        "source_load_s": results["source"]["seconds"],
        "compile_s": results["compile"]["seconds"],
        "artifact_load_s": results["artifact"]["seconds"],
        "speedup": results["source"]["seconds"] / results["artifact"]["seconds"],
        "cache_files_added_at_load": results["artifact"]["cache_files_added"],
        "same_tokens": results["source"]["tokens"] == results["artifact"]["tokens"],
    }
    print(json.dumps(report, indent=2))
    print(
        f"| {report['model']} | {args.device} | {args.quantization or args.dtype} | "
        f"{report['source_load_s']:.1f} s | {report['compile_s']:.1f} s | {report['artifact_load_s']:.1f} s | "
        f"{report['speedup']:.1f}x | {report['cache_files_added_at_load']} | {report['same_tokens']} |"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
