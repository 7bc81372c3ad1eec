"""BatchL2Grad: the squared norm ``‖g_n‖²`` of every per-sample gradient, per parameter.

The same backpropagated column as BatchGrad (``∂ℓ/∂f_n``); each layer's rule
gives ``‖J_θᵀ m_n‖²`` (:meth:`~curvhook.rules.base.LayerRule.param_sq_norms`)
without forming ``g_n`` where it can: ``‖δ_n‖²‖x_n‖²`` for ``nn.Linear``
without positions, Gram-matrix forms for ``nn.Linear`` over positions and for
convolutions where they are cheaper. A parameter used by several operations
sums its per-sample gradients over the uses before the norm is taken.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvhook.extensions.base import Extension
from curvhook.records import Operation
from curvhook.rules.base import LayerRule
from curvhook.sources import LossGradient


class BatchL2Grad(Extension):
    """Writes ``p.batch_l2`` with shape ``[N]``: ``‖g_n‖²`` over the entries of ``p``.

    No loss is needed. With ``accumulate=True``, or when one backward reaches
    several forward passes, the samples are concatenated in order.
    """

    attribute = "batch_l2"
    concatenates = True
    loss_power = 2
    source_type = LossGradient

    def param_term(
        self, rule: LayerRule, op: Operation, name: str, value: Tensor, shared: bool
    ) -> Tensor:
        if shared:  # the per-sample gradients of all uses are summed before the norm
            return rule.param_jac_t_mat_prod(op, name, value)  # [1, N, *θ]
        return rule.param_sq_norms(op, name, value)  # [1, N]

    def finalize(
        self, totals: dict[int, Tensor], shared: frozenset[int], params: list[nn.Parameter], root: Tensor
    ) -> dict[int, Tensor]:
        out = {}
        for p in params:
            total = totals.get(id(p))
            if total is None:
                out[id(p)] = torch.zeros(root.shape[0], dtype=p.dtype, device=p.device)
            elif id(p) in shared:
                out[id(p)] = total[0].reshape(total[0].shape[0], -1).square().sum(1)
            else:
                out[id(p)] = total[0]
        return out

    @staticmethod
    def combine(old: Tensor, new: Tensor) -> Tensor:
        return torch.cat([old, new])
