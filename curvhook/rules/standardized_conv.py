"""Weight-standardized convolutions: timm's ``StdConv2d`` (BiT ResNet-V2) and ``ScaledStdConv2d`` (NFNets),
Hugging Face's ``WeightStandardizedConv2d`` (BiT).

The layer is a convolution ``y = conv(x, W̃) + b`` whose kernel is standardized per
output channel ``o`` over its fan-in (``F = C_in/G · k_h · k_w`` entries ``w_o``)::

    ŵ_o = (w_o − mean(w_o)) / σ_o,   σ_o = √(var(w_o) + ε)   (biased variance, as
                                                            F.batch_norm in training mode)
    W̃_o = a_o ŵ_o,                   a_o = gain_o · scale    (ScaledStdConv2d; 1 for StdConv2d)

The input and bias products are the convolution's with ``W̃``
(:class:`~curvhook.rules.conv.ConvRule` on a stand-in module). The weight's Jacobian
is the convolution's times ``J_o = ∂W̃_o/∂w_o = (a_o/σ_o)(I − 11ᵀ/F − ŵ_o ŵ_oᵀ/F)``,
symmetric: a layer norm's backward per output channel. ``∂W̃_o/∂gain_o = scale · ŵ_o``.

DiagGGNApprox counts the layer as one operation, so the weight's diagonal is
``Σ_{n,p} d_{n,o,p} (J_o x_{n,p})²`` over the patches ``x_p`` at the output positions
``p``. With ``m_p = mean(x_p)`` and ``c_{o,p} = ŵ_o·x_p / F``,
``J_o x_p = (a_o/σ_o)(x_p − m_p 1 − c_{o,p} ŵ_o)``, whose square expands into three
weight-gradient convolutions (``Σ d x²``, ``Σ d m x``, ``Σ d c x``) and three sums.
Without this rule the layer went to the torch.func fallback, whose DiagGGNApprox
takes per-sample Jacobians of the whole layer (minutes, then out of memory, on an NFNet).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvhook.records import Operation
from curvhook.rules.base import LayerRule
from curvhook.rules.conv import _CONV, _GRAD_WEIGHT, ConvRule, _geometry
from curvhook.rules.registry import register_rule_by_name

_CONV_RULE = ConvRule()


class _Standardized:
    """``ŵ`` ``[O, F]``, ``σ`` and ``a`` ``[O, 1]`` of one call's module, and ``W̃`` in the weight's shape."""

    def __init__(self, module: nn.Module) -> None:
        w = module.weight.detach().flatten(1)
        var, mean = torch.var_mean(w, dim=1, correction=0, keepdim=True)
        self.sigma = (var + module.eps).sqrt()
        self.w_hat = (w - mean) / self.sigma
        gain = getattr(module, "gain", None)
        self.scale = float(getattr(module, "scale", 1.0)) if gain is not None else 1.0
        self.a = gain.detach().reshape(-1, 1) * self.scale if gain is not None else torch.ones_like(self.sigma)
        self.weight = (self.a * self.w_hat).view(module.weight.shape)

    def pull_back(self, g: Tensor) -> Tensor:
        """``J_oᵀ g_o`` (= ``J_o g_o``) for ``g`` ``[..., O, F]``: the gradient at ``W`` from that at ``W̃``."""
        g = g * self.a
        return (g - g.mean(-1, keepdim=True) - self.w_hat * (g * self.w_hat).mean(-1, keepdim=True)) / self.sigma


class _StandInCall:
    """The call as :class:`ConvRule` reads a plain convolution's, with the kernel ``W̃``."""

    def __init__(self, call: Operation, weight: Tensor) -> None:
        self._call = call
        m = call.module
        self.module = SimpleNamespace(
            weight=weight, bias=m.bias, groups=m.groups, kernel_size=m.kernel_size, stride=m.stride,
            dilation=m.dilation, padding=m.padding, padding_mode=m.padding_mode, _conv_forward=m._conv_forward,
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


@register_rule_by_name("timm", "StdConv2d", "ScaledStdConv2d")
@register_rule_by_name("transformers", "WeightStandardizedConv2d")
class StandardizedConvRule(LayerRule):
    """timm's and Hugging Face's weight-standardized convolutions (see the module docstring).

    Hugging Face's ``WeightStandardizedConv2d`` pads dynamically (``"SAME"`` padding with a
    stride) through a child module ``pad``; such a layer is not served (the fallback is).
    """

    def accepts(self, module: nn.Module) -> bool:
        w, gain = getattr(module, "weight", None), getattr(module, "gain", None)
        if not (
            isinstance(w, Tensor) and w.dim() == 4 and isinstance(getattr(module, "eps", None), float)
            and getattr(module, "padding_mode", None) == "zeros" and not isinstance(module.padding, str)
            and getattr(module, "pad", None) is None
        ):
            return False
        if type(module).__name__ == "ScaledStdConv2d":
            return (
                isinstance(gain, Tensor) and gain.shape == (w.shape[0], 1, 1, 1)
                and isinstance(getattr(module, "scale", None), float)
            )
        return gain is None

    @staticmethod
    def _parts(call: Operation) -> tuple[_Standardized, _StandInCall]:
        std = _Standardized(call.module)
        return std, _StandInCall(call, std.weight)

    # ------------------------------------------------------------- input
    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        return _CONV_RULE.jac_t_mat_prod(self._parts(call)[1], mat)

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        return _CONV_RULE.diag_jac_t_diag_jac(self._parts(call)[1], diag)

    # -------------------------------------------------------- parameters
    def _channel_products(self, call: Operation, std: _Standardized) -> Tensor:
        """``c`` ``[N, O, *out]``: ``ŵ_o·x_p / F`` at every output position."""
        x, padding, _ = _geometry(call)
        m = call.module
        return _CONV[2](x, std.w_hat.view(m.weight.shape), None, m.stride, padding, m.dilation, m.groups) / std.w_hat.shape[1]

    def param_jac_t_mat_prod(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        std, stand_in = self._parts(call)
        if name == "bias":
            return _CONV_RULE.param_jac_t_mat_prod(stand_in, "bias", mat)
        if name == "gain":  # Σ_p m_{o,p} · scale ŵ_o·x_p
            c = self._channel_products(call, std)
            f = std.w_hat.shape[1]
            out = torch.einsum("vnop,nop->vno", mat.flatten(3), c.flatten(2)) * (std.scale * f)
            return out.reshape(*out.shape, 1, 1, 1)
        tilde = _CONV_RULE.param_jac_t_mat_prod(stand_in, "weight", mat)  # [V, N, *W]
        return std.pull_back(tilde.flatten(3)).view(tilde.shape)

    def param_diag(self, call: Operation, name: str, diag: Tensor) -> Tensor:
        std, stand_in = self._parts(call)
        if name == "bias":
            return _CONV_RULE.param_diag(stand_in, "bias", diag)
        f = std.w_hat.shape[1]
        if name == "gain":
            c = self._channel_products(call, std)  # [N, O, *out]
            return (diag * c.square()).sum((0, 2, 3)).reshape(-1, 1, 1, 1) * (std.scale * f) ** 2
        m = call.module
        x, padding, _ = _geometry(call)
        # J_o x_p is unchanged where every entry of the patch moves by the same amount (ŵ_o sums
        # to zero): the zero padding made explicit, each sample is centred by its mean, so that
        # the expansion below does not cancel large terms (an input far from zero in float32)
        x = F.pad(x, [p for size in reversed(padding) for p in (size, size)])
        x = x - x.mean(dim=tuple(range(1, x.dim())), keepdim=True)
        padding = (0,) * len(padding)
        groups, out_channels = m.groups, m.weight.shape[0]
        c = _CONV[2](x, std.w_hat.view(m.weight.shape), None, m.stride, padding, m.dilation, groups) / f
        ones = x.new_full((groups, x.shape[1] // groups, *m.kernel_size), 1.0 / f)
        means = _CONV[2](x, ones, None, m.stride, padding, m.dilation, groups)  # [N, G, *out]: m_p
        means = means.repeat_interleave(out_channels // groups, dim=1)  # [N, O, *out]

        def weight_grad(inp: Tensor, grad: Tensor) -> Tensor:  # Σ_{n,p} grad_{n,o,p} inp_p, [O, F]
            return _GRAD_WEIGHT[2](inp, m.weight.shape, grad, m.stride, padding, m.dilation, groups).flatten(1)

        sq = weight_grad(x.square(), diag)  # Σ d x²
        cross_m = weight_grad(x, diag * means)  # Σ d m x
        cross_c = weight_grad(x, diag * c)  # Σ d c x
        sums = [(diag * t).sum((0, 2, 3)).unsqueeze(1) for t in (means.square(), c.square(), means * c)]
        w_hat = std.w_hat
        total = sq - 2 * cross_m + sums[0] + w_hat.square() * sums[1] - 2 * w_hat * cross_c + 2 * w_hat * sums[2]
        # a sum of squares: rounding of the expansion must not make it negative
        return (total.clamp_min(0) * (std.a / std.sigma).square()).view(m.weight.shape)

    # ------------------------------------------------------------ forward
    def jvp(self, call: Operation, tangents: list[Optional[Tensor]], param_tangents: dict[str, Tensor]) -> list[Optional[Tensor]]:
        std, stand_in = self._parts(call)
        mapped = {k: v for k, v in param_tangents.items() if k == "bias"}
        d_tilde = None
        if "weight" in param_tangents:
            dw = param_tangents["weight"]
            d_tilde = std.pull_back(dw.flatten(2)).view(dw.shape)
        if "gain" in param_tangents:
            dg = param_tangents["gain"].flatten(1).unsqueeze(-1) * std.scale  # [K, O, 1]
            from_gain = (dg * std.w_hat).view(-1, *call.module.weight.shape)
            d_tilde = from_gain if d_tilde is None else d_tilde + from_gain
        if d_tilde is not None:
            mapped["weight"] = d_tilde
        return _CONV_RULE.jvp(stand_in, tangents, mapped)
