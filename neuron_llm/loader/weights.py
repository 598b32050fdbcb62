"""Copying checkpoint tensors into model parameters, one shard per rank.

A checkpoint tensor is offered as a ``TensorSource``: something with a ``shape`` that can
be sliced, so a tensor-parallel rank reads only its rows or columns (a safetensors slice
reads just those bytes from disk). A parameter that needs more than a plain copy carries a
``weight_loader(param, source)`` attribute, set by the layer that owns it (see
``neuron_llm.parallel.layers``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

logger = logging.getLogger(__name__)

_TIED = ("model.embed_tokens.weight", "lm_head.weight")
_ROTARY_BUFFERS = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
_TIED_SAMPLE_ROWS = 8
"""Rows of the embedding and of a stored head compared when the model ties them: a head
trained apart from the embedding differs in every row."""


class TensorSource(Protocol):
    """A checkpoint tensor read lazily: ``source[rows, cols]`` returns a torch tensor."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, index: object) -> torch.Tensor: ...


def default_weight_loader(param: nn.Parameter, source: TensorSource) -> None:
    """Copy the whole tensor, refusing a shape mismatch."""
    if tuple(source.shape) != tuple(param.shape):
        raise ValueError(f"checkpoint shape {tuple(source.shape)} does not match parameter shape {tuple(param.shape)}")
    param.data.copy_(source[...])


def load_weights(model: nn.Module, sources: Iterable[tuple[str, TensorSource]]) -> None:
    """Load every named tensor of ``sources`` into ``model``; every parameter must be filled.

    Raises ``ValueError`` naming an unexpected checkpoint tensor, a shape mismatch, or a
    parameter the checkpoint lacks. When the model ties ``lm_head.weight`` to the embedding,
    the stored head (quantized too, as vLLM ignores it) is ignored, or fills the embedding when
    the checkpoint has no embedding.
    """
    params = dict(model.named_parameters())  # tied parameters appear once, under their first name
    loaded: set[str] = set()
    tied: dict[str, TensorSource] = {}
    head_is_quantized = False
    for name, source in sources:
        if name not in params and f"model.{name}" in params:
            name = f"model.{name}"  # a bare LlamaModel's names, which transformers also reads
        if name in _TIED and "lm_head.weight" not in params:
            tied[name] = source
        if name not in params:
            if name == "lm_head.weight":
                continue  # tied to model.embed_tokens.weight
            if name.startswith("lm_head.") and "lm_head.weight" not in params:
                head_is_quantized = True  # its scales: llm-compressor quantizes a tied head unless told not to
                continue
            if name.endswith(_ROTARY_BUFFERS):
                continue  # recomputed from the config (ColossalAI saves the cos/sin tables too)
            raise ValueError(f"checkpoint tensor {name!r} has no matching parameter in the model")
        _load_one(name, params[name], source)
        loaded.add(name)
    embedding = _TIED[0]
    if embedding in params and embedding not in loaded and _TIED[1] in tied:
        # A tied model saved under the head's name only (safetensors' save_model keeps the
        # first name of a shared tensor): the head's values are the embedding's.
        if head_is_quantized:
            raise ValueError(
                "the checkpoint stores no embedding, only a quantized lm_head, which its config ties to the "
                "embedding (tie_word_embeddings): there are no 16-bit values to embed tokens with"
            )
        _load_one(_TIED[1], params[embedding], tied[_TIED[1]])
        loaded.add(embedding)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}")
    if len(tied) == 2 and not torch.equal(*(source[:_TIED_SAMPLE_ROWS].float() for source in tied.values())):
        # transformers 5 would use the stored head; vLLM and transformers 4 tie it, as here.
        # (A quantized head always differs.)
        logger.warning(
            "the checkpoint stores an lm_head.weight that differs from its embedding, but its config ties "
            "them (tie_word_embeddings): the embedding serves as the LM head and the stored one is ignored"
        )


def _load_one(name: str, param: nn.Parameter, source: TensorSource) -> None:
    loader = getattr(param, "weight_loader", default_weight_loader)
    try:
        loader(param, source)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from e


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Write ``tensors`` to ``path`` as safetensors, readable as the umask allows: safetensors
    itself makes the file 0600, which another user serving it (a container's) could not read.

    Raises ``OSError`` when writing fails (a full disk), as Python's own writes do: safetensors
    raises an error class of its own.
    """
    try:
        save_file(dict(tensors), str(path), metadata={"format": "pt"})
    except SafetensorError as e:
        raise OSError(f"{path}: {e}") from e
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)
