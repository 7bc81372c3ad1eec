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

import inspect
from functools import lru_cache, partial
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from curvhook._torch_internals import (
    REPLAYED_AS, current_graph_task_id, disable_torch_function, functorch_level, in_backward_hook_setup,
    in_reentrant_checkpoint, saved_tensor_hooks_active, tensor_version,
)
from curvhook.batch_axis import FOLLOWED, MOVERS, output_batch_axes
from curvhook.block_state import BlockState
from curvhook.errors import reentrant_checkpoint_error
from curvhook.fixed_constants import all_fixed, fixed_slots, note_fixed
from curvhook.guards import refuse_transform
from curvhook.loss_finder import functional_loss_module
from curvhook.loss_linearity import LossLinearity
from curvhook.mask_index import mask_as_positions
from curvhook.operations import (
    ADDITIONS, MERGING_RESHAPES, REVERSED_SUBTRACTIONS, SUBTRACTIONS, is_inplace, name_of, skipped,
)
from curvhook.records import (
    BATCHED, CONST, SHARED, DifferentiableOutputs, Operation, carries_gradient, flat_tensors, key_of,
    make_template, tensor_arguments,
)
from curvhook.row_groups import (
    PURE_RESHAPES, mark_merged_constants, mark_outputs, mark_rows, note_repeated_rows, note_rows, rows_of,
)
from curvhook.rules.parameters_only import COPIES_TO_BATCH
from curvhook.trace import Trace
from curvhook.view_writes import WriteThrough, sliced_chain, view_chain

# Marks an input with an autograd history in an operation recorded after the model.
_HISTORY = object()

# Marks the pending record of an operation on part of the batch of a model output.
_BATCH_PART = object()
# Marks the pending record of an operation on fixed constants (curvhook/fixed_constants.py).
_FIXED = object()

# Marks the pending record of a functional loss (``F.cross_entropy``) called outside the model.
_FUNCTIONAL_LOSS = object()

# Operations that can select samples of the model output (``out[:4]``, ``out[idx]``,
# ``out[mask]``, ``out.narrow(0, 0, 4)``): where their result has lost the batch
# size, it holds part of the batch.
BATCH_SELECTIONS = frozenset({
    "__getitem__", "index_select", "narrow", "masked_select", "take", "take_along_dim", "gather",
    "select", "split", "split_with_sizes", "tensor_split", "chunk", "unbind",
})


