"""Merged rows: a batch axis merged with the axes after it, followed as pseudo-samples.

OPT runs its MLP on ``h.reshape(-1, H)``, the ``[N, L, H]`` activations viewed as
``[N·L, H]``, and views the result back as ``[N, L, H]``. Swin partitions
``[N, H, W, C]`` into windows ``[N·nW, ws, ws, C]``, DeBERTa merges the heads
with the batch (``[N·h, L, d]``), LeViT normalizes ``x.flatten(0, 1)``. A reshape
keeps every entry in row-major order, so in ``[N·k, …]`` sample ``n`` is the
block of rows ``n·k … n·k + k − 1``, whatever the reshape's sizes, as long as
the leading size is a multiple of ``N``.

Between such a merge and the reshape that splits the rows again, an operation
that keeps rows apart (linear layers, norms, activations, attention within a
window, a batched ``@``) is followed with its rows as pseudo-samples: its rule
sees a batch of ``N·k`` rows. That is exact:

- sample ``n``'s Jacobian is block-diagonal over its ``k`` rows, so columns
  ``[V, N·k, …]`` pulled back row by row are the samples' columns, and the
  diagonal ``diag(J_nᵀ D J_n)`` is the rows' diagonals side by side;
- a parameter's per-sample product is the sum over the sample's rows,
  ``J_θᵀ m_vn = Σ_j J_{θ,nj}ᵀ m_vnj``, summed before any square
  (:class:`curvhook.rules.row_groups.GroupedRowsRule`); a tensor computed from
  parameters only that the rows read (Swin's relative-position bias) gets its
  per-sample value the same way. A sum over all samples (DiagGGNApprox's
  parameter diagonal) needs no change.

The forward pass marks the tensors and operations (:func:`note_rows`); the plan
checks each operation against a batch of ``N·k`` and gives the merge and the
split their rule (:data:`curvhook.rules.row_groups.REGROUP`). A container whose
merged rows meet an operation that does not keep rows apart is recorded as one
module for the fallback, as before (:func:`rows_followed`).
"""

from __future__ import annotations

import weakref
from typing import Optional, Sequence

from torch import Tensor

from curvhook.records import BATCHED, CONST, Operation, TensorKey, key_of
from curvhook.trace import Trace

# Reshapes that keep every entry in row-major order (the second argument of the
# ``_as`` forms gives only a shape).
PURE_RESHAPES = frozenset({"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"})


def note_rows(trace: Trace, op: Operation, outputs: Sequence[Tensor], reshape: bool) -> bool:
    """Set ``op.rows_in`` and ``op.rows``, and mark the outputs of a merge or split with their
    rows per sample (the caller marks those of any other operation on merged rows with
    :func:`mark_outputs`, once their batch axes are known).

    Args:
        trace: The forward pass being recorded (``trace.row_groups`` is updated).
        op: A recorded operation or module call of the model.
        outputs: Its outputs that carry a gradient.
        reshape: Whether ``op`` is one of :data:`PURE_RESHAPES`.

    Returns:
        Whether ``op`` merges or splits rows (:func:`is_regroup`).
    """
    n = trace.batch_hint
    if reshape:  # the tensor reshaped alone decides (``view_as(y)``: y gives a shape)
        batched = [rows_of(trace, op.inputs[0], op.input_keys[0])] if op.input_kinds and op.input_kinds[0] == BATCHED else []
    elif trace.row_groups:
        batched = [
            rows_of(trace, x, k) for x, k, kind in zip(op.inputs, op.input_keys, op.input_kinds) if kind == BATCHED
        ]
    else:
        return False
    if not batched:
        return False
    rows = batched[0]
    if any(r != rows for r in batched):
        op.rows = op.rows_in = 0  # the plan refuses it, or its container goes to the fallback
        return False
    out_rows = rows
    # the batch axis where the input has it: first, or moved (SAM's attention merges it with the
    # heads after a permute, ``[3, N, H, L, d] → [3, N·H, L, d]``), the axes before it kept
    axis = trace.moved_axes.get(op.input_keys[0], 0) if reshape else 0
    if (reshape and n and outputs and outputs[0].dim() > axis
            and (axis == 0 or op.inputs[0].shape[axis] == n * rows)  # (where the batch axis is)
            and tuple(outputs[0].shape[:axis]) == tuple(op.inputs[0].shape[:axis])):
        lead = outputs[0].shape[axis]
        if lead and lead % n == 0:
            out_rows = lead // n
    if rows == 1 and out_rows == 1:
        return False
    op.rows_in, op.rows = rows, out_rows
    if axis and rows != out_rows:  # the merged (or split) batch axis stays where it was
        op.batch_axes = (
            tuple(trace.moved_axes.get(k, 0) if kind == BATCHED else None for k, kind in zip(op.input_keys, op.input_kinds)),
            (axis,),
        )
        trace.moved_axes.update((k, axis) for k in op.output_keys if k is not None)
    if reshape and out_rows > 1:
        mark_outputs(trace, op, outputs)
    return rows != out_rows


