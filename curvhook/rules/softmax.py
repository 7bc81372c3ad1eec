"""``nn.Softmax``, ``nn.LogSoftmax`` and ``nn.Softmax2d`` as layers, over any dimension but the batch axis
(the tensor operations ``F.softmax``/``F.log_softmax`` use the same diagonal, :func:`softmax_diag`).

Along the softmax dimension, with ``s = softmax(x)``:

- Softmax: ``J[o, i] = s_o (δ_oi - s_i)``, so ``J_xᵀ m = s ∘ (m - ⟨m, s⟩)`` and

      Σ_o d_o J[o, i]² = s_i² (d_i (1 - s_i)² + Σ_{o≠i} d_o s_o²);

- LogSoftmax: ``J[o, i] = δ_oi - s_i``, so ``J_xᵀ m = m - s Σ_o m_o`` and

      Σ_o d_o J[o, i]² = d_i (1 - s_i)² + s_i² Σ_{o≠i} d_o.

Both are sums of non-negative terms: ``1 - s_i`` and the sums over ``o ≠ i`` are
formed without cancellation (:func:`_sum_of_others`). The expanded
``d_i (1 - 2 s_i) + Σ_o d_o s_o²`` cancels where ``s_i ≈ 1`` and can turn negative.
``s`` is recomputed from the stored input.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvhook.records import Operation
from curvhook.errors import UnsupportedModelError
from curvhook.rules.base import LayerRule
from curvhook.rules.registry import register_rule


def _sum_of_others(t: Tensor, dim: int) -> Tensor:
    """``Σ_{o ≠ i} t_o`` for every ``i`` along ``dim``, for ``t ≥ 0``, without cancellation.

    ``total - t_i`` keeps its relative precision where ``t_i`` is not the largest
    term (then ``total - t_i ≥ max t``), and is never negative (a rounded sum of
    non-negative terms is at least each of them). For the largest term, the
    others are summed directly.
    """
    m = t.argmax(dim, keepdim=True)
    others = t.sum(dim, keepdim=True) - t
    return others.scatter_(dim, m, t.scatter(dim, m, 0).sum(dim, keepdim=True))


def softmax_diag(s: Tensor, dim: int, diag: Tensor, log: bool) -> Tensor:
    """``Σ_o d_o J[o, i]²`` of softmax (``log=False``) or log-softmax along ``dim``.

    Args:
        s: ``softmax(x)`` along ``dim``, ``[N, *in]``.
        dim: The softmax dimension (not the batch axis).
        diag: ``d`` at the output, ``[N, *in]``.
        log: Log-softmax instead of softmax.

    Returns:
        ``[N, *in]``, a sum of non-negative terms (see the module docstring).
    """
    own = _sum_of_others(s, dim).square_().mul_(diag)  # d_i (1 - s_i)², 1 - s_i = Σ_{o≠i} s_o
    s_sq = s.square()
    if log:
        return own.addcmul_(s_sq, _sum_of_others(diag, dim))
    return own.add_(_sum_of_others(diag * s_sq, dim)).mul_(s_sq)


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
        return softmax_diag(s, dim, diag, self.log)


@register_rule(nn.LogSoftmax)
class LogSoftmaxRule(SoftmaxRule):
    """Rules for log-softmax over one dimension."""

    log = True
