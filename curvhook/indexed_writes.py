"""Writes through an index that hits one entry twice: refused.

``h[:, idx] = v``, ``h.index_put_((idx,), v)``, ``h.scatter(1, idx, v)``,
``h.index_copy(1, idx, v)`` and ``h.put_(idx, v)`` with an index (a tensor, a list,
a numpy array) that names one entry of ``h`` more
than once leave that entry with one of the written values, and torch does not
say which (its documentation calls the result undefined). The derivative with
respect to ``v`` is then undefined too, and torch's two modes disagree: the
reverse mode gives every written copy the entry's gradient, the forward mode
follows whichever write the kernel kept. Curvature built from one mode
(``DiagGGN``, by vector-Jacobian products) and products built from the other
(``GGNVectorProduct``, by Jacobian-vector products) would not belong to one
function, so curvhook refuses the call once per step, before the backward walk.

A value without gradient (``h[mask] = 0``, a constant) is not checked: the
entries it overwrites get a zero derivative whichever copy lands, and an
accumulating write (``index_put_(…, accumulate=True)``, ``put_(…, accumulate=True)``,
``scatter_add``, ``index_add``) is a sum, well defined. Writes inside a leaf module
served by the fallback are not seen here.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from curvhook.errors import UnsupportedModelError
from curvhook.records import CONST, Operation, Slot, fill_template

# Each write by index: (position, keyword) of the written value, then of the index
_WRITES = {
    "__setitem__": ((2, None), (1, None)),
    "index_put": ((2, "values"), (1, "indices")),
    "index_put_": ((2, "values"), (1, "indices")),
    "scatter": ((3, "src"), (2, "index")),
    "scatter_": ((3, "src"), (2, "index")),
    "index_copy": ((3, "source"), (2, "index")),
    "index_copy_": ((3, "source"), (2, "index")),
    "put": ((2, "source"), (1, "index")),  # (flat positions)
    "put_": ((2, "source"), (1, "index")),
}


def _argument(args: tuple, kwargs: dict, where: tuple[int, Optional[str]]):
    position, keyword = where
    if position < len(args):
        return args[position]
    return kwargs.get(keyword) if keyword is not None else None


def may_write_twice(op: Operation) -> bool:
    """Whether ``op`` writes a value with gradient through an index whose entries could repeat.

    Decided from the call's structure (its name and argument kinds), once per
    plan; :func:`refuse_duplicate_writes` then looks at the index values each step.
    """
    if op.module is not None:
        return False
    where = _WRITES.get(op.func_name)
    if where is None:
        return False
    value, index = (_argument(op.args, op.kwargs, w) for w in where)
    if not isinstance(value, Slot) or op.input_kinds[value] == CONST:
        return False
    if op.func_name.startswith(("index_put", "put")) and _accumulates(op):
        return False
    if op.func_name.startswith("scatter") and "reduce" in op.kwargs:
        return False
    return _may_repeat(index)


def _accumulates(op: Operation) -> bool:
    flag = op.args[3] if len(op.args) > 3 else op.kwargs.get("accumulate", False)
    return bool(flag)


def _may_repeat(index) -> bool:
    """Whether an index may name an entry twice: anything but ints, slices, ``None`` and ``...``
    (and tuples of those): a tensor, a list, a numpy array."""
    if isinstance(index, tuple):
        return any(_may_repeat(i) for i in index)
    if isinstance(index, Slot):  # (an int subclass: a tensor argument)
        return True
    return not (index is None or index is Ellipsis or isinstance(index, (bool, int, slice)))


def refuse_duplicate_writes(op: Operation) -> None:
    """Raise if the recorded index of ``op`` (see :func:`may_write_twice`) names an entry twice.

    The entries written are found by applying the index to the positions
    ``0 … numel - 1`` of the destination, laid out in its shape.
    """
    name = op.func_name
    args, kwargs = fill_template(op.args, op.kwargs, list(op.inputs))
    dest = args[0] if args else kwargs.get("input", kwargs.get("self"))
    positions = torch.arange(dest.numel(), device=dest.device).view(dest.shape)
    index = _argument(args, kwargs, _WRITES[name][1])
    dim = args[1] if len(args) > 1 else kwargs.get("dim")  # (scatter, index_copy)
    written = _written_positions(name, positions, index, dim)
    if written is None or written.numel() < 2:
        return
    if torch.unique(written.reshape(-1)).numel() < written.numel():
        raise UnsupportedModelError(
            f"The operation {op.name} writes a tensor with a gradient through an index that names "
            "one entry more than once. torch leaves undefined which of the values lands there, so "
            "the derivative is undefined too (torch's forward and reverse modes disagree on it). "
            "Make the index's entries distinct (torch.unique), or add the values with "
            "index_put_(..., accumulate=True), scatter_add or index_add if a sum is meant."
        )


def _written_positions(name: str, positions: Tensor, index, dim) -> Optional[Tensor]:
    """The destination positions a write by index covers, one per written entry."""
    if name == "__setitem__":
        return positions[index]
    if name.startswith("index_put"):
        return positions[tuple(index)]
    if name.startswith("put"):  # positions in the flattened destination
        return positions.reshape(-1)[index.reshape(-1)] if isinstance(index, Tensor) else None
    if not isinstance(index, Tensor) or not isinstance(dim, int):
        return None
    if name.startswith("scatter"):
        return positions.gather(dim, index)
    return positions.index_select(dim, index)  # index_copy
