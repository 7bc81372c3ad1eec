"""Padding: ``ZeroPad``, ``ConstantPad``, ``ReflectionPad``, ``ReplicationPad``, ``CircularPad`` (1d, 2d, 3d).

Every output entry is either a constant or a copy of one input entry, so the
Jacobian has entries 0 and 1 with at most one 1 per row. ``J_xᵀ m`` adds each
output entry onto the input it copies, and since ``J∘J = J`` the diagonal
pullback ``Σ_o d_o J[o, i]²`` is the same map applied to ``d``.

Constant padding (``ZeroPad*`` included) only adds a border, so ``J_xᵀ`` crops
it: ``F.pad`` with the negated widths (negative widths, which crop the input in
the forward pass, turn into zero borders). Reflection, replication and circular
padding copy border entries several times: their transpose is the autograd
transpose of the module, batched over all columns.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from curvhook.records import Operation
from curvhook.rules.linear_maps import columns_vjp, linear_vjp
from curvhook.rules.base import LayerRule
from curvhook.rules.registry import register_rule


@register_rule(
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d
)
class ConstantPadRule(LayerRule):
    """``y = pad(x)`` with a constant border: the transpose removes the border."""

    @staticmethod
    def _unpad(call: Operation, t: Tensor) -> Tensor:
        return F.pad(t, [-p for p in call.module.padding])

    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        return self._unpad(call, mat)

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        return self._unpad(call, diag)


@register_rule(
    nn.ReflectionPad1d,
    nn.ReflectionPad2d,
    nn.ReflectionPad3d,
    nn.ReplicationPad1d,
    nn.ReplicationPad2d,
    nn.ReplicationPad3d,
    nn.CircularPad1d,
    nn.CircularPad2d,
    nn.CircularPad3d,
)
class CopyPadRule(LayerRule):
    """Padding that copies input entries into the border: 0/1 Jacobian, transposed by autograd."""

    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        return columns_vjp(call, mat)

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        return linear_vjp(call, diag)  # J∘J = J
