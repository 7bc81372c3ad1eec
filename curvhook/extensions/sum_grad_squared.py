"""SumGradSquared: ``Σ_n g_n ∘ g_n``, the diagonal of the empirical Fisher.

The same backpropagated column as BatchGrad (``∂ℓ/∂f_n``); a layer's
``param_sq_sum`` (``Σ_{v,n} (J_θᵀ m_vn)²``, DiagGGN's term, here with one
column) gives the sum of squares without holding every ``g_n`` where the rule
can (``nn.Linear`` without positions: ``(δ∘δ)ᵀ (x∘x)``). A parameter used by
several operations sums its per-sample gradients over the uses before squaring.
"""

from __future__ import annotations

from torch import Tensor, nn

from curvhook.extensions.base import Extension, zeros_for
from curvhook.records import Operation
from curvhook.rules.base import LayerRule
from curvhook.sources import LossGradient


class SumGradSquared(Extension):
    """Writes ``p.sum_grad_squared``, shaped like ``p``: ``Σ_n g_n ∘ g_n``.

    No loss is needed. With ``accumulate=True`` successive backward passes add up.
    """

    attribute = "sum_grad_squared"
    source_type = LossGradient

    def param_term(
        self, rule: LayerRule, op: Operation, name: str, value: Tensor, shared: bool
    ) -> Tensor:
        if shared:  # the per-sample gradients of all uses are summed before the square
            return rule.param_jac_t_mat_prod(op, name, value)  # [1, N, *θ]
        return rule.param_sq_sum(op, name, value)  # [*θ]

    def finalize(
        self, totals: dict[int, Tensor], shared: frozenset[int], params: list[nn.Parameter], root: Tensor
    ) -> dict[int, Tensor]:
        out = {}
        for p in params:
            total = totals.get(id(p))
            if total is None:
                out[id(p)] = zeros_for(p)
            elif id(p) in shared:
                out[id(p)] = total.square().sum((0, 1))
            else:
                out[id(p)] = total
        return out
