"""What the forward pass records: one :class:`ModuleCall` per leaf-module call.

A tensor is identified by ``(id(tensor), tensor._version)``. The record holds a
reference to every tensor it names, so the ``id`` cannot be reused while the
record lives, and the version counter tells apart the states of a tensor that
an in-place operation (``ReLU(inplace=True)``) changes. No ``data_ptr`` is used,
so views and memory reuse cannot confuse two tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn

TensorKey = tuple[int, int]


def key_of(tensor: Tensor) -> TensorKey:
    """Return the identity of ``tensor`` in its current state."""
    return (id(tensor), tensor._version)


@dataclass(eq=False)
class ModuleCall:
    """One call of a leaf module during the forward pass.

    Attributes:
        module: The module that was called.
        name: Its qualified name inside the extended model (for messages).
        inputs: The positional tensor arguments, as the module saw them.
        input_keys: Identity of each input before the call.
        input_versions: ``_version`` of each input before the call.
        input_requires_grad: ``requires_grad`` of each input at call time.
        output: The output tensor (``None`` if the module did not return one
            tensor, and for the call that produced the model output: holding
            that tensor would tie the record to the graph it is hooked on).
        output_key: Identity of the output right after the call.
        output_shape: Shape of the output (``None`` if there is no tensor output).
        output_requires_grad: Whether the output is part of the autograd graph.
        node: ``output.grad_fn`` right after the call (the last autograd node of
            the module). For the call that produced the model output it is only
            set while a backward pass runs.
        input_nodes: ``grad_fn`` of each input before the call.
        training: ``module.training`` at call time.
        args: Positional arguments, tensors replaced by :class:`Slot` markers
            indexing ``inputs`` (the distinct tensor arguments).
        kwargs: Keyword arguments, likewise.
        recurse: Whether the module has children it did not call (it is then one
            operation over all the parameters below it).
        other_output_keys: Identity of further tensor outputs that require grad.
        cache: Per-backward scratch space for rules (e.g. a Jacobian diagonal).
    """

    module: nn.Module
    name: str
    inputs: tuple[Tensor, ...]
    input_keys: tuple[TensorKey, ...]
    input_versions: tuple[int, ...]
    input_nodes: tuple[Any, ...]
    input_requires_grad: tuple[bool, ...] = ()
    output: Optional[Tensor] = None
    output_key: Optional[TensorKey] = None
    output_shape: Optional[torch.Size] = None
    output_requires_grad: bool = False
    node: Any = None
    training: bool = False
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    recurse: bool = False
    other_output_keys: tuple[TensorKey, ...] = ()
    cache: dict = field(default_factory=dict)

    @property
    def input(self) -> Tensor:
        """The first positional input, ``[N, *in]``."""
        return self.inputs[0]

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The module's own parameters that require grad, as ``(name, parameter)``.

        Kept in :attr:`cache` for the backward pass under way (the engine asks twice).
        """
        found = self.cache.get("trainable_parameters")
        if found is None:
            # A leaf's own parameters are its ``_parameters``: read directly, they cost a
            # fraction of ``named_parameters``' generator machinery on every call and step.
            named = self.module.named_parameters() if self.recurse else self.module._parameters.items()
            found = [(n, p) for n, p in named if p is not None and p.requires_grad]
            if len({id(p) for _, p in found}) < len(found):  # one parameter under two names
                first = {}
                for n, p in found:
                    first.setdefault(id(p), (n, p))
                found = list(first.values())
            self.cache["trainable_parameters"] = found
        return found


@dataclass(eq=False)
class LossCall:
    """A loss module called on a model output.

    Attributes:
        module: The loss module (``nn.CrossEntropyLoss`` ...).
        input: The model output it was called on, detached, ``[N, *out]``.
        target: The target it was called with (``None`` for a named loss).
        key: Identity of the tensor the loss was called on: the model output, or a
            tensor computed from it by operations after the model.
        scale: ``dℓ/dL``, the derivative of the backpropagated scalar ℓ with
            respect to this loss value L, captured by a hook during backward.
            ``None`` until backward passes through the loss.
        cache: Per-backward scratch space for loss rules.
    """

    module: nn.Module
    input: Tensor
    target: Optional[Tensor]
    key: Optional[TensorKey] = None
    scale: Optional[Tensor] = None
    cache: dict = field(default_factory=dict)


