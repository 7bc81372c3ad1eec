"""The shape of a graph: dense slots for its tensors, and the key its plan is cached under.

Two forward passes have the same key exactly when every check a plan made, and
every decision it holds, is the same for both: the same operations (module
identity, type, configuration and train/eval mode; function and arguments),
connected the same way, on inputs of the same shapes, dtypes, devices,
requires_grad and kind, with the same parameters, and no rule registered in between.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Optional

import torch
from torch import Tensor, nn

from curvhook.records import Operation, Slot, TensorKey
from curvhook.rules.registry import registry_version
from curvhook.trace import Trace

_PLAIN = (int, float, str, bool, bytes, type(None), torch.dtype, torch.device, type(Ellipsis))
_MODEL_INPUT = -2  # the slot token of a tensor passed to the model
_EXTERNAL = -1  # the slot token of a tensor no recorded operation produced


@dataclass(eq=False)
class GraphShape:
    """One forward pass's graph as slot numbers.

    Attributes:
        key: Equal for graphs that one plan serves (``None``: do not cache).
        slot_of: The dense slot of every tensor an operation produced.
        produced: The identities of those tensors.
    """

    key: Optional[Hashable]
    slot_of: dict[TensorKey, int]

    @property
    def produced(self) -> dict[TensorKey, int]:
        """The tensors an operation produced (the keys of ``slot_of``)."""
        return self.slot_of


def graph_shape(trace: Trace) -> GraphShape:
    """Number the tensors of ``trace`` and compute its key."""
    slot_of: dict[TensorKey, int] = {}
    parts: list[Hashable] = [registry_version(), len(trace.operations)]
    for op in trace.all_operations:
        inputs = tuple(_input_token(op, i, slot_of, trace) for i in range(len(op.inputs)))
        for key in (*op.output_keys, *op.unfollowed_output_keys):
            if key is not None:
                slot_of.setdefault(key, len(slot_of))
        outputs = tuple(-1 if k is None else slot_of[k] for k in op.output_keys)
        parts.append((
            _operation_token(op), inputs, outputs, op.output_shapes, len(op.unfollowed_output_keys), op.rows, op.rows_in
        ))
    parts.append(slot_of.get(trace.root_key, _EXTERNAL))
    return GraphShape(tuple(parts), slot_of)


def _input_token(op: Operation, i: int, slot_of: dict[TensorKey, int], trace: Trace) -> Hashable:
    x, key = op.inputs[i], op.input_keys[i]
    origin = slot_of.get(key)
    if origin is None:
        origin = _MODEL_INPUT if key in trace.input_keys else _EXTERNAL
    return (origin, op.input_kinds[i], x.shape, x.dtype, x.device, op.input_nodes[i] is None)


def _operation_token(op: Operation) -> Hashable:
    params = tuple((name, id(p), p.shape, p.dtype, p.device) for name, p in op.params)
    if op.module is None:
        return (
            op.func, freeze(op.args), freeze(op.kwargs), op.inplace, op.to_batch, op.rows_per_sample, op.batch_axes,
            params, op.fixed_slots,
        )
    module = op.module
    return (
        type(module), id(module), module_configuration(module), op.training, op.recurse, params,
        freeze(op.args), freeze(op.kwargs), op.from_parameters, op.batch_axes, op.fixed_slots,
    )


def module_configuration(module: nn.Module) -> Hashable:
    """The module's public attributes (``stride``, ``eps``, ``batch_first`` …), frozen."""
    return tuple((k, freeze(v)) for k, v in module.__dict__.items() if k[0] != "_" and k != "training")


def freeze(obj: Any) -> Hashable:
    """A hashable stand-in for an argument: equal for arguments a plan treats alike.

    Tensors stand for their shape and dtype (their values are never part of a
    plan), slots for their number, containers for their items; other objects
    for their identity.
    """
    if isinstance(obj, Slot):
        return ("slot", int(obj))
    if isinstance(obj, _PLAIN):
        return obj
    if isinstance(obj, (tuple, list)):
        return (type(obj).__name__, *(freeze(o) for o in obj))
    if isinstance(obj, dict):
        return ("dict", *((k, freeze(v)) for k, v in obj.items()))
    if isinstance(obj, slice):
        return ("slice", freeze(obj.start), freeze(obj.stop), freeze(obj.step))
    if isinstance(obj, Tensor):
        return ("tensor", obj.shape, obj.dtype, obj.device)
    return ("object", type(obj), id(obj))
