"""Convolutions ``nn.Conv1d/2d/3d`` with zero padding.

For one sample, ``y[o, l] = Σ_{i,k} W[o, i, k] x̃[i, l·s + k·d] + b[o]`` where
``x̃`` is the zero-padded input. With the *unfolded* input
``U[i·K + k, l] = x̃[i, l·s + k·d]`` the layer is a matrix product ``y = W U + b``
per group, so

- ``J_Wᵀ m = m Uᵀ`` (per sample), ``J_bᵀ m = Σ_l m[:, l]``;
- ``J_xᵀ m`` is the transposed convolution of ``m`` with ``W``;
- ``diag(J_xᵀ diag(d) J_x)`` is the transposed convolution of ``d`` with ``W∘W``;
- ``Σ_n diag(J_Wᵀ diag(d_n) J_W)`` is the weight gradient of ``d`` against ``x∘x``.

Unfolding uses a convolution with a one-hot kernel, so 1d, 2d and 3d share
one code path. ``padding_mode`` other than ``'zeros'`` goes to the fallback.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from curvhook.calls import ModuleCall
from curvhook.rules.base import LayerRule
from curvhook.rules.registry import register_rule

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_GRAD_INPUT = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input, 3: torch.nn.grad.conv3d_input}
_GRAD_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}


def _geometry(call: ModuleCall) -> tuple[Tensor, tuple[int, ...], list[int]]:
    """Return the explicitly padded input, the symmetric padding left to the conv, and the pads applied.

    ``padding='same'`` can be asymmetric; it is applied with ``F.pad`` so that
    every convolution below uses symmetric padding.
    """
    if "geometry" in call.cache:
        return call.cache["geometry"]
    module, x = call.module, call.input.detach()
    dims = x.dim() - 2
    if isinstance(module.padding, str):
        if module.padding == "valid":
            result = (x, (0,) * dims, [0] * (2 * dims))
        else:  # 'same': total dil·(k-1), extra entry on the right
            pads: list[int] = []
            for k, dil in zip(reversed(module.kernel_size), reversed(module.dilation)):
                total = dil * (k - 1)
                pads += [total // 2, total - total // 2]
            result = (F.pad(x, pads), (0,) * dims, pads)
    else:
        result = (x, tuple(module.padding), [0] * (2 * dims))
    call.cache["geometry"] = result
    return result


def _crop(grad: Tensor, pads: list[int]) -> Tensor:
    """Undo ``F.pad(x, pads)`` on the trailing dimensions of ``grad``."""
    if not any(pads):
        return grad
    index = [slice(None)] * grad.dim()
    for j in range(len(pads) // 2):
        left, right = pads[2 * j], pads[2 * j + 1]
        size = grad.shape[-1 - j]
        index[grad.dim() - 1 - j] = slice(left, size - right)
    return grad[tuple(index)]


def unfold(x: Tensor, module: nn.Module, padding: tuple[int, ...]) -> Tensor:
    """Unfold the input into patches: ``[N, C_in, *in] → [N, C_in·K, L]``."""
    dims = x.dim() - 2
    channels, kernel = x.shape[1], tuple(module.kernel_size)
    k = 1
    for size in kernel:
        k *= size
    one_hot = torch.eye(k, dtype=x.dtype, device=x.device).reshape(k, 1, *kernel)
    patches = _CONV[dims](
        x, one_hot.repeat(channels, 1, *([1] * dims)), None, module.stride, padding, module.dilation, channels
    )
    return patches.flatten(2)


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(LayerRule):
    """Rules for zero-padded N-d convolutions (stride, dilation, groups, bias)."""

    def _patches(self, call: ModuleCall) -> Tensor:
        """Per-group unfolded input, ``[N, G, C_in/G · K, L]`` (cached per backward)."""
        if "patches" not in call.cache:
            x, padding, _ = _geometry(call)
            u = unfold(x, call.module, padding)
            call.cache["patches"] = rearrange(u, "n (g i) l -> n g i l", g=call.module.groups)
        return call.cache["patches"]

    def _input_transpose(self, call: ModuleCall, weight: Tensor, grad: Tensor) -> Tensor:
        """Transposed convolution of ``grad`` ``[B, C_out, *out]`` back to input shape ``[B, C_in, *in]``."""
        module = call.module
        x, padding, pads = _geometry(call)
        size = (grad.shape[0], *x.shape[1:])
        dims = x.dim() - 2
        back = _GRAD_INPUT[dims](size, weight, grad, module.stride, padding, module.dilation, module.groups)
        return _crop(back, pads)

    def jac_t_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        v = mat.shape[0]
        back = self._input_transpose(call, call.module.weight, mat.flatten(0, 1))
        return back.unflatten(0, (v, -1))

    def param_jac_t_mat_prod(self, call: ModuleCall, name: str, mat: Tensor) -> Tensor:
        m = mat.flatten(3) if mat.dim() > 3 else mat.unsqueeze(-1)  # [V, N, C_out, L]
        if name == "bias":
            return m.sum(-1)
        g = call.module.groups
        m = rearrange(m, "v n (g o) l -> v n g o l", g=g)
        prod = torch.einsum("vngol,ngil->vngoi", m, self._patches(call))
        return prod.reshape(*mat.shape[:2], *call.module.weight.shape)

    def param_sq_sum(self, call: ModuleCall, name: str, mat: Tensor) -> Tensor:
        prod = self.param_jac_t_mat_prod(call, name, mat)
        return prod.square_().sum((0, 1))  # one [V, N, *θ] buffer, squared in place

    def diag_jac_t_diag_jac(self, call: ModuleCall, diag: Tensor) -> Tensor:
        return self._input_transpose(call, call.module.weight.square(), diag)

    def param_diag(self, call: ModuleCall, name: str, diag: Tensor) -> Tensor:
        if name == "bias":
            return diag.flatten(2).sum((0, 2))
        module = call.module
        x, padding, _ = _geometry(call)
        return _GRAD_WEIGHT[x.dim() - 2](
            x.square(), module.weight.shape, diag, module.stride, padding, module.dilation, module.groups
        )
