"""Max pooling ``nn.MaxPool1d/2d/3d``.

Each output entry copies one input entry, chosen by the indices of the forward
pass, so ``J`` has entries 0 and 1: ``J_xᵀ m`` scatter-adds ``m`` onto the chosen
inputs (overlapping windows add up), and since ``J∘J = J`` the diagonal rule is
the same scatter. The indices are recomputed from the stored input.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from curvhook.calls import ModuleCall
from curvhook.rules.base import LayerRule
from curvhook.rules.registry import register_rule

_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


@register_rule(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
class MaxPoolRule(LayerRule):
    """Rules for N-d max pooling (padding, dilation, ceil_mode)."""

    @staticmethod
    def _indices(call: ModuleCall) -> Tensor:
        """Flat input index of each output entry, ``[N, C, L_out]`` (cached per backward)."""
        if "indices" not in call.cache:
            m, x = call.module, call.input.detach()
            _, idx = _POOL[x.dim() - 2](
                x, m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode, return_indices=True
            )
            call.cache["indices"] = idx.flatten(2)
        return call.cache["indices"]

    def _scatter(self, call: ModuleCall, values: Tensor) -> Tensor:
        """Scatter-add ``[..., C, *out]`` onto ``[..., C, *in]``; leading dims broadcast the indices."""
        x = call.input
        lead = values.shape[: values.dim() - x.dim() + 1]  # (V, N) or (N,)
        idx = self._indices(call).expand(*lead, *self._indices(call).shape[1:])
        flat = values.reshape(*lead, x.shape[1], -1)
        out = flat.new_zeros(*lead, x.shape[1], x[0, 0].numel())
        return out.scatter_add_(-1, idx, flat).reshape(*lead, *x.shape[1:])

    def jac_t_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        return self._scatter(call, mat)

    def diag_jac_t_diag_jac(self, call: ModuleCall, diag: Tensor) -> Tensor:
        return self._scatter(call, diag)
