"""Layers that only move entries around: ``Identity``, ``Flatten``, ``Unflatten``.

Their Jacobian is a permutation-free reshape, so every product is the same
reshape applied to the backpropagated quantity.
"""

from __future__ import annotations

from torch import Tensor, nn

from curvhook.calls import ModuleCall
from curvhook.rules.base import LayerRule
from curvhook.rules.registry import register_rule


@register_rule(nn.Identity, nn.Flatten, nn.Unflatten)
class ReshapeRule(LayerRule):
    """Reshape the output-shaped quantity back to the input shape."""

    def jac_t_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        return mat.reshape(mat.shape[0], *call.input.shape)

    def diag_jac_t_diag_jac(self, call: ModuleCall, diag: Tensor) -> Tensor:
        return diag.reshape(call.input.shape)
