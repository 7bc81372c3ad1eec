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
pass (its graph task) reaching it; the backward driver refuses to run in such
a pass. Logging ``loss.exp()`` without backpropagating through it is therefore fine.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable, Optional

from torch import Tensor

from curvhook._torch_internals import current_graph_task_id
from curvhook.operations import LINEAR_IN_ALL, LINEAR_IN_EACH, LINEAR_IN_FIRST
from curvhook.records import flat_tensors, tensor_arguments


class LossLinearity:
    """Marks on the tensors computed from loss values.

    Attributes:
        nonlinear_tasks: Ids of the backward passes (graph tasks) that went
            through a nonlinear function of a loss value.
    """

    def __init__(self) -> None:
        self._marks: dict[int, tuple[weakref.ref, bool]] = {}
        self._handles: list[Any] = []
        self.nonlinear_tasks: set[int] = set()
        self.enabled = True

    def watch(self, loss: Tensor) -> None:
        """Start tracking a loss value (a scalar computed by a loss module)."""
        self._set(loss, True)

    def _set(self, tensor: Tensor, linear: bool) -> None:
        self._marks[id(tensor)] = (weakref.ref(tensor, self._forget(id(tensor))), linear)

    def _forget(self, key: int):
        owner_ref = weakref.ref(self)

        def callback(ref: weakref.ref) -> None:
            owner = owner_ref()
            if owner is not None and owner._marks.get(key, (None,))[0] is ref:
                del owner._marks[key]

        return callback

    def _mark_of(self, obj: Any) -> Optional[bool]:
        entry = self._marks.get(id(obj))
        if entry is None or entry[0]() is not obj:
            return None
        return entry[1]

    @property
    def active(self) -> bool:
        """Whether any loss value is tracked (else nothing needs to be propagated)."""
        return bool(self._marks)

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

    def propagate(self, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        """Mark the outputs of an operation that read tracked tensors."""
        marks = [m for m in map(self._mark_of, tensor_arguments(args, kwargs)) if m is not None]
        if not marks:
            return
        linear = all(marks)
        if name in LINEAR_IN_ALL:
            pass
        elif name in LINEAR_IN_EACH:
            linear = linear and len(marks) == 1
        elif name in LINEAR_IN_FIRST:
            linear = linear and len(marks) == 1 and self._mark_of(args[0] if args else None) is not None
        else:
            linear = False
        for tensor in flat_tensors(out):
            if not tensor.requires_grad:
                continue
            self._set(tensor, linear)
            if not linear and all(marks):  # where the function of the loss turns nonlinear
                self._handles.append(tensor.register_hook(self._record_task))

    def _record_task(self, grad: Tensor) -> None:
        if self.enabled:
            self.nonlinear_tasks.add(current_graph_task_id())
