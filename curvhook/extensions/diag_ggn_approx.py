"""DiagGGNApprox: the diagonal-backpropagation approximation of diag(G).

Start from ``d = diag(H_n)``; between adjacent operations keep only the
diagonal of the metric, ``d_in = diag(J_opᵀ diag(d_out) J_op)``; a parameter
gets ``Σ_n diag(J_θᵀ diag(d) J_θ)``. Diagonals reaching one tensor along
several paths are summed. The cost is of the order of one backward pass.
"""

from __future__ import annotations

from torch import Tensor, nn

from curvhook.calls import ModuleCall
from curvhook.extensions.base import Extension, zeros_for
from curvhook.rules.base import LayerRule


class DiagGGNApprox(Extension):
    """Writes ``p.diag_ggn_approx``, shaped like ``p``."""

    attribute = "diag_ggn_approx"
    source = "diag_ggn"

    def param_term(
        self, rule: LayerRule, call: ModuleCall, name: str, value: Tensor, shared: bool
    ) -> Tensor:
        return rule.param_diag(call, name, value)

    def finalize(
        self, totals: dict[int, Tensor], shared: set[int], params: list[nn.Parameter], root: Tensor
    ) -> dict[int, Tensor]:
        return {id(p): totals[id(p)] if id(p) in totals else zeros_for(p) for p in params}
