"""In-place operations on a view that write through to its base.

``b = self.bias.clone(); b[n:2 * n].zero_()`` (torchvision's Swin V2),
``h[:, 2:4].mul_(2)``: the operation changes the view, and through it the
tensor the view was taken from. Autograd gives the base a ``CopySlices`` node;
the tape records the operation on the view, and here, beside it, one
operation on the base: ``base ↦ base with the view's entries replaced``, a
replay of the views that led from the base to the view and of the in-place
operation on them (:class:`WriteThrough`). The generic tensor-operation rule
differentiates that replay exactly, like any operation it does not know.

Only chains of true views recorded by the tape (slices, ``select``,
``narrow``, ``view``, transposes, ...) are followed; for any other form the
base keeps its unseen ``CopySlices`` node and the plan refuses it with a
message that names the in-place operation on a view.
"""

from __future__ import annotations

from typing import Any, Hashable, Optional

from torch import Tensor

from curvhook.plan_key import freeze
from curvhook.records import Operation, fill_template, flat_tensors, key_of
from curvhook.trace import Trace

# Operations whose output is always a view of their first tensor argument.
VIEWS = frozenset({
    "__getitem__", "narrow", "select", "view", "view_as", "permute", "transpose", "swapaxes", "swapdims",
    "movedim", "moveaxis", "unsqueeze", "squeeze", "unflatten", "split", "chunk", "unbind", "tensor_split",
    "expand", "expand_as", "diagonal", "t", "__get__",
})

# How far back the tape looks for the operation that made a view (views are taken just before use).
_LOOK_BACK = 64


def view_chain(trace: Trace, view: Tensor) -> Optional[list[tuple[Operation, int, int]]]:
    """The recorded views from ``view._base`` to ``view``: ``[(op, slot, output index), ...]``
    in the order they ran, or ``None`` where one of them was not recorded (or is no view)."""
    base, chain, current, key = view._base, [], view, key_of(view)
    recent = trace.operations[-_LOOK_BACK:]
    for _ in range(8):
        op = next((o for o in reversed(recent) if key in o.output_keys), None)
        if op is None or op.func_name not in VIEWS or op.inplace:
            return None
        slot = next((i for i, x in enumerate(op.inputs) if x is base or x._base is base), None)
        if slot is None:
            return None
        chain.append((op, slot, op.output_keys.index(key)))
        current, key = op.inputs[slot], op.input_keys[slot]
        if current is base:
            return chain[::-1]
    return None


class WriteThrough:
    """``(base, *others) ↦ base`` after an in-place operation on a view of ``base``.

    ``Operation.invoke`` hands it a copy of the base (the record is in place):
    the views are taken of that copy and the operation writes through them.
    Two instances are equal when they replay the same calls, so plans keyed by
    the function stay the same from step to step.
    """

    __name__ = "write_through_view"

    def __init__(self, chain: list[tuple[Operation, int, int]], func: Any, args: tuple, kwargs: dict) -> None:
        self.chain = chain
        self.func, self.args, self.kwargs = func, args, kwargs
        self._key: Hashable = (
            tuple((op.func, freeze(op.args), freeze(op.kwargs), slot, index) for op, slot, index in chain),
            func, freeze(args), freeze(kwargs),
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WriteThrough) and other._key == self._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __call__(self, base: Tensor, *others: Tensor) -> Tensor:
        view = base
        for op, slot, index in self.chain:
            tensors = list(op.inputs)
            tensors[slot] = view
            args, kwargs = fill_template(op.args, op.kwargs, tensors)
            view = list(flat_tensors(op.func(*args, **kwargs)))[index]
        args, kwargs = fill_template(self.args, self.kwargs, [view, *others])
        self.func(*args, **kwargs)
        return base