class OperationTape(TorchFunctionMode):
    """Records the tensor operations of the network (see the module docstring)."""

    def __init__(
        self, state: BlockState, linearity: LossLinearity,
        functional_loss: Optional[Callable[[nn.Module, tuple, dict, Any], None]] = None,
    ) -> None:
        """
        Args:
            state: The block's shared state.
            linearity: Marks the tensors computed from loss values.
            functional_loss: Called as ``functional_loss(module, args, kwargs, output)``
                after a functional loss with a module twin ran outside the model, with
                that module (:func:`~curvhook.loss_finder.functional_loss_module`).
        """
        super().__init__()
        self.state = state
        self.linearity = linearity
        self.functional_loss = functional_loss
        self.enabled = True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = name_of(func)
        if not self.enabled or skipped(func, name):
            return func(*args, **kwargs)
        if name == "einsum" and len(args) == 2 and isinstance(args[1], (list, tuple)):
            # einsum(spec, [a, b]) (CvT's attention) recorded as einsum(spec, a, b): the same call,
            # in the one form the einsum rules read
            args = (args[0], *args[1])
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
            stack = self.state.stack
            if stack and stack[-1].grad_enabled and in_reentrant_checkpoint():
                frames = self.state.frames
                raise reentrant_checkpoint_error(f"called in {frames[-1].op.name!r}" if frames else "")
            if not _wraps_for_backward_hooks(name, args):
                return None
        state, after = self.state, None
        if not state.stack:  # outside the model: only what is applied to its output
            if state.in_loss():
                return None
            if self.functional_loss is not None:
                module = functional_loss_module(func, args, kwargs)
                if module is not None:  # F.cross_entropy(out, y): found like nn.CrossEntropyLoss()(out, y)
                    return _FUNCTIONAL_LOSS, module, args, kwargs
            traces = self._watched_traces(args, kwargs)
            if not traces:
                return self._batch_part_pending(args, kwargs)
            # Outputs of two forward passes combined are not followed; a backward
            # through the result is still marked, so that a named loss refuses it.
            after = traces[0] if len(traces) == 1 else tuple(traces)
        elif state.frames and not state.frames[-1].records_inside:
            return None  # inside a leaf module with a rule
        elif functorch_level() != state.stack[-1].functorch_level:  # inside a torch.func transform
            frame = state.frames[-1] if state.frames else None
            if frame is not None and not frame.has_children:  # a leaf without a rule: the fallback replays it, transform and all
                frame.records_inside = False
                return None
            where = f" (in {frame.op.name!r})" if frame is not None else ""
            refuse_transform(state.stack[-1].functorch_level, f"operation {name!r}{where}")
        # With no frame open, the model's forward runs its own hooks (it is a
        # plain container, or its frame closed): what they compute is recorded.
        t_args, t_kwargs, tensors = make_template(args, kwargs)
        if not any(t.requires_grad for t in tensors):
            if after is None and (not tensors or all_fixed(state.fixed_ids, state.stack[-1], tensors)):
                # from buffers alone, or a new tensor (``torch.zeros((1, H, W, 1))``): no batch axis
                return _FIXED, state.stack[-1], name, not tensors
            if after is None and name == "repeat_interleave" and _repeats_rows(state.stack[-1], t_args, t_kwargs, tensors):
                # frozen features [N, …] with each sample's rows copied k times: k merged rows
                return _REPEATED_CONSTANT, state.stack[-1]
            if after is None and name in FOLLOWED:  # the model input transposed: follow its batch axis
                axes = _constant_axes_pending(state.stack[-1], name, t_args, t_kwargs, tensors)
                if _may_merge(state.stack[-1], name, tensors):  # or merged with other axes
                    return _MERGED_CONSTANT, state.stack[-1], tensors[0], axes
                return axes
            return None
        # Identities and nodes before the call: an in-place operation changes them.
        keys = tuple(key_of(t) for t in tensors)
        inplace = is_inplace(name) or _inplace_flag(func, args, kwargs)
        before = _value_before(name, inplace, tensors, kwargs)
        through = _write_through_pending(state, tensors) if inplace and after is None and state.stack else None
        return (
            after, func, name, t_args, t_kwargs, tensors, keys, tuple(t.grad_fn for t in tensors), inplace, before,
            through,
        )

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

    def _batch_part_pending(self, args: tuple, kwargs: dict) -> Optional[tuple]:
        """``(_BATCH_PART, trace, operation)`` for an operation on part of a model output's batch."""
        if not self.state.batch_parts:
            return None
        for t in tensor_arguments(args, kwargs):
            found = self.state.batch_part_of(t)
            if found is not None:
                return (_BATCH_PART, *found)
        return None

    def _mark_batch_part(self, trace: Trace, operation: str, outputs: Any) -> None:
        """Remember the outputs that require grad as parts of the batch of ``trace``'s output."""
        for o in flat_tensors(outputs):
            if o.requires_grad:
                self.state.watch_batch_part(o, trace, operation)

    def _after(self, pending: tuple, out: Any) -> None:
        if pending[0] is _FIXED:
            note_fixed(pending[1], pending[2], out, pending[1].batch_hint, pending[3])
            return
        if pending[0] is _CONSTANT_AXES:
            _follow_constant_axes(pending, out)
            return
        if pending[0] is _REPEATED_CONSTANT:
            trace, x = pending[1], pending[1].batch_hint
            if isinstance(out, Tensor) and out.dim() and x and out.shape[0] % x == 0:
                remember_merged_constant(trace, out)
            return
        if pending[0] is _MERGED_CONSTANT:
            if not _note_merged_constant(pending[1], pending[2], out) and pending[3] is not None:
                _follow_constant_axes(pending[3], out)
            return
        if pending[0] is _BATCH_PART:  # computed from part of the batch: still part of it
            self._mark_batch_part(pending[1], pending[2], out)
            return
        if pending[0] is _FUNCTIONAL_LOSS:
            self.functional_loss(*pending[1:], out)
            return
        after, func, name, t_args, t_kwargs, tensors, keys, nodes, inplace, before, through = pending
        if isinstance(after, tuple):  # outputs of several forward passes combined
            for o in flat_tensors(out):
                if o.requires_grad:
                    for trace in after:
                        trace.handles.append(o.register_hook(partial(_record_after_task, trace)))
            return
        outputs = [tensors[0]] if inplace and tensors else list(flat_tensors(out))
        if outputs and all(_is_unchanged_input(o, tensors, keys) for o in outputs):
            # The call returned its input as it was (``γ.to(γ.dtype)``, ``x.contiguous()`` of a
            # contiguous ``x``, an in-place call that changed nothing): no operation. A record
            # would map the tensor's key to itself, and a parameter read through it would get
            # its terms twice. (Such an output beside new ones is not followed: _operation.)
            return
        if not all(carries_gradient(o) for o in outputs):  # max's values and indices: the values
            outputs = [o for o in outputs if carries_gradient(o)]
            func = DifferentiableOutputs.of(func)
            if not outputs:
                return
        if after is not None:
            op = self._record_after(after, (func, name, t_args, t_kwargs), tensors, keys, nodes, outputs, inplace)
        elif self.state.stack:
            op = self._record_between((func, name, t_args, t_kwargs), tensors, keys, nodes, outputs, inplace)
        else:
            op = None
        if op is not None and before is not None:
            _keep_value_before(op, before)
        if op is not None and through is not None:  # in place on a view: its base changed too
            self._record_write_through(through, func, name, t_args, t_kwargs, tensors, keys, nodes)

    def _record_write_through(
        self, through: tuple, func: Any, name: str, t_args: tuple, t_kwargs: dict, tensors: list, keys: tuple,
        nodes: tuple,
    ) -> None:
        """Record the change an in-place operation on a view made to the view's base
        (:mod:`curvhook.view_writes`)."""
        chain, base, base_key, base_node, base_before = through
        write = WriteThrough(chain, func, t_args, t_kwargs)
        slots, _, _ = make_template(tuple(tensors), {})  # (Slot(0), Slot(1), …): write(base, *others)
        op = self._record_between(
            (write, f"{name} on a view", slots, {}), [base, *tensors[1:]], (base_key, *keys[1:]),
            (base_node, *nodes[1:]), [base], True,
        )
        if op is not None:
            _keep_value_before(op, base_before)

    def _record_between(
        self, call: tuple, tensors: list, keys: tuple, nodes: tuple, outputs: list, inplace: bool
    ) -> Optional[Operation]:
        """Record an operation a container's ``forward`` ran between its children.

        ``call`` is ``(func, name, args, kwargs)`` with slots in the arguments.

        Returns:
            The record, or ``None`` where nothing was recorded.
        """
        if not any(o.requires_grad for o in outputs):
            return None
        state = self.state
        trace = state.stack[-1]
        where = repr(state.frames[-1].op.name) if state.frames else "the model"
        func, name, t_args, t_kwargs = call
        kinds, params = [], []
        for i, t in enumerate(tensors):
            if not t.requires_grad or (inplace and i == 0 and nodes[0] is None and id(t) not in state.param_ids):
                # (changed in place without a node before: it needed no gradient, torch refuses
                # in-place changes of a leaf that does; ``z = zeros(L); z[2:6] = w``)
                kinds.append(CONST)
            elif id(t) in state.param_ids:
                kinds.append(SHARED)
                params.append((f"t{i}", t))
            else:
                kinds.append(SHARED if keys[i] in trace.shared_keys else BATCHED)
        fixed = fixed_slots(state.fixed_ids, trace, tensors, kinds)
        if BATCHED not in kinds and SHARED in kinds:
            _mark_batched_constants(kinds, tensors, outputs, trace.batch_hint, fixed)
            if trace.row_groups:  # frozen features with merged rows, met by parameters
                mark_merged_constants(trace, kinds, tensors, keys)
        picks = 1
        if BATCHED in kinds and name == "__getitem__":  # h[eos_mask, :]: c entries per sample
            rewritten = mask_as_positions(t_args, tensors, kinds, keys, nodes, trace.moved_axes)
            x_slot = t_args[0]
            if rewritten is not None and (rewritten[5] == 1 or rows_of(trace, tensors[x_slot], keys[x_slot]) == 1):
                t_args, tensors, kinds, keys, nodes, picks = rewritten  # (c > 1: not on merged rows)
                fixed = fixed_slots(state.fixed_ids, trace, tensors, kinds)
        op = _operation(
            f"{name} (in {where})", func, t_args, t_kwargs, tuple(tensors), kinds, keys,
            nodes, outputs, outputs[0].grad_fn, inplace, params,
        )
        op.fixed_slots = fixed
        if op.node is not None and saved_tensor_hooks_active():  # activation checkpointing
            op.node, op.node_saves_hooked = None, True
        # merged rows, followed as pseudo-samples (curvhook/row_groups.py); a merge or split
        # keeps the batch axis first (its leading size is N·k or N)
        regroup = BATCHED in kinds and (
            note_repeated_rows(trace, op, outputs) or note_rows(trace, op, outputs, name in PURE_RESHAPES)
        )
        if picks > 1:  # each sample's c picks: c merged rows (curvhook/mask_index.py)
            op.rows_in, op.rows, regroup = 1, picks, True
            mark_rows(trace, outputs[0], picks)
        if BATCHED in kinds and (trace.moved_axes or name in MOVERS) and not regroup:
            _follow_batch_axis(op, trace.moved_axes)
            if op.batch_axes is not None:  # (held: a later tensor with its id would pass for moved)
                trace.held.extend(outputs)
        if op.rows > 1 and not regroup:  # outputs that keep the merged rows
            mark_outputs(trace, op, outputs)
        if BATCHED not in kinds and _copies_to_batch(op, tensors, outputs, trace.batch_hint):
            op.to_batch = True  # its output has the batch axis: one copy per sample
        elif BATCHED not in kinds and _copies_to_merged_rows(op, tensors, outputs, trace):
            op.to_batch = True  # one copy per sample of k merged rows (DeBERTa's w.repeat(N, 1, 1))
        elif BATCHED not in kinds:  # computed from parameters only
            shared = [k for k in op.output_keys if k is not None]
            trace.shared_keys.update(shared)
            trace.shared_log.extend(shared)
            # held: a shared tensor that no later operation reads (``zeros_like(w[1:])``) would
            # die, and a batched tensor made after it could get its id and pass for shared
            trace.held.extend(o for o, k in zip(outputs, op.output_keys) if k is not None)
        trace.operations.append(op)
        return op

    def _record_after(
        self, trace: Trace, call: tuple, tensors: list, keys: tuple, nodes: tuple, outputs: list,
        inplace: bool,
    ) -> Optional[Operation]:
        """Record an operation applied to the model output after the model returned.

        The record holds detached tensors and no autograd node: the hook on the
        model output holds the trace, so a reference back into the graph would
        keep the graph alive forever (see :class:`~curvhook.trace.Trace`).

        Returns:
            The record, or ``None`` where nothing was recorded.
        """
        if trace.released:
            return None
        func, name, t_args, t_kwargs = call
        n = trace.batch_size
        rows = 0
        if not any(o.requires_grad and o.dim() and o.shape[0] == n for o in outputs):
            rows = _merged_rows(name, tensors, outputs, n)
            if not rows:
                if name in BATCH_SELECTIONS:  # out[:4]: a loss on it gets a clear error
                    self._mark_batch_part(trace, name, outputs)
                return None  # no batch axis left: the loss itself, or a reduction, not part of the network
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
        op.rows_per_sample = rows
        _retire_reused_keys(trace, op, outputs, tensors)
        trace.after_operations.append(op)
        # The identity of full backward hooks (``view_as`` under no_grad) changes no
        # loss: a named loss still describes it, and its output has no node yet to hook.
        identity = not torch.is_grad_enabled()
        for o, key in zip(outputs, op.output_keys):
            if key is not None:
                self.state.watch_output(o, key, trace)
                if not identity:
                    trace.handles.append(o.register_hook(partial(_record_after_task, trace)))
        return op


