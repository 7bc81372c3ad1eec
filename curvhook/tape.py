"""The tape: a torch-function mode that records tensor operations.

Active for the whole ``extend`` block, it sees every torch function called in
the process. It records

- the operations a container's ``forward`` runs between its children
  (``x + y``, ``x.view(...)``, ``F.relu``), as part of the network;
- the operations applied to the model output after the model returned (before
  a loss), also part of the network for the GGN extensions;

and it lets :class:`~curvhook.loss_linearity.LossLinearity` mark the tensors
computed from loss values. Operations inside a leaf module are part of that
module and are not recorded.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Optional

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from curvhook._torch_internals import current_graph_task_id, disable_torch_function
from curvhook.block_state import BlockState
from curvhook.loss_linearity import LossLinearity
from curvhook.operations import is_inplace, name_of, skipped
from curvhook.records import (
    BATCHED, CONST, SHARED, Operation, flat_tensors, key_of, make_template, tensor_arguments,
)
from curvhook.trace import Trace

# Marks an input with an autograd history in an operation recorded after the model.
_HISTORY = object()


class OperationTape(TorchFunctionMode):
    """Records the tensor operations of the network (see the module docstring)."""

    def __init__(self, state: BlockState, linearity: LossLinearity) -> None:
        super().__init__()
        self.state = state
        self.linearity = linearity
        self.enabled = True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = name_of(func)
        if not self.enabled or skipped(func, name):
            return func(*args, **kwargs)
        # The bookkeeping reads tensor metadata (versions, ``grad_fn``); with torch
        # functions disabled those reads do not come back through this mode.
        with disable_torch_function():
            pending = self._before(func, name, args, kwargs)
        out = func(*args, **kwargs)
        if pending is not None or self.linearity.active:
            with disable_torch_function():
                if pending is not None:
                    self._after(pending, out)
                if self.linearity.active:
                    self.linearity.propagate(name, args, kwargs, out)
        return out

    # ------------------------------------------------------------ recording
    def _before(self, func: Any, name: str, args: tuple, kwargs: dict) -> Optional[tuple]:
        """What to record of an operation about to run, or ``None`` to record nothing."""
        if not torch.is_grad_enabled():
            return None
        state, after = self.state, None
        if not state.stack:  # outside the model: only what is applied to its output
            if state.losses_running:
                return None
            traces = self._watched_traces(args, kwargs)
            if not traces:
                return None
            # Outputs of two forward passes combined are not followed; a backward
            # through the result is still marked, so that a named loss refuses it.
            after = traces[0] if len(traces) == 1 else tuple(traces)
        elif not state.frames or not state.frames[-1].records_inside:
            return None  # inside a leaf module with a rule
        t_args, t_kwargs, tensors = make_template(args, kwargs)
        if not any(t.requires_grad for t in tensors):
            return None
        # Identities and nodes before the call: an in-place operation changes them.
        keys = tuple(key_of(t) for t in tensors)
        return after, func, name, t_args, t_kwargs, tensors, keys, tuple(t.grad_fn for t in tensors)

    def _watched_traces(self, args: tuple, kwargs: dict) -> list[Trace]:
        """The distinct traces whose outputs (or functions of them) are among the arguments."""
        if not self.state.watch:
            return []
        found: list[Trace] = []
        for t in tensor_arguments(args, kwargs):
            trace = self.state.watched(t)
            if trace is not None and all(trace is not f for f in found):
                found.append(trace)
        return found

    def _after(self, pending: tuple, out: Any) -> None:
        after, func, name, t_args, t_kwargs, tensors, keys, nodes = pending
        if isinstance(after, tuple):  # outputs of several forward passes combined
            for o in flat_tensors(out):
                if o.requires_grad:
                    for trace in after:
                        trace.handles.append(o.register_hook(partial(_record_after_task, trace)))
            return
        inplace = is_inplace(name)
        outputs = [tensors[0]] if inplace and tensors else list(flat_tensors(out))
        if after is not None:
            self._record_after(after, (func, name, t_args, t_kwargs), tensors, keys, nodes, outputs, inplace)
        elif self.state.stack and self.state.frames:
            self._record_between((func, name, t_args, t_kwargs), tensors, keys, nodes, outputs, inplace)

    def _record_between(
        self, call: tuple, tensors: list, keys: tuple, nodes: tuple, outputs: list, inplace: bool
    ) -> None:
        """Record an operation a container's ``forward`` ran between its children.

        ``call`` is ``(func, name, args, kwargs)`` with slots in the arguments.
        """
        if not any(o.requires_grad for o in outputs):
            return
        state = self.state
        trace, frame = state.stack[-1], state.frames[-1]
        func, name, t_args, t_kwargs = call
        kinds, params = [], []
        for i, t in enumerate(tensors):
            if not t.requires_grad:
                kinds.append(CONST)
            elif id(t) in state.param_ids:
                kinds.append(SHARED)
                params.append((f"t{i}", t))
            else:
                kinds.append(SHARED if keys[i] in trace.shared_keys else BATCHED)
        op = _operation(
            f"{name} (in {frame.op.name!r})", func, t_args, t_kwargs, tuple(tensors), kinds, keys,
            nodes, outputs, outputs[0].grad_fn, inplace, params,
        )
        if BATCHED not in kinds:  # computed from parameters only
            shared = [k for k in op.output_keys if k is not None]
            trace.shared_keys.update(shared)
            trace.shared_log.extend(shared)
        trace.operations.append(op)

    def _record_after(
        self, trace: Trace, call: tuple, tensors: list, keys: tuple, nodes: tuple, outputs: list,
        inplace: bool,
    ) -> None:
        """Record an operation applied to the model output after the model returned.

        The record holds detached tensors and no autograd node: the hook on the
        model output holds the trace, so a reference back into the graph would
        keep the graph alive forever (see :class:`~curvhook.trace.Trace`).
        """
        if trace.released:
            return
        func, name, t_args, t_kwargs = call
        n = trace.batch_size
        if not any(o.requires_grad and o.dim() and o.shape[0] == n for o in outputs):
            return  # no batch axis left: the loss itself, or a reduction, not part of the network
        kinds, params = [], []
        for i, t in enumerate(tensors):
            if id(t) in self.state.param_ids:
                kinds.append(SHARED)
                params.append((f"t{i}", t))
            elif t.grad_fn is None and self.state.watched(t) is None:
                kinds.append(CONST)  # a constant, or a leaf that is no parameter of the model
            else:  # from the model output, or with a history curvhook has to check
                kinds.append(BATCHED)
        op = _operation(
            f"{name} (after the model)", func, t_args, t_kwargs,
            tuple(t.detach() if k == BATCHED else t for t, k in zip(tensors, kinds)), kinds,
            keys, tuple(None if node is None else _HISTORY for node in nodes), outputs, None, inplace, params,
        )
        trace.after_operations.append(op)
        for o, key in zip(outputs, op.output_keys):
            if key is not None:
                self.state.watch_output(o, key, trace)
                trace.handles.append(o.register_hook(partial(_record_after_task, trace)))


def _operation(
    name: str, func: Any, t_args: tuple, t_kwargs: dict, tensors: tuple, kinds: list, keys: tuple,
    nodes: tuple, outputs: list, node: Any, inplace: bool, params: list,
) -> Operation:
    """The record of one tensor operation."""
    return Operation(
        name=name,
        func=func,
        args=t_args,
        kwargs=t_kwargs,
        inputs=tensors,
        input_kinds=tuple(kinds),
        input_keys=keys,
        input_versions=tuple(k[1] for k in keys),
        input_nodes=nodes,
        output_keys=tuple(key_of(o) if o.requires_grad else None for o in outputs),
        output_shapes=tuple(o.shape for o in outputs),
        output_values=tuple(o.detach() for o in outputs),
        node=node,
        inplace=inplace,
        params=tuple(params),
    )


def _record_after_task(trace: Trace, grad: Tensor) -> None:
    """Tensor hook: this backward pass goes through an operation applied after the model."""
    trace.after_tasks.add(current_graph_task_id())
