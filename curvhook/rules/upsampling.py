"""``nn.Upsample`` (and ``UpsamplingNearest2d``, ``UpsamplingBilinear2d``).

Interpolation is linear in the input, so ``J_xᵀ m`` is the autograd transpose
of the module, batched over all ``V·N`` columns.

For ``nearest`` and ``nearest-exact`` every output entry copies one input
entry: ``J`` has entries 0 and 1, ``J∘J = J``, and the diagonal pullback
``Σ_o d_o J[o, i]²`` is the transpose applied to ``d``.

``linear``, ``bilinear``, ``bicubic`` and ``trilinear`` interpolate separably:
``J[o, i] = Π_j A_j[o_j, i_j]`` with one small ``[out_j, in_j]`` matrix per
spatial dimension, so ``J[o, i]² = Π_j A_j[o_j, i_j]²`` and the diagonal pullback
contracts ``d`` with ``A_j∘A_j`` along every spatial dimension. ``A_j`` is read
from the module itself: an input that is one-hot along dimension ``j`` and
constant along the others yields ``A_j`` (interpolation weights sum to one
along every other dimension), so align_corners, scale factors and
``recompute_scale_factor`` are those of the forward pass.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvhook.records import Operation
from curvhook.rules.linear_maps import columns_vjp, linear_vjp
from curvhook.rules.base import LayerRule
from curvhook.rules.registry import register_rule

_COPYING = ("nearest", "nearest-exact")
_SEPARABLE = ("linear", "bilinear", "bicubic", "trilinear")


def interpolates_separably(mode: str) -> bool:
    """Whether :class:`UpsampleRule` serves interpolation in ``mode`` (``area`` and others: no)."""
    return mode in _COPYING + _SEPARABLE


@register_rule(nn.Upsample)
class UpsampleRule(LayerRule):
    """Rules for ``nn.Upsample`` in the nearest and (bi/tri)linear/bicubic modes; ``area`` falls back."""

    def accepts(self, module: nn.Module) -> bool:
        return interpolates_separably(module.mode)

    @staticmethod
    def _matrices(call: Operation) -> list[Tensor]:
        """``A_j`` ``[out_j, in_j]`` for every spatial dimension ``j`` (cached per backward)."""
        if call.scratch.upsampling_matrices is None:
            x = call.input
            spatial = tuple(x.shape[2:])
            matrices = []
            for j, size in enumerate(spatial):
                shape = [size if k == j else 1 for k in range(len(spatial))]
                # sample c is one-hot at position c along dimension j, constant along the others
                one_hot = torch.eye(size, dtype=x.dtype, device=x.device).reshape(size, 1, *shape)
                out = call.module.forward(one_hot.expand(size, 1, *spatial).contiguous())
                index = [slice(None), 0] + [slice(None) if k == j else 0 for k in range(len(spatial))]
                matrices.append(out[tuple(index)].T)  # [out_j, in_j]
            call.scratch.upsampling_matrices = matrices
        return call.scratch.upsampling_matrices

    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        return columns_vjp(call, mat)

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        if call.module.mode in _COPYING:
            return linear_vjp(call, diag)  # J∘J = J
        back = diag
        for j, a in enumerate(self._matrices(call)):
            # Σ_{o_j} d[..., o_j, ...] A_j[o_j, i_j]²
            back = torch.movedim(torch.movedim(back, 2 + j, -1) @ a.square(), -1, 2 + j)
        return back