class Trace:
    """Everything recorded during one forward pass of the extended model.

    The trace must not hold the model output or its autograd node: the gradient
    hook on the output holds the trace, and a reference back would make a cycle
    through the autograd graph that Python's garbage collector cannot see. So
    the trace lives exactly as long as the graph of its forward pass.

    Attributes:
        seq: Position of this forward pass among those of the block.
        calls: The leaf-module calls in forward order.
        root_value: The model output, detached (shares its storage).
        root_key: Identity of the model output.
        losses: Loss modules called on the model output (or on a function of it).
        after_calls: Tensor operations applied to the model output after the
            model returned and before a loss: part of the network for the GGN
            extensions. They hold no autograd node (see above).
        after_tasks: Graph tasks of the backward passes that went through them.
        used: Whether a backward has consumed this trace at least once.
        released: Whether the stored tensors were dropped.
    """

    def __init__(self, seq: int = 0) -> None:
        self.seq = seq
        self.calls: list[ModuleCall] = []
        self.root_value: Optional[Tensor] = None
        self.root_key: Optional[TensorKey] = None
        self.losses: list[LossCall] = []
        self.after_calls: list[FunctionCall] = []
        self.after_tasks: set[int] = set()
        self.shared_keys: set[TensorKey] = set()
        self.shared_log: list[TensorKey] = []  # shared_keys in the order they were added
        self.input_keys: set[TensorKey] = set()
        self.produced: set[TensorKey] = set()
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.root_handle: Optional[torch.utils.hooks.RemovableHandle] = None
        self.used = False
        self.released = False

    @property
    def all_calls(self) -> list:
        """The calls of the network in forward order: the model's, then those after it."""
        return self.calls + self.after_calls

    def detach_root(self, root: Tensor) -> None:
        """Replace every stored reference to ``root`` (or its node) by what the rules need."""
        node = root.grad_fn
        for call in self.calls:
            if getattr(call, "output", None) is root:
                call.output = None
            if call.node is node:
                call.node = None
            if isinstance(call, FunctionCall):  # an in-place operation changed its input
                call.tensors = tuple(x.detach() if x is root else x for x in call.tensors)
            elif any(x is root for x in call.inputs):  # an in-place module changed its input
                call.inputs = tuple(x.detach() if x is root else x for x in call.inputs)

    def release(self) -> None:
        """Drop every stored tensor and remove the hooks on loss values.

        The hook on the model output stays until the block exits, so that a later
        backward through this forward pass raises instead of being ignored.
        """
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.calls.clear()
        self.losses.clear()
        self.after_calls.clear()
        self.root_value = None
        self.released = True

    def remove_hooks(self) -> None:
        """Release everything, the hook on the model output included."""
        self.release()
        if self.root_handle is not None:
            self.root_handle.remove()
            self.root_handle = None


class Slot(int):
    """Placeholder for the ``i``-th distinct tensor argument inside a recorded call."""


def make_template(args: tuple, kwargs: dict) -> tuple[tuple, dict, list[Tensor]]:
    """Replace tensor arguments by :class:`Slot` markers, one slot per distinct tensor.

    Returns:
        ``(args, kwargs, tensors)``: the arguments with slots (one level into lists
        and tuples, as for ``torch.cat``) and the distinct tensors in slot order.
    """
    tensors: list[Tensor] = []
    index: dict[int, int] = {}
    new_args = tuple(_slot(a, tensors, index) for a in args)
    new_kwargs = {k: _slot(v, tensors, index) for k, v in kwargs.items()}
    return new_args, new_kwargs, tensors


# Module-level helpers rather than nested recursive closures: a closure that calls
# itself is a reference cycle, which would keep the tensors it saw alive until
# the garbage collector runs, and make it run more often.
def _slot(obj: Any, tensors: list[Tensor], index: dict[int, int]) -> Any:
    if isinstance(obj, Tensor):
        if id(obj) not in index:
            index[id(obj)] = len(tensors)
            tensors.append(obj)
        return Slot(index[id(obj)])
    if isinstance(obj, (list, tuple)) and any(isinstance(o, Tensor) for o in obj):
        return _same_container(obj, [_slot(o, tensors, index) for o in obj])
    return obj


