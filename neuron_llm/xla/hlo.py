"""The HLO module of a lazy graph: what neuronx-cc compiles to a NEFF.

``hlo_module_proto`` hands out the serialized ``xla.HloModuleProto`` of the graph that
computes some lazy tensors; ``entry_parameter_shapes`` reads the entry computation's
signature back from those bytes (``entry_parameter_splits``, under SPMD, how each parameter is
split over the devices) with a small protobuf wire-format reader, so checking an
exported graph needs neither the protobuf package nor XLA's generated message classes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from neuron_llm.xla.device import import_torch_xla

# Field numbers from XLA's hlo.proto / xla_data.proto.
_MODULE_HOST_PROGRAM_SHAPE = 4  # HloModuleProto.host_program_shape: ProgramShapeProto
_PROGRAM_SHAPE_PARAMETERS = 1  # ProgramShapeProto.parameters: repeated ShapeProto
_SHAPE_ELEMENT_TYPE = 2  # ShapeProto.element_type: PrimitiveType
_SHAPE_DIMENSIONS = 3  # ShapeProto.dimensions: repeated int64
_MODULE_COMPUTATIONS = 3  # HloModuleProto.computations: repeated HloComputationProto
_MODULE_ENTRY_COMPUTATION_ID = 6  # HloModuleProto.entry_computation_id: int64
_COMPUTATION_INSTRUCTIONS = 2  # HloComputationProto.instructions: repeated HloInstructionProto
_COMPUTATION_ID = 5  # HloComputationProto.id: int64
_INSTRUCTION_OPCODE = 2  # HloInstructionProto.opcode: string
_INSTRUCTION_PARAMETER_NUMBER = 9  # HloInstructionProto.parameter_number: int64
_INSTRUCTION_SHARDING = 40  # HloInstructionProto.sharding: OpSharding
_SHARDING_TYPE = 1  # OpSharding.type: 3 is OTHER (tiled); REPLICATED is 0
_SHARDING_TILE_DIMENSIONS = 3  # OpSharding.tile_assignment_dimensions: repeated int64
_SHARDING_REPLICATE_ON_LAST_TILE_DIM = 6  # OpSharding.replicate_on_last_tile_dim: bool
_SHARDING_TILED = 3

# xla.PrimitiveType values, named as the HLO text names them.
_PRIMITIVE_TYPES = {
    1: "pred", 2: "s8", 3: "s16", 4: "s32", 5: "s64", 6: "u8", 7: "u16", 8: "u32", 9: "u64",
    10: "f16", 11: "f32", 12: "f64", 13: "tuple", 16: "bf16", 19: "f8e5m2", 20: "f8e4m3fn",
}  # fmt: skip


@dataclass(frozen=True)
class HloShape:
    """An array shape of the HLO signature: element type as HLO writes it (``f32``) and dimensions."""

    dtype: str
    dims: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(map(str, self.dims))}]"


def graph_order(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` in the order a sync makes them its graph's outputs: by tensor id, as
    ``torch_xla.sync()`` collects the live tensors, each once. Another order is another module."""
    unique = {id(tensor): tensor for tensor in tensors}
    return sorted(unique.values(), key=import_torch_xla()._XLAC._xla_get_tensor_id)


def hlo_module_proto(tensors: Sequence[torch.Tensor]) -> bytes:
    """The serialized ``HloModuleProto`` of the graph computing ``tensors`` (XLA lazy tensors),
    its outputs in ``graph_order``: the module that a sync of these tensors compiles.

    Only traces: nothing is compiled or run, and the tensors stay pending.
    """
    return import_torch_xla()._XLAC._get_xla_tensors_hlo_proto(graph_order(tensors))


def hlo_text(tensors: Sequence[torch.Tensor]) -> str:
    """The HLO text of the graph computing ``tensors``, as ``hlo_module_proto`` would serialize it."""
    return import_torch_xla()._XLAC._get_xla_tensors_hlo(graph_order(tensors))


