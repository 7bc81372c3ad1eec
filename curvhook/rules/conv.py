"""Convolutions ``nn.Conv1d/2d/3d`` with zero padding.

For one sample, ``y[o, l] = Σ_{i,k} W[o, i, k] x̃[i, l·s + k·d] + b[o]`` where
``x̃`` is the zero-padded input. With the *unfolded* input
``U[i·K + k, l] = x̃[i, l·s + k·d]`` the layer is a matrix product ``y = W U + b``
per group, so

- ``J_Wᵀ m = m Uᵀ`` (per sample), ``J_bᵀ m = Σ_l m[:, l]``;
- ``J_xᵀ m`` is the transposed convolution of ``m`` with ``W``;
- ``diag(J_xᵀ diag(d) J_x)`` is the transposed convolution of ``d`` with ``W∘W``;
- ``Σ_n diag(J_Wᵀ diag(d_n) J_W)`` is the weight gradient of ``d`` against ``x∘x``.

Unfolding copies a strided view of the padded input once (:func:`unfold`). Where
input and output hold one position per sample, one tap alone reaches the input
and the rules are those of ``nn.Linear`` with that tap's ``[C_out, C_in/G]`` slice.
``padding_mode`` other than ``'zeros'`` goes to the fallback.

Transposed convolutions ``nn.ConvTranspose1d/2d/3d`` are the adjoints of
convolutions: ``y[o, l·s + k·d - p] += Σ_i W[i, o, k] x[i, l]`` (per group), so

- ``J_Wᵀ m [i, o, k] = Σ_l x[i, l] m[o, l·s + k·d - p]``: for each kernel tap
  ``k`` a strided view of ``m`` on the input grid contracted with ``x`` (a loop
  over the ``K`` taps, never over samples; no zero-stuffed patches, so a stride
  ``s`` costs no factor ``s^dims``); ``J_bᵀ m = Σ_t m[:, t]``;
- ``J_xᵀ m`` is the ordinary convolution of ``m`` with ``W`` (cropped to the
  input size when ``output_padding`` left extra positions);
- ``diag(J_xᵀ diag(d) J_x)`` is the same convolution of ``d`` with ``W∘W``;
- ``Σ_n diag(J_Wᵀ diag(d_n) J_W) [i, o, k] = Σ_{n,l} x[i, l]² d[o, l·s + k·d - p]``.
"""

from __future__ import annotations

import itertools
import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from curvhook import _memory
from curvhook._memory import empty
from curvhook.records import Operation
from curvhook.rules.base import LayerRule, sum_of_squared_products
from curvhook.rules.registry import register_rule

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_GRAD_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}
# Up to this many output positions per sample, a weight diagonal is one GEMM over the
# squared patches: oneDNN's convolution weight gradient takes 2–20× longer there (2
# threads, N = 8: 3×3 kernels, 512 channels on 1×1 outputs 8 ms against 0.45 ms, on 2×2
# 3.4 against 1.0; 1×1 kernels alike), and from about 8×8 positions on it is the faster.
_GEMM_POSITIONS = 4


def _geometry(call: Operation) -> tuple[Tensor, tuple[int, ...], list[int]]:
    """Return the explicitly padded input, the symmetric padding left to the conv, and the pads applied.

    ``padding='same'`` can be asymmetric; it is applied with ``F.pad`` so that
    every convolution below uses symmetric padding.
    """
    if call.scratch.conv_geometry is not None:
        return call.scratch.conv_geometry
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
    call.scratch.conv_geometry = result
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


