"""Every private torch API curvhook uses, behind one name each.

This is the only file of curvhook that touches torch internals: ``torch._C``,
underscore attributes of torch objects (``tensor._version``,
``module._parameters``, an autograd node's ``_saved_*``) and underscore names of
torch modules (``_Loss``, ``_BatchNorm``, ``F._canonical_mask``). The rest of the
package imports the names below instead; ``tests/test_torch_internals.py``
scans the package for private torch APIs used anywhere else and tests every
entry here on the installed torch.

Each entry says what it does, the torch versions it was checked on, and what
curvhook does where the internal is missing: a fallback built from public APIs,
a degraded path (something is recomputed or not recycled; results stay exact),
or a :class:`~curvhook.errors.CurvhookError` when the entry is used (never
when this file is imported). A new torch release is supported once the test
suite passes on it; widen the ranges then.

"Checked on torch 2.6–2.13" means: the tests of this file and the whole test
suite pass on torch 2.6.0 (the oldest release curvhook supports) and 2.13.0,
the two releases CI tests. Older releases lack public features curvhook needs
(README.md, "Supported torch versions").
"""

from __future__ import annotations

import contextlib
import operator
import os
import sys
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

from curvhook.errors import CurvhookError

__all__ = [
    "AUTOCAST_DEVICE_TYPES",
    "BATCH_NORM_TYPES",
    "LOSS_MODULE_TYPES",
    "REPLAYED_AS",
    "ModuleHookPairs",
    "TORCH_FUNC_IMPORTS_DYNAMO",
    "any_autocast_enabled",
    "attention_packs_projections",
    "autocast_device_types",
    "canonical_attention_masks",
    "compiled_forward",
    "compiled_original",
    "current_autograd_node",
    "current_graph_task_id",
    "disable_torch_function",
    "parameter_gets_gradient",
    "forward_pre_hooks",
    "functorch_level",
    "in_backward_hook_setup",
    "in_compiled_region",
    "in_reentrant_checkpoint",
    "is_compiled_node",
    "keep_forward_hook_at",
    "module_state_without_hooks",
    "own_parameters",
    "pop_torch_function_mode",
    "push_torch_function_mode",
    "queue_backward_callback",
    "remove_global_forward_hook",
    "saved_node_values",
    "saved_pooling_indices",
    "saved_tensor_hooks_active",
    "set_compiled_forward",
    "storage_use_count",
    "tensor_version",
    "torch_function_mode_on_top",
]

_C = torch._C


def _missing(name: str, consequence: str) -> Callable[..., Any]:
    """A stand-in for a missing internal that raises a clear error when called."""

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise CurvhookError(
            f"This torch ({torch.__version__}) lacks {name}, which curvhook needs: {consequence} "
            "Install a torch release that curvhook supports (see README.md, 'Supported torch versions')."
        )

    unavailable.__name__ = name.rsplit(".", 1)[-1]
    return unavailable


# ------------------------------------------------------- torch-function modes

# disable_torch_function(): context manager under which no torch-function mode
# and no ``__torch_function__`` override runs: the hooks and the mode's own
# bookkeeping read tensor metadata (``grad_fn``, the version counter) through it
# without coming back into curvhook's mode. A C type, entered on every
# operation of a model inside an ``extend`` block: aliased, not wrapped.
# Checked on torch 2.6–2.13 (``torch._C.DisableTorchFunction``).
# Missing: entering it raises CurvhookError (curvhook cannot record the tape).
if hasattr(_C, "DisableTorchFunction"):
    disable_torch_function = _C.DisableTorchFunction
else:  # pragma: no cover - every torch 2.x has it

    class disable_torch_function:  # type: ignore[no-redef]  # noqa: N801
        def __enter__(self) -> None:
            _missing("torch._C.DisableTorchFunction", "its hooks run with torch functions disabled.")()

        def __exit__(self, *exc: Any) -> None:
            return None


# enable_torch_function(): context manager under which torch-function modes run again
# inside a region where curvhook disabled them (its backward walk): a rule that watches
# a module's own ``forward`` through a mode of its own (the probed norms) enters it.
# Checked on torch 2.6–2.13 (``torch._C._EnableTorchFunction``).
# Missing: a no-op, and such a watch sees nothing (the probed norms then keep the
# tolerance of float64 unless the module's output shows the rounding).
if hasattr(_C, "_EnableTorchFunction"):
    enable_torch_function = _C._EnableTorchFunction
else:  # pragma: no cover - every torch 2.x has it
    enable_torch_function = contextlib.nullcontext