def entry_parameter_shapes(module_proto: bytes) -> list[HloShape]:
    """The entry computation's parameter shapes, in parameter order, read from a serialized module.

    Raises ``ValueError`` when the bytes are not a well-formed protobuf message or carry no
    host program shape.
    """
    program_shapes = [value for field, value in _fields(module_proto) if field == _MODULE_HOST_PROGRAM_SHAPE]
    if not program_shapes:
        raise ValueError("HLO module has no host_program_shape")
    return [_shape(value) for field, value in _fields(program_shapes[-1]) if field == _PROGRAM_SHAPE_PARAMETERS]


def entry_parameter_splits(module_proto: bytes) -> list[tuple[int, ...] | None]:
    """How the entry computation's parameters are split over devices (GSPMD), in parameter
    order: the number of tiles along each dimension, or None for a parameter whole on every
    device (replicated, or no annotation: a module traced without SPMD).

    Raises ``ValueError`` when the bytes are not a well-formed protobuf message or hold no
    entry computation.
    """
    module = list(_fields(module_proto))
    entry_id = next((value for field, value in module if field == _MODULE_ENTRY_COMPUTATION_ID), None)
    for field, computation in module:
        if field != _MODULE_COMPUTATIONS:
            continue
        computation_fields = list(_fields(computation))
        if next((value for f, value in computation_fields if f == _COMPUTATION_ID), None) != entry_id:
            continue
        splits: dict[int, tuple[int, ...] | None] = {}
        for f, instruction in computation_fields:
            if f != _COMPUTATION_INSTRUCTIONS:
                continue
            values = dict(_fields(instruction))
            if values.get(_INSTRUCTION_OPCODE) == b"parameter":
                splits[values.get(_INSTRUCTION_PARAMETER_NUMBER, 0)] = _split(values.get(_INSTRUCTION_SHARDING, b""))
        return [splits[number] for number in sorted(splits)]
    raise ValueError("HLO module has no entry computation")


def _split(sharding_proto: bytes) -> tuple[int, ...] | None:
    values = dict(_fields(sharding_proto))
    if values.get(_SHARDING_TYPE, 0) != _SHARDING_TILED:
        return None
    dims = values.get(_SHARDING_TILE_DIMENSIONS, b"")
    tiles = tuple(_packed_varints(dims) if isinstance(dims, bytes) else [dims])
    # A last tile dimension that counts replicas is not a split of the array.
    return tiles[:-1] if values.get(_SHARDING_REPLICATE_ON_LAST_TILE_DIM) else tiles


def _shape(shape_proto: bytes) -> HloShape:
    element_type = 0
    dims: list[int] = []
    for field, value in _fields(shape_proto):
        if field == _SHAPE_ELEMENT_TYPE:
            element_type = value
        elif field == _SHAPE_DIMENSIONS:
            # Packed (proto3's default) or, from older writers, one varint per field.
            dims.extend(_packed_varints(value) if isinstance(value, bytes) else [value])
    return HloShape(_PRIMITIVE_TYPES.get(element_type, f"type{element_type}"), tuple(dims))


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint in HLO module proto")
        byte = data[pos]
        result |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return result, pos
        shift += 7


def _packed_varints(data: bytes) -> list[int]:
    values, pos = [], 0
    while pos < len(data):
        value, pos = _varint(data, pos)
        values.append(value)
    return values


def _fields(message: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) pairs of a protobuf message: ints for varints, bytes otherwise."""
    pos = 0
    while pos < len(message):
        key, pos = _varint(message, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _varint(message, pos)
            yield field, value
        elif wire_type == 2:
            length, pos = _varint(message, pos)
            if pos + length > len(message):
                raise ValueError("truncated field in HLO module proto")
            yield field, message[pos : pos + length]
            pos += length
        elif wire_type in (1, 5):
            width = 8 if wire_type == 1 else 4
            if pos + width > len(message):
                raise ValueError("truncated field in HLO module proto")
            yield field, message[pos : pos + width]
            pos += width
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type} in HLO module proto")
