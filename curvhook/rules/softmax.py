"""``nn.Softmax``, ``nn.LogSoftmax`` and ``nn.Softmax2d`` as layers, over any dimension but the batch axis.

Along the softmax dimension, with ``s = softmax(x)``:

- Softmax: ``J[o, i] = s_o (δ_oi - s_i)``, so ``J_xᵀ m = s ∘ (m - ⟨m, s⟩)`` and

      Σ_o d_o J[o, i]² = s_i² (d_i (1 - 2 s_i) + Σ_o d_o s_o²);

- LogSoftmax: ``J[o, i] = δ_oi - s_i``, so ``J_xᵀ m = m - s Σ_o m_o`` and

      Σ_o d_o J[o, i]² = d_i (1 - 2 s_i) + s_i² Σ_o d_o.

``s`` is recomputed from the stored input.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvhook.records import Operation
from curvhook.errors import UnsupportedModelError
from curvhook.rules.base import LayerRule
from curvhook.rules.registry import register_rule


def _softmax_dim(call: Operation) -> int:
    """The softmax dimension, counted from the end (so it also indexes ``[V, N, *]``)."""
    module, ndim = call.module, call.input.dim()
    if isinstance(module, nn.Softmax2d):
        dim = -3
    elif module.dim is None:  # legacy implicit choice of torch.nn.functional
        dim = 0 if ndim in (0, 1, 3) else 1
    else:
        dim = module.dim
    dim = dim - ndim if dim >= 0 else dim
    if dim == -ndim:
        raise UnsupportedModelError(
            f"Module {call.name!r} ({type(module).__name__}) normalizes over the batch axis, so "
            "samples are mixed and per-sample Jacobians do not exist. Give it dim >= 1."
        )
    return dim


@register_rule(nn.Softmax, nn.Softmax2d)
class SoftmaxRule(LayerRule):
    """Rules for softmax over one dimension."""

    log = False

    def _probabilities(self, call: Operation) -> tuple[Tensor, int]:
        """``s`` ``[N, *in]`` and the dimension (cached per backward)."""
        if call.scratch.softmax is None:
            dim = _softmax_dim(call)
            call.scratch.softmax = (torch.softmax(call.input.detach(), dim), dim)
        return call.scratch.softmax

    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        s, dim = self._probabilities(call)
        if self.log:
            return mat - s * mat.sum(dim, keepdim=True)
        return s * (mat - (mat * s).sum(dim, keepdim=True))

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        s, dim = self._probabilities(call)
        if self.log:
            return diag * (1 - 2 * s) + s.square() * diag.sum(dim, keepdim=True)
        s_sq = s.square()
        return s_sq * (diag * (1 - 2 * s) + (diag * s_sq).sum(dim, keepdim=True))


@register_rule(nn.LogSoftmax)
class LogSoftmaxRule(SoftmaxRule):
    """Rules for log-softmax over one dimension."""

    log = True
