"""A quantization recipe: the format the chosen linears get, and the policy that chooses them."""

from __future__ import annotations

from dataclasses import dataclass

from neuron_llm.quant.formats import DEFAULT_ACTIVATION_SCALE_UB, LinearFormat
from neuron_llm.quant.policy import ALL_LINEARS, ALL_LINEARS_AND_HEAD, LLAMA3_FP8, QuantPolicy


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a model: ``format`` for every linear that ``policy`` selects."""

    format: LinearFormat
    policy: QuantPolicy

    @property
    def scheme(self) -> str:
        return self.format.scheme

    @classmethod
    def for_scheme(
        cls,
        scheme: str,
        *,
        group_size: int | None = None,
        activation_scale_ub: float | None = DEFAULT_ACTIVATION_SCALE_UB,
        policy: QuantPolicy | None = None,
    ) -> QuantConfig:
        """The recipe of ``scheme`` ("int8", "fp8" or "w8a8") with its defaults.

        int8: per-channel scales (``group_size`` for per-group), every decoder linear.
        fp8: activation scale bound 1200 (None: unbounded), the Llama 3 policy.
        w8a8: per-channel weight scales, per-token activation scales, every decoder linear.
        ``policy`` replaces the scheme's default policy.
        """
        if scheme == "int8":
            return cls(LinearFormat("int8", group_size=group_size), policy or ALL_LINEARS)
        if scheme == "fp8":
            if group_size is not None:
                raise ValueError(f"group_size={group_size}: fp8 weights have per-channel scales only")
            return cls(LinearFormat("fp8", activation_scale_ub=activation_scale_ub), policy or LLAMA3_FP8)
        if scheme == "w8a8":
            if group_size is not None:
                raise ValueError(f"group_size={group_size}: w8a8 weights have per-channel scales only")
            return cls(LinearFormat("w8a8"), policy or ALL_LINEARS)
        raise ValueError(f"quantization scheme {scheme!r} is not one of int8, fp8, w8a8")


PRESETS: dict[str, QuantConfig] = {
    "int8": QuantConfig.for_scheme("int8"),
    "int8-head": QuantConfig.for_scheme("int8", policy=ALL_LINEARS_AND_HEAD),
    "int8-g128": QuantConfig.for_scheme("int8", group_size=128),
    "fp8": QuantConfig.for_scheme("fp8"),
    "fp8-all": QuantConfig.for_scheme("fp8", policy=ALL_LINEARS),
    "w8a8": QuantConfig.for_scheme("w8a8"),
}
"""Named recipes: int8 per channel, the same with the LM head in int8 too, int8 per group of 128,
fp8 Llama 3 recipe, fp8 on all linears, int8 weights and activations (without smoothing:
``neuron-llm quantize --smoothquant`` smooths)."""


def resolve_quant_config(quantization: str | QuantConfig) -> QuantConfig:
    """A ``QuantConfig`` from itself or a preset name; ``ValueError`` listing the presets otherwise."""
    if isinstance(quantization, QuantConfig):
        return quantization
    if quantization not in PRESETS:
        raise ValueError(f"quantization={quantization!r}: must be one of {', '.join(PRESETS)} or a QuantConfig")
    return PRESETS[quantization]