# push_torch_function_mode(mode): put an already-entered torch-function mode
# back on top of the mode stack without calling its ``__enter__`` again;
# pop_torch_function_mode() takes the innermost mode off the stack and
# returns it. ``extend`` takes its mode off the stack while a torch layer
# without children runs (nothing to record inside it, and its functions then
# skip the mode's Python dispatch) and puts it back after.
# Checked on torch 2.6–2.13 (``torch._C._push_on_torch_function_stack``,
# ``torch._C._pop_torch_function_stack``).
# Missing: raises CurvhookError when an extend block runs a layer.
push_torch_function_mode: Callable[[Any], None] = getattr(
    _C, "_push_on_torch_function_stack", None
) or _missing("torch._C._push_on_torch_function_stack", "it steps its mode aside while a torch layer runs.")
pop_torch_function_mode: Callable[[], Any] = getattr(
    _C, "_pop_torch_function_stack", None
) or _missing("torch._C._pop_torch_function_stack", "it steps its mode aside while a torch layer runs.")

_stack_len = getattr(_C, "_len_torch_function_stack", None)
_stack_at = getattr(_C, "_get_function_stack_at", None)


def torch_function_mode_on_top(mode: Any) -> bool:
    """Whether ``mode`` is the innermost torch-function mode on the stack.

    Checked on torch 2.6–2.13 (``torch._C._len_torch_function_stack``,
    ``torch._C._get_function_stack_at``). Missing: ``False`` (an ``extend`` block
    then never takes its mode off the stack: torch layers run through the mode,
    slower, with the same results).
    """
    if _stack_len is None or _stack_at is None:  # pragma: no cover - every torch 2.x has both
        return False
    depth = _stack_len()
    return depth > 0 and _stack_at(depth - 1) is mode


def torch_function_mode_stack_empty() -> bool:
    """Whether no torch-function mode is on the stack (``False`` where torch cannot say:
    ``torch._C._len_torch_function_stack`` missing)."""
    return _stack_len is not None and _stack_len() == 0


# ------------------------------------------------------------------ torch.func

# The transforms of ``torch.func`` (``vmap``, ``jacrev``, ...) of torch before
# 2.8 import ``torch._dynamo`` on their first call. That import runs a
# torch-function mode of its own and asserts that it sees the calls it makes;
# under ``disable_torch_function()``, where curvhook's rules run during the
# backward pass, it sees none, the import fails, and so does every later call
# of a transform. On those releases, curvhook imports ``torch._dynamo`` here,
# once, outside any block (about 1 s).
# Checked on torch 2.6 (needed: without it, the tests fail; 2.7's
# ``torch._functorch.apis`` has the same import of ``torch._dynamo``) and 2.13
# (not needed: from 2.8 on it imports ``torch.compiler`` instead, so curvhook
# skips the import there).
# Missing (``torch._dynamo`` gone): nothing to do, the import is skipped.
TORCH_FUNC_IMPORTS_DYNAMO = torch.__version__ < (2, 8)
if TORCH_FUNC_IMPORTS_DYNAMO:
    try:
        import torch._dynamo  # noqa: F401
    except ImportError:  # pragma: no cover - a build without dynamo
        pass


# ---------------------------------- torch.compile, transforms in a forward, autocast

# any_autocast_enabled() -> bool: whether ``torch.autocast`` is on for any device
# type in this thread. Inside it, modules compute in dtypes autocast picks per
# operation (a Linear in bfloat16, a LayerNorm in float32), which the rules,
# computing with the module's parameters, do not reproduce.
# Checked on torch 2.6–2.13 (``torch._C._is_any_autocast_enabled``).
# Missing: the public ``torch.is_autocast_enabled(device_type)`` over
# :data:`AUTOCAST_DEVICE_TYPES` (the same answer, a few calls more).
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla", "ipu")
_any_autocast = getattr(_C, "_is_any_autocast_enabled", None)


def autocast_device_types() -> list[str]:
    """The device types for which ``torch.autocast`` is on (public API; slower than the check)."""
    found = []
    for device in AUTOCAST_DEVICE_TYPES:
        try:
            if torch.is_autocast_enabled(device):
                found.append(device)
        except RuntimeError:  # a device type this build does not know
            pass
    return found


def any_autocast_enabled() -> bool:
    """Whether ``torch.autocast`` is on for any device type (see the comment above)."""
    if _any_autocast is None:  # pragma: no cover - every torch 2.x from 2.4 has it
        return bool(autocast_device_types())
    return bool(_any_autocast())


# functorch_level() -> Optional[int]: the level of the innermost ``torch.func``
# transform (``vmap``, ``grad``, ``jacrev``, ``vjp``) under way; ``None`` outside
# any. A module or operation that runs at another level than the model's
# forward started at runs inside a transform the forward called: its tensors
# are wrapped (batched, or carrying a transform's gradient), and what curvhook
# would record of them is no tensor of the model's own graph.
# Checked on torch 2.6–2.13 (``torch._C._functorch.maybe_current_level``).
# Missing: ``None``; transforms inside a forward are then not named (the
# forward is still refused where its output was not recorded).
functorch_level: Callable[[], Optional[int]] = getattr(
    getattr(_C, "_functorch", None), "maybe_current_level", None
) or (lambda: None)


