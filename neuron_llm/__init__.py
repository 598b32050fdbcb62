"""neuron-llm: Llama inference for AWS Trainium/Inferentia and NVIDIA GPUs.

    from neuron_llm import LLM, SamplingParams
    llm = LLM()  # the default model, SmolLM2-135M-Instruct
    print(llm.generate("The capital of France is", SamplingParams(max_tokens=8))[0].outputs[0].text)

Device packages (torch-xla, the Neuron SDK, Triton) are imported only by the backend that
needs them, so importing this package needs neither a GPU nor the Neuron SDK.
"""

from neuron_llm.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from neuron_llm.outputs import CompletionOutput, Logprob, RequestOutput
from neuron_llm.sampling_params import SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # LLM pulls in transformers and the loaders; import it only when asked for.
    if name == "LLM":
        from neuron_llm.llm import LLM

        return LLM
    raise AttributeError(f"module 'neuron_llm' has no attribute {name!r}")


__all__ = [
    "LLM",
    "BeamSearchOutput",
    "BeamSearchParams",
    "BeamSearchSequence",
    "CompletionOutput",
    "Logprob",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutputsParams",
    "__version__",
]
