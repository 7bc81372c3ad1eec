"""BatchGrad: the per-sample gradients of the backpropagated scalar.

The gradient ``∂ℓ/∂f_n`` that reaches the model output travels backward as one
column per sample (:class:`~curvhook.sources.LossGradient`); what reaches a
parameter is ``g_n = J_nᵀ ∂ℓ/∂f_n``, and ``Σ_n g_n = p.grad``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvhook.extensions.base import Extension, zeros_for
from curvhook.records import Operation
from curvhook.rules.base import LayerRule
from curvhook.sources import LossGradient


class BatchGrad(Extension):
    """Writes ``p.grad_batch`` with shape ``[N, *p.shape]``: ``g_n``, with ``Σ_n g_n = p.grad``.

    A mean-reduced loss carries its ``1/N`` in every ``g_n``. No loss is needed
    (the gradient at the model output is used as autograd delivers it). With
    ``accumulate=True``, or when one backward reaches several forward passes,
    the samples are concatenated in order.
    """

    attribute = "grad_batch"
    concatenates = True
    source_type = LossGradient

    def param_term(
        self, rule: LayerRule, op: Operation, name: str, value: Tensor, shared: bool
    ) -> Tensor:
        return rule.param_jac_t_mat_prod(op, name, value)  # [1, N, *θ]

    def finalize(
        self, totals: dict[int, Tensor], shared: frozenset[int], params: list[nn.Parameter], root: Tensor
    ) -> dict[int, Tensor]:
        n = root.shape[0]
        return {id(p): totals[id(p)][0] if id(p) in totals else zeros_for(p, n) for p in params}

    @staticmethod
    def combine(old: Tensor, new: Tensor) -> Tensor:
        return torch.cat([old, new])
