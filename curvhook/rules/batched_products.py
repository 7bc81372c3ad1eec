"""Products plus an added tensor: ``torch.baddbmm``, ``torch.addcmul``, ``torch.addcdiv``.

BLOOM's attention scores are ``alibi.baddbmm(q, k, beta=β, alpha=α)``,

    S = β c + α a @ b,   a ``[B, L, K]``, b ``[B, K, S]``, c broadcast to ``[B, L, S]``,

with the batch merged with the heads (``B = N·H``, :mod:`curvhook.row_groups`) and
the ALiBi bias ``c`` ``[N·H, 1, S]``, a constant with one slice per row. The
matrices of slice ``j`` of the output read slice ``j`` of ``a``, ``b`` and ``c``
only (a ``bmm`` does not broadcast its batch axis), so the call keeps samples
(and merged rows) apart when ``a`` and ``b`` carry the batch axis and ``c`` is
shared or has one slice per sample.

DiagGGNApprox: the product is linear in each operand, and each output entry
reads each entry of an operand at most once, so (as for ``a @ b``)

    d_a = α² d (b ∘ b)ᵀ,   d_b = α² (a ∘ a)ᵀ d,   d_c = β² d summed to c's shape.

timm's ResMLP scales with ``torch.addcmul(β, α, x) = β + α ∘ x`` (its ``Affine``;
dense per-sample Jacobians before, 16 s of a 16.2 s step at resmlp_12 on 64×64
images). ``addcmul(c, a, b, value=v) = c + v a ∘ b`` and ``addcdiv(c, a, b, value=v)
= c + v a / b`` are entrywise with broadcasting, so every Jacobian entry of an
operand is one entry of the output:

    d_a = Σ_broadcast d (v b)²,  d_b = Σ_broadcast d (v a)²  (addcmul),
    d_a = Σ_broadcast d (v / b)², d_b = Σ_broadcast d (v a / b²)²  (addcdiv),
    d_c = Σ_broadcast d,

summed over the axes each operand is broadcast along (per sample for one shared
by the samples).

The exact products are the generic ones (``torch.func`` on the whole call).
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from curvhook.records import BATCHED, CONST, SHARED, Operation, Slot
from curvhook.rules.tensor_ops import TensorOpRule

_NAMES = ("input", "batch1", "batch2")


def _bound(call: Operation, names: tuple[str, ...] = _NAMES, defaults: Any = (("beta", 1), ("alpha", 1))) -> dict[str, Any]:
    """The arguments by name (``torch.baddbmm(c, a, b, …)`` or ``c.baddbmm(a, b, …)``), slots as
    :class:`Slot` markers."""
    bound = dict(defaults)
    bound.update(zip(names, call.args))
    bound.update(call.kwargs)
    return bound


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, (bool, Slot))


class BaddbmmFunction(TensorOpRule):
    """``β c + α a @ b`` with ``a``, ``b`` batched (see the module docstring)."""

    def keeps_samples_apart(self, call: Operation, n: int) -> bool:
        args = _bound(call)
        a, b, c = args.get("batch1"), args.get("batch2"), args.get("input")
        if not all(isinstance(t, Slot) for t in (a, b, c)) or set(call.kwargs) - {*_NAMES, "beta", "alpha"}:
            return False
        if not all(_number(args[k]) for k in ("alpha", "beta")):
            return False  # (a tensor ``alpha`` is a slot here, not its value)
        out = call.output_shapes[0]
        if out is None or len(out) != 3 or out[0] != n:
            return False
        kinds = [call.input_kinds[t] for t in (a, b)]
        # each slice of a (b) pairs with the same slice of the other: batched, or a constant per sample
        if BATCHED not in kinds or any(k not in (BATCHED, CONST) for k in kinds):
            return False
        if any(call.inputs[t].dim() != 3 or call.inputs[t].shape[0] != n for t in (a, b)):
            return False
        x, kind = call.inputs[c], call.input_kinds[c]
        if kind == BATCHED:  # its batch axis must be the product's (``[N, S]`` broadcasts N along L)
            return x.dim() == 3 and x.shape[0] == n
        shared_slices = x.dim() < 3 or x.shape[0] == 1
        return shared_slices if kind == SHARED else (shared_slices or x.shape[0] == n)

    def _sliced_slots(self, call: Operation) -> list[int]:
        """The batched inputs, and the constants with one slice per sample (ALiBi's ``[N·H, 1, S]``)."""
        n = call.output_shapes[0][0]
        return [
            i for i, (t, k) in enumerate(zip(call.inputs, call.input_kinds))
            if k == BATCHED or (k == CONST and t.dim() == 3 and t.shape[0] == n)
        ]

    def _fast_diag(self, call: Operation, value: Any, slot: int) -> Optional[Tensor]:
        """``[B, *x[1:]]`` for ``a``, ``b`` or a batched ``c`` (see the module docstring)."""
        if isinstance(value, list) or call.uses(slot) != 1 or call.input_kinds[slot] != BATCHED:
            return None
        args = _bound(call)
        alpha, beta = args["alpha"], args["beta"]
        if slot == args["input"]:
            return value * beta**2 if call.inputs[slot].shape == value.shape else None
        a, b = call.inputs[args["batch1"]].detach(), call.inputs[args["batch2"]].detach()
        if slot == args["batch1"]:
            return alpha**2 * (value @ b.square().transpose(1, 2))
        return alpha**2 * (a.square().transpose(1, 2) @ value)

    def _shared_diag(self, call: Operation, value: Any, slot: int) -> Optional[Tensor]:
        """``[N, *c]``: ``β² d`` per sample summed to the shape of a shared ``c`` (a bias table)."""
        args = _bound(call)
        if isinstance(value, list) or slot != args["input"] or call.uses(slot) != 1:
            return None
        c = call.inputs[slot]
        padded = (1,) * (3 - c.dim()) + tuple(c.shape)
        return (value * args["beta"] ** 2).sum_to_size(value.shape[0], *padded[1:]).reshape(-1, *c.shape)


_ENTRYWISE_NAMES = ("input", "tensor1", "tensor2")


class AddcmulFunction(TensorOpRule):
    """``c + v a ∘ b`` (``divide``: ``c + v a / b``) with broadcasting (see the module docstring)."""

    def __init__(self, divide: bool) -> None:
        self.divide = divide

    def keeps_samples_apart(self, call: Operation, n: int) -> bool:
        args = _bound(call, _ENTRYWISE_NAMES, (("value", 1),))
        if set(call.kwargs) - {*_ENTRYWISE_NAMES, "value"} or not _number(args["value"]):
            return False
        if not all(isinstance(args.get(k), Slot) for k in _ENTRYWISE_NAMES):
            return False
        out = call.output_shapes[0]
        if out is None or len(out) == 0 or out[0] != n:
            return False
        for t, kind in zip(call.inputs, call.input_kinds):
            if kind == BATCHED:  # its batch axis must be the output's
                if t.dim() != len(out) or t.shape[0] != n:
                    return False
            elif not (t.dim() < len(out) or t.shape[0] == 1 or (kind == CONST and t.shape[0] == n)):
                return False  # (a constant with one slice per sample is cut by sample)
        return True

    def _coefficient_sq(self, call: Operation, slot: int) -> Optional[Tensor]:
        """``(∂out/∂x)²`` for the operand at ``slot``, broadcast against the output."""
        args = _bound(call, _ENTRYWISE_NAMES, (("value", 1),))
        if call.uses(slot) != 1:
            return None
        v = args["value"]
        if slot == args["input"]:
            return None  # coefficient one: the sum alone
        a, b = (call.inputs[args[k]].detach() for k in ("tensor1", "tensor2"))
        if not self.divide:
            return (v * (b if slot == args["tensor1"] else a)).square()
        return (v / b).square() if slot == args["tensor1"] else (v * a / b.square()).square()

    def _fast_diag(self, call: Operation, value: Any, slot: int) -> Optional[Tensor]:
        """``[N, *x[1:]]`` for a batched operand."""
        if isinstance(value, list) or call.uses(slot) != 1 or call.input_kinds[slot] != BATCHED:
            return None
        x = call.inputs[slot]
        sq = self._coefficient_sq(call, slot)
        weighted = value if sq is None else value * sq
        return weighted if weighted.shape == x.shape else weighted.sum_to_size(x.shape)

    def _shared_diag(self, call: Operation, value: Any, slot: int) -> Optional[Tensor]:
        """``[N, *w]`` for an operand ``w`` shared by the samples (ResMLP's ``α``, ``β``)."""
        if isinstance(value, list) or call.uses(slot) != 1:
            return None
        w = call.inputs[slot]
        sq = self._coefficient_sq(call, slot)
        weighted = value if sq is None else value * sq  # [N, *out[1:]]
        padded = (1,) * (value.dim() - w.dim()) + tuple(w.shape)
        return weighted.sum_to_size(value.shape[0], *padded[1:]).reshape(-1, *w.shape)
