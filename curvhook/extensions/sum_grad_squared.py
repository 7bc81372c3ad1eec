"""SumGradSquared: ``Σ_n g_n ∘ g_n``, the diagonal of the empirical Fisher.

The same backpropagated column as BatchGrad (``∂ℓ/∂f_n``); a layer's
``param_sq_sum`` (``Σ_{v,n} (J_θᵀ m_vn)²``, DiagGGN's term, here with one
column) gives the sum of squares without holding every ``g_n`` where the rule
can (``nn.Linear`` without positions: ``(δ∘δ)ᵀ (x∘x)``). A parameter used by
several operations sums its per-sample gradients over the uses before squaring.
"""

from __future__ import annotations

from curvhook.extensions.base import SquaredColumnSum
from curvhook.sources import LossGradient


class SumGradSquared(SquaredColumnSum):
    """Writes ``p.sum_grad_squared``, shaped like ``p``: ``Σ_n g_n ∘ g_n``.

    No loss is needed. With ``accumulate=True`` successive backward passes add up.
    """

    attribute = "sum_grad_squared"
    loss_power = 2
    source_type = LossGradient
