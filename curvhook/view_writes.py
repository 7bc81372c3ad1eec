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
``narrow``, ``view``, transposes, ...) are followed, and, where the tape recorded
none (a view of a tensor that needs no gradient), a view that is a slicing of its
contiguous base (:func:`sliced_chain`); for any other form the base keeps its
unseen ``CopySlices`` node and the plan refuses it with a message that names the
in-place operation on a view.
"""

from __future__ import annotations

from typing import Any, Hashable, Optional

from torch import Tensor

from curvhook.operations import ADDITIONS, ELEMENTWISE, PRODUCTS, QUOTIENTS, SUBTRACTIONS, name_of
from curvhook.plan_key import freeze
from curvhook.records import Slot, fill_template, flat_tensors, key_of
from curvhook.trace import Trace

# Operations whose output is always a view of their one tensor argument.
VIEWS = frozenset({
    "__getitem__", "narrow", "select", "view", "permute", "transpose", "swapaxes", "swapdims",
    "movedim", "moveaxis", "unsqueeze", "squeeze", "unflatten", "split", "chunk", "unbind", "tensor_split",
    "expand", "diagonal", "t", "__get__",
})

# In-place operations that act on their target entry by entry (``v.mul_(w)``, ``v.zero_()``,
# ``v[i] = u``): written through a view, the map from the base to the new base has a
# diagonal Jacobian (the entries outside the view pass unchanged).
ENTRYWISE_WRITES = frozenset(
    {f"{name}_" for name in ELEMENTWISE | PRODUCTS | QUOTIENTS | ADDITIONS | SUBTRACTIONS if not name.startswith("_")}
    | {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__setitem__", "zero_", "fill_", "copy_",
       "masked_fill_", "clamp_", "clamp_min_", "clamp_max_"}
    | {name for name in ELEMENTWISE if name.endswith("_")}
)

# How far back the tape looks for the operation that made a view, in recorded operations
# (views are taken just before they are written to), and how many views deep.
_LOOK_BACK, _DEPTH = 64, 8

# One view of a chain: the call (function and arguments, slot 0 the parent tensor) and which
# of its outputs (``split``, ``unbind``: several) is the next view.
ViewStep = tuple[Any, tuple, dict, int]


def view_chain(trace: Trace, view: Tensor) -> Optional[list[ViewStep]]:
    """The recorded views from ``view._base`` to ``view``, in the order they ran, or ``None``
    where one of them was not recorded, is no view, or read another tensor."""
    base, chain, key = view._base, [], key_of(view)
    recent = trace.operations[-_LOOK_BACK:]
    for _ in range(_DEPTH):
        op = next((o for o in reversed(recent) if key in o.output_keys), None)
        if op is None or op.func_name not in VIEWS or op.inplace or len(op.inputs) != 1:
            return None
        parent = op.inputs[0]
        if parent is not base and parent._base is not base:
            return None
        # (the index among the recorded outputs: every output of a view call is a view, so recorded)
        chain.append((op.func, op.args, op.kwargs, op.output_keys.index(key)))
        if parent is base:
            return chain[::-1]
        key = op.input_keys[0]
    return None


def sliced_chain(view: Tensor) -> Optional[list[ViewStep]]:
    """The view as one ``base[..., a:b:s, …]`` of its contiguous base, read off its sizes,
    strides and offset, where the tape recorded no chain of views (views of a tensor that
    needs no gradient are not recorded: DeepSeek's ``k = h.new_empty(…)``,
    ``k[..., :d].copy_(a)``, ``k[..., d:].copy_(b)``); ``None`` where the view is no such
    slicing, or slices the batch axis (axis 0 stays whole: the replay also runs on one sample).

    Any view with the same geometry is the same entries of the base, so writing through the
    slicing writes what the model wrote.
    """
    base = view._base
    if base is None or not base.is_contiguous() or view.dim() != base.dim() or view.dim() < 2:
        return None
    rest = view.storage_offset() - base.storage_offset()
    slices = []
    for d in range(base.dim()):  # strides decrease along a contiguous tensor's axes
        start, rest = divmod(rest, base.stride(d)) if base.size(d) > 1 else (0, rest)
        size = view.size(d)
        step = view.stride(d) // base.stride(d) if size > 1 else 1
        if step < 1 or (size > 1 and view.stride(d) != step * base.stride(d)) or start + (size - 1) * step >= base.size(d):
            return None
        slices.append(slice(start, start + (size - 1) * step + 1, step))
    if rest != 0 or slices[0] != slice(0, base.size(0), 1):
        return None
    first = next((d for d, (sl, n) in enumerate(zip(slices, base.shape)) if sl != slice(0, n, 1)), base.dim())
    index = (Ellipsis, *slices[first:])  # (Ellipsis,) alone: the whole base (``k[:, :].copy_(h)``)
    made = base[index]
    if made.shape != view.shape or made.stride() != view.stride() or made.storage_offset() != view.storage_offset():
        return None
    return [(Tensor.__getitem__, (Slot(0), index), {}, 0)]


class WriteThrough:
    """``(base, *others) ↦ base`` after an in-place operation on a view of ``base``.

    ``Operation.invoke`` hands it a copy of the base (the record is in place):
    the views are taken of that copy and the operation writes through them.
    Two instances are equal when they replay the same calls, so plans keyed by
    the function stay the same from step to step.
    """

    __name__ = "write_through_view"

    def __init__(self, chain: list[ViewStep], func: Any, args: tuple, kwargs: dict) -> None:
        # (no tensors: it sits in the plan's key, which outlives the step)
        self.chain = chain
        self.func, self.args, self.kwargs = func, args, kwargs
        self.wrapped_name = name_of(func)
        self.entrywise = self.wrapped_name in ENTRYWISE_WRITES
        self._key: Hashable = (
            tuple((f, freeze(a), freeze(k), index) for f, a, k, index in chain), func, freeze(args), freeze(kwargs),
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WriteThrough) and other._key == self._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __call__(self, base: Tensor, *others: Tensor) -> Tensor:
        view = base
        for func, args, kwargs, index in self.chain:
            args, kwargs = fill_template(args, kwargs, [view])
            view = list(flat_tensors(func(*args, **kwargs)))[index]
        args, kwargs = fill_template(self.args, self.kwargs, [view, *others])
        self.func(*args, **kwargs)
        return base