def compiled_original(module: nn.Module) -> Optional[nn.Module]:
    """The module that a ``torch.compile(module)`` wrapper wraps; ``None`` for any other module.

    Recognised by its class (``torch._dynamo.eval_frame.OptimizedModule``)
    without importing ``torch._dynamo`` (a second on torch ≥ 2.8).

    Checked on torch 2.6–2.13 (``OptimizedModule._orig_mod``).
    Missing: ``None`` (the wrapper is then extended as it is, and its compiled
    code refused when it runs inside the block).
    """
    cls = type(module)
    if cls.__name__ != "OptimizedModule" or not cls.__module__.startswith("torch._dynamo"):
        return None
    return module.__dict__.get("_modules", {}).get("_orig_mod")


def compiled_forward(module: nn.Module) -> tuple[str, Any]:
    """Where a module keeps the compiled code it runs instead of its own: ``(attribute, value)``.

    ``torch.compile(module)`` returns a wrapper whose ``forward`` runs the
    compiled code (``"forward"``); ``module.compile()`` sets the module's
    compiled call (``"_compiled_call_impl"``). ``("", None)`` for a module
    without either. :func:`set_compiled_forward` puts such a value in place.

    Checked on torch 2.6–2.13 (``OptimizedModule.forward`` in the wrapper's
    ``__dict__``, ``Module._compiled_call_impl``). Missing: ``("", None)``.
    """
    if compiled_original(module) is not None and "forward" in module.__dict__:
        return "forward", module.__dict__["forward"]
    impl = module.__dict__.get("_compiled_call_impl")
    return ("_compiled_call_impl", impl) if impl is not None else ("", None)


def set_compiled_forward(module: nn.Module, attribute: str, value: Any) -> None:
    """Replace what :func:`compiled_forward` found: ``None`` runs the module eagerly,
    the value it returned restores the compiled code."""
    if attribute == "forward":
        original = compiled_original(module)
        # the wrapper's forward runs the wrapped module with its hooks, as torch.compile's does
        object.__setattr__(module, "forward", value if value is not None else original.__call__)
    elif attribute:
        object.__setattr__(module, attribute, value)


# in_compiled_region() -> bool: whether the code calling it runs under
# ``torch.compile``: traced by dynamo (``torch.compiler.is_compiling()``), or run
# from a compiled frame (dynamo's frame-evaluation callback is set while
# compiled code runs, also in the parts it leaves to eager Python around a
# graph break, such as module hooks). Code that dynamo traces may be rerun
# eagerly when it raises; the callback still tells.
# Checked on torch 2.6–2.13 (``torch._C._dynamo.eval_frame.get_eval_frame_callback``:
# ``None`` outside compiled code, ``False`` in dynamo's run-only mode).
# Missing: ``torch.compiler.is_compiling()`` alone (compiled backward nodes
# are still refused, :func:`is_compiled_node`).
_eval_frame_callback = getattr(
    getattr(getattr(_C, "_dynamo", None), "eval_frame", None), "get_eval_frame_callback", None
)


def in_compiled_region() -> bool:
    """Whether the caller runs under ``torch.compile`` (see the comment above)."""
    if torch.compiler.is_compiling():
        return True
    if _eval_frame_callback is None:  # pragma: no cover - every torch 2.x from 2.6 has it
        return False
    callback = _eval_frame_callback()
    return callback is not None and callback is not False


# is_compiled_node(node): whether an autograd node runs code ``torch.compile``
# compiled (AOTAutograd's ``CompiledFunctionBackward``): one node for a whole
# graph of operations, which curvhook cannot apply as one operation's Jacobian.
# Checked on torch 2.6–2.13 (the class name of the node of a compiled graph).
# Missing: no such name; nothing to check.
def is_compiled_node(node: Any) -> bool:
    """Whether ``node`` is the backward of a ``torch.compile``'d graph (see the comment above)."""
    return node is not None and type(node).__name__ == "CompiledFunctionBackward"


# ------------------------------------------------------------ autograd engine

# current_graph_task_id() -> int: an id of the backward pass (graph task) under
# way, the same in every hook of one pass, different for the next pass; -1
# outside of a backward pass. Tells the forward passes one backward reaches
# apart from separate backward passes, and finds the passes that went through
# a nonlinear function of a loss.
# Checked on torch 2.6–2.13 (``torch._C._current_graph_task_id``).
# Missing: raises CurvhookError in the first backward pass inside a block.
current_graph_task_id: Callable[[], int] = getattr(_C, "_current_graph_task_id", None) or _missing(
    "torch._C._current_graph_task_id", "it tells one backward pass from the next."
)

# current_autograd_node(): the autograd node (``grad_fn``) whose hooks or
# backward are running, ``None`` outside of a backward pass. In the tensor hook
# on the model output, the node that produced the output: the rules of the
# last layer apply it instead of holding a reference to the graph.
# Checked on torch 2.6–2.13 (``torch._C._current_autograd_node``).
# Missing: ``None``, which the rules treat like a call without a single node
# (the last layer's product is recomputed from its inputs; results are the same).
current_autograd_node: Callable[[], Any] = getattr(_C, "_current_autograd_node", None) or (lambda: None)