def fill_template(args: tuple, kwargs: dict, tensors: list[Tensor]) -> tuple[tuple, dict]:
    """Inverse of :func:`make_template` with new tensors in the slots."""
    return tuple(_fill(a, tensors) for a in args), {k: _fill(v, tensors) for k, v in kwargs.items()}


def _fill(obj: Any, tensors: list[Tensor]) -> Any:
    if isinstance(obj, Slot):
        return tensors[obj]
    if isinstance(obj, (list, tuple)) and any(isinstance(o, Slot) for o in obj):
        return _same_container(obj, [_fill(o, tensors) for o in obj])
    return obj


def _same_container(obj: Any, items: list) -> Any:
    """``items`` in a container of ``obj``'s kind: a list, a tuple, or the same namedtuple."""
    if not isinstance(obj, tuple):
        return items
    if hasattr(type(obj), "_fields"):  # a namedtuple: the module reads its fields by name
        return type(obj)(*items)
    return tuple(items)


@dataclass(eq=False)
class FunctionCall:
    """One tensor operation executed between modules (``x + y``, ``x.view(...)``, ``F.relu``).

    Attributes:
        func: The function or tensor method that was called.
        name: ``func``'s name and the module whose ``forward`` called it (for messages).
        args: Positional arguments, tensors replaced by :class:`Slot` markers.
        kwargs: Keyword arguments, likewise.
        tensors: The distinct tensor arguments, as they were at call time.
        kinds: Per tensor: ``"batched"`` (computed from the model input: batch axis
            first), ``"shared"`` (requires grad but has no batch axis: a parameter
            or something computed from parameters only) or ``"const"``.
        input_keys: Identity of each tensor before the call.
        input_versions: ``_version`` of each tensor before the call.
        input_nodes: ``grad_fn`` of each tensor before the call.
        output_keys: Identity of each tensor output (``None`` for other outputs).
        output_shapes: Shape of each tensor output.
        output_values: The outputs, detached (to check the per-sample structure).
        node: ``grad_fn`` of the first output right after the call.
        inplace: Whether the call modified its first argument in place.
        params: ``(slot name, parameter)`` for the model parameters among the tensors.
        cache: Per-backward scratch space for rules.
    """

    func: Any
    name: str
    args: tuple
    kwargs: dict
    tensors: tuple[Tensor, ...]
    kinds: tuple[str, ...]
    input_keys: tuple[TensorKey, ...]
    input_versions: tuple[int, ...]
    input_nodes: tuple[Any, ...]
    output_keys: tuple[Optional[TensorKey], ...] = ()
    output_shapes: tuple[Optional[torch.Size], ...] = ()
    output_values: tuple[Optional[Tensor], ...] = ()
    node: Any = None
    inplace: bool = False
    params: tuple[tuple[str, nn.Parameter], ...] = ()
    cache: dict = field(default_factory=dict)

    @property
    def output_key(self) -> Optional[TensorKey]:
        """Identity of the first output."""
        return self.output_keys[0] if self.output_keys else None

    @property
    def func_name(self) -> str:
        """The bare name of the function (``"add"``, ``"__getitem__"``)."""
        return getattr(self.func, "__name__", str(self.func))

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Model parameters passed to this operation, as ``("t<slot>", parameter)``."""
        return list(self.params)

    def slot_of(self, name: str) -> int:
        """Slot index of a parameter name returned by :meth:`trainable_parameters`."""
        return int(name[1:])

    def invoke(self, tensors: list[Tensor]) -> Any:
        """Call the operation again with ``tensors`` in the slots (out of place)."""
        args, kwargs = fill_template(self.args, self.kwargs, tensors)
        if self.inplace:
            args = (args[0].clone(),) + args[1:]
            result = self.func(*args, **kwargs)
            return args[0] if result is None else result
        return self.func(*args, **kwargs)


def tensor_arguments(args: tuple, kwargs: dict) -> Iterator[Tensor]:
    """The tensors among a call's arguments, one level into lists and tuples (``torch.cat``)."""
    for arg in (*args, *kwargs.values()):
        if isinstance(arg, Tensor):
            yield arg
        elif isinstance(arg, (list, tuple)):
            yield from (a for a in arg if isinstance(a, Tensor))
