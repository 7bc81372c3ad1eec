"""The only file of curvhook that touches private torch APIs.

Every entry says what it does, the torch versions it was checked on, and what
curvhook does where it is missing. Nothing else in ``curvhook/`` may use an
underscore name of torch (``tests/test_torch_internals.py`` checks that).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

# Checked on torch 2.13 unless an entry says otherwise; the oldest supported
# version is the one setup.cfg names, where CI runs the whole suite.


def disable_torch_function() -> Any:
    """Context manager: torch functions skip every torch-function mode inside it.

    The tape's own bookkeeping (reading ``grad_fn``, versions, shapes) must not
    come back through the tape. ``torch._C.DisableTorchFunction`` (torch ≥ 1.13);
    without it curvhook cannot record tensor operations and would not import.
    """
    return torch._C.DisableTorchFunction()


def pop_torch_function_mode() -> None:
    """Take the innermost torch-function mode off the stack (it must be curvhook's tape).

    Inside a torch layer the tape records nothing, and off the stack each of the
    layer's functions skips the mode's Python dispatch.
    ``torch._C._pop_torch_function_stack`` (torch ≥ 2.0).
    """
    torch._C._pop_torch_function_stack()


def push_torch_function_mode(mode: Any) -> None:
    """Put ``mode`` back on top of the torch-function mode stack.

    ``torch._C._push_on_torch_function_stack`` (torch ≥ 2.0).
    """
    torch._C._push_on_torch_function_stack(mode)


def torch_function_mode_on_top(mode: Any) -> bool:
    """Whether ``mode`` is the innermost active torch-function mode.

    ``torch._C._len_torch_function_stack`` and ``_get_function_stack_at`` (torch ≥ 2.0).
    """
    depth = torch._C._len_torch_function_stack()
    return depth > 0 and torch._C._get_function_stack_at(depth - 1) is mode


def current_graph_task_id() -> int:
    """Id of the backward pass (graph task) running on this thread; ``-1`` outside one.

    Tells apart two backward passes through the same forward pass.
    ``torch._C._current_graph_task_id`` (torch ≥ 1.13).
    """
    return torch._C._current_graph_task_id()


def current_autograd_node() -> Any:
    """The autograd node whose hook or function is running now (``None`` outside backward).

    The rules of the module that produced the model output need its node, which
    the record may not hold (see :class:`~curvhook.trace.Trace`).
    ``torch._C._current_autograd_node`` (torch ≥ 2.0).
    """
    return torch._C._current_autograd_node()


def queue_backward_callback(callback: Callable[[], None]) -> None:
    """Run ``callback`` when the backward pass under way ends.

    Results are written then, so that several forward passes reached by one
    backward pass add up. ``Variable._execution_engine.queue_callback`` (torch ≥ 1.0).
    """
    torch.autograd.Variable._execution_engine.queue_callback(callback)


def remove_global_forward_hook(handle: Any) -> None:
    """Remove a global module forward hook registered ``with_kwargs=True``.

    ``handle.remove()`` leaves its id in ``_global_forward_hooks_with_kwargs``
    (torch 2.1–2.13); this drops it there too. Where that table does not exist
    there is nothing to drop.
    """
    handle.remove()
    table = getattr(_module, "_global_forward_hooks_with_kwargs", None)
    if table is not None:
        table.pop(handle.id, None)


def tensor_version(tensor: Tensor) -> int:
    """The version counter of ``tensor``: it grows with every in-place change.

    ``Tensor._version`` (every torch 1.x and 2.x).
    """
    return tensor._version


def own_parameters(module: nn.Module) -> Iterable[tuple[str, Any]]:
    """``(name, parameter or None)`` of the parameters a module registered itself.

    ``module._parameters`` is read directly: ``named_parameters(recurse=False)``
    costs several times more on every call of every step. Every torch 1.x and 2.x.
    """
    return module._parameters.items()


def forward_pre_hooks(module: nn.Module) -> Iterator[Any]:
    """The forward pre-hooks registered on ``module``.

    ``extend`` refuses a module already inside another active block.
    ``module._forward_pre_hooks`` (every torch 1.x and 2.x).
    """
    return iter(module._forward_pre_hooks.values())


# Base class of torch's loss modules: those the loss finder watches. It is
# ``torch.nn.modules.loss._Loss`` on every torch 1.x and 2.x.
LOSS_BASE: type = torch.nn.modules.loss._Loss