_will_execute = getattr(_C, "_will_engine_execute_node", None)  # see parameter_gets_gradient


# parameter_gets_gradient(p): whether the backward pass under way computes a
# gradient for the leaf ``p``: it runs p's AccumulateGrad node, or (for
# torch.autograd.grad with p among its inputs) captures the gradient there, in
# which case the engine's query raises for that node.
# Checked on torch 2.6–2.13 (``torch.autograd.graph.get_gradient_edge``,
# ``torch._C._will_engine_execute_node``).
# Missing: ``True`` (every pass counts, as before).
_gradient_edge = getattr(getattr(torch.autograd, "graph", None), "get_gradient_edge", None)


def parameter_gets_gradient(p: Tensor) -> bool:
    """Whether the backward pass under way computes a gradient for ``p`` (see the comment above)."""
    if _will_execute is None or _gradient_edge is None:  # pragma: no cover - every torch >= 2.6 has them
        return True
    try:
        return bool(_will_execute(_gradient_edge(p).node))
    except RuntimeError:  # captured by torch.autograd.grad: its gradient is computed
        return True


_engine = getattr(getattr(torch.autograd, "Variable", None), "_execution_engine", None)


def queue_backward_callback(callback: Callable[[], None]) -> None:
    """Run ``callback()`` once when the backward pass under way has finished.

    Only valid inside a backward pass (a tensor hook or an autograd node).
    ``extend`` writes the results of all forward passes one backward pass
    reached at its end, in forward order.

    Checked on torch 2.6–2.13
    (``torch.autograd.Variable._execution_engine.queue_callback``). Missing:
    raises CurvhookError (results could not be written at the end of the pass).
    """
    if _engine is None:  # pragma: no cover - every torch 2.x has it
        _missing("torch.autograd.Variable._execution_engine", "it writes results when backward ends.")()
    _engine.queue_callback(callback)


def saved_pooling_indices(node: Any) -> Optional[Tensor]:
    """The argmax indices a max-pooling autograd node saved for its backward, if it has them.

    ``MaxPool{2,3}DWithIndicesBackward0`` and ``AdaptiveMaxPool{1,2,3}DBackward0``
    keep their indices output as ``_saved_result1``. Returns ``None`` for any
    other node, and once a backward pass without ``retain_graph`` freed them.

    Checked on torch 2.6–2.13. Missing (renamed): ``None``; the
    pooling rule then recomputes the indices by pooling the stored input again.
    """
    try:
        saved = getattr(node, "_saved_result1", None)
    except RuntimeError:  # freed by an earlier backward pass
        return None
    return saved if isinstance(saved, Tensor) else None


def saved_node_values(node: Any, names: tuple[str, ...]) -> Optional[tuple[Any, ...]]:
    """What an autograd node saved for its backward: its ``_saved_<name>`` for each name.

    ``ReluBackward0`` keeps ``_saved_result``, ``GeluBackward0`` ``_saved_self``
    and ``_saved_approximate``, ``MaxPool2DWithIndicesBackward0`` its arguments
    and ``_saved_result1`` (the indices). Reading a saved tensor checks its
    version as autograd does. Returns ``None`` where any name is missing, where
    a backward pass without ``retain_graph`` freed the values, or where a saved
    tensor was modified in place since (the caller then applies the node itself,
    which raises autograd's own error for the last case).

    Checked on torch 2.6–2.13 (the names of the nodes that
    :mod:`curvhook.rules.node_kernels` lists). Missing (renamed): ``None``;
    the node is then applied as it is (its result is not recycled).
    """
    values = []
    try:
        for name in names:
            value = getattr(node, "_saved_" + name, _ABSENT)
            if value is _ABSENT:
                return None
            values.append(value)
    except RuntimeError:  # freed by an earlier backward pass, or modified in place
        return None
    return tuple(values)


_ABSENT = object()


# ------------------------------------------------------ activation checkpointing

_top_saved_hooks = getattr(getattr(_C, "_autograd", None), "_top_saved_tensors_default_hooks", None)


def saved_tensor_hooks_active() -> bool:
    """Whether ``torch.autograd.graph.saved_tensors_hooks`` are active (the nodes made now pack their saves).

    Non-reentrant activation checkpointing (``checkpoint(..., use_reentrant=False)``)
    packs what the nodes of the block save and recomputes it on unpack, once per
    backward pass: the rules must not read such a node, or autograd's own read
    fails. Called for every recorded operation: a C function.

    Checked on torch 2.8–2.13 (``torch._C._autograd._top_saved_tensors_default_hooks``).
    Missing (torch 2.6, 2.7): whether ``torch.utils.checkpoint.checkpoint`` is
    on the call stack, found by walking it (the only hooks whose unpacking may
    not be repeated).
    """
    if _top_saved_hooks is None:
        return _checkpoint_on_stack()
    return _top_saved_hooks(False) is not None


def _checkpoint_on_stack() -> bool:
    """Whether a frame of ``torch.utils.checkpoint.checkpoint`` is on the call stack."""
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "checkpoint" and code.co_filename.endswith(_CHECKPOINT_FILE):
            return True
        frame = frame.f_back
    return False


