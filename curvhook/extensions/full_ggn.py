"""FullGGN: the full generalized Gauss-Newton matrix.

``G = Σ_n J_nᵀ H_n J_n = Bᵀ B`` where ``B`` stacks the per-sample products
``J_nᵀ s_vn`` of all ``V·N`` backpropagated columns: ``[V·N, P]``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from curvhook.calls import ModuleCall
from curvhook.extensions.base import Extension
from curvhook.rules.base import LayerRule


class FullGGN(Extension):
    """Writes ``p.ggn`` with shape ``[p.numel(), P]``: the rows of ``G`` that belong to ``p``.

    Columns run over all trainable parameters in ``model.parameters()`` order.
    After the backward, ``FullGGN.matrix`` holds the whole ``[P, P]`` matrix;
    every ``p.ggn`` is a view of it, so no extra memory is used.

    Example::

        ggn = FullGGN()
        with extend(model, ggn):
            criterion(model(X), y).backward()
        G = ggn.matrix  # [P, P]
    """

    attribute = "ggn"
    source = "sqrt_ggn"

    def __init__(self, loss: Optional[nn.Module] = None) -> None:
        super().__init__(loss)
        self.matrix: Optional[Tensor] = None

    def param_term(
        self, rule: LayerRule, call: ModuleCall, name: str, value: Tensor, shared: bool
    ) -> Tensor:
        return rule.param_jac_t_mat_prod(call, name, value)

    def finalize(
        self, totals: dict[int, Tensor], shared: set[int], params: list[nn.Parameter], root: Tensor
    ) -> dict[int, Tensor]:
        v_n = next((t.shape[0] * t.shape[1] for t in totals.values()), 0)
        blocks = [
            totals[id(p)].reshape(v_n, -1)
            if id(p) in totals
            else root.new_zeros(v_n, p.numel())
            for p in params
        ]
        factor = torch.cat(blocks, dim=1)  # B: [V·N, P]
        return {"matrix": factor.T @ factor}

    def reset(self, params: list[nn.Parameter]) -> None:
        super().reset(params)
        self.matrix = None

    def write(self, results: dict, params: list[nn.Parameter], accumulate: bool) -> None:
        dtype = params[0].dtype if params else None
        matrix = results["matrix"].to(dtype)
        if accumulate and self.matrix is not None:
            self.matrix += matrix
        else:
            self.matrix = matrix
        start = 0
        for p in params:
            setattr(p, self.attribute, self.matrix[start : start + p.numel()])
            start += p.numel()