def _is_unchanged_input(output: Tensor, inputs: list, keys: tuple) -> bool:
    """Whether ``output`` is one of ``inputs``, in the state it had before the call."""
    return any(output is x and key_of(output) == key for x, key in zip(inputs, keys))


def _wraps_for_backward_hooks(name: str, args: tuple) -> bool:
    """Whether a call under ``no_grad`` is the identity that full backward hooks put around a
    module's inputs or outputs (``BackwardHookFunction``: ``x.view_as(x)``).

    It is recorded like any ``view_as``: the identity in the forward pass. The
    hooks see (and may change) the gradient; the curvature is that of the
    model's forward function, as without them.
    """
    return (
        name == "view_as" and len(args) == 2 and args[0] is args[1] and isinstance(args[0], Tensor)
        and args[0].requires_grad and in_backward_hook_setup()
    )


def _retire_reused_keys(trace: Trace, op: Operation, outputs: list, inputs: list) -> None:
    """Retire the records of dead tensors whose ids the outputs of ``op`` reuse.

    An output that is none of the operation's inputs (``x.contiguous()`` may
    return ``x``) is a new tensor: a recorded key equal to its key belonged to a
    tensor that died (``Trace.retire_key``).
    """
    for o, key in zip(outputs, op.output_keys):
        if key is not None and not any(o is x for x in inputs) and trace.produced(key):
            trace.retire_key(key)


