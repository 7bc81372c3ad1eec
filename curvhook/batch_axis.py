"""Where the batch axis is: followed through permutes, transposes, unbind and reshapes.

Modules see the batch axis first. Between modules, models move it and move it
back: timm's attention computes ``qkv.reshape(B, L, 3, H, d).permute(2, 0, 3, 1, 4)``
(batch axis second) and then ``unbind(0)`` (batch axis first again). Every
batched tensor therefore has a *batch axis* ``b``; the tape records it for the
tensors where it is not ``0``. Quantities that travel backward keep their
layout whatever ``b`` is: columns ``[V, N, *rest]`` and diagonals ``[N, *rest]``,
where ``rest`` is the tensor's shape without axis ``b``. The tensor-operation
rule moves the axis in and out where it replays an operation.

:func:`output_batch_axes` tells, from an operation's arguments alone, where the
batch axis of each output is. It knows the operations that move axes or keep
them in place; for any other operation on a tensor whose batch axis is not
first it returns ``None``, and curvhook refuses the graph with a clear error.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from curvhook.operations import (
    ELEMENTWISE, INDEXED_EXTREMES, PRODUCTS, QUOTIENTS, ADDITIONS, SUBTRACTIONS, REVERSED_SUBTRACTIONS,
)

# Operations that keep every axis where it is.
_SAME_AXES = ELEMENTWISE | frozenset({
    "contiguous", "clone", "to", "float", "double", "type_as", "neg", "__neg__", "negative",
    "softmax", "log_softmax", "dropout",
})
# Broadcasting operations of several operands: axes aligned from the right.
_BROADCASTING = PRODUCTS | QUOTIENTS | ADDITIONS | SUBTRACTIONS | REVERSED_SUBTRACTIONS | frozenset({"where", "masked_fill"})
# Operations that split a tensor along one axis into several outputs.
_SPLITS = frozenset({"split", "chunk", "tensor_split", "unbind"})
# The operations whose output axes this module knows (beyond those above).
MOVERS = frozenset({
    "permute", "transpose", "t", "swapaxes", "swapdims", "movedim", "moveaxis", "unsqueeze",
    "squeeze", "select", "reshape", "view", "flatten", "unflatten", "sum", "mean", "amax", "amin", "__getitem__",
}) | INDEXED_EXTREMES | _SPLITS | frozenset({"stack", "cat", "concat", "concatenate"})
# Every operation whose output axes this module knows.
FOLLOWED = MOVERS | _SAME_AXES | _BROADCASTING


def _dim(args: Sequence, kwargs: dict, position: int, name: str = "dim", default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else default


def output_batch_axes(
    name: str, args: tuple, kwargs: dict, axis: int, ndim: int, out_shapes: Sequence[Sequence[int]],
    in_shape: Sequence[int],
) -> Optional[tuple[int, ...]]:
    """The batch axis of each output of an operation whose batched input has it at ``axis``.

    Args:
        name: The operation's bare name (``"permute"``).
        args: Its positional arguments (``args[0]`` the batched tensor for methods).
        kwargs: Its keyword arguments.
        axis: The batch axis of the batched input.
        ndim: That input's number of axes.
        out_shapes: The shapes of the outputs.
        in_shape: The batched input's shape.

    Returns:
        One axis per output, or ``None`` where this module cannot tell.
    """
    n_out = len(out_shapes)
    if name in _SAME_AXES or name in _BROADCASTING:
        out_ndim = len(out_shapes[0])
        return (out_ndim - (ndim - axis),) * n_out
    if name in ("permute",):
        dims = list(args[1:]) if len(args) > 1 else list(kwargs.get("dims", ()))
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = list(dims[0])
        return (_index(dims, axis, ndim),)
    if name in ("transpose", "swapaxes", "swapdims"):
        a, b = (_dim(args, kwargs, 1, "dim0") % ndim, _dim(args, kwargs, 2, "dim1") % ndim)
        return (b if axis == a else a if axis == b else axis,)
    if name == "t":
        return (1 - axis if ndim == 2 else axis,)
    if name in ("movedim", "moveaxis"):
        return (_moved(axis, ndim, _dim(args, kwargs, 1, "source"), _dim(args, kwargs, 2, "destination")),)
    if name == "unsqueeze":
        d = _dim(args, kwargs, 1) % (ndim + 1)
        return (axis + (d <= axis),)
    if name in ("squeeze", "select") or name in _SPLITS:
        return _along_one_axis(name, args, kwargs, axis, ndim, n_out, in_shape)
    if name in ("sum", "mean", "amax", "amin") or name in INDEXED_EXTREMES:
        d = _dim(args, kwargs, 1)
        keep = _dim(args, kwargs, 2, "keepdim", False)
        if d is None or not isinstance(keep, bool):
            return None
        if name in INDEXED_EXTREMES and not isinstance(d, int):
            return None  # the elementwise form max(a, b), or no dim
        dims = [x % ndim for x in (d if isinstance(d, (tuple, list)) else (d,))]
        if axis in dims:
            return None  # a sum over samples
        # (max and min along a dim: the values and the indices, both without the dim)
        return (axis if keep else axis - sum(1 for x in dims if x < axis),) * (n_out if name in INDEXED_EXTREMES else 1)
    if name in ("reshape", "view", "flatten", "unflatten"):
        return (_reshaped_axis(axis, in_shape, out_shapes[0]),)
    if name == "stack":  # a new axis at ``dim`` (CrossViT's heads: ``mean(stack(heads, 0), 0)``)
        d = _dim(args, kwargs, 1, default=0)
        return None if not isinstance(d, int) else (axis + (d % (ndim + 1) <= axis),)
    if name in ("cat", "concat", "concatenate"):  # joined along another axis than the samples'
        d = _dim(args, kwargs, 1, default=0)
        return None if not isinstance(d, int) or d % ndim == axis else (axis,)
    if name == "__getitem__" and len(args) > 1:
        return _indexed_axis(args[1], axis, ndim)
    return None


def _index(dims: list, axis: int, ndim: int) -> Optional[int]:
    """Where ``permute(dims)`` puts ``axis``."""
    normal = [d % ndim for d in dims if isinstance(d, int)]
    return normal.index(axis) if axis in normal else None


def _moved(axis: int, ndim: int, source: Any, destination: Any) -> Optional[int]:
    src = [s % ndim for s in (source if isinstance(source, (tuple, list)) else (source,))]
    dst = [d % ndim for d in (destination if isinstance(destination, (tuple, list)) else (destination,))]
    order = [None] * ndim
    for s, d in zip(src, dst):
        order[d] = s
    rest = iter(i for i in range(ndim) if i not in src)
    order = [o if o is not None else next(rest) for o in order]
    return order.index(axis)


def _along_one_axis(
    name: str, args: tuple, kwargs: dict, axis: int, ndim: int, n_out: int, in_shape: Sequence[int]
) -> Optional[tuple[int, ...]]:
    """``squeeze``, ``select`` and the splits: they must not act on the batch axis."""
    default = 0 if name in _SPLITS and name != "unbind" else None
    position = 2 if name in ("split", "chunk", "tensor_split") else 1  # select(dim, index)
    d = _dim(args, kwargs, position, default=0 if name == "unbind" else default)
    if name == "squeeze":
        if d is None:  # every axis of size one
            return (axis - sum(1 for i in range(axis) if in_shape[i] == 1),) if in_shape[axis] != 1 else None
        dims = [x % ndim for x in (d if isinstance(d, (tuple, list)) else (d,))]
        dims = [x for x in dims if in_shape[x] == 1]
        return None if axis in dims else (axis - sum(1 for x in dims if x < axis),)
    if not isinstance(d, int):
        return None
    d %= ndim
    if d == axis:
        return None  # a selection or split of samples
    removes = name in ("select", "unbind")
    return (axis - (removes and d < axis),) * n_out


def _reshaped_axis(axis: int, in_shape: Sequence[int], out_shape: Sequence[int]) -> Optional[int]:
    """The batch axis after a reshape that keeps it whole: same size, same elements before it."""
    before = math.prod(in_shape[:axis])
    size = in_shape[axis]
    running = 1
    for j, s in enumerate(out_shape):
        if running == before and s == size:
            return j
        running *= s
    return None


def _indexed_axis(index: Any, axis: int, ndim: int) -> Optional[tuple[int]]:
    """The batch axis after basic indexing (``h[-1]``, ``h[:, :, 0]``, ``h[..., None]``).

    Integers remove an axis, slices keep it, ``None`` adds one, ``...`` stands for
    the axes the other items do not name. The batch axis must be taken whole
    (``:`` or under ``...``); tensor indices are not followed (``None``).
    """
    items = list(index) if isinstance(index, tuple) else [index]
    if not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) and not isinstance(i, bool) for i in items):
        return None
    named = sum(1 for i in items if i is not None and i is not Ellipsis)
    if items.count(Ellipsis) > 1 or named > ndim:
        return None
    if Ellipsis not in items:
        items.append(Ellipsis)
    at = items.index(Ellipsis)
    items[at : at + 1] = [slice(None)] * (ndim - named)
    in_axis, out_axis = 0, 0
    for item in items:
        if item is None:
            out_axis += 1
            continue
        if in_axis == axis:
            return (out_axis,) if item == slice(None) else None
        in_axis += 1
        out_axis += not isinstance(item, int)
    return None