_CHECKPOINT_FILE = os.path.join("torch", "utils", "checkpoint.py")


def _checkpoint_forward_code() -> Any:
    try:
        from torch.utils.checkpoint import CheckpointFunction

        return CheckpointFunction.forward.__code__
    except (ImportError, AttributeError):  # pragma: no cover - renamed
        return None


_CHECKPOINT_FORWARD = _checkpoint_forward_code()


def in_reentrant_checkpoint() -> bool:
    """Whether the caller runs inside the forward of reentrant activation checkpointing.

    ``checkpoint(block, x, use_reentrant=True)`` runs ``block`` under ``no_grad``
    inside ``CheckpointFunction.forward`` (and again in the backward pass): no
    operation of the block is differentiable in the forward pass that curvhook
    records. Walks the Python stack; called only for modules that run with grad
    disabled inside a forward pass started with grad enabled.

    Checked on torch 2.6–2.13 (``torch.utils.checkpoint.CheckpointFunction.forward``).
    Missing (renamed): ``False``; a block in the middle or at the end of the model
    still raises (its output comes from a node curvhook did not see), one at its start
    whose input needs no grad gets no curvature, as it gets no gradient.
    """
    code = _CHECKPOINT_FORWARD
    if code is None:  # pragma: no cover - renamed
        return False
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


# ------------------------------------------------------------ tensors, memory

# tensor_version(t) -> int: the version counter of ``t``, which every in-place
# operation on it or on a view of it increments. ``(id(t), tensor_version(t))``
# identifies the state of a tensor in a recording, and rules check that an
# input was not overwritten since the forward pass. Called for every recorded
# tensor: a C getter, not a Python function.
# Checked on torch 2.6–2.13 (``Tensor._version``).
# Missing: none of torch 2.x lacks it; the getter would raise AttributeError.
tensor_version: Callable[[Tensor], int] = operator.attrgetter("_version")

_use_count = getattr(_C, "_storage_Use_Count", None)


def storage_use_count(tensor: Tensor) -> Optional[int]:
    """The use count of ``tensor``'s storage, or ``None`` where torch does not expose it.

    One for each tensor (view, or tensor saved by autograd) that shares the
    storage, plus one for the storage object this call creates. The buffer
    pool of :mod:`curvhook._memory` hands a buffer out again only when nothing
    but the pool uses it.

    Checked on torch 2.6–2.13 (``torch._C._storage_Use_Count`` of
    ``UntypedStorage._cdata``). Missing: ``None``; nothing is recycled then
    (every large buffer is fresh, slower for large results, same numbers).
    """
    if _use_count is None:
        return None
    return _use_count(tensor.untyped_storage()._cdata)


# ------------------------------------------------------------------- modules


def own_parameters(module: nn.Module) -> Mapping[str, Optional[nn.Parameter]]:
    """The parameters registered on ``module`` itself (not its children), by name.

    A read-only view by convention: do not change it. Entries may be ``None``
    (a parameter registered as ``None``, such as a bias turned off). Reading
    the dict costs a fraction of ``named_parameters(recurse=False)``'s
    generator on every call of every leaf.

    Checked on torch 2.6–2.13 (``Module._parameters``). Missing:
    the same from ``named_parameters(recurse=False)`` (without ``None``
    entries, which the callers skip anyway).
    """
    params = getattr(module, "_parameters", None)
    if params is None:  # pragma: no cover - every nn.Module has it
        return dict(module.named_parameters(recurse=False))
    return params


def own_buffers(module: nn.Module) -> Mapping[str, Optional[Tensor]]:
    """The buffers registered on ``module`` itself (not its children), by name.

    A read-only view by convention, like :func:`own_parameters`; entries may be
    ``None``. ``extend`` reads them once per block to refuse meta tensors.

    Checked on torch 2.6–2.13 (``Module._buffers``). Missing: the same from
    ``named_buffers(recurse=False)``.
    """
    buffers = getattr(module, "_buffers", None)
    if buffers is None:  # pragma: no cover - every nn.Module has it
        return dict(module.named_buffers(recurse=False))
    return buffers


def forward_pre_hooks(module: nn.Module) -> Iterable[Callable[..., Any]]:
    """The forward pre-hooks registered on ``module`` (not the global ones), in order.

    ``extend`` refuses to open a second block on a module whose hooks already
    include one of another active block.

    Checked on torch 2.6–2.13 (``Module._forward_pre_hooks``).
    Missing: no hooks (the check for a second block is then skipped).
    """
    hooks = getattr(module, "_forward_pre_hooks", None)
    return () if hooks is None else hooks.values()


