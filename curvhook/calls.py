"""What the forward pass records: one :class:`ModuleCall` per leaf-module call.

A tensor is identified by ``(id(tensor), tensor._version)``. The record holds a
reference to every tensor it names, so the ``id`` cannot be reused while the
record lives, and the version counter tells apart the states of a tensor that
an in-place operation (``ReLU(inplace=True)``) changes. No ``data_ptr`` is used,
so views and memory reuse cannot confuse two tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

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
        output: The output tensor (``None`` if the module did not return one tensor).
        output_key: Identity of the output right after the call.
        node: ``output.grad_fn`` right after the call (the last autograd node of the module).
        input_nodes: ``grad_fn`` of each input before the call.
        training: ``module.training`` at call time.
        cache: Per-backward scratch space for rules (e.g. a Jacobian diagonal).
    """

    module: nn.Module
    name: str
    inputs: tuple[Tensor, ...]
    input_keys: tuple[TensorKey, ...]
    input_versions: tuple[int, ...]
    input_nodes: tuple[Any, ...]
    output: Optional[Tensor] = None
    output_key: Optional[TensorKey] = None
    node: Any = None
    training: bool = False
    cache: dict = field(default_factory=dict)

    @property
    def input(self) -> Tensor:
        """The first positional input, ``[N, *in]``."""
        return self.inputs[0]

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The module's own parameters that require grad, as ``(name, parameter)``."""
        return [
            (n, p)
            for n, p in self.module.named_parameters(recurse=False)
            if p.requires_grad
        ]


@dataclass(eq=False)
class LossCall:
    """A loss module called on a model output.

    Attributes:
        module: The loss module (``nn.CrossEntropyLoss`` ...).
        input: The model output it was called on, ``[N, *out]``.
        target: The target it was called with (``None`` for a named loss).
        output: The scalar loss tensor (``None`` for a named loss).
        scale: ``dℓ/dL``, the derivative of the backpropagated scalar ℓ with
            respect to this loss value L, captured by a hook during backward.
            ``None`` until backward passes through the loss.
        cache: Per-backward scratch space for loss rules.
    """

    module: nn.Module
    input: Tensor
    target: Optional[Tensor]
    output: Optional[Tensor] = None
    scale: Optional[Tensor] = None
    cache: dict = field(default_factory=dict)


class Trace:
    """Everything recorded during one forward pass of the extended model.

    Attributes:
        calls: The leaf-module calls in forward order.
        root: The model output, ``[N, *out]``.
        losses: Loss modules called on ``root``.
        used: Whether a backward has consumed this trace at least once.
    """

    def __init__(self) -> None:
        self.calls: list[ModuleCall] = []
        self.root: Optional[Tensor] = None
        self.root_key: Optional[TensorKey] = None
        self.losses: list[LossCall] = []
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.used = False
        self.released = False

    def release(self) -> None:
        """Drop every stored tensor and remove the hooks on the outputs."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.calls.clear()
        self.losses.clear()
        self.root = None
        self.released = True
