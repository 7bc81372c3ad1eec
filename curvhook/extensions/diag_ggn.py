"""DiagGGN: the exact diagonal of the generalized Gauss-Newton matrix.

``G = Σ_n J_nᵀ H_n J_n``. With a square-root factor ``H_n = Σ_v s_vn s_vnᵀ``,
``diag(G) = Σ_{v,n} (J_nᵀ s_vn)²``: backpropagate the ``V`` columns of ``S``
and square-sum the per-sample parameter products.
"""

from __future__ import annotations

from torch import Tensor, nn

from curvhook.records import Operation
from curvhook.sources import LossHessianSqrt
from curvhook.extensions.base import Extension, zeros_for
from curvhook.rules.base import LayerRule


class DiagGGN(Extension):
    """Writes ``p.diag_ggn``, shaped like ``p``: ``diag(G)`` restricted to ``p``."""

    attribute = "diag_ggn"
    source_type = LossHessianSqrt

    def param_term(
        self, rule: LayerRule, op: Operation, name: str, value: Tensor, shared: bool
    ) -> Tensor:
        if shared:  # the sum over uses comes before the square
            return rule.param_jac_t_mat_prod(op, name, value)
        return rule.param_sq_sum(op, name, value)

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