# The tables of a module's forward hooks, by handle id: the hooks themselves, and
# the ids of those called with keyword arguments or also when forward raised.
# Checked on torch 2.6–2.13 (``Module._forward_pre_hooks``, ``_forward_hooks``,
# ``_forward_pre_hooks_with_kwargs``, ``_forward_hooks_with_kwargs``,
# ``_forward_hooks_always_called``).
_FORWARD_HOOK_TABLES = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def keep_forward_hook_at(module: nn.Module, handle_id: int, pre: bool, last: bool) -> None:
    """Move a forward (pre-)hook of ``module`` to the end (``last``) or the start of its hooks.

    The hooks of a module run in the order of their table. ``extend`` keeps its
    pre-hook last and its forward hook first, so that they see the input the
    module's ``forward`` receives and the output it returns, also where the user
    registers hooks that change them inside the block.

    Checked on torch 2.6–2.13 (``Module._forward_pre_hooks`` and
    ``Module._forward_hooks``, ordered dicts by handle id). Missing: nothing
    moves (hooks registered inside the block run where they were registered).
    """
    table = getattr(module, "_forward_pre_hooks" if pre else "_forward_hooks", None)
    if table is None or handle_id not in table:
        return
    ends = reversed(table) if last else iter(table)
    if next(ends) != handle_id:
        table.move_to_end(handle_id, last=last)


def _direct_tables_available() -> bool:
    try:
        from torch.utils.hooks import RemovableHandle
    except ImportError:  # pragma: no cover - every torch 2.x has it
        return False
    module = nn.Module()
    return isinstance(getattr(RemovableHandle, "next_id", None), int) and all(
        isinstance(getattr(module, name, None), dict) for name in _FORWARD_HOOK_TABLES
    )


_DIRECT_HOOKS = _direct_tables_available()