def note_repeated_rows(trace: Trace, op: Operation, outputs: Sequence[Tensor]) -> bool:
    """``g.repeat_interleave(k, dim=0)`` of a batched ``g`` ``[N·r, …]`` (``r`` rows per sample,
    often one): each row copied to ``k`` consecutive rows, so sample ``n`` owns rows
    ``n·r·k … (n + 1)·r·k − 1`` of the result (GCViT's global query repeated to the windows of
    its image). Set ``op.rows_in = r`` and ``op.rows = r·k`` and mark the output; ``False``
    (nothing set) for any other call, such as repeats given as a tensor or another axis.
    """
    n = trace.batch_hint
    if op.func_name != "repeat_interleave" or not n or not outputs or len(op.inputs) != 1:
        return False
    args, kwargs = op.args, op.kwargs
    repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
    dim = args[2] if len(args) > 2 else kwargs.get("dim")
    x, key = op.inputs[0], op.input_keys[0]
    if (not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 2 or not isinstance(dim, int)
            or x.dim() == 0 or dim not in (0, -x.dim()) or key in trace.moved_axes):
        return False
    rows = rows_of(trace, x, key)
    if x.shape[0] != n * rows:
        return False
    op.rows_in, op.rows = rows, rows * repeats
    mark_rows(trace, outputs[0], op.rows)
    return True


def mark_outputs(trace: Trace, op: Operation, outputs: Sequence[Tensor]) -> None:
    """Mark the outputs of an operation on merged rows that keep them: ``k`` rows per sample
    along their batch axis (where :mod:`curvhook.batch_axis` found it, else first).

    An output of another leading size (``m[::L]``, one row of each sample picked from
    ``[N·L, C]``) is left unmarked: the operation does not keep rows apart, so the plan
    refuses it (or its container goes to the fallback), naming it.
    """
    rows, n = op.rows, trace.batch_hint
    if rows <= 1 or not n:
        return
    for key, out in zip(op.output_keys, outputs):
        if key is None or out.dim() == 0:
            continue
        axis = trace.moved_axes.get(key, 0)
        if axis < out.dim() and out.shape[axis] == n * rows:
            # a weak reference: the key's id may be reused once the tensor dies
            trace.row_groups[key] = (rows, weakref.ref(out))


def mark_rows(trace: Trace, x: Tensor, rows: int) -> None:
    """Mark ``x`` as ``[N·k, …]`` with ``k = rows`` rows per sample: a constant whose batch axis
    a reshape merged (frozen features, held by the trace), or a copy of a shared tensor to
    merged rows."""
    if rows > 1:
        trace.row_groups[key_of(x)] = (rows, weakref.ref(x))


def mark_merged_constants(trace: Trace, kinds: list, tensors: Sequence[Tensor], keys: Sequence[TensorKey]) -> bool:
    """Count constants with merged rows as batched where parameters meet them.

    ``linear(frozen.flatten(0, 1))``, ``windows_of_frozen_features * γ``: the result has
    ``k`` rows per sample, like the constant. The constant gets no pullback (no recorded
    operation produced it). Returns whether any was marked.
    """
    marked = False
    for i, (t, kind) in enumerate(zip(tensors, kinds)):
        if kind == CONST and rows_of(trace, t, keys[i]) > 1:
            kinds[i] = BATCHED
            marked = True
    return marked


def rows_of(trace: Trace, x: Tensor, key: Optional[TensorKey] = None) -> int:
    """Rows per sample of the batched tensor ``x`` (``1`` where its rows are not merged)."""
    entry = trace.row_groups.get(key) if key is not None else None
    if entry is None:
        return 1
    rows, ref = entry
    return rows if ref() is x else 1


def is_regroup(op: Operation) -> bool:
    """Whether ``op`` merges or splits rows (its inputs and outputs group samples differently)."""
    return op.rows != op.rows_in


def rows_followed(operations: Sequence[Operation], n: Optional[int]) -> bool:
    """Whether every operation of a container on merged rows can be followed row by row.

    Args:
        operations: The container's recorded operations (and module calls).
        n: The batch size.

    Returns:
        ``False`` where one combines merged with unmerged rows, or does not keep
        its rows apart (a module that changes the number of rows, a tensor
        operation whose structure and per-row replay do not show that it keeps
        them apart): the container is then one module for the fallback.
    """
    from curvhook.plan import resolve_rule  # the plan imports the recorder's modules
    from curvhook.rules.batch_axis_view import batch_axis_refusal
    from curvhook.rules.registry import rule_for

    for op in operations:
        if op.rows == 1 and op.rows_in == 1:
            continue
        if op.rows == 0 or n is None:
            return False
        if is_regroup(op):
            continue
        size = n * op.rows
        if op.module is not None:
            if op.batch_axes is not None or not op.output_shapes or op.output_shape is None:
                return False
            if len(op.output_shape) == 0 or op.output_shape[0] != size:
                return False
            # a module without a rule may mix a sample's rows (a cumsum over them), and one
            # that takes its batch axis elsewhere (batch_first=False) would read rows as positions
            in_axes = tuple(0 if k == BATCHED else None for k in op.input_kinds)
            if rule_for(op.module) is None or batch_axis_refusal(op.module, in_axes, op.inputs) is not None:
                return False
            continue
        if all(k is None for k in op.output_keys):
            continue
        if op.batch_axes is not None:  # the merged axis moved: followed where it is known
            if any(a is None for a in op.batch_axes[1]):
                return False
            continue
        rule = resolve_rule(op)
        if rule.keeps_samples_apart(op, size):
            continue
        check = getattr(rule, "check", None)
        if check is None:
            return False
        try:
            check(op)  # the per-row replay, as the backward pass would run it
        except Exception:  # noqa: BLE001 - any failure: the fallback serves the container
            return False
    return True


def group_rows(value: Tensor, rows: int, matrix: bool) -> Tensor:
    """Sum a per-row value over each sample's rows: ``[V, N·k, …] → [V, N, …]``
    (``matrix``) or ``[N·k, …] → [N, …]``."""
    axis = 1 if matrix else 0
    lead = value.shape[axis]
    return value.unflatten(axis, (lead // rows, rows)).sum(axis + 1)

