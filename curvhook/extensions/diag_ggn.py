"""DiagGGN: the exact diagonal of the generalized Gauss-Newton matrix.

``G = Σ_n J_nᵀ H_n J_n``. With a square-root factor ``H_n = Σ_v s_vn s_vnᵀ``,
``diag(G) = Σ_{v,n} (J_nᵀ s_vn)²``: backpropagate the ``V`` columns of ``S``
and square-sum the per-sample parameter products.
"""

from __future__ import annotations

from curvhook.extensions.base import SquaredColumnSum
from curvhook.sources import LossHessianSqrt


class DiagGGN(SquaredColumnSum):
    """Writes ``p.diag_ggn``, shaped like ``p``: ``diag(G)`` restricted to ``p``."""

    attribute = "diag_ggn"
    source_type = LossHessianSqrt
