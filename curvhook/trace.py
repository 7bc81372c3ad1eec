"""Everything one forward pass of the extended model recorded."""

from __future__ import annotations

import itertools
from typing import Optional

import torch
from torch import Tensor

from curvhook.records import LossCall, Operation, TensorKey

# Fresh identities for retired keys: ``(-n, -1)`` is never ``(id(t), version)``.
_RETIRED = itertools.count(1)


class Trace:
    """The record of one forward pass: its operations, output and losses.

    The trace must not hold the model output or its autograd node: the gradient
    hook on the output holds the trace, and a reference back would make a cycle
    through the autograd graph that Python's garbage collector cannot see. So
    the trace lives exactly as long as the graph of its forward pass.

    Attributes:
        seq: Position of this forward pass among those of the block.
        operations: Leaf-module calls and tensor operations of the model, in
            forward order.
        after_operations: Tensor operations applied to the model output after the
            model returned and before a loss: part of the network for the GGN
            extensions. They hold no autograd node (see above).
        root_value: The model output, detached (shares its storage).
        root_key: Identity of the model output.
        input_keys: Identity of the tensors passed to the model.
        batch_hint: The leading size of the first tensor passed to the model:
            while the forward runs, the best guess of ``N`` (a module output
            computed from parameters only with another leading size has no
            batch axis).
        shared_keys: Outputs of operations computed from parameters only (no batch axis).
        shared_log: ``shared_keys`` in the order they were added.
        moved_axes: The batch axis of the batched tensors where it is not first
            (also of constants moved from the model input, ``x.transpose(0, 1)``).
        held: Tensors whose keys the record uses but no recorded operation holds (those
            constants; merged constants; outputs of tensor operations computed from
            parameters only or with their batch axis moved), held so that their ids are
            not reused while the trace lives.
        row_groups: Rows per sample of the batched tensors whose batch axis a
            reshape merged with the axes after it (``[N·k, …]``: ``k``), by key
            (:mod:`curvhook.row_groups`).
        losses: Loss modules called on the model output (or on a function of it).
        after_tasks: Graph tasks of the backward passes that went through the
            operations after the model.
        grad_enabled: Whether grad mode was on when the forward pass started.
        functorch_level: The ``torch.func`` transform level it started at
            (``None`` outside any; see :mod:`curvhook.guards`).
        used: Whether a backward has consumed this trace at least once.
        released: Whether the stored tensors were dropped.
    """

    def __init__(self, seq: int = 0) -> None:
        self.seq = seq
        self.operations: list[Operation] = []
        self.after_operations: list[Operation] = []
        self.root_value: Optional[Tensor] = None
        self.root_key: Optional[TensorKey] = None
        self.input_keys: set[TensorKey] = set()
        self.batch_hint: Optional[int] = None
        self.shared_keys: set[TensorKey] = set()
        self.shared_log: list[TensorKey] = []
        self.moved_axes: dict[TensorKey, int] = {}
        self.held: list[Tensor] = []
        self.row_groups: dict[TensorKey, tuple] = {}  # key -> (k, weak reference to the tensor)
        self.root_rows = 1  # rows per sample of the model output (curvhook/row_groups.py)
        self.merged_inputs: set[TensorKey] = set()  # constants with their batch axis merged (tape)
        self.fixed_keys: dict = {}  # constants from buffers alone, weakly (curvhook/fixed_constants.py)
        self.losses: list[LossCall] = []
        self.after_tasks: set[int] = set()
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.root_handle: Optional[torch.utils.hooks.RemovableHandle] = None
        self.grad_enabled = True
        self.functorch_level: Optional[int] = None
        self.used = False
        self.root_reached = False  # a backward pass reached the output (used or not)
        self.other_output_reached: Optional[tuple] = None  # a backward pass reached this other tensor of it
        self.released = False
        self._model_keys: Optional[set] = None  # the keys of ``operations`` (see ``produced``)

    @property
    def all_operations(self) -> list[Operation]:
        """The operations of the network in forward order: the model's, then those after it."""
        return self.operations + self.after_operations

    @property
    def batch_size(self) -> Optional[int]:
        """``N``, the leading size of the model output (``None`` for a scalar output)."""
        root = self.root_value
        return root.shape[0] if root is not None and root.dim() else None

    def detach_root(self, root: Tensor) -> None:
        """Replace every stored reference to ``root`` (or its node) by what the rules need."""
        node = root.grad_fn
        for op in self.operations:
            if op.output is root:
                op.output = None
            if op.node is node:
                op.node = None
            if any(x is root for x in op.inputs):  # an in-place operation changed its input
                op.inputs = tuple(x.detach() if x is root else x for x in op.inputs)

    def produced(self, key: TensorKey) -> bool:
        """Whether an operation of the model or after it produced a tensor with identity ``key``."""
        if key == self.root_key or any(key in op.output_keys for op in self.after_operations):
            return True
        if self._model_keys is None:  # the model's operations are final once its forward returned
            self._model_keys = {k for op in self.operations for k in (*op.output_keys, *op.unfollowed_output_keys)}
        return key in self._model_keys

    def retire_key(self, key: TensorKey) -> None:
        """Give a recorded tensor that died a fresh identity, everywhere in the record.

        A key is ``(id(t), version)``, and Python reuses the id of a dead tensor:
        in ``crit(2 * model(X).tanh(), y)`` the model output dies after ``tanh``
        and the product may get its id. The record must then not read the
        product as the model output (a cycle in the graph, a loss on the wrong
        tensor), so the dead tensor's records are renamed first.
        """
        new: TensorKey = (-next(_RETIRED), -1)
        self._model_keys = None

        def renamed(keys: tuple) -> tuple:
            return tuple(new if k == key else k for k in keys)

        if self.root_key == key:
            self.root_key = new
        for op in self.all_operations:
            op.input_keys = renamed(op.input_keys)
            op.output_keys = renamed(op.output_keys)
            op.unfollowed_output_keys = renamed(op.unfollowed_output_keys)
        for call in self.losses:
            if call.key == key:
                call.key = new
        for keys in (self.input_keys, self.shared_keys):
            if key in keys:
                keys.discard(key)
                keys.add(new)
        self.shared_log = list(renamed(tuple(self.shared_log)))
        if key in self.moved_axes:
            self.moved_axes[new] = self.moved_axes.pop(key)
        if key in self.row_groups:
            self.row_groups[new] = self.row_groups.pop(key)

    def release(self) -> None:
        """Drop every stored tensor and remove the hooks on loss values.

        The hook on the model output stays until the block exits, so that a later
        backward through this forward pass raises instead of being ignored.
        """
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.operations.clear()
        self.losses.clear()
        self.after_operations.clear()
        self.held.clear()
        self.merged_inputs.clear()
        self.row_groups.clear()
        self._model_keys = None
        self.root_value = None
        self.released = True

    def remove_hooks(self) -> None:
        """Release everything, the hook on the model output included."""
        self.release()
        if self.root_handle is not None:
            self.root_handle.remove()
            self.root_handle = None
