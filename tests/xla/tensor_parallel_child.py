"""Run in a process of its own (SPMD is the process's mode): generate with tensor parallelism
on the XLA device and print, as JSON, the greedy tokens, the graphs compiled after warm-up,
and the collectives of every partitioned graph (from XLA's dump, ``XLA_FLAGS``).

    CPU_NUM_DEVICES=2 XLA_FLAGS=--xla_dump_to=DIR \
        python tensor_parallel_child.py MODEL_DIR DIR [QUANTIZATION] [--after-one-device] ...

``--after-one-device``: first generate with an unsharded LLM on the XLA device;
``--after-device-call``: first take the device (``torch_xla.device()``), creating no tensor;
``--compile-to=ARTIFACT``: compile the model into an artifact instead, and print its HLO
manifest (MODEL_DIR may be such an artifact, to load).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from neuron_llm import LLM, SamplingParams
from neuron_llm.compile.build import compile_artifact
from neuron_llm.xla import count_graphs

OPTIONS = {"max_model_len": 64, "max_num_seqs": 2, "max_num_batched_tokens": 32, "block_size": 4, "dtype": "float32"}
PROMPTS = [{"prompt_token_ids": [1, 2, 3, 4, 5]}, {"prompt_token_ids": [7] * 9}]
COLLECTIVE = re.compile(r"= (\S+) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)\(")


def main(model: str, dump: Path, quantization: str | None, flags: list[str]) -> None:
    if "--after-device-call" in flags:
        import torch_xla

        torch_xla.device()
    if "--after-one-device" in flags:
        LLM(model, device="xla", num_kv_blocks=40, **OPTIONS).generate(PROMPTS[0], SamplingParams(max_tokens=2))
    options = {"device": "xla", "num_kv_blocks": 40, "tensor_parallel_size": 2, "quantization": quantization}
    if compile_to := next((flag.split("=", 1)[1] for flag in flags if flag.startswith("--compile-to=")), None):
        compile_artifact(model, compile_to, **options, **OPTIONS)
        print(json.dumps(json.loads((Path(compile_to) / "graphs" / "hlo" / "manifest.json").read_text())))
        return
    llm = LLM(model, **options, **OPTIONS)
    with count_graphs() as counts:
        outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0.0))
    collectives = [
        sorted(match.groups() for match in COLLECTIVE.finditer(path.read_text()))
        for path in sorted(dump.glob("*cpu_after_optimizations.txt"))
    ]
    result = {
        "tokens": [list(output.outputs[0].token_ids) for output in outputs],
        "compiled_after_warm_up": counts.compilations,
        "weight_bytes": llm.weight_bytes,
        "collectives": [graph for graph in collectives if graph],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    flags = [arg for arg in sys.argv[3:] if arg.startswith("--")]
    quantization = next((arg for arg in sys.argv[3:] if not arg.startswith("--")), None)
    main(sys.argv[1], Path(sys.argv[2]), quantization, flags)
