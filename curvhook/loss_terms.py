"""The loss terms of the backpropagated scalar, and the per-step check that they are all of it.

curvhook needs ``ℓ = Σ_i c_i L_i + g``: the ``L_i`` are loss modules called on
the model output (or on one function of it), the ``c_i ≥ 0`` their multiples,
and ``g`` does not depend on the output. The multiples are read from hooks on
the loss values; the gradient reaching the model output is then checked to be
``Σ_i c_i ∂L_i/∂f``, so nothing else depends on the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from curvhook._torch_internals import current_graph_task_id
from curvhook.errors import UnsupportedLossError
from curvhook.losses import LossRule, loss_rule_for
from curvhook.records import LossCall, Operation, TensorKey
from curvhook.trace import Trace


@dataclass(eq=False)
class LossTerms:
    """The losses ``L_i`` of the backpropagated scalar and their multiples ``c_i``.

    Attributes:
        start: Identity of the tensor every loss was called on.
        calls: The loss calls.
        rules: Their Hessian rules.
        scales: ``c_i = dℓ/dL_i`` (1 for a named loss).
        named: Whether the one call is a named loss (``DiagGGN(loss=...)``), with no
            targets and no multiple, rather than losses found in the block.
    """

    start: TensorKey
    calls: list[LossCall]
    rules: list[LossRule]
    scales: list[float]
    merge: Optional[Operation] = None
    named: bool = False

    def __post_init__(self) -> None:
        if self.merge is not None:  # the walk starts before the reshape that merged the rows
            self.start = self.merge.input_keys[0]

    def columns_at_start(self, factor: Tensor) -> Tensor:
        """Square-root factor columns at :attr:`start`, ``[V', N, *x[1:]]``.

        Where a reshape merged the batch axis with the next ones before the loss
        (``[N, k, *t]`` → ``[N·k, *t]``), the factor of the rows ``[V, N·k, *t]``
        becomes per-sample columns: sample ``n``'s Hessian is block-diagonal over
        its ``k`` rows, so row ``j``'s columns become columns ``(v, j)`` that are
        zero in every other row: ``[V·k, N, k, *t]``.
        """
        if self.merge is None:
            return factor
        x = self.merge.inputs[0]
        n, k = x.shape[0], self.merge.rows_per_sample
        v, rest = factor.shape[0], factor.shape[2:]
        rows = factor.reshape(v, n, k, *rest).movedim(2, 0)  # [k, V, N, *t]
        blocks = factor.new_zeros(v, k, n, k, *rest)
        index = torch.arange(k, device=factor.device)
        blocks[:, index, :, index] = rows
        return blocks.reshape(v * k, n, *x.shape[1:])

    def per_sample_at_start(self, value: Tensor) -> Tensor:
        """A per-row quantity ``[N·k, *t]`` (a gradient, a diagonal) at :attr:`start`: ``[N, *x[1:]]``."""
        return value if self.merge is None else value.reshape(self.merge.inputs[0].shape)

    def require_nonnegative(self) -> None:
        """Refuse a scalar that decreases with a loss: its Hessian has no square-root factor."""
        if any(s < 0 for s in self.scales):
            raise UnsupportedLossError(
                "The backpropagated scalar decreases with the loss (a negative multiple of it); "
                "its Hessian is negative and has no square-root factor. Backpropagate the loss itself."
            )

    def weighted_sum(self, terms: list[Tensor]) -> Tensor:
        """``Σ_i c_i t_i``, without arithmetic where there is one term of weight one."""
        if len(terms) == 1 and self.scales[0] == 1.0:
            return terms[0]
        return sum(w * t for w, t in zip(self.scales, terms))


def find_loss_terms(trace: Trace, loss: Optional[nn.Module], who: str) -> LossTerms:
    """The loss terms of this backward pass, or a clear error if there are none.

    Args:
        trace: The forward pass.
        loss: A named loss module, or ``None`` for the losses called in the block.
        who: The extension's name, for messages.
    """
    calls, named = _loss_calls(trace, loss, who)
    keys = {call.key for call in calls}
    if len(keys) > 1:
        raise UnsupportedLossError(
            "The backpropagated scalar sums losses called on different functions of the model "
            "output. curvhook follows one: call every loss on the same tensor, or move the "
            "operations that differ into the model."
        )
    rules = [loss_rule_for(call.module) for call in calls]  # refuses reduction='none' first
    scales = [1.0 if call.scale is None else float(call.scale) for call in calls]
    key = keys.pop()
    merge = next((op for op in trace.after_operations if op.rows_per_sample and key in op.output_keys), None)
    return LossTerms(key, calls, rules, scales, merge, named)


def _loss_calls(trace: Trace, loss: Optional[nn.Module], who: str) -> tuple[list[LossCall], bool]:
    """The loss calls of this backward pass, and whether they are the named loss.

    Losses called in the block and reached by this backward pass come first, also
    when a loss is named: they know their targets and their multiple in the scalar
    (``F.cross_entropy(out, y) / 4``), which a named loss cannot see.
    """
    _refuse_batch_part(trace, who)
    if loss is not None:
        reached = [call for call in trace.losses if call.batch_part is None and call.scale is not None]
        if reached:
            return reached, False
        if current_graph_task_id() in trace.after_tasks:
            raise UnsupportedLossError(
                f"{who}(loss=...) describes the loss of the model output, but this "
                "backward pass goes through operations applied to the output after the model. "
                "Call a loss module on their result inside the block instead of naming the loss "
                "(nn.CrossEntropyLoss()(g(model(X)), y)), or move them into the model."
            )
        return [LossCall(module=loss, input=trace.root_value, target=None, key=trace.root_key)], True
    whole = [call for call in trace.losses if call.batch_part is None]
    if not whole:
        raise UnsupportedLossError(
            f"{who} needs the loss, and no supported loss was called on the model "
            "output inside the block. Call a loss module (nn.CrossEntropyLoss, nn.MSELoss, "
            "nn.BCEWithLogitsLoss) or its function (F.cross_entropy, F.mse_loss, "
            "F.binary_cross_entropy_with_logits) on the model output inside the `with extend(...)` "
            f"block, or name it: {who}(loss=nn.CrossEntropyLoss()) where the backpropagated scalar is "
            "exactly that loss of the model output itself. A Hugging Face model given labels= computes its "
            "loss after shifting the labels and ignoring -100: call it without labels= and apply "
            "the loss module to its logits in the block."
        )
    reached = [call for call in whole if call.scale is not None]
    if not reached:
        raise UnsupportedLossError(
            f"{who} needs the loss, but the scalar being backpropagated does not "
            "depend on the loss module called on the model output. Call backward() on that loss "
            f"(or a multiple of it), or name the loss: {who}(loss=...)."
        )
    return reached, False


def _refuse_batch_part(trace: Trace, who: str) -> None:
    """Refuse a backward pass through a loss called on part of the batch of the model output."""
    part = next((call for call in trace.losses if call.batch_part is not None and call.scale is not None), None)
    if part is None:
        return
    n = trace.batch_size
    raise UnsupportedLossError(
        f"{who}: the loss {type(part.module).__name__} was called on part of the batch of the "
        f"model output (shape {tuple(part.input.shape)}, taken by {part.batch_part} from an output "
        f"with {n} samples: a slice, index or mask over the samples such as out[:4], out[idx] or "
        "out[mask]). curvhook needs the loss on the whole batch of the model output. To use "
        "part of the batch, slice the input instead: crit(model(X[:4]), y[:4]); to leave "
        "samples out of a cross-entropy loss, call it on the whole output with their targets "
        "set to its ignore_index."
    )


def check_gradient(trace: Trace, terms: LossTerms, grad_root: Tensor) -> None:
    """Check that ``∂ℓ/∂f`` equals ``Σ_i c_i ∂L_i/∂f``, so that ``ℓ`` is a sum of the losses seen.

    For losses called after operations ``g`` on the output, their gradient is
    pulled back through ``g`` to the model output first.
    """
    actual = grad_root.detach() if grad_root.requires_grad else grad_root
    if actual.numel() == 0:
        return
    if len(terms.calls) == 1 and terms.start == trace.root_key and terms.merge is None:  # the usual case
        residual = terms.rules[0].residual(terms.calls[0], actual, terms.scales[0])
    else:
        expected = terms.weighted_sum([rule.gradient(call) for rule, call in zip(terms.rules, terms.calls)])
        expected = terms.per_sample_at_start(expected)
        if terms.start != trace.root_key:
            expected = pull_to_root(trace, terms.start, expected)
        residual = actual - expected
    # a loss computed in lower precision than the output (HF's loss on logits.float() of a
    # float64 model) gives a gradient that is only that precise
    tol = max(gradient_tolerance(d) for d in {actual.dtype, *(call.input.dtype for call in terms.calls)})
    # max|actual − expected| against tol · (max|actual| + max|expected|), in few operations
    # and one synchronisation: max|expected| ≤ max|actual| + max|actual − expected|.
    # max|t| = max(−min t, max t): aminmax is one vectorised pass (the ∞-norm took 14 times
    # as long on a language model's logits, [8, 64, 1000]); NaN propagates as before.
    low_r, high_r, low_a, high_a = torch.stack([*torch.aminmax(residual), *torch.aminmax(actual)]).tolist()
    diff, size = max(-low_r, high_r), max(-low_a, high_a)
    if diff > tol * (2 * size + diff) + torch.finfo(actual.dtype).tiny:
        raise UnsupportedLossError(
            "The gradient reaching the model output is not that of the loss module(s) called on "
            "it: the scalar you backpropagate also depends on the model output in another way "
            "(an extra term, or a nonlinear function of the loss). Its Hessian is then not the "
            "loss Hessian curvhook knows. Backpropagate a sum of multiples of supported losses."
        )


def check_named_gradient(terms: LossTerms, grad_root: Tensor, who: str) -> None:
    """Check what the gradient at the model output says about a named loss's unknown targets.

    A named loss (``DiagGGN(loss=...)``) has no targets, so its gradient cannot be compared
    with the one that arrived; what the gradient implies of them can. For
    ``CrossEntropyLoss`` with scale ``s`` (``1/(N·Π d)`` for ``'mean'``, 1 for ``'sum'``),
    ``g = s (softmax(f, 1) − y)`` with each ``y`` a distribution over axis 1: ``y = p − g/s``
    must lie in ``[0, 1]`` and sum to 1, and no position may get no gradient at all (an
    ignored label, a masked token: the named loss would count it). For
    ``BCEWithLogitsLoss``, ``y = σ(f) − g/s`` must lie in ``[0, 1]``. Other losses (``MSELoss``:
    every ``y`` is possible) are not checked.

    Raises:
        UnsupportedLossError: where the gradient cannot be that of the named loss of the
            model output (a loss over another axis, over part of the positions, of another
            reduction or kind).
    """
    module = terms.calls[0].module
    if not isinstance(module, (nn.CrossEntropyLoss, nn.BCEWithLogitsLoss)):
        return
    if getattr(module, "weight", None) is not None or getattr(module, "pos_weight", None) is not None:
        return  # its rule refuses it, saying why (the weights need the targets)
    g = grad_root.detach()
    out = terms.calls[0].input.detach()
    if g.numel() == 0 or g.shape != out.shape or not out.is_floating_point():
        return
    tol = 8 * gradient_tolerance(g.dtype)
    name = type(module).__name__
    if isinstance(module, nn.CrossEntropyLoss):
        if out.dim() < 2:
            return
        positions = out.numel() // out.shape[1]
        s = 1.0 / positions if module.reduction == "mean" else 1.0
        y = out.softmax(1).sub_(g, alpha=1.0 / s)
        silent = (g == 0).all(1)
        low, high = torch.aminmax(y)
        sums = y.sum(1).sub_(1).abs().amax()
        bad_silent, low, high, sums = torch.stack([silent.any().to(y.dtype), low, high, sums]).tolist()
        if bad_silent:
            reason = "some positions get no gradient at all (ignored labels, masked tokens), which it would count"
        elif not (low >= -tol and high <= 1 + tol and sums <= tol * out.shape[1]):
            reason = "the targets it implies are no distributions over axis 1"
        else:
            return
    else:
        s = 1.0 / out.numel() if module.reduction == "mean" else 1.0
        low, high = torch.stack(torch.aminmax(torch.sigmoid(out).sub_(g, alpha=1.0 / s))).tolist()  # one sync
        if low >= -tol and high <= 1 + tol:
            return
        reason = "the targets it implies are not in [0, 1]"
    what = "takes axis 1 as the classes and counts every position" if name == "CrossEntropyLoss" else (
        "counts every entry")
    raise UnsupportedLossError(
        f"{who}(loss={name}(reduction={module.reduction!r})): the gradient reaching the model output "
        f"is not that of this loss applied to the model output {tuple(out.shape)} as it is: {reason}. "
        "A named loss must be the backpropagated scalar as a function of the model output, any "
        f"factor included: {name} {what}. Call the loss module (or its function, "
        "F.cross_entropy, F.binary_cross_entropy_with_logits) on the output inside the block "
        "instead of naming it: curvhook then finds it, with its targets and factor. A Hugging Face "
        "model given labels= shifts them and ignores -100: call it without labels= and apply "
        "nn.CrossEntropyLoss to its logits (for a causal LM: logits[:, :-1].flatten(0, 1) against "
        "labels[:, 1:].flatten())."
    )


def gradient_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of :func:`check_gradient` in ``dtype``.

    ``1e-9`` in float64 and ``1e-4`` in float32 (hundreds of rounding errors), and
    at least ``8 ε`` for the half-precision types, whose machine epsilon (``ε ≈ 1e-3``
    in float16, ``7.8e-3`` in bfloat16) is above ``1e-4``: torch rounds the
    gradient it backpropagates and curvhook the one it recomputes, a few ``ε``
    of the largest entry each. An extra term in the scalar changes the gradient
    by far more than that, so it is still refused.
    """
    base = 1e-9 if dtype == torch.float64 else 1e-4
    return max(base, 8 * torch.finfo(dtype).eps)


def pull_to_root(trace: Trace, start: TensorKey, vector: Tensor) -> Tensor:
    """Apply ``J_gᵀ`` of the operations after the model to a per-sample vector at ``start``.

    Args:
        trace: The forward pass; ``trace.after_operations`` lead from its output to ``start``.
        start: Identity of the tensor the losses were called on.
        vector: ``[N, *]`` at ``start``.

    Returns:
        ``[N, *out]`` at the model output.
    """
    from curvhook.rules.tensor_ops import TENSOR_OPS

    pending = {start: vector.unsqueeze(0)}
    for op in reversed(trace.after_operations):
        values = [pending.pop(k, None) if k is not None else None for k in op.output_keys]
        if all(v is None for v in values):
            continue
        value = values[0] if len(values) == 1 else values
        for slot, (kind, key) in enumerate(zip(op.input_kinds, op.input_keys)):
            if kind == "const" or not _produced(trace, key):
                continue
            back = TENSOR_OPS.input_jac_t_mat_prod(op, value, slot)
            pending[key] = back if key not in pending else pending[key] + back
    root = pending.get(trace.root_key)
    return torch.zeros_like(trace.root_value) if root is None else root[0]


def _produced(trace: Trace, key: TensorKey) -> bool:
    """Whether ``key`` is the model output or an output of an operation after the model."""
    return key == trace.root_key or any(key in op.output_keys for op in trace.after_operations)
