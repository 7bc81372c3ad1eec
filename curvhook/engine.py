"""The reverse walk that runs inside ``backward()``.

When the gradient reaches the model output, the backward driver hands the
engine the forward pass's trace and its plan. For every source (identity
columns, a square-root factor of the loss Hessian, or the loss-Hessian
diagonal) the engine keeps, per dense slot, the quantity that has reached that
tensor; at each step of the plan it pulls the quantity back through the
operation's rule and lets each extension turn what reaches a parameter into its
terms. A quantity is dropped as soon as the step that consumes it has run.

An extension whose result needs a further walk (eigenvectors from the Gram
matrix of a first walk, the power iterations of a randomised eigensolver)
returns a :class:`~curvhook.extensions.base.FollowUp` from ``finalize``: the
engine runs the walk it names, with the loss terms of the extension's own
source, and hands the result on, until a final result comes back.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from curvhook.errors import UnsupportedModelError
from curvhook.extensions.base import Extension, FollowUp
from curvhook.loss_terms import LossTerms
from curvhook.plan import Plan, Step
from curvhook.plan_key import GraphShape
from curvhook.records import SHARED, Operation
from curvhook.row_groups import group_rows
from curvhook.rules.row_groups import grouped
from curvhook.sources import Source
from curvhook.trace import Trace


class _Walk:
    """One source's quantities during the walk, and the extensions that read them."""

    def __init__(self, source: Source, extensions: list[Extension], slots: int) -> None:
        self.source = source
        self.extensions = extensions
        self.pending: list[Optional[Tensor]] = [None] * slots
        self.totals: dict[Extension, dict[int, object]] = {ext: {} for ext in extensions}

    def take(self, step: Step, op: Operation):
        """Pop what reached the outputs of ``op``: a tensor, a list (several outputs) or ``None``."""
        pending = self.pending
        for slot in step.unfollowed:
            if pending[slot] is not None:
                raise UnsupportedModelError(
                    f"The model uses a second output of module {op.name!r} "
                    f"({type(op.module).__name__}); curvhook follows only the first tensor output "
                    "of a module. Use only the first output, or wrap the module so that it returns "
                    "the output you need first."
                )
        if len(step.outputs) == 1:
            slot = step.outputs[0]
            if slot < 0:
                return None
            value, pending[slot] = pending[slot], None
            return value
        values = []
        for slot in step.outputs:
            values.append(None if slot < 0 else pending[slot])
            if slot >= 0:
                pending[slot] = None
        return None if all(v is None for v in values) else values

    def add(self, slot: int, value: Tensor) -> None:
        old = self.pending[slot]
        self.pending[slot] = value if old is None else old + value


def backpropagate(
    trace: Trace,
    plan: Plan,
    shape: GraphShape,
    grad_root: Tensor,
    groups: dict[Source, list[Extension]],
    terms: dict[Source, LossTerms],
    params: Sequence[nn.Parameter],
) -> dict[Extension, object]:
    """Compute every extension's results for one backward pass.

    Args:
        trace: What the forward pass recorded.
        plan: Its compiled walk (bound to ``trace``).
        shape: Its dense slots.
        grad_root: ``∂ℓ/∂f`` as it reached the model output, ``[N, *out]``.
        groups: The active extensions by source.
        terms: The loss terms of every source that needs them.
        params: All trainable parameters of the model, in order.

    Returns:
        For each extension, what its ``finalize`` returned.
    """
    results = _walk(trace, plan, shape, grad_root, groups, terms, params)
    for ext, result in results.items():
        while isinstance(result, FollowUp):
            follow = {result.source: [result.extension]}
            done = _walk(trace, plan, shape, grad_root, follow, {result.source: terms.get(ext.source)}, params)
            result = result.then(done[result.extension])
        results[ext] = result
    return results


def _walk(
    trace: Trace,
    plan: Plan,
    shape: GraphShape,
    grad_root: Tensor,
    groups: dict[Source, list[Extension]],
    terms: dict[Source, LossTerms],
    params: Sequence[nn.Parameter],
) -> dict[Extension, object]:
    """One reverse walk over the plan for every source of ``groups`` (see :func:`backpropagate`)."""
    walks = []
    for source, exts in groups.items():
        walk = _Walk(source, exts, plan.slots)
        start, value = source.initial(trace, grad_root, terms.get(source), plan)
        if value is not None:
            walk.add(shape.slot_of[start], value)
        walks.append(walk)
    ops = trace.all_operations
    if any(walk.pending[slot] is not None for walk in walks for slot in range(plan.slots)):
        for step in plan.steps:
            op = ops[step.index]
            try:
                for walk in walks:
                    _visit(walk, step, op)
            except UnsupportedModelError as err:
                better = _further_output_error(trace, op, err)
                if better is None:
                    raise
                raise better from err
            op.clear_scratch()
    root = trace.root_value
    return {
        ext: ext.finalize(walk.totals[ext], plan.shared_params, list(params), root)
        for walk in walks for ext in walk.extensions
    }


def _further_output_error(trace: Trace, op: Operation, err: UnsupportedModelError) -> Optional[UnsupportedModelError]:
    """The refusal of ``op``, said better where it reads a module's further output (an RNN's ``h_n``)."""
    reads: dict = {}  # key computed from a further output -> the module that gave that output
    for m in trace.operations:
        if m is op:
            break
        for key in m.unfollowed_output_keys:
            reads[key] = m
        source = next((reads[k] for k in m.input_keys if k in reads), None)
        if source is not None:
            reads.update((k, source) for k in m.output_keys if k is not None)
    source = next((reads[k] for k in op.input_keys if k in reads), None)
    if source is None:
        return None
    hint = (
        " For the final state h_n of an RNN, read the last step of its first output instead: "
        "out[:, -1] with batch_first=True (the last layer's; for a bidirectional RNN, h_n's forward "
        "half is out[:, -1, :H] and its backward half out[:, 0, H:])."
        if isinstance(source.module, nn.RNNBase) else ""
    )
    return UnsupportedModelError(
        f"The operation {op.name} reads a further output of module {source.name!r} "
        f"({type(source.module).__name__}): curvhook follows only the first tensor output of a "
        f"module.{hint} (The operation itself was refused: {err})"
    )


def _visit(walk: _Walk, step: Step, op: Operation) -> None:
    """Run one step of the plan for one source."""
    value = walk.take(step, op)
    if value is None:
        return
    rule = walk.source.rule(step.rule)
    rows = op.rows if op.rows == op.rows_in else 1  # merged rows: each is a pseudo-sample
    if rows > 1 and step.params:
        rule = grouped(rule, rows)  # a parameter's per-sample product sums the sample's rows
    for use in step.params:
        p = op.params[use.position][1]
        for ext in walk.extensions:
            ext.add_term(walk.totals[ext], p, ext.param_term(rule, op, use.name, value, use.shared))
    for slot, dense in step.upstream:
        pulled = walk.source.pull_back(rule, op, value, slot)
        if rows > 1 and op.input_kinds[slot] == SHARED:  # read by every row of a sample
            pulled = group_rows(pulled, rows, walk.source.matrix)
        walk.add(dense, pulled)