# In-place operations whose Jacobians do not depend on the values they overwrite
# (``out += identity``): their records need no copy of the value before the call.
_LINEAR_INPLACE = (ADDITIONS | SUBTRACTIONS | REVERSED_SUBTRACTIONS | {"__setitem__"})


@lru_cache(maxsize=None)
def _inplace_position(func: Any) -> Optional[int]:
    """The position of a function's ``inplace`` parameter (``F.relu(x, inplace)``), or ``None``."""
    try:
        names = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):  # a builtin without a signature
        return None
    return names.index("inplace") if "inplace" in names else None


def _inplace_flag(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether a functional layer was asked to write into its input (``F.relu(h, inplace=True)``)."""
    if "inplace" in kwargs:
        return kwargs["inplace"] is True
    try:
        position = _inplace_position(func)
    except TypeError:  # an unhashable callable
        return False
    return position is not None and len(args) > position and args[position] is True


def _value_before(name: str, inplace: bool, tensors: list, kwargs: dict) -> Optional[Tensor]:
    """A copy of the tensor an in-place operation is about to overwrite, where its rule needs it.

    ``h.tanh_()``, ``F.relu(h, inplace=True)``, ``h.mul_(w)``: the derivatives
    are functions of ``h`` as it was before the call, which the call destroys
    (autograd keeps what it needs on its node, but a view's node is not the
    operation's own). Additions, subtractions and ``__setitem__`` have
    Jacobians that do not depend on it: no copy.
    """
    if not inplace or not tensors or (name in _LINEAR_INPLACE and not kwargs):
        return None
    return tensors[0].detach().clone()


def _write_through_pending(state: BlockState, tensors: list) -> Optional[tuple]:
    """What :meth:`OperationTape._record_write_through` needs where an in-place operation
    changes a view whose chain of views from its base the tape recorded; else ``None``."""
    view = tensors[0] if tensors else None
    if view is None or view._base is None:
        return None
    chain = view_chain(state.stack[-1], view) or sliced_chain(view)
    if chain is None:
        return None
    base = view._base
    return chain, base, key_of(base), base.grad_fn, base.detach().clone()


def _keep_value_before(op: Operation, before: Tensor) -> None:
    """Make ``op.inputs[0]`` the value its in-place operation overwrote.

    The overwritten tensor itself (now the output) stays referenced by
    ``op.overwritten``, so its ``id`` (in ``op.input_keys``) is not reused.
    """
    op.overwritten = (op.inputs[0],)
    op.inputs = (before, *op.inputs[1:])
    op.input_versions = (tensor_version(before), *op.input_versions[1:])


def _follow_batch_axis(op: Operation, moved: dict) -> None:
    """Record where the batch axis of each input and output of ``op`` is, where one is not first.

    Adds the outputs whose batch axis is not first to ``moved``
    (``trace.moved_axes``); see :mod:`curvhook.batch_axis`.
    """
    in_axes = tuple(moved.get(k, 0) if kind == BATCHED else None for k, kind in zip(op.input_keys, op.input_kinds))
    batched = [i for i, a in enumerate(in_axes) if a is not None]
    shapes = [s for s in op.output_shapes]
    candidates = {
        output_batch_axes(
            op.func_name, op.args, op.kwargs, in_axes[i], op.inputs[i].dim(), shapes, op.inputs[i].shape
        )
        for i in batched
    }
    out_axes = candidates.pop() if len(candidates) == 1 else None
    if all(a == 0 for a in in_axes if a is not None) and (out_axes is None or not any(out_axes)):
        return  # every batch axis first, or the operation splits samples: as before
    op.batch_axes = (in_axes, out_axes)
    for key, axis in zip(op.output_keys, out_axes or ()):
        if key is not None and axis:
            moved[key] = axis


# Marks the pending record of an operation on constants whose batch axis is followed.
_CONSTANT_AXES = object()


def _constant_axes_pending(trace: Trace, name: str, t_args: tuple, t_kwargs: dict, tensors: list) -> Optional[tuple]:
    """What :func:`_follow_constant_axes` needs, for an operation on one model input or on a
    constant computed from one by moving axes (``x.transpose(0, 1)``); else ``None``.

    Such constants are not recorded (they need no gradient), but a module may
    take one as its input (``lstm(x.transpose(0, 1))``): where their batch axis
    is must be known.
    """
    axes = [
        0 if k in trace.input_keys else trace.moved_axes.get(k)
        for k in (key_of(t) for t in tensors)
    ]
    found = [(t, a) for t, a in zip(tensors, axes) if a is not None]
    if len(found) != 1:
        return None
    (x, axis), = found
    return _CONSTANT_AXES, trace, name, t_args, t_kwargs, x, axis


def _follow_constant_axes(pending: tuple, out: Any) -> None:
    """Record the batch axis of the outputs of an operation on a constant with a batch axis."""
    _, trace, name, t_args, t_kwargs, x, axis = pending
    outputs = list(flat_tensors(out))
    if not outputs:
        return
    out_axes = output_batch_axes(name, t_args, t_kwargs, axis, x.dim(), [o.shape for o in outputs], x.shape)
    for o, a in zip(outputs, out_axes or ()):
        if a:
            trace.moved_axes[key_of(o)] = a
            trace.held.append(o)  # its id is not reused while the trace lives


def _mark_batched_constants(kinds: list, tensors: list, outputs: list, batch_hint, fixed: tuple) -> None:
    """Count constants with the batch axis as batched where they meet shared tensors.

    ``inputs_embeds + position_embeds`` with frozen token embeddings ``[N, L, D]``
    and trainable position embeddings ``[1, L, D]``: the sum has one row per
    sample, so the constant is split by sample like a batched input (it gets no
    pullback: no recorded operation produced it). The ``fixed`` slots, constants
    from buffers alone, are never batched (``table[index]`` with ``index`` ``[L, L]``
    and ``L = N``).
    """
    out = outputs[0]
    if batch_hint is None or out.dim() == 0 or out.shape[0] != batch_hint:
        return
    for i, (t, kind) in enumerate(zip(tensors, kinds)):
        if kind == CONST and t.dim() and t.shape[0] == batch_hint and i not in fixed:
            kinds[i] = BATCHED


def _merged_rows(name: str, tensors: list, outputs: list, n) -> int:
    """Rows per sample of a reshape that merges the batch axis with the axes after it.

    ``logits.reshape(-1, V)`` for logits ``[N, L, V]`` gives ``[N·L, V]``: sample
    ``n`` is rows ``n·L … n·L + L − 1``. Returns ``0`` for any other operation.
    """
    if name not in MERGING_RESHAPES or len(tensors) != 1 or len(outputs) != 1:
        return 0
    return _rows_per_sample(tensors[0], outputs[0], n, same_tail=True)


def merged_constant(trace: Trace, tensors: list, kinds: list) -> bool:
    """Whether one of ``tensors`` is a constant whose batch axis a reshape merged with the
    axes after it (:func:`_note_merged_constant`): the features of frozen layers (Swin's
    windows after a frozen stem, LeViT's ``x.flatten(0, 1)``), or the model input."""
    return bool(trace.merged_inputs) and any(
        kind == CONST and key_of(t) in trace.merged_inputs for t, kind in zip(tensors, kinds)
    )


# Marks the pending record of a reshape of a constant that may merge its batch axis.
_MERGED_CONSTANT = object()


def _may_merge(trace: Trace, name: str, tensors: list) -> bool:
    """Whether an operation on one constant may merge its batch axis (a reshape of a floating
    ``[N, …]``, not moved elsewhere) or keep one merged (any operation the batch axis is
    followed through, on a merged constant: Swin's ``window_partition`` views it twice)."""
    if len(tensors) != 1:
        return False
    x, key = tensors[0], key_of(tensors[0])
    if key in trace.merged_inputs:
        return True
    return (  # (integer ids too: an embedding of ``ids.reshape(-1)`` has their rows)
        name in MERGING_RESHAPES and x.dim() >= 2 and x.shape[0] == trace.batch_hint and key not in trace.moved_axes
    )


def _note_merged_constant(trace: Trace, x: Tensor, out: Any) -> bool:
    """Remember the output of a reshape that merged the batch axis of the constant ``x``
    (``x.reshape(-1, F)`` of the model input, ``x.flatten(0, 1)`` of frozen features), or
    of an operation that keeps a merged constant's leading axis. Returns whether it did."""
    if not isinstance(out, Tensor) or out.dim() == 0:
        return False
    kept = key_of(x) in trace.merged_inputs and out.shape[0] == x.shape[0]
    if not (kept or _rows_merged(x, out, trace.batch_hint)):
        return False
    remember_merged_constant(trace, out)
    return True


# Marks the pending record of ``x.repeat_interleave(k, dim=0)`` of a constant ``[N, …]``.
_REPEATED_CONSTANT = object()


def _repeats_rows(trace: Trace, t_args: tuple, t_kwargs: dict, tensors: list) -> bool:
    """Whether ``repeat_interleave`` copies each row of one constant ``[N, …]`` (frozen features,
    the model input) ``k`` times along the batch axis, an int ``k``: ``k`` merged rows per sample."""
    if len(tensors) != 1 or t_args[:1] != (0,):
        return False
    x, key = tensors[0], key_of(tensors[0])
    repeats = _repeats_along_first_axis(t_args, t_kwargs, x)
    return (
        repeats is not None and repeats > 1
        and x.shape[0] == trace.batch_hint and key not in trace.moved_axes and key not in trace.merged_inputs
    )


def remember_merged_constant(trace: Trace, out: Tensor) -> None:
    """Take the constant ``out`` for one with merged rows, ``[N·k, …]`` (``k`` rows per sample)."""
    trace.merged_inputs.add(key_of(out))
    trace.held.append(out)  # its id is not reused while the trace lives
    # its rows per sample: where it meets parameters, the result is followed row by row
    if trace.batch_hint:
        mark_rows(trace, out, out.shape[0] // trace.batch_hint)


def _rows_merged(x: Tensor, out: Tensor, n: Optional[int]) -> bool:
    """Whether ``out`` is ``x`` ``[N, a, b, …]`` with its batch axis merged with the axes after
    it (``[N·a, b, …]``, ``[N·a·b, …]``, whatever follows)."""
    return _rows_per_sample(x, out, n, same_tail=False) > 0


def _rows_per_sample(x: Tensor, out: Tensor, n: Optional[int], same_tail: bool) -> int:
    """``k > 1`` where ``out``'s leading size is ``N·k`` with ``k`` the product of ``x``'s sizes
    after its batch axis up to some axis ``j`` (and, ``same_tail``, ``out``'s other sizes
    those of ``x`` after ``j``); else ``0``."""
    if n is None or x.dim() < 2 or out.dim() == 0 or x.shape[0] != n or out.shape[0] % n:
        return 0
    rows = out.shape[0] // n
    size = 1
    for j in range(1, x.dim()):
        size *= x.shape[j]
        if size == rows and (not same_tail or tuple(out.shape[1:]) == tuple(x.shape[j + 1 :])):
            return rows if rows > 1 else 0
    return 0


def _copies_to_merged_rows(op: Operation, tensors: list, outputs: list, trace: Trace) -> bool:
    """Whether a tensor operation on shared tensors copies one to ``N`` blocks of ``k`` merged
    rows, the same block for every sample; if so, marks its output with ``k`` rows per sample.

    DeBERTa's relative-position keys ``w`` ``[H, 2S, d]`` repeated ``w.repeat(N, 1, 1)`` to meet
    the queries ``[N·H, L, d]``: output row ``i`` is ``w[i mod H]``, so with ``k = H`` rows per
    sample (a multiple of that period) every sample's block is ``w`` itself.
    """
    n = trace.batch_hint
    if not n or len(outputs) != 1 or op.args[:1] != (0,):
        return False
    if op.func_name == "repeat_interleave":  # w.repeat_interleave(N·k, dim=0) of a w [1, …]
        if _repeats_along_first_axis(op.args, op.kwargs, tensors[0]) is None or tensors[0].shape[0] != 1:
            return False
    elif op.func_name not in ("repeat", "expand"):
        return False
    out, w = outputs[0], tensors[0]
    if out.dim() == 0 or out.shape[0] % n or out.shape[0] // n < 2:
        return False
    rows = out.shape[0] // n
    period = w.shape[0] if w.dim() == out.dim() else 1
    if rows % period or (op.func_name == "expand" and period != 1):
        return False
    op.rows = rows  # rows_in stays 1: the copy makes the rows (rules/parameters_only.ToBatchRule)
    mark_rows(trace, out, rows)
    return True


def _repeats_along_first_axis(args: tuple, kwargs: dict, w: Tensor) -> Optional[int]:
    """``k`` where the arguments of ``repeat_interleave`` make ``w.repeat_interleave(k, dim=0)``
    with an int ``k`` (also ``dim=-w.dim()``); else ``None``."""
    repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
    dim = args[2] if len(args) > 2 else kwargs.get("dim")
    ok = type(repeats) is int and type(dim) is int and w.dim() > 0 and dim % w.dim() == 0
    return repeats if ok else None


def _copies_to_batch(op: Operation, tensors: list, outputs: list, batch_hint) -> bool:
    """Whether a tensor operation on shared tensors copies one along a new batch axis.

    ``cls_token.expand(N, -1, -1)`` (or ``repeat``, ``repeat_interleave(N, dim=0)``):
    the first argument, with a leading axis of size one (or fewer axes), copied to the
    leading size of the model input.
    """
    if batch_hint is None or len(outputs) != 1:
        return False
    if op.func_name == "repeat_interleave":  # w.repeat_interleave(N, dim=0) of a w [1, …]
        if _repeats_along_first_axis(op.args, op.kwargs, tensors[0]) is None:
            return False
    elif op.func_name not in COPIES_TO_BATCH:
        return False
    out, w = outputs[0], tensors[0]
    if op.args[:1] != (0,) or out.dim() == 0 or out.shape[0] != batch_hint:
        return False
    return w.dim() < out.dim() or w.shape[0] == 1


def _operation(
    name: str, func: Any, t_args: tuple, t_kwargs: dict, tensors: tuple, kinds: list, keys: tuple,
    nodes: tuple, outputs: list, node: Any, inplace: bool, params: list,
) -> Operation:
    """The record of one tensor operation."""
    return Operation(
        name=name,
        func=REPLAYED_AS.get(func, func),  # torch.cdist: its torch.func derivatives are wrong
        args=t_args,
        kwargs=t_kwargs,
        inputs=tensors,
        input_kinds=tuple(kinds),
        input_keys=keys,
        input_versions=tuple(k[1] for k in keys),
        input_nodes=nodes,
        # an output that is an input as it was (``torch.atleast_2d(W, b)`` returns ``W``) is not
        # produced by the call: its key stays that of the input
        output_keys=tuple(
            key_of(o) if o.requires_grad and not _is_unchanged_input(o, tensors, keys) else None for o in outputs
        ),
        output_shapes=tuple(o.shape for o in outputs),
        output_values=tuple(o.detach() for o in outputs),
        node=node,
        inplace=inplace,
        params=tuple(params),
    )


def _record_after_task(trace: Trace, grad: Tensor) -> None:
    """Tensor hook: this backward pass goes through an operation applied after the model."""
    trace.after_tasks.add(current_graph_task_id())