class ModuleHookPairs:
    """A forward pre-hook and a forward hook on each of many modules, added and removed as one.

    For each module, what ``register_forward_pre_hook(pre, with_kwargs=True)``
    and ``register_forward_hook(post, prepend=True, with_kwargs=True,
    always_call=True)`` do, without a ``RemovableHandle`` per hook. A handle
    holds weak references to two or three of the module's tables: some ten
    objects per module that Python's cyclic garbage collector tracks while the
    block runs. Created anew by every block, they outlive a few young
    collections and each step moves them into the oldest generation, whose
    full collections (about 0.1 to 0.2 s with transformers or timm imported)
    then come every few steps.

    The hooks of module ``i`` of ``modules`` have the ids ``first + 2 i`` (pre)
    and ``first + 2 i + 1``, taken from the counter the handles draw from, so
    that no handle of the user's ever has the same id.

    Checked on torch 2.6–2.13 (the tables of ``_FORWARD_HOOK_TABLES``,
    ``torch.utils.hooks.RemovableHandle.next_id``). Missing: the public
    registration, one handle per hook.
    """

    def __init__(self, modules: list[nn.Module], pre: Callable[..., Any], post: Callable[..., Any]) -> None:
        from torch.utils.hooks import RemovableHandle

        self.modules = modules
        self._handles: list[Any] = []
        if not _DIRECT_HOOKS:
            self.first = -1
            for module in modules:
                self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                self._handles.append(
                    module.register_forward_hook(post, prepend=True, with_kwargs=True, always_call=True)
                )
            return
        self.first = first = RemovableHandle.next_id
        RemovableHandle.next_id = first + 2 * len(modules)
        for i, module in enumerate(modules):
            pre_id, post_id = first + 2 * i, first + 2 * i + 1
            module._forward_pre_hooks[pre_id] = pre
            module._forward_pre_hooks_with_kwargs[pre_id] = True
            hooks = module._forward_hooks
            hooks[post_id] = post
            hooks.move_to_end(post_id, last=False)
            module._forward_hooks_with_kwargs[post_id] = True
            module._forward_hooks_always_called[post_id] = True

    @property
    def ids(self) -> Iterable[int]:
        """The ids of all the hooks (a ``range``: membership is one comparison)."""
        if self._handles:
            return [h.id for h in self._handles]
        return range(self.first, self.first + 2 * len(self.modules))

    def keep_order(self) -> None:
        """Each pre-hook last among its module's, each forward hook first (see :func:`keep_forward_hook_at`)."""
        ids = iter(self.ids)
        for module, pre_id, post_id in zip(self.modules, ids, ids):
            keep_forward_hook_at(module, pre_id, True, True)
            keep_forward_hook_at(module, post_id, False, False)

    def remove(self) -> None:
        """Take every hook off its module; removing twice is harmless."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.first >= 0:
            ids = iter(self.ids)
            for module, pre_id, post_id in zip(self.modules, ids, ids):
                for table in _FORWARD_HOOK_TABLES:
                    getattr(module, table).pop(pre_id, None)
                    getattr(module, table).pop(post_id, None)
        self.modules = []


def module_state_without_hooks(state: Any, handle_ids: Iterable[int], drop: Iterable[str] = ()) -> Any:
    """A module's pickled state (``Module.__getstate__``) without the given forward hooks.

    ``copy.deepcopy(model)``, ``pickle`` and ``torch.save(model)`` inside an
    ``extend`` block copy the module's ``__dict__``, hooks included; the copy
    gets the state without curvhook's hooks (new tables: the module's own are
    not changed) and without the ``__dict__`` entries named in ``drop``.

    Checked on torch 2.6–2.13 (the tables of ``_FORWARD_HOOK_TABLES``).
    Missing (renamed tables): the state as it is, less ``drop``.
    """
    if not isinstance(state, dict):
        return state
    state = {k: v for k, v in state.items() if k not in drop}
    for name in _FORWARD_HOOK_TABLES:
        table = state.get(name)
        if isinstance(table, dict) and any(k in handle_ids for k in table):  # handle_ids: a range or a set
            state[name] = type(table)((k, v) for k, v in table.items() if k not in handle_ids)
    return state


def _backward_hook_setup_code() -> Any:
    try:
        from torch.utils.hooks import BackwardHook

        return BackwardHook._apply_on_tensors.__code__
    except (ImportError, AttributeError):  # pragma: no cover - renamed
        return None


_BACKWARD_HOOK_SETUP = _backward_hook_setup_code()


def in_backward_hook_setup() -> bool:
    """Whether the caller runs inside the wrapping of a module's tensors for its full backward hooks.

    A module with ``register_full_backward_hook`` or
    ``register_full_backward_pre_hook`` (or global ones) passes its input
    tensors, and then its output tensors, through an autograd function that is
    the identity in the forward pass (``BackwardHookFunction``); autograd makes
    its outputs with ``x.view_as(x)`` under ``no_grad``. Walks at most eight frames
    up the Python stack; called only for that ``view_as`` inside a block.

    Checked on torch 2.6–2.13 (``torch.utils.hooks.BackwardHook._apply_on_tensors``).
    Missing (renamed): ``False``; a module with full backward hooks then raises
    an error that names an operation curvhook did not see.
    """
    code = _BACKWARD_HOOK_SETUP
    if code is None:  # pragma: no cover - renamed
        return False
    frame = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            return False
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def remove_global_forward_hook(handle: Any) -> None:
    """Remove a hook of ``torch.nn.modules.module.register_module_forward_hook`` completely.

    ``handle.remove()`` leaves the hook's entry in torch's table of global
    hooks taking keyword arguments (``with_kwargs=True``) behind, which would
    grow by one entry per ``extend`` block; this removes both. Removing twice
    is harmless.

    Checked on torch 2.6–2.13 (``_global_forward_hooks_with_kwargs``
    of ``torch.nn.modules.module``). Missing: only ``handle.remove()``.
    """
    handle.remove()
    table = getattr(torch.nn.modules.module, "_global_forward_hooks_with_kwargs", None)
    if table is not None:
        table.pop(handle.id, None)


def _public_classes(module: Any, match: Callable[[str], bool]) -> tuple[type, ...]:
    """The public module classes of ``module`` whose names ``match``: a stand-in for a private base."""
    return tuple(
        cls
        for name, cls in vars(module).items()
        if not name.startswith("_") and match(name) and isinstance(cls, type) and issubclass(cls, nn.Module)
    )


# LOSS_MODULE_TYPES: a tuple for ``isinstance``: the base class of every torch
# loss module (``nn.MSELoss``, ``nn.CrossEntropyLoss``, ...; user losses that
# subclass it too). The global module hook counts calls of these as losses.
# Checked on torch 2.6–2.13 (``torch.nn.modules.loss._Loss``).
# Missing: the classes of ``torch.nn.modules.loss`` named ``*Loss*`` (a user
# loss that subclasses only the private base is then not seen as a loss).
_loss_base = getattr(getattr(nn.modules, "loss", None), "_Loss", None)
LOSS_MODULE_TYPES: tuple[type, ...] = (
    (_loss_base,) if isinstance(_loss_base, type) else _public_classes(nn.modules.loss, lambda name: "Loss" in name)
)

# BATCH_NORM_TYPES: a tuple for ``isinstance``: the batch-norm modules
# (``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, the lazy ones), which mix
# the samples of a batch when they use batch statistics.
# Checked on torch 2.6–2.13 (``torch.nn.modules.batchnorm._BatchNorm``).
# Missing: the classes of ``torch.nn.modules.batchnorm`` named ``*BatchNorm*``.
_batch_norm_base = getattr(getattr(nn.modules, "batchnorm", None), "_BatchNorm", None)
BATCH_NORM_TYPES: tuple[type, ...] = (
    (_batch_norm_base,)
    if isinstance(_batch_norm_base, type)
    else _public_classes(nn.modules.batchnorm, lambda name: "BatchNorm" in name)
)


def attention_packs_projections(module: nn.MultiheadAttention) -> bool:
    """Whether ``nn.MultiheadAttention`` keeps one packed ``in_proj_weight`` for q, k and v.

    True when ``kdim == vdim == embed_dim``; otherwise it has separate
    ``q_proj_weight``, ``k_proj_weight`` and ``v_proj_weight``.

    Checked on torch 2.6–2.13 (``MultiheadAttention._qkv_same_embed_dim``).
    Missing: whether ``in_proj_weight`` is set, which is the same.
    """
    flag = getattr(module, "_qkv_same_embed_dim", None)
    if flag is None:
        return getattr(module, "in_proj_weight", None) is not None
    return bool(flag)


def _canonical_mask_fallback(mask: Optional[Tensor], name: str, dtype: torch.dtype) -> Optional[Tensor]:
    """What ``F._canonical_mask`` does: a boolean mask becomes ``-inf`` where true, 0 elsewhere."""
    if mask is None:
        return None
    if mask.dtype != torch.bool and not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of {name} are supported")
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    return mask


def canonical_attention_masks(
    attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], dtype: torch.dtype
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The masks of ``nn.MultiheadAttention`` as it adds them to the scores: ``(attn_mask, key_padding_mask)``.

    A boolean mask becomes a float mask of ``dtype`` that is ``-inf`` where it is
    true; a float mask is returned as it is; ``None`` stays ``None``. Other
    dtypes raise ``AssertionError``, as in the module's forward.

    Checked on torch 2.6–2.13 (``F._canonical_mask`` and
    ``F._none_or_dtype``, as ``F.multi_head_attention_forward`` calls them).
    Missing: the same conversion written out here (without torch's warning
    about masks of different types, which the module's forward already gave).
    """
    canonical = getattr(torch.nn.functional, "_canonical_mask", None)
    none_or_dtype = getattr(torch.nn.functional, "_none_or_dtype", None)
    if canonical is None or none_or_dtype is None:
        return (
            _canonical_mask_fallback(attn_mask, "attn_mask", dtype),
            _canonical_mask_fallback(key_padding_mask, "key_padding_mask", dtype),
        )
    padding = canonical(
        mask=key_padding_mask, mask_name="key_padding_mask", other_type=none_or_dtype(attn_mask),
        other_name="attn_mask", target_type=dtype,
    )
    attn_mask = canonical(
        mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
        target_type=dtype, check_other=False,
    )
    return attn_mask, padding


