"""Pooling: ``nn.MaxPool*``, ``nn.AdaptiveMaxPool*``, ``nn.AvgPool*``, ``nn.AdaptiveAvgPool*`` (1d, 2d, 3d).

Max pooling: each output entry copies one input entry, chosen by the indices
of the forward pass, so ``J`` has entries 0 and 1: ``J_xᵀ m`` scatter-adds ``m``
onto the chosen inputs (overlapping windows add up), and since ``J∘J = J`` the
diagonal rule is the same scatter. The indices are those the forward pass saved
for autograd when the module is one autograd operation (2d and 3d), else they
are recomputed from the stored input.

With padding, dilation and ``ceil_mode`` a window can lie entirely in the
padding (``MaxPool2d(2, 2, padding=1, dilation=2, ceil_mode=True)`` on a 1×1
map). Its output is the constant ``−inf``, so its row of ``J`` is zero, but
torch's index for it points outside the window, even outside the input. Such
entries are found from the geometry of the windows and get no pullback (exact
where what reaches them is zero, e.g. ``sigmoid(−inf)`` with slope 0); where a
nonzero or NaN value reaches one (a ``Linear`` after the pool gives NaN logits)
the rule raises ``UnsupportedModelError`` at the start of backward, before
torch's own max-pool backward writes through the out-of-range index.

Average pooling is linear: output ``o`` is ``c_o Σ_{i ∈ window(o)} x_i`` with one
coefficient ``c_o = 1/divisor_o`` per window (the divisor depends on the window
under ``count_include_pad=False``, ``ceil_mode`` and at adaptive boundaries).
``J_xᵀ m`` is the autograd transpose of the pooling, and

    diag(J_xᵀ diag(d) J_x)_i = Σ_o d_o J[o, i]² = Σ_{o ∋ i} d_o c_o² = (J_xᵀ (c ∘ d))_i,

the transpose applied to ``d`` scaled by the per-window coefficient.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvhook import _memory
from curvhook._torch_internals import saved_pooling_indices
from curvhook.errors import UnsupportedModelError
from curvhook.records import Operation
from curvhook.rules.linear_maps import columns_vjp, linear_vjp
from curvhook.rules.base import LayerRule, apply_node, is_single_node, one_column_by_node
from curvhook.rules.registry import register_rule

_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_ADAPTIVE_MAX = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}
_AVG = {2: F.avg_pool2d, 3: F.avg_pool3d}


@register_rule(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
class MaxPoolRule(LayerRule):
    """Rules for N-d max pooling (padding, dilation, ceil_mode)."""

    def accepts(self, module: nn.Module) -> bool:
        return not module.return_indices  # a tuple output is not one tensor

    @staticmethod
    def _compute_indices(call: Operation) -> Tensor:
        """Flat input index of each output entry, ``[N, C, *out]``."""
        m, x = call.module, call.input.detach()
        _, idx = _POOL[x.dim() - 2](
            x, m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode, return_indices=True
        )
        return idx

    def _empty_windows(self, call: Operation) -> Optional[Tensor]:
        """Output positions whose window lies entirely in the padding, ``[*out]`` (bool), or ``None``."""
        m, x = call.module, call.input
        dims = x.dim() - 2
        geometry = tuple(
            _as_tuple(a, dims) for a in (m.kernel_size, m.stride, m.padding, m.dilation)
        )
        empty = _empty_window_mask(tuple(x.shape[2:]), tuple(call.output_shape[2:]), *geometry)
        return None if empty is None else empty.to(x.device)

    def _indices(self, call: Operation) -> Tensor:
        """Flat input index of each output entry, ``[N, C, L_out]`` (cached per backward).

        The index of an empty window (:meth:`_empty_windows`) is set to 0: a valid
        position that only ever receives zeros (:meth:`_scatter` checks them).
        """
        if call.scratch.pool_indices is None:
            # The forward pass's own indices, saved on its autograd node (no second
            # pooling pass); 1d pooling adds a squeeze node and recomputes them.
            saved = _saved_indices(call)
            if saved is None or saved.shape != call.output_shape:
                saved = self._compute_indices(call)
            empty = self._empty_windows(call)
            if empty is not None:
                saved = saved.masked_fill(empty, 0)
            call.scratch.pool_indices = saved.flatten(2)
        return call.scratch.pool_indices

    def _refuse_values_at_empty_windows(self, call: Operation, values: Tensor) -> None:
        """Raise if a nonzero (or NaN) value reaches an output whose window is empty.

        Such an output is the constant ``−inf``: a model whose output depends on it
        with a nonzero slope has infinite or NaN values downstream.

        Args:
            call: The recorded call.
            values: ``[..., C, *out]``, columns or a diagonal at the output.
        """
        empty = self._empty_windows(call)
        if empty is None or not bool((values[..., empty] != 0).any()):
            return
        m = call.module
        raise UnsupportedModelError(
            f"Max pooling module {call.name!r} ({type(m).__name__}: kernel_size={m.kernel_size}, "
            f"stride={m.stride}, padding={m.padding}, dilation={m.dilation}, ceil_mode={m.ceil_mode}) "
            f"on an input of spatial size {tuple(call.input.shape[2:])} has windows that lie "
            "entirely in the padding: their output is -inf, and the model output depends on "
            "them (NaN or infinite values downstream, e.g. a Linear layer right after the pool). "
            "torch's own backward of such a pool writes outside its input. Choose padding, "
            "dilation and ceil_mode so that every window overlaps the input."
        )

    def _scatter(self, call: Operation, values: Tensor) -> Tensor:
        """Scatter-add ``[..., C, *out]`` onto ``[..., C, *in]``; leading dims broadcast the indices."""
        x = call.input
        self._refuse_values_at_empty_windows(call, values)
        lead = values.shape[: values.dim() - x.dim() + 1]  # (V, N) or (N,)
        indices = self._indices(call)
        idx = indices.expand(*lead, *indices.shape[1:])
        flat = values.reshape(*lead, x.shape[1], -1)
        out = _memory.zeros((*lead, x.shape[1], x[0, 0].numel()), like=flat)
        return out.scatter_add_(-1, idx, flat).reshape(*lead, *x.shape[1:])

    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        if self._empty_windows(call) is None:  # torch's pooling backward, where it indexes no empty window
            pulled = one_column_by_node(call, mat)
            if pulled is not None:
                return pulled
        return self._scatter(call, mat)

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        # Every output entry copies one input entry: J has 0/1 entries, so
        # Σ_o d_o J_oi² = (Jᵀ d)_i, which the module's own backward node computes
        # from its saved indices (no pooling pass to find them again), except
        # where a window is empty: torch's index there is out of range.
        if is_single_node(call) and self._empty_windows(call) is None:
            return apply_node(call.node, diag)
        return self._scatter(call, diag)


@register_rule(nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
class AdaptiveMaxPoolRule(MaxPoolRule):
    """Rules for N-d adaptive max pooling: the same scatter, with adaptive windows."""

    @staticmethod
    def _compute_indices(call: Operation) -> Tensor:
        x = call.input.detach()
        # ``output_size`` may hold ``None`` (keep that input size): resolve it from the input.
        size = tuple(
            s if s is not None else x.shape[2 + j]
            for j, s in enumerate(_as_tuple(call.module.output_size, x.dim() - 2))
        )
        _, idx = _ADAPTIVE_MAX[x.dim() - 2](x, size, return_indices=True)
        return idx

    def _empty_windows(self, call: Operation) -> Optional[Tensor]:
        return None  # adaptive windows always overlap the input


def _saved_indices(call: Operation) -> Optional[Tensor]:
    """The indices the pooling's autograd node saved, or ``None`` where there is none to read."""
    if not is_single_node(call):
        return None
    return saved_pooling_indices(call.node)


