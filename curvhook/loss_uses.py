"""Notice when the backpropagated scalar is a nonlinear function of a loss value.

curvhook needs ``ℓ = Σ_i c_i L_i + g``, where the ``L_i`` are the loss modules
called on the model output and ``g`` does not depend on it. Then
``∂²ℓ/∂f² = Σ_i c_i ∂²L_i/∂f²``. For ``ℓ = φ(L)`` the Hessian gains
``φ''(L) ∇L ∇Lᵀ``, a term that couples all samples. The gradient reaching the
model output cannot tell the two apart (it is ``φ'(L) ∇L`` either way), so the
operations applied to loss values are watched during the forward pass instead.

Every tensor computed from a loss value is marked *linear* while only sums,
differences, scalings, reshapes and selections have been applied, and
*nonlinear* once anything else has (``exp``, ``log``, ``pow``, a product of two
losses …). A nonlinear tensor gets a gradient hook that records the backward
pass (its graph task) reaching it; the engine refuses to run in such a pass.
Logging ``loss.exp()`` without backpropagating through it is therefore fine.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable, Optional

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from curvhook.calls import tensor_arguments

# Linear in all their tensor arguments together (sums, reshapes, selections).
_ADDITIVE = {
    "add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "subtract", "__sub__",
    "__rsub__", "__isub__", "rsub", "neg", "neg_", "negative", "__neg__", "positive", "__pos__",
    "sum", "nansum", "mean", "nanmean", "stack", "cat", "concat", "concatenate", "hstack",
    "vstack", "clone", "contiguous", "view", "view_as", "reshape", "reshape_as", "squeeze",
    "unsqueeze", "flatten", "ravel", "expand", "expand_as", "__getitem__", "select",
    "narrow", "index_select", "to", "float", "double", "half", "bfloat16", "type", "type_as",
    "sum_to_size", "cumsum", "t", "T", "mT", "transpose", "permute", "movedim", "unbind",
    "split", "chunk", "squeeze_", "unsqueeze_",
}
# Linear in each argument on its own: linear when exactly one argument is a loss.
_MULTIPLICATIVE = {
    "mul", "mul_", "__mul__", "__rmul__", "__imul__", "multiply", "matmul", "__matmul__",
    "__rmatmul__", "mm", "mv", "dot", "einsum", "outer",
}
# Linear in the first argument only.
_DIVISION = {"div", "div_", "__truediv__", "__itruediv__", "divide", "true_divide"}


# Calls that compute no new differentiable tensor: skipped at once.
_NOT_OPERATIONS = {
    "detach", "detach_", "register_hook", "size", "dim", "numel", "item", "tolist", "backward",
    "requires_grad_", "retain_grad", "__len__", "__format__", "__repr__", "data_ptr", "stride",
    "is_contiguous", "storage_offset", "element_size", "__bool__", "untyped_storage",
    "__hash__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__index__",
    "__int__", "__float__", "__array__", "numpy", "cpu", "equal", "allclose", "isclose",
    "register_post_accumulate_grad_hook", "__reduce_ex__", "__deepcopy__", "nelement",
    "__set__",  # property setters: p.grad = None, x.requires_grad = ...
}
_TENSOR_PROPERTIES = {"T", "mT", "H", "mH", "real", "imag"}


def _tensor_property(getter: Any) -> bool:
    """Whether a property getter returns a differentiable view (``x.T``), not metadata."""
    return getattr(getattr(getter, "__self__", None), "__name__", "") in _TENSOR_PROPERTIES


class LossUseMonitor(TorchFunctionMode):
    """A torch-function mode, active inside an ``extend`` block, that tracks loss values.

    It also hands every other operation to ``recorder`` (the block), which records
    the tensor operations executed between modules.

    Attributes:
        nonlinear_tasks: Ids of the backward passes (graph tasks) that went
            through a nonlinear function of a loss value.
    """

    def __init__(self, recorder: Any = None) -> None:
        super().__init__()
        self.recorder = recorder
        self._marks: dict[int, tuple[weakref.ref, bool]] = {}
        self._handles: list[Any] = []
        self.nonlinear_tasks: set[int] = set()
        self.enabled = True

    # ----------------------------------------------------------------- marks
    def watch(self, loss: Tensor) -> None:
        """Start tracking a loss value (a scalar computed by a loss module)."""
        self._set(loss, True)

    def _set(self, tensor: Tensor, linear: bool) -> None:
        self._marks[id(tensor)] = (weakref.ref(tensor, self._forget(id(tensor))), linear)

    def _forget(self, key: int):
        monitor = weakref.ref(self)

        def callback(ref: weakref.ref) -> None:
            owner = monitor()
            if owner is not None and owner._marks.get(key, (None,))[0] is ref:
                del owner._marks[key]

        return callback

    def _mark_of(self, obj: Any) -> Optional[bool]:
        entry = self._marks.get(id(obj))
        if entry is None or entry[0]() is not obj:
            return None
        return entry[1]

    def marked(self, tensors: Iterable[Any]) -> bool:
        """Whether any of ``tensors`` is a tracked function of a loss value."""
        return bool(self._marks) and any(self._mark_of(t) is not None for t in tensors)

    def clear(self) -> None:
        """Forget every tracked tensor and remove the hooks (end of the block)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._marks.clear()
        self.nonlinear_tasks.clear()
        self.enabled = False

    def prune(self) -> None:
        """Drop bookkeeping of finished backward passes and of tensors that died."""
        self.nonlinear_tasks.clear()
        self._handles = [h for h in self._handles if h.hooks_dict_ref() is not None]

    # ------------------------------------------------------------- the mode
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if not self.enabled or name in _NOT_OPERATIONS or (name == "__get__" and not _tensor_property(func)):
            return func(*args, **kwargs)
        # The bookkeeping reads tensor metadata (``_version``, ``grad_fn``); with torch
        # functions disabled those reads do not come back through this mode.
        state = None
        if self.recorder is not None:
            with torch._C.DisableTorchFunction():
                state = self.recorder.before_function(func, args, kwargs)
        out = func(*args, **kwargs)
        if state is not None or self._marks:
            with torch._C.DisableTorchFunction():
                if state is not None:
                    self.recorder.after_function(state, out)
                if self._marks:
                    marks = [m for m in map(self._mark_of, tensor_arguments(args, kwargs)) if m is not None]
                    if marks:
                        self._propagate(func, args, marks, out)
        return out

    def _propagate(self, func, args: tuple, marks: list[bool], out: Any) -> None:
        name = getattr(func, "__name__", "")
        linear = all(marks)
        if name in _ADDITIVE:
            pass
        elif name in _MULTIPLICATIVE:
            linear = linear and len(marks) == 1
        elif name in _DIVISION:
            linear = linear and len(marks) == 1 and self._mark_of(args[0] if args else None) is not None
        else:
            linear = False
        for tensor in _tensors(out):
            if not tensor.requires_grad:
                continue
            self._set(tensor, linear)
            if not linear and all(marks):  # where the function of the loss turns nonlinear
                self._handles.append(tensor.register_hook(self._record_task))

    def _record_task(self, grad: Tensor) -> None:
        if self.enabled:
            self.nonlinear_tasks.add(torch._C._current_graph_task_id())


def _tensors(out: Any) -> Iterable[Tensor]:
    if isinstance(out, Tensor):
        yield out
    elif isinstance(out, (list, tuple)):
        yield from (o for o in out if isinstance(o, Tensor))
