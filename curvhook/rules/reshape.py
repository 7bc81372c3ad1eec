"""Layers that only move entries around: ``Identity``, ``Flatten``, ``Unflatten``,
``PixelShuffle``, ``PixelUnshuffle``, ``Unfold``, ``Fold``.

Their Jacobian is a permutation matrix ``P`` (the identity for the reshapes), so
``J_xᵀ m = P⁻¹ m`` and, since ``P∘P = P``, ``diag(J_xᵀ diag(d) J_x) = P⁻¹ d``:
every product is the inverse rearrangement applied to the backpropagated quantity.

``Unfold`` (sliding windows, im2col) copies entries, some into several windows, and
``Fold`` (col2im) adds them back: entries 0 or 1, ``J∘J = J`` again, so the diagonal
pullback is the autograd transpose applied to ``d`` (VOLO's outlook attention; the
fallback's per-sample Jacobians before session 44).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from curvhook.records import Operation
from curvhook.rules.base import LayerRule
from curvhook.rules.linear_maps import columns_vjp, linear_vjp
from curvhook.rules.registry import register_rule


@register_rule(nn.Identity, nn.Flatten, nn.Unflatten)
class ReshapeRule(LayerRule):
    """Reshape the output-shaped quantity back to the input shape."""

    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        return mat.reshape(mat.shape[0], *call.input.shape)

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        return diag.reshape(call.input.shape)


@register_rule(nn.PixelShuffle)
class PixelShuffleRule(LayerRule):
    """``[C·r², H, W] → [C, H·r, W·r]``: the transpose is ``pixel_unshuffle``."""

    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        return F.pixel_unshuffle(mat, call.module.upscale_factor)  # leading dims pass through

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        return F.pixel_unshuffle(diag, call.module.upscale_factor)


@register_rule(nn.PixelUnshuffle)
class PixelUnshuffleRule(LayerRule):
    """``[C, H·r, W·r] → [C·r², H, W]``: the transpose is ``pixel_shuffle``."""

    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        return F.pixel_shuffle(mat, call.module.downscale_factor)

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        return F.pixel_shuffle(diag, call.module.downscale_factor)


@register_rule(nn.Unfold, nn.Fold)
class WindowRule(LayerRule):
    """``Unfold`` ``[C, *spatial] → [C·k, L]`` and ``Fold``, its adjoint: the autograd transpose."""

    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        return columns_vjp(call, mat)

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        return linear_vjp(call, diag)  # J∘J = J