def live_taps(in_size: tuple[int, ...], module: nn.Module, padding: tuple[int, ...]) -> tuple[slice, ...]:
    """Per spatial dimension, the kernel taps that read the input at some output position.

    Tap ``t`` reads the zero-padded input at ``t·dilation + j·stride`` for the output
    positions ``j``; the others read the padding only, so their patch entries, and
    their part of a weight diagonal or gradient, are zero. A 7×7 depthwise kernel
    with padding 3 on a 2×2 input has 3×3 live taps.

    Args:
        in_size: The spatial size of the input (before ``padding``).
        module: The convolution (kernel size, stride, dilation).
        padding: The symmetric zero padding of each spatial dimension.

    Returns:
        A ``slice(first, stop)`` of taps per spatial dimension, possibly empty.
    """
    taps = []
    for size, p, k, s, d in zip(in_size, padding, module.kernel_size, module.stride, module.dilation):
        positions = (size + 2 * p - d * (k - 1) - 1) // s + 1
        first = max(0, -(-(p - (positions - 1) * s) // d))  # t·d + (positions - 1)·s ≥ p
        stop = min(k, (p + size - 1) // d + 1)  # t·d ≤ p + size - 1
        taps.append(slice(first, max(first, stop)))
    return tuple(taps)


def unfold(
    x: Tensor, module: nn.Module, padding: tuple[int, ...], positions_first: bool = False,
    taps: Optional[tuple[slice, ...]] = None,
) -> Tensor:
    """Unfold the input into patches: ``[N, C_in, *in] → [N, C_in·K, L]``.

    The patches are a strided view of the zero-padded input,
    ``[N, C_in, *kernel, *out]`` with strides ``(…, s_d·dilation_d, …, s_d·stride_d)``,
    copied once into ``[N, C_in·K, L]``: exact in every dtype and layout, and
    faster than PyTorch's ``im2col`` (``F.unfold``, 2d only) or a convolution with
    a one-hot kernel (3c3d's layers, N = 128, 2 threads: 2.2, 15 and 2.6 ms
    against 7, 25 and 4 ms for ``im2col`` and 20, 42 and 5 ms for the one-hot
    convolution).

    Args:
        x: The input, ``[N, C_in, *in]``.
        module: The convolution (kernel size, stride, dilation).
        padding: The symmetric zero padding of each spatial dimension.
        positions_first: Return ``[N, L, C_in·K]`` instead (a patch per row).
        taps: Only these kernel taps per spatial dimension (``K`` their count), e.g.
            the :func:`live_taps`; all by default.
    """
    dims = x.dim() - 2
    if any(padding):
        x = F.pad(x, [p for p in reversed(padding) for _ in range(2)])
    kernel, stride, dilation = tuple(module.kernel_size), tuple(module.stride), tuple(module.dilation)
    size = x.shape[2:]
    out_size = [(size[d] - dilation[d] * (kernel[d] - 1) - 1) // stride[d] + 1 for d in range(dims)]
    s = x.stride()
    offset = x.storage_offset()
    if taps is not None:
        kernel = tuple(t.stop - t.start for t in taps)
        offset += sum(t.start * dilation[d] * s[2 + d] for d, t in enumerate(taps))
    patches = x.as_strided(
        (*x.shape[:2], *kernel, *out_size),
        (s[0], s[1], *(s[2 + d] * dilation[d] for d in range(dims)), *(s[2 + d] * stride[d] for d in range(dims))),
        offset,
    )
    n, c, k, length = x.shape[0], x.shape[1], math.prod(kernel), math.prod(out_size)
    if positions_first:  # [N, *out, C_in, *kernel]
        order = (0, *range(2 + dims, 2 + 2 * dims), 1, *range(2, 2 + dims))
        patches = patches.permute(order)
    # into a recyclable buffer: a fresh one of tens of MB faults its pages in on every step
    out = empty(patches.shape, like=x).copy_(patches)
    return out.view(n, length, c * k) if positions_first else out.view(n, c * k, length)


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(LayerRule):
    """Rules for zero-padded N-d convolutions (stride, dilation, groups, bias)."""

    def accepts(self, module: nn.Module) -> bool:
        # 'reflect', 'replicate', 'circular' pad before a valid convolution: the fallback serves them.
        return module.padding_mode == "zeros"

    def _patches(self, call: Operation) -> Tensor:
        """Per-group unfolded input, ``[N, G, C_in/G · K, L]`` (cached per backward)."""
        if call.scratch.conv_patches is None:
            x, padding, _ = _geometry(call)
            u = unfold(x, call.module, padding)
            call.scratch.conv_patches = rearrange(u, "n (g i) l -> n g i l", g=call.module.groups)
        return call.scratch.conv_patches

    @staticmethod
    def _through_live_taps(call: Operation, grad: Tensor, squared: bool) -> Optional[Tensor]:
        """The transposed convolution where each sample has one output position, as GEMMs.

        With one output position, tap ``k`` reads input position ``k·d - p`` (per spatial
        dimension): each input position is read by at most one tap, and only the live taps
        (:func:`live_taps`) read the input at all. The layer is then the linear map
        ``y = Σ_k W[:, :, k] x[k·d - p] + b`` (per group), as in the last stages of an
        ImageNet CNN on small images: ``J_xᵀ g`` is ``g W[:, :, live]`` (``W∘W`` if
        ``squared``) placed at the positions the taps read, zero elsewhere. ``None`` where
        an output holds more than one position or the padding is not symmetric.

        Args:
            call: The recorded call.
            grad: ``[B, C_out, 1, …]``.
            squared: Use ``W∘W``.

        Returns:
            ``[B, C_in, *in]``, or ``None``.
        """
        x, padding, pads = _geometry(call)
        out = call.output_shape
        if out is None or any(pads) or any(size != 1 for size in out[2:]):
            return None
        module, b = call.module, grad.shape[0]
        taps = live_taps(tuple(x.shape[2:]), module, padding)
        if any(t.stop == t.start for t in taps):  # every tap reads padding: nothing reaches x
            return grad.new_zeros((b, *x.shape[1:]))
        weight, g = module.weight.detach(), module.groups
        c_out = weight.shape[0]
        one_tap = all(t.stop - t.start == 1 for t in taps)
        if one_tap:  # W[:, :, k] (squared): the one tap's [C_out, C_in/G] entries
            weight = weight[(slice(None), slice(None), *(t.start for t in taps))]
            weight = weight.square() if squared else weight
        elif squared:
            # Several taps: all of them in one GEMM, the live ones picked after. Squaring the
            # whole W into a recycled buffer and a GEMM over every tap beat squaring the
            # strided slice of the live taps (512·256·3·3 at 2×2 taps: 0.5 ms against 0.9 ms).
            weight = _memory.square(weight, "conv_w_sq")
        if g == 1:
            back = torch.mm(grad.reshape(b, -1), weight.reshape(c_out, -1))
        else:
            back = torch.einsum("bgo,goi->bgi", grad.reshape(b, g, -1), weight.reshape(g, c_out // g, -1))
        if one_tap:
            back = back.reshape(b, x.shape[1], *(1 for _ in taps))
        else:
            back = back.reshape(b, x.shape[1], *module.kernel_size)[(slice(None), slice(None), *taps)]
        if back.shape[1:] == x.shape[1:]:  # the live taps read every input position
            return back.contiguous()
        full = grad.new_zeros((b, *x.shape[1:]))
        read = tuple(
            slice(t.start * d - p, (t.stop - 1) * d - p + 1, d) for t, d, p in zip(taps, module.dilation, padding)
        )
        full[(slice(None), slice(None), *read)] = back
        return full

    def _input_transpose(self, call: Operation, grad: Tensor, squared: bool = False) -> Tensor:
        """Transposed convolution of ``grad`` ``[B, C_out, *out]`` with ``W`` (``W∘W`` if ``squared``)
        back to input shape ``[B, C_in, *in]``."""
        module = call.module
        back = self._through_live_taps(call, grad, squared)
        if back is not None:
            return back
        # W∘W into a recycled buffer: a fresh one of a large layer faults its pages in every step
        weight = _memory.square(module.weight.detach(), "conv_w_sq") if squared else module.weight
        x, padding, pads = _geometry(call)
        # A transposed convolution; output_padding restores the input entries that the
        # stride skipped at the end. (torch.nn.grad.conv*_input passes a zero-stride dummy
        # input, which makes convolution_backward copy grad to channels-last first.)
        k, stride, dilation = module.kernel_size, module.stride, module.dilation
        extra = [
            x.shape[2 + i] + 2 * padding[i] - dilation[i] * (k[i] - 1) - 1 - (grad.shape[2 + i] - 1) * stride[i]
            for i in range(x.dim() - 2)
        ]
        back = _CONV_T[x.dim() - 2](grad, weight, None, stride, padding, extra, module.groups, dilation)
        return _crop(back, pads)

    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        v = mat.shape[0]
        back = self._input_transpose(call, mat.flatten(0, 1))
        return back.unflatten(0, (v, -1))

    def _weight_products(self, call: Operation, mat: Tensor) -> Tensor:
        """``J_Wᵀ m_vn = m_vn U_nᵀ`` per group, sample-major.

        Args:
            call: The recorded call.
            mat: ``[V, N, C_out, *out]``.

        Returns:
            ``[N, V, G, O, C_in/G·K]``.
        """
        g = call.module.groups
        patches = self._patches(call)  # [N, G, I, L]
        n, _, i, _ = patches.shape
        v = mat.shape[0]
        out = empty((n, v, g, mat.shape[2] // g, i), like=mat)
        if g == 1:
            # One GEMM per sample for all columns, [V·O, L] @ [L, I], straight into the
            # sample-major result: m is copied sample-major into a scratch buffer first.
            # (Per-column GEMMs into the strided slices out[:, v] ran one small GEMM per
            # sample through a temporary: 1.4–2× slower, whatever L and I.)
            o, length = mat.shape[2], patches.shape[-1]
            m = mat.flatten(3).transpose(0, 1)  # [N, V, O, L]; already in place when V = 1
            if not m.is_contiguous():
                m = _memory.scratch(m.shape, mat, "conv_columns").copy_(m)
            torch.bmm(m.view(n, v * o, length), patches[:, 0].transpose(1, 2), out=out.view(n, v * o, i))
        else:
            m = rearrange(mat.flatten(3), "v n (g o) l -> v n g o l", g=g)
            out.copy_(torch.einsum("vngol,ngil->nvgoi", m, patches))
        return out

    def param_jac_t_mat_prod(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        if name == "bias":
            return mat.flatten(3).sum(-1) if mat.dim() > 3 else mat
        # Sample-major buffer returned as a [V, N, *θ] view: contiguous batch Jacobians.
        prod = self._weight_products(call, mat)
        return prod.transpose(0, 1).reshape(*mat.shape[:2], *call.module.weight.shape)

    def position_factors(self, call: Operation, mat: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        if call.module.groups > 1:  # W is block-diagonal over the groups: no one Kronecker product
            return None
        if call.scratch.conv_patches is not None:
            patches = call.scratch.conv_patches[:, 0].transpose(1, 2)
        else:  # copied straight into rows: no [N, C_in·K, L] buffer to transpose
            if call.scratch.conv_rows is None:  # once for the weight and the bias (and every source)
                x, padding, _ = _geometry(call)
                call.scratch.conv_rows = unfold(x, call.module, padding, positions_first=True)
            patches = call.scratch.conv_rows
        return patches, mat.flatten(3).transpose(2, 3)  # [N, L, C_in·K] (a patch per output position), [V, N, L, C_out]

    def param_sq_sum(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        if name == "bias":
            return self.param_jac_t_mat_prod(call, name, mat).square().sum((0, 1))
        if call.module.groups > 1:
            return self.param_jac_t_mat_prod(call, name, mat).square_().sum((0, 1))
        # Σ_{v,n} (m_vn U_nᵀ)² with U_n the unfolded input [I, L]
        patches = self._patches(call)[:, 0]  # [N, I, L]
        total = sum_of_squared_products(mat.flatten(3), patches.transpose(1, 2))
        return total.reshape(call.module.weight.shape)

    def param_sq_norms(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        if name == "bias":
            return super().param_sq_norms(call, name, mat)
        g = call.module.groups
        patches = self._patches(call)  # [N, G, I, L]
        i, length = patches.shape[2:]
        v, o = mat.shape[0], mat.shape[2] // g
        if length * (v * o + i) >= v * o * i:  # the Gram matrices cost more than the products
            return super().param_sq_norms(call, name, mat)
        # ‖m U_nᵀ‖² = Σ_{l,l'} (m_lᵀ m_l')(U_lᵀ U_l') per group: two [L, L] Gram matrices per sample
        m = rearrange(mat.flatten(3), "v n (g o) l -> v n g o l", g=g)
        gram_u = torch.matmul(patches.transpose(2, 3), patches)  # [N, G, L, L]
        gram_m = torch.matmul(m.transpose(3, 4), m)  # [V, N, G, L, L]
        return torch.einsum("vngst,ngst->vn", gram_m, gram_u)

    def jvp(self, call: Operation, tangents: list[Optional[Tensor]], param_tangents: dict[str, Tensor]) -> list[Optional[Tensor]]:
        if len(tangents) != 1:
            return super().jvp(call, tangents, param_tangents)
        # dy = conv(dx, W) + conv(x, dW) + db, K columns at once
        module = call.module
        dx, d_w, d_b = tangents[0], param_tangents.get("weight"), param_tangents.get("bias")
        out = None
        if dx is not None:
            out = module._conv_forward(dx.flatten(0, 1), module.weight.detach(), None).unflatten(0, (dx.shape[0], -1))
        if d_w is not None:
            x = call.input.detach()
            k, o = d_w.shape[:2]
            if module.groups == 1:  # the K kernels as K·C_out output channels of one convolution
                y = module._conv_forward(x, d_w.flatten(0, 1), None)
                y = y.unflatten(1, (k, o)).transpose(0, 1)
            else:
                y = torch.stack([module._conv_forward(x, d_w[i], None) for i in range(k)])
            out = y if out is None else out.add_(y)
        if d_b is not None:
            k, o = d_b.shape
            shape = (k, 1, o, *[1] * (call.input.dim() - 2))
            out = d_b.reshape(shape).expand(k, *call.output_shape).clone() if out is None else out.add_(d_b.reshape(shape))
        return [out]

    def param_summed_products(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        module = call.module
        if name == "bias":
            return mat.flatten(3).sum((1, 3))
        # Σ_n m_vn U_nᵀ is the weight gradient of column v: no unfolded input
        x, padding, _ = _geometry(call)
        grad_weight = _GRAD_WEIGHT[x.dim() - 2]
        return torch.stack([
            grad_weight(x, module.weight.shape, mat[v], module.stride, padding, module.dilation, module.groups)
            for v in range(mat.shape[0])
        ])

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        return self._input_transpose(call, diag, squared=True)

    def param_diag(self, call: Operation, name: str, diag: Tensor) -> Tensor:
        if name == "bias":
            return diag.flatten(2).sum((0, 2))
        module = call.module
        if diag[0, 0].numel() <= _GEMM_POSITIONS:
            # Σ_{n,l} d[n, o, l] U[n, i, l]², one GEMM per group over the squared patches of
            # the live taps (the others read zero padding: their entries are zero; one
            # position in and out: the one tap that reads it)
            x, padding, _ = _geometry(call)
            taps = live_taps(tuple(x.shape[2:]), module, padding)
            every = all(t.stop - t.start == k for t, k in zip(taps, module.kernel_size))
            patches = self._patches(call) if every else rearrange(
                unfold(x, module, padding, taps=taps), "n (g i) l -> n g i l", g=module.groups
            )
            squares = _memory.square(patches, "conv_patches_sq")  # [N, G, I, L]
            d = rearrange(diag.flatten(2), "n (g o) l -> n g o l", g=module.groups)
            if every and module.groups == 1:  # [O, N·L] @ [N·L, I] into a recyclable result
                rows = rearrange(squares[:, 0], "n i l -> (n l) i")
                out = _memory.recyclable((d.shape[2], rows.shape[1]), diag)
                return torch.mm(rearrange(d[:, 0], "n o l -> o (n l)"), rows, out=out).view(module.weight.shape)
            at_taps = torch.einsum("ngol,ngil->goi", d, squares)
            if every:
                return at_taps.reshape(module.weight.shape)
            out = _memory.zeros(module.weight.shape, like=diag)
            out[(slice(None), slice(None), *taps)] = at_taps.reshape(*module.weight.shape[:2], *(t.stop - t.start for t in taps))
            return out
        x, padding, _ = _geometry(call)
        return _GRAD_WEIGHT[x.dim() - 2](
            _memory.square(x, "conv_x_sq"), module.weight.shape, diag, module.stride, padding, module.dilation, module.groups
        )


def _crop_to(t: Tensor, size: tuple[int, ...]) -> Tensor:
    """Keep the first ``size`` entries of the trailing dimensions of ``t``."""
    if tuple(t.shape[-len(size) :]) == tuple(size):
        return t
    return t[(Ellipsis, *(slice(0, s) for s in size))]


@register_rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
class ConvTransposeRule(LayerRule):
    """Rules for N-d transposed convolutions (stride, padding, output_padding, dilation, groups, bias).

    The weight has shape ``[C_in, C_out/G, *kernel]``.
    """

    def accepts(self, module: nn.Module) -> bool:
        return module.padding_mode == "zeros"

    @staticmethod
    def _taps(call: Operation, t: Tensor) -> Iterator[Tensor]:
        """For every kernel tap ``k`` (row-major), the entries of ``t`` that tap ``k`` writes.

        ``t`` is output-shaped, ``[*lead, C_out, *out]``; each view has shape
        ``[*lead, C_out, *in]`` and holds ``t[..., l·s + k·d - p]`` at input position
        ``l`` (zero outside the output). ``t`` is padded once; the views are strided slices.
        """
        module, x = call.module, call.input
        dims = x.dim() - 2
        in_size, out_size = x.shape[2:], t.shape[t.dim() - dims :]
        stride, dilation, padding, kernel = module.stride, module.dilation, module.padding, module.kernel_size
        pads: list[int] = []
        for j in reversed(range(dims)):  # F.pad lists the last dimension first
            needed = (in_size[j] - 1) * stride[j] + dilation[j] * (kernel[j] - 1) + 1
            pads += [padding[j], needed - padding[j] - out_size[j]]  # a negative width crops
        padded = F.pad(t, pads)
        for taps in itertools.product(*(range(k) for k in kernel)):
            index = tuple(
                slice(k * dilation[j], k * dilation[j] + (in_size[j] - 1) * stride[j] + 1, stride[j])
                for j, k in enumerate(taps)
            )
            yield padded[(Ellipsis, *index)]

    def _adjoint(self, call: Operation, weight: Tensor, grad: Tensor) -> Tensor:
        """Convolve ``grad`` ``[B, C_out, *out]`` with ``weight`` back to ``[B, C_in, *in]``."""
        module, x = call.module, call.input
        back = _CONV[x.dim() - 2](grad, weight, None, module.stride, module.padding, module.dilation, module.groups)
        return _crop_to(back, tuple(x.shape[2:]))

    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        back = self._adjoint(call, call.module.weight, mat.flatten(0, 1))
        return back.unflatten(0, mat.shape[:2])

    def _grouped_input(self, call: Operation) -> Tensor:
        """``x`` as ``[N, G, C_in/G, L_in]``."""
        return rearrange(call.input.detach().flatten(2), "n (g i) l -> n g i l", g=call.module.groups)

    def param_jac_t_mat_prod(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        if name == "bias":
            return mat.flatten(3).sum(-1)
        module = call.module
        g = module.groups
        x = self._grouped_input(call)
        v, n, (_, o) = mat.shape[0], mat.shape[1], module.weight.shape[:2]
        k = math.prod(module.kernel_size)
        out = mat.new_empty(v, n, g, x.shape[2], o, k)
        for tap, view in enumerate(self._taps(call, mat)):
            # J_Wᵀ m [i, o, k] = Σ_l x[i, l] m[o, l·s + k·d - p]
            m_k = rearrange(view, "v n (g o) ... -> v n g o (...)", g=g)
            out[..., tap] = torch.einsum("vngol,ngil->vngio", m_k, x)
        return out.reshape(v, n, *module.weight.shape)

    def param_sq_sum(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        prod = self.param_jac_t_mat_prod(call, name, mat)
        return prod.square_().sum((0, 1))  # one [V, N, *θ] buffer, squared in place

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        return self._adjoint(call, _memory.square(call.module.weight.detach(), "conv_w_sq"), diag)

    def param_diag(self, call: Operation, name: str, diag: Tensor) -> Tensor:
        if name == "bias":
            return diag.flatten(2).sum((0, 2))
        module = call.module
        g = module.groups
        x_sq = self._grouped_input(call).square()
        # every entry of J_W is one input value: Σ_{n,l} d[o, l·s + k·d - p] x[i, l]²
        taps = [
            torch.einsum("ngol,ngil->gio", rearrange(view, "n (g o) ... -> n g o (...)", g=g), x_sq)
            for view in self._taps(call, diag)
        ]
        return torch.stack(taps, -1).reshape(module.weight.shape)