# REPLAYED_AS: torch functions whose torch.func derivatives are wrong (or that cannot be
# replayed on one sample), mapped to
# the same function written with operations whose derivatives are right. The
# tape records the replacement as the operation's function, so curvhook's
# replays (vjp, vmap, jacrev in the generic tensor-operation rule) call it; the
# forward pass still runs the original. Names are kept (rules match by name).
# torch.cdist: jacrev and vmap of its backward give wrong Jacobians (checked on
# torch 2.6 and 2.13: an error as large as the Jacobian itself on a 3×6 input,
# against autograd and finite differences); autograd's own backward is right.
# Missing: nothing (plain Python over public functions).
def _cdist_written_out(x1: Tensor, x2: Tensor, p: float = 2.0, compute_mode: Optional[str] = None) -> Tensor:
    """``torch.cdist(x1, x2, p)`` as the ``p``-norm of all differences: ``[..., P, R]``."""
    return torch.linalg.vector_norm(x1.unsqueeze(-2) - x2.unsqueeze(-3), ord=p, dim=-1)


_cdist_written_out.__name__ = "cdist"


# F.affine_grid(theta, size): ``size`` holds the batch size N as a number, so a replay on one
# sample (theta [1, 2, 3]) fails. The replacement reads N off theta, as the call requires anyway
# (theta [N, 2, 3] with size [N, C, H, W]): the same values for the whole batch.
def _affine_grid_sized_by_theta(theta: Tensor, size: Any, align_corners: Optional[bool] = None) -> Tensor:
    """``F.affine_grid(theta, [theta.shape[0], *size[1:]], align_corners)``: ``[N, H, W, 2]``."""
    return torch.nn.functional.affine_grid(theta, [theta.shape[0], *list(size)[1:]], align_corners=align_corners)


_affine_grid_sized_by_theta.__name__ = "affine_grid"


# F.grid_sample(x, grid) differentiated for the grid alone, with x a constant (a spatial
# transformer sampling the model input): torch 2.6's vmap of that backward fails with "Expected
# a proper Tensor but got None" (its input gradient is undefined); torch 2.13 runs it. Adding
# 0 · Σ grid to x gives the same values and makes the input gradient defined (exactly zero
# from that term). Checked on 2.6 and 2.13 against autograd's Jacobian.
def _grid_sample_with_defined_input_gradient(
    input: Tensor, grid: Tensor, mode: str = "bilinear", padding_mode: str = "zeros",
    align_corners: Optional[bool] = None,
) -> Tensor:
    """``F.grid_sample(input, grid, …)``: ``[N, C, H_out, W_out]``."""
    return torch.nn.functional.grid_sample(
        input + 0 * grid.sum(), grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners
    )


_grid_sample_with_defined_input_gradient.__name__ = "grid_sample"
REPLAYED_AS: dict[Callable[..., Any], Callable[..., Any]] = {
    torch.cdist: _cdist_written_out,
    torch.nn.functional.affine_grid: _affine_grid_sized_by_theta,
    torch.nn.functional.grid_sample: _grid_sample_with_defined_input_gradient,
}
