"""What the parts of one ``extend`` block share while it is active."""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor, nn

from curvhook.records import Operation, TensorKey, key_of
from curvhook.trace import Trace


# What the module recorder needs to know of a module of the model, read at entry:
# ``(name, has_children, torch_leaf)``, ``torch_leaf`` for a torch layer without
# children (its forward calls no module). A plain tuple of a string and two bools,
# which Python's cyclic garbage collector stops tracking at its first pass.
ModuleInfo = tuple[str, bool, bool]


@dataclass(eq=False)
class Frame:
    """A module whose ``forward`` is running: leaf or container is known only at its end."""

    op: Operation
    start: int  # len(trace.operations) when it started
    has_children: bool
    shared_start: int = 0  # len(trace.shared_log) when it started
    child_called: bool = False
    # the tape records inside it: it has children, or it is a leaf without a rule
    # that may count as its operations (curvhook/leaf_operations.py)
    records_inside: bool = False
    # outputs of operations in its forward that merged the batch axis with other axes
    # (Swin's windows, DeBERTa's heads): if its output depends on one, it is recorded as
    # one module, for the exact fallback
    merged_keys: list = field(default_factory=list)


@dataclass(eq=False)
class BlockState:
    """The recording state of an active block.

    Attributes:
        params: The model's parameters that require grad, in order.
        param_ids: Their ``id``.
        fixed_ids: ``id`` of the model's buffers and frozen parameters: constants
            without a batch axis (:mod:`curvhook.fixed_constants`).
        fixed_held: Those tensors, held while the block is active: a buffer the forward
            replaces (``self.h = torch.zeros(…)``) keeps its id, so no other tensor
            gets it.
        modules: Every module of the model, as found at entry.
        stack: Traces of the forward passes of the model under way (innermost last).
        frames: Modules of the innermost forward pass whose ``forward`` is running.
        watch: Model outputs and tensors computed from them after the model:
            where a loss may be called. Weak references, so an id reused later
            never matches.
        traces: Every trace whose output has a hook (weakly held).
        batch_parts: Tensors computed after the model from part of its batch
            (``out[:4]``, ``out[idx]``, ``out[mask]``), with their trace and the
            operation that took the part: a loss on one is refused with a clear error.
        losses_running: Loss modules in their forward (their operations are not recorded),
            by thread: the global module hooks also see the loss calls of other
            threads, which must not stop this block's tape.
        forwards: Forward passes started in the block.
    """

    params: list[nn.Parameter] = field(default_factory=list)
    param_ids: set[int] = field(default_factory=set)
    fixed_ids: set[int] = field(default_factory=set)
    fixed_held: list = field(default_factory=list)
    modules: dict[nn.Module, ModuleInfo] = field(default_factory=dict)
    stack: list[Trace] = field(default_factory=list)
    frames: list[Frame] = field(default_factory=list)
    watch: dict[TensorKey, tuple[weakref.ref, weakref.ref]] = field(default_factory=dict)
    traces: "weakref.WeakSet[Trace]" = field(default_factory=weakref.WeakSet)
    losses_running: dict[int, int] = field(default_factory=dict)
    forwards: int = 0
    batch_parts: dict[TensorKey, tuple[weakref.ref, weakref.ref, str]] = field(default_factory=dict)

    def loss_started(self) -> None:
        """A loss module starts its forward in the calling thread."""
        thread = threading.get_ident()
        self.losses_running[thread] = self.losses_running.get(thread, 0) + 1

    def loss_ended(self) -> None:
        """A loss module of the calling thread returned or raised."""
        thread = threading.get_ident()
        left = self.losses_running.pop(thread, 0) - 1
        if left > 0:
            self.losses_running[thread] = left

    def in_loss(self) -> bool:
        """Whether a loss module runs its forward in the calling thread."""
        return bool(self.losses_running) and threading.get_ident() in self.losses_running

    def watched(self, tensor: Tensor) -> Optional[Trace]:
        """The live trace whose output ``tensor`` is, or was computed from after the model."""
        entry = self.watch.get(key_of(tensor))
        if entry is None or entry[0]() is not tensor:
            return None
        trace = entry[1]()
        return None if trace is None or trace.released else trace

    def watch_output(self, tensor: Tensor, key: TensorKey, trace: Trace) -> None:
        """Remember that ``tensor`` is (a function of) the output of ``trace``."""
        self.watch[key] = (weakref.ref(tensor), weakref.ref(trace))

    def prune_watch(self) -> None:
        """Forget watched tensors that died."""
        self.watch = {k: v for k, v in self.watch.items() if v[0]() is not None and v[1]() is not None}
        self.batch_parts = {k: v for k, v in self.batch_parts.items() if v[0]() is not None and v[1]() is not None}

    def batch_part_of(self, tensor: Tensor) -> Optional[tuple[Trace, str]]:
        """The live trace and the operation, where ``tensor`` holds part of a model output's batch."""
        entry = self.batch_parts.get(key_of(tensor))
        if entry is None or entry[0]() is not tensor:
            return None
        trace = entry[1]()
        return None if trace is None or trace.released else (trace, entry[2])

    def watch_batch_part(self, tensor: Tensor, trace: Trace, operation: str) -> None:
        """Remember that ``tensor`` was computed from part of the batch of ``trace``'s output."""
        self.batch_parts[key_of(tensor)] = (weakref.ref(tensor), weakref.ref(trace), operation)