@lru_cache(maxsize=256)
def _empty_window_mask(
    size_in: tuple[int, ...], size_out: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...],
    padding: tuple[int, ...], dilation: tuple[int, ...],
) -> Optional[Tensor]:
    """Which windows of a max pooling contain no input position, ``[*out]`` (bool), or ``None``.

    Along axis ``j``, window ``o`` reads positions ``o·s − p + k·d`` for ``k < K``;
    it is empty if none lies in ``[0, L)``. A window is empty if it is empty
    along any axis (it is the product of its per-axis position sets).
    """
    empty = None
    for j, (length, count, k, s, p, d) in enumerate(zip(size_in, size_out, kernel, stride, padding, dilation)):
        taps = torch.arange(count)[:, None] * s - p + torch.arange(k)[None, :] * d  # [O_j, K_j]
        axis = ~((taps >= 0) & (taps < length)).any(1)
        axis = axis.reshape(*([1] * j), count, *([1] * (len(size_out) - j - 1)))
        empty = axis if empty is None else empty | axis
    if empty is None or not bool(empty.any()):
        return None
    return empty.expand(size_out).clone()


def _as_tuple(value, dims: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


class _AveragePoolRule(LayerRule):
    """Shared rules of the average poolings: transpose by autograd, coefficients per window."""

    def _coefficients(self, call: Operation, out_size: tuple[int, ...]) -> Tensor:
        """``c_o``, the weight every input of window ``o`` gets, ``[*out]``."""
        raise NotImplementedError

    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        return columns_vjp(call, mat)

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        if call.scratch.pool_coefficients is None:
            call.scratch.pool_coefficients = self._coefficients(call, tuple(diag.shape[2:]))
        return linear_vjp(call, diag * call.scratch.pool_coefficients)


@register_rule(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
class AvgPoolRule(_AveragePoolRule):
    """Rules for N-d average pooling (padding, ceil_mode, count_include_pad, divisor_override)."""

    def _coefficients(self, call: Operation, out_size: tuple[int, ...]) -> Tensor:
        # c_o = (Σ_i J[o, i]) / |window(o) ∩ input| : pool a ones tensor once as an average
        # (the module itself) and once as a plain sum (divisor 1) over the same windows.
        module, x = call.module, call.input
        dims = x.dim() - 2
        ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
        average = module.forward(ones)
        kernel, stride, padding = (_as_tuple(a, dims) for a in (module.kernel_size, module.stride, module.padding))
        if dims == 1:  # avg_pool1d has no divisor_override: pool [1, 1, 1, L] in 2d instead
            ones, kernel, stride, padding = ones.unsqueeze(2), (1, *kernel), (1, *stride), (0, *padding)
        count = _AVG[max(dims, 2)](ones, kernel, stride, padding, module.ceil_mode, True, 1)
        return (average / count.reshape(average.shape)).reshape(out_size)


@register_rule(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
class AdaptiveAvgPoolRule(_AveragePoolRule):
    """Rules for N-d adaptive average pooling."""

    def _coefficients(self, call: Operation, out_size: tuple[int, ...]) -> Tensor:
        # Window o_j along a dimension of input size L and output size O covers
        # [⌊o_j L / O⌋, ⌈(o_j + 1) L / O⌉); c_o = 1 / Π_j (window length along j).
        x = call.input
        lengths = []
        for size_in, size_out in zip(x.shape[2:], out_size):
            o = torch.arange(size_out, device=x.device)
            start = torch.div(o * size_in, size_out, rounding_mode="floor")
            end = torch.div((o + 1) * size_in + size_out - 1, size_out, rounding_mode="floor")
            lengths.append((end - start).to(x.dtype))
        count = math.prod(
            length.reshape(*([1] * j), -1, *([1] * (len(lengths) - j - 1))) for j, length in enumerate(lengths)
        )
        return 1.0 / count
