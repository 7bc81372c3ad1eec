"""BatchJacobian: per-sample Jacobians of the model output.

Backpropagating the identity columns ``e_c`` of the output gives, per sample,
``J_nᵀ e_c``: row ``c`` of the Jacobian ``J_n = ∂f_n/∂θ``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvhook.records import Operation
from curvhook.sources import JacobianColumns
from curvhook.extensions.base import Extension, zeros_for
from curvhook.rules.base import LayerRule


class BatchJacobian(Extension):
    """Writes ``p.batch_jacobian`` with shape ``[N, C, *p.shape]``.

    ``C`` is the number of output entries of one sample. No loss is needed:
    backward may start at the model output (``model(X).sum().backward()``).
    With ``accumulate=True`` the Jacobians of successive batches are
    concatenated along the sample axis.
    """

    attribute = "batch_jacobian"
    concatenates = True
    loss_power = 0
    source_type = JacobianColumns

    def param_term(
        self, rule: LayerRule, op: Operation, name: str, value: Tensor, shared: bool
    ) -> Tensor:
        return rule.param_jac_t_mat_prod(op, name, value)

    def finalize(
        self, totals: dict[int, Tensor], shared: frozenset[int], params: list[nn.Parameter], root: Tensor
    ) -> dict[int, Tensor]:
        n, c = root.shape[0], root[0].numel()
        return {
            id(p): totals[id(p)].transpose(0, 1) if id(p) in totals else zeros_for(p, n, c)
            for p in params
        }

    @staticmethod
    def combine(old: Tensor, new: Tensor) -> Tensor:
        return torch.cat([old, new])
