"""Helpers for rules of linear, parameter-free layers (pooling, padding, upsampling).

For a linear map ``y = A x`` the Jacobian is ``A`` itself, so ``J_xᵀ m = Aᵀ m``
is the gradient autograd computes for ``⟨m, A x⟩`` at any ``x``: the rules call
the module's own ``forward`` on zeros and let autograd transpose it, batched
over all ``V·N`` columns at once. The DiagGGNApprox pullback needs the map with
squared coefficients, ``Σ_o d_o A[o, i]²``; each rule supplies it from the
structure of its map.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvhook.records import Operation


def linear_vjp(call: Operation, grad: Tensor) -> Tensor:
    """``Aᵀ g`` for the linear module of ``call``.

    Args:
        call: A call of a module whose forward is linear in its input.
        grad: ``[B, *out]``, any number ``B`` of stacked columns.

    Returns:
        ``[B, *in]``.
    """
    x = call.input
    zeros = torch.zeros((grad.shape[0], *x.shape[1:]), dtype=grad.dtype, device=grad.device, requires_grad=True)
    with torch.enable_grad():
        # ``forward``, not ``__call__``: no hook (curvhook's own included) sees this evaluation.
        out = call.module.forward(zeros)
    (back,) = torch.autograd.grad(out, zeros, grad)
    return back


def columns_vjp(call: Operation, mat: Tensor) -> Tensor:
    """``Aᵀ m`` for every column: ``[V, N, *out] → [V, N, *in]`` in one batched call."""
    return linear_vjp(call, mat.flatten(0, 1)).unflatten(0, mat.shape[:2])
