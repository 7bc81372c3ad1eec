"""Normalization layers: ``BatchNorm1d/2d/3d`` (eval mode), ``LayerNorm``, ``GroupNorm``,
``InstanceNorm1d/2d/3d``, ``RMSNorm``.

**BatchNorm with running statistics** is an affine map per channel,
``y = a_c x + b_c`` with ``a_c = γ_c / √(v_c + ε)`` and ``x̂ = (x - μ_c) / √(v_c + ε)``:
``J_xᵀ m = a ∘ m``, ``diag(J_xᵀ diag(d) J_x) = a² ∘ d``, ``J_γᵀ m = Σ_pos m ∘ x̂``,
``J_βᵀ m = Σ_pos m``. BatchNorm with batch statistics (train mode, or
``track_running_stats=False``) mixes samples and is rejected by the engine.

**LayerNorm, GroupNorm, InstanceNorm, RMSNorm** normalize groups of ``G`` entries of one sample.
For one group, with ``σ = √(Var(x) + ε)`` (biased variance) and ``x̂ = (x - mean(x)) / σ``,
``y_o = γ_o x̂_o + β_o`` and

    J[o, i] = (γ_o / σ) (δ_oi - 1/G - x̂_o x̂_i / G).

Then, with ``u = γ ∘ m``, ``J_xᵀ m = (u - mean(u) - x̂ mean(u ∘ x̂)) / σ``, and with
``e = γ² ∘ d`` and ``S_k = Σ_o e_o x̂_oᵏ``, squaring and summing over ``o`` gives

    Σ_o d_o J[o, i]² = (e_i (1 - 2 (1 + x̂_i²) / G) + (S_0 + 2 x̂_i S_1 + x̂_i² S_2) / G²) / σ²,

``O(G)`` per group, no ``[G, G]`` Jacobian. RMSNorm has ``r = √(mean(x²) + ε)``,
``x̂ = x / r`` and ``J[o, i] = (γ_o / r)(δ_oi - x̂_o x̂_i / G)``: the same formulas without the
mean terms, ``J_xᵀ m = (u - x̂ mean(u ∘ x̂)) / r`` and
``Σ_o d_o J[o, i]² = (e_i (1 - 2 x̂_i² / G) + x̂_i² S_2 / G²) / r²``.

These closed forms cancel where the sum is small against its terms (a group of one
or two entries, where ``J ≈ 0``): they could give ``-1e-14`` for a sum of squares.
Where the closed form is below ``1/16`` of the magnitude of its terms, the entry is
recomputed as the sum of non-negative terms ``Σ_o e_o (δ_oi - c_o)²`` itself
(``O(G)`` per such entry); elsewhere the closed form keeps at least the relative
precision ``16 G ε``, and so its sign.

For all of them the affine parameters are elementwise: ``J_γᵀ m = Σ m ∘ x̂`` and
``J_βᵀ m = Σ m`` over the positions that share the parameter entry, and
``Σ_n diag(J_γᵀ diag(d) J_γ) = Σ d ∘ x̂²``, ``Σ_n diag(J_βᵀ diag(d) J_β) = Σ d``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, Optional

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from curvhook import _memory
from curvhook._torch_internals import enable_torch_function, torch_function_mode_stack_empty
from curvhook.records import Operation
from curvhook.rules.base import LayerRule
from curvhook.rules.registry import fallback_rule, register_rule, register_rule_by_name


def _channel_shape(x: Tensor) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector against ``x[n]``: ``[C, 1, ..., 1]``."""
    return (x.shape[1], *([1] * (x.dim() - 2)))


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
class BatchNormRule(LayerRule):
    """BatchNorm that normalizes with its running statistics (eval mode)."""

    @staticmethod
    def _inv_std(call: Operation) -> Tensor:
        """``1 / √(v + ε)`` per channel, ``[C]``."""
        module = call.module
        return torch.rsqrt(module.running_var.to(call.input.dtype) + module.eps)

    def _scale(self, call: Operation) -> Tensor:
        """``a = γ / √(v + ε)`` shaped ``[C, 1, ...]`` (cached per backward)."""
        if call.scratch.bn_scale is None:
            scale = self._inv_std(call)
            if call.module.weight is not None:
                scale = scale * call.module.weight.detach()
            call.scratch.bn_scale = scale.reshape(_channel_shape(call.input))
        return call.scratch.bn_scale

    def _x_hat(self, call: Operation) -> Tensor:
        """``x̂`` ``[N, C, *]`` (cached per backward; only the matrix rules need it)."""
        if call.scratch.bn_x_hat is None:
            module, x = call.module, call.input.detach()
            shape = _channel_shape(x)
            mean = module.running_mean.to(x.dtype).reshape(shape)
            call.scratch.bn_x_hat = (x - mean) * self._inv_std(call).reshape(shape)
        return call.scratch.bn_x_hat

    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        return mat * self._scale(call)

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        return diag * self._scale(call).square()

    def param_jac_t_mat_prod(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        m = mat.flatten(3) if mat.dim() > 3 else mat.unsqueeze(-1)  # [V, N, C, L]
        if name == "bias":
            return m.sum(-1)
        x_hat = self._x_hat(call)
        return torch.einsum("vncl,ncl->vnc", m, x_hat.reshape(*x_hat.shape[:2], -1))

    def param_diag(self, call: Operation, name: str, diag: Tensor) -> Tensor:
        d = diag.reshape(*diag.shape[:2], -1)  # [N, C, L]
        if name == "bias":
            return d.sum((0, 2))
        # Σ_{n,l} d x̂² = (Σ_{n,l} d (x - μ)²) / (v + ε): in place in one scratch buffer and
        # one reduction (an einsum would copy both operands channel-major for a batched GEMM)
        module, x = call.module, call.input.detach()
        x = x.reshape(d.shape)
        centered = torch.sub(x, module.running_mean.to(x.dtype).unsqueeze(-1), out=_memory.scratch(d.shape, x, "bn_centered"))
        return centered.square_().mul_(d).sum((0, 2)).mul_(self._inv_std(call).square())


class _GroupNormalizationRule(LayerRule):
    """Shared rules of the per-sample normalizations.

    Subclasses describe how a sample splits into groups: ``_group`` maps a
    tensor ``[*lead, *sample]`` to ``[*lead, T, G]`` (``T`` groups of ``G``
    entries) and ``_ungroup`` back, and ``_gamma`` gives ``γ`` broadcast to
    ``[T, G]`` (or ``None``).
    """

    centered = True  # LayerNorm, GroupNorm subtract the mean; RMSNorm does not

    def _group(self, call: Operation, t: Tensor, lead: int) -> Tensor:
        raise NotImplementedError

    def _ungroup(self, call: Operation, t: Tensor, lead: int) -> Tensor:
        raise NotImplementedError

    def _gamma(self, call: Operation) -> Tensor | None:
        raise NotImplementedError

    def _eps(self, call: Operation, x: Tensor) -> float:
        return call.module.eps

    def _normalized(self, call: Operation) -> tuple[Tensor, Tensor]:
        """``x̂`` ``[N, T, G]`` and ``1/σ`` ``[N, T, 1]`` (cached per backward)."""
        if call.scratch.normalized is None:
            x = self._group(call, call.input.detach(), 1)
            if self.centered:
                x = x - x.mean(-1, keepdim=True)
            inv_std = torch.rsqrt(x.square().mean(-1, keepdim=True) + self._eps(call, x))
            call.scratch.normalized = (x * inv_std, inv_std)
        return call.scratch.normalized

    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        x_hat, inv_std = self._normalized(call)
        gamma = self._gamma(call)
        u = self._group(call, mat, 2)  # [V, N, T, G]
        if gamma is not None:
            u = u * gamma
        # (u - mean(u) - x̂ mean(u ∘ x̂)) / σ
        back = u - x_hat * (u * x_hat).mean(-1, keepdim=True)
        if self.centered:
            back = back - u.mean(-1, keepdim=True)
        return self._ungroup(call, back * inv_std, 2)

    def _x_hat_sq(self, call: Operation) -> Tensor:
        """``x̂ ∘ x̂``, ``[N, T, G]`` (cached per backward: the diagonals of input and weight share it)."""
        if call.scratch.x_hat_sq is None:
            call.scratch.x_hat_sq = self._normalized(call)[0].square()
        return call.scratch.x_hat_sq

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        x_hat, inv_std = self._normalized(call)
        x_sq = self._x_hat_sq(call)
        gamma = self._gamma(call)
        e = self._group(call, diag, 1)  # [N, T, G]
        if gamma is not None:
            e = e * gamma.square()
        size = e.shape[-1]
        rows = e.reshape(-1, 1, size)  # the sums over a group as batched dot products: no temporaries

        def group_dot(t: Tensor) -> Tensor:
            return torch.bmm(rows, t.reshape(-1, size, 1)).view(*e.shape[:-1], 1)

        s2 = group_dot(x_sq)
        if self.centered:
            # Σ_o e_o (δ_oi - 1/G - x̂_o x̂_i / G)²
            #   = e_i (1 - 2 (1 + x̂_i²) / G) + (Σ e + 2 x̂_i Σ e x̂ + x̂_i² Σ e x̂²) / G²
            s0, s1 = e.sum(-1, keepdim=True), group_dot(x_hat)
            back = torch.rsub(x_sq, 1 - 2 / size, alpha=2 / size).mul_(e)
            back.addcmul_(x_hat, s1, value=2 / size**2)
            back.add_(s0, alpha=1 / size**2)
        else:
            # Σ_o e_o (δ_oi - x̂_o x̂_i / G)² = e_i (1 - 2 x̂_i² / G) + x̂_i² Σ e x̂² / G²
            s0 = s1 = None
            back = torch.rsub(x_sq, 1, alpha=2 / size).mul_(e)
        back.addcmul_(x_sq, s2, value=1 / size**2)
        unstable = self._unstable_groups(x_sq, s0, s1, s2)
        if unstable is not None:
            self._recompute_cancelled(back, e, x_hat, x_sq, s2, s0, unstable)
        return self._ungroup(call, back.mul_(inv_std.square()), 1)

    def _unstable_groups(self, x_sq: Tensor, s0: Tensor | None, s1: Tensor | None, s2: Tensor) -> Tensor | None:
        """The groups where an entry of the closed form may have cancelled, ``[N, T]``; ``None``: none.

        Centered, the closed form is ``e_i a_i + q(x̂_i) / G²`` with ``a_i = 1 - 2 (1 + x̂_i²) / G``
        and ``q(x) = S_0 + 2 x S_1 + x² S_2 = Σ_o e_o (1 + x̂_o x)² ≥ 0``. Where
        ``2 (1 + x̂_i²) / G ≤ 1/2``, ``a_i ≥ 1/2``; where ``S_1² ≤ (9/16) S_0 S_2``,
        ``q(x) ≥ (S_0 + x² S_2) / 4`` (as ``2 |x S_1| ≤ (|S_1| / √(S_0 S_2)) (S_0 + x² S_2)``).
        Both terms then keep a quarter of their magnitude, so the entry is at least twice
        the ``mag / 16`` of :meth:`_suspects`: it is not recomputed. A group is stable when
        every entry has ``x̂_i² ≤ G/4 - 1`` and its sums pass the second test.
        Without centering, ``e_i (1 - 2 x̂_i² / G) + x̂_i² S_2 / G²`` needs ``x̂_i² ≤ G/4`` only.
        Wide groups pass (LayerNorm over 128 features: ``x̂² ≤ 31`` everywhere) and skip
        the entrywise bound; the few groups with an outlier (LayerNorm over 64 features of
        random activations: 16 of 262,144 entries) are bounded alone.

        Args:
            x_sq: ``x̂²`` ``[N, T, G]``.
            s0, s1: ``Σ_o e_o``, ``Σ_o e_o x̂_o`` ``[N, T, 1]`` (``None`` without centering).
            s2: ``Σ_o e_o x̂_o²`` ``[N, T, 1]``.
        """
        size = x_sq.shape[-1]
        limit = size / 4 - (1.0 if self.centered else 0.0)
        peak = x_sq.amax(-1)  # [N, T]
        spread = None if not self.centered else (s1.square() <= 0.5625 * s0 * s2).squeeze(-1)
        if float(peak.max()) <= limit and (spread is None or bool(spread.all())):  # NaN: not stable
            return None
        unstable = (peak <= limit).logical_not_()
        return unstable if spread is None else unstable.logical_or_(spread.logical_not_())

    def _recompute_cancelled(
        self, back: Tensor, e: Tensor, x_hat: Tensor, x_sq: Tensor, s2: Tensor, s0: Tensor | None, unstable: Tensor
    ) -> None:
        """Recompute, in place, the entries of ``back`` where the closed form may have cancelled.

        The closed form is ``Σ_o e_o (δ_oi - c_o)²`` expanded, with ``c_o = (1 + x̂_o x̂_i) / G``
        (``x̂_o x̂_i / G`` without centering). Where ``back ≤ mag / 16``, ``mag`` the size of
        its terms (:meth:`_suspects`), the entry is summed term by term: a sum of
        non-negative terms. Only the ``unstable`` groups can hold such entries
        (:meth:`_unstable_groups`); where they are few, the bound is computed on their
        rows alone instead of in ten passes over ``[N, T, G]``.

        Args:
            back: The closed form, ``[N, T, G]`` (before the ``1/σ²`` factor); changed in place.
            e: ``γ² ∘ d`` ``[N, T, G]``.
            x_hat: ``x̂`` ``[N, T, G]``.
            x_sq: ``x̂²`` ``[N, T, G]``.
            s2: ``S_2 = Σ_o e_o x̂_o²`` ``[N, T, 1]``.
            s0: ``S_0 = Σ_o e_o`` ``[N, T, 1]`` (``None`` without centering).
            unstable: The groups to bound, ``[N, T]`` boolean.
        """
        size = e.shape[-1]
        n, t = unstable.nonzero(as_tuple=True)
        if n.numel() * 8 > unstable.numel():  # many: whole-tensor passes are cheaper than gathers
            suspect = self._suspects(back, e, x_sq, s2, s0, size)
            if not bool(suspect.any()):
                return
            n, t, i = suspect.nonzero(as_tuple=True)
        else:
            keep = self._suspects(back[n, t], e[n, t], x_sq[n, t], s2[n, t], None if s0 is None else s0[n, t], size)
            rows, i = keep.nonzero(as_tuple=True)  # [F, G] rows of the unstable groups
            n, t = n[rows], t[rows]
        chunk = max(1, 2**22 // size)  # bounded memory: [chunk, G] temporaries
        for start in range(0, n.numel(), chunk):
            sl = slice(start, start + chunk)
            back[n[sl], t[sl], i[sl]] = self._exact_entries(e[n[sl], t[sl]], x_hat[n[sl], t[sl]], i[sl])

    def _suspects(self, back: Tensor, e: Tensor, x_sq: Tensor, s2: Tensor, s0: Tensor | None, size: int) -> Tensor:
        """Where the closed form ``back`` is at most ``1/16`` of the size of its terms, ``mag``.

        ``mag = e_i (1 + 2 (1 + x̂_i²) / G) + 2 (S_0 + x̂_i² S_2) / G²`` (as
        ``2 |x̂_i x̂_o| ≤ 1 + x̂_i² x̂_o²``), resp. ``e_i (1 + 2 x̂_i² / G) + x̂_i² S_2 / G²``.
        ``mag = 0``: every term is zero and so is ``back`` (a group that nothing reaches,
        such as the tokens after BERT's [CLS] in front of its pooler), not a suspect.

        Args:
            back, e, x_sq: Entries, ``[N, T, G]``, or the rows of some groups ``[F, G]``.
            s2, s0: Their groups' sums, ``[N, T, 1]`` resp. ``[F, 1]`` (``s0``: ``None``
                without centering).
            size: ``G``.

        Returns:
            A boolean mask of ``back``'s shape.
        """
        if self.centered:
            mag = torch.add(x_sq, 1).mul_(2 / size).add_(1).mul_(e)
            mag.add_(torch.addcmul(s0, x_sq, s2), alpha=2 / size**2)
        else:
            mag = torch.mul(x_sq, 2 / size).add_(1).mul_(e).addcmul_(x_sq, s2, value=1 / size**2)
        mag.mul_(1 / 16)
        return (back <= mag).logical_and_(mag > 0)

    def _exact_entries(self, e: Tensor, x_hat: Tensor, i: Tensor) -> Tensor:
        """``Σ_o e_o (δ_oi - c_o)²`` for ``F`` entries, each with its group's ``e``, ``x̂`` ``[F, G]``
        and its position ``i`` ``[F]`` in the group; returns ``[F]``."""
        size = e.shape[-1]
        rows = torch.arange(i.numel(), device=i.device)
        c = x_hat * x_hat[rows, i].unsqueeze(-1)  # x̂_o x̂_i
        if self.centered:
            c.add_(1)
        jac = c.mul_(-1 / size)
        jac[rows, i] += 1  # δ_oi - c_o: J[o, i] σ
        return jac.square_().mul_(e).sum(-1)

    # The affine parameters: the subclasses reduce ``m ∘ x̂`` / ``m`` over the shared positions.
    def _param_reduce(self, call: Operation, t: Tensor, lead: int) -> Tensor:
        """Sum ``[*lead, *sample]`` over the positions that share one parameter entry."""
        raise NotImplementedError

    def _x_hat(self, call: Operation) -> Tensor:
        """``x̂`` in the input's shape, ``[N, *sample]``."""
        return self._ungroup(call, self._normalized(call)[0], 1)

    def param_jac_t_mat_prod(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        if name == "bias":
            return self._param_reduce(call, mat, 2)
        return self._param_reduce(call, mat * self._x_hat(call), 2)

    def param_diag(self, call: Operation, name: str, diag: Tensor) -> Tensor:
        if name == "bias":
            return self._param_reduce(call, diag, 1).sum(0)
        x_sq = self._ungroup(call, self._x_hat_sq(call), 1)
        terms = torch.mul(diag, x_sq, out=_memory.scratch(diag.shape, diag, "normalization_weight_terms"))
        return self._param_reduce(call, terms, 1).sum(0)


@register_rule(nn.LayerNorm)
class LayerNormRule(_GroupNormalizationRule):
    """``nn.LayerNorm`` over the last ``len(normalized_shape)`` dims, with or without affine and bias."""

    def _dims(self, call: Operation) -> int:
        return len(call.module.normalized_shape)

    def _group(self, call: Operation, t: Tensor, lead: int) -> Tensor:
        # [*lead, *, *normalized] -> [*lead, T, G]
        return t.reshape(*t.shape[:lead], -1, math.prod(call.module.normalized_shape))

    def _ungroup(self, call: Operation, t: Tensor, lead: int) -> Tensor:
        return t.reshape(*t.shape[:lead], *call.input.shape[1:])

    def _gamma(self, call: Operation) -> Tensor | None:
        weight = call.module.weight
        return None if weight is None else weight.detach().flatten()

    def _param_reduce(self, call: Operation, t: Tensor, lead: int) -> Tensor:
        dims = self._dims(call)
        shared = tuple(range(lead, t.dim() - dims))  # the leading positions of the sample
        return t.sum(shared) if shared else t


@register_rule(nn.GroupNorm)
class GroupNormRule(_GroupNormalizationRule):
    """``nn.GroupNorm`` on ``[N, C, *]``: ``num_groups`` groups of ``C / num_groups`` channels."""

    @staticmethod
    def _num_groups(call: Operation) -> int:
        return call.module.num_groups

    def _group(self, call: Operation, t: Tensor, lead: int) -> Tensor:
        t = t.reshape(*t.shape[: lead + 1], -1)  # [*lead, C, L]
        return rearrange(t, "... (t c) l -> ... t (c l)", t=self._num_groups(call))

    def _ungroup(self, call: Operation, t: Tensor, lead: int) -> Tensor:
        c = call.input.shape[1] // self._num_groups(call)
        t = rearrange(t, "... t (c l) -> ... (t c) l", c=c)
        return t.reshape(*t.shape[:lead], *call.input.shape[1:])

    def _gamma(self, call: Operation) -> Tensor | None:
        weight = call.module.weight
        if weight is None:
            return None
        spatial = call.input[0, 0].numel()
        w = weight.detach()[:, None].expand(-1, spatial)  # [C, L]
        return rearrange(w, "(t c) l -> t (c l)", t=self._num_groups(call))

    def _param_reduce(self, call: Operation, t: Tensor, lead: int) -> Tensor:
        return t.reshape(*t.shape[: lead + 1], -1).sum(-1)  # over the spatial positions


_BATCH_NORM = BatchNormRule()


@register_rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
class InstanceNormRule(GroupNormRule):
    """``nn.InstanceNorm*`` on ``[N, C, *]``.

    With the statistics of the input (the default, and train mode) it is a
    GroupNorm with one group per channel; in eval mode with
    ``track_running_stats=True`` it is the per-channel affine map of BatchNorm.
    """

    @staticmethod
    def _num_groups(call: Operation) -> int:
        return call.input.shape[1]

    @staticmethod
    def _running(call: Operation) -> bool:
        return call.module.track_running_stats and not call.training

    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        if self._running(call):
            return _BATCH_NORM.jac_t_mat_prod(call, mat)
        return super().jac_t_mat_prod(call, mat)

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        if self._running(call):
            return _BATCH_NORM.diag_jac_t_diag_jac(call, diag)
        return super().diag_jac_t_diag_jac(call, diag)

    def param_jac_t_mat_prod(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        if self._running(call):
            return _BATCH_NORM.param_jac_t_mat_prod(call, name, mat)
        return super().param_jac_t_mat_prod(call, name, mat)

    def param_diag(self, call: Operation, name: str, diag: Tensor) -> Tensor:
        if self._running(call):
            return _BATCH_NORM.param_diag(call, name, diag)
        return super().param_diag(call, name, diag)


@register_rule(nn.RMSNorm)
class RMSNormRule(LayerNormRule):
    """``nn.RMSNorm`` over the last ``len(normalized_shape)`` dims, with or without weight."""

    centered = False

    def _eps(self, call: Operation, x: Tensor) -> float:
        eps = call.module.eps
        if eps is None:  # torch uses the epsilon of the computation type
            dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
            eps = torch.finfo(dtype).eps
        return eps


class _RMSNormCall:
    """A call of Hugging Face's ``LlamaRMSNorm`` as :class:`RMSNormRule` reads an ``nn.RMSNorm`` call
    (of weight ``weight`` and ``eps``, by default the module's ``weight`` and ``variance_epsilon``)."""

    def __init__(
        self, call: Operation, weight: Optional[Tensor] = None, eps: Optional[float] = None, weightless: bool = False,
    ) -> None:
        self._call = call
        m = call.module
        weight = None if weightless else m.weight if weight is None else weight
        self.module = SimpleNamespace(
            weight=weight, normalized_shape=(call.input.shape[-1],),
            eps=m.variance_epsilon if eps is None else eps, bias=None,
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


@register_rule_by_name("transformers", "LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "T5LayerNorm")
class HFRMSNormRule(RMSNormRule):
    """``w ∘ x / √(mean(x²) + ε)`` over the last axis (``LlamaRMSNorm``, weight ``[E]``, ``variance_epsilon``).

    The module computes in float32 and casts back; its derivative is that of
    ``nn.RMSNorm`` (exact up to that rounding in a float64 model).
    """

    def accepts(self, module: nn.Module) -> bool:
        w = getattr(module, "weight", None)
        return isinstance(w, Tensor) and w.dim() == 1 and isinstance(getattr(module, "variance_epsilon", None), float)

    call_view = _RMSNormCall

    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        return super().jac_t_mat_prod(self.call_view(call), mat)

    def param_jac_t_mat_prod(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        return super().param_jac_t_mat_prod(self.call_view(call), name, mat)

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        return super().diag_jac_t_diag_jac(self.call_view(call), diag)

    def param_diag(self, call: Operation, name: str, diag: Tensor) -> Tensor:
        return super().param_diag(self.call_view(call), name, diag)


class _OffsetRMSNormCall(_RMSNormCall):
    """A call of Gemma's ``GemmaRMSNorm`` (``x̂ ∘ (1 + w)``, ``eps``) as :class:`RMSNormRule` reads an
    ``nn.RMSNorm`` call of weight ``1 + w``; ``∂y/∂w = x̂``, as for ``nn.RMSNorm``'s weight."""

    def __init__(self, call: Operation) -> None:
        super().__init__(call, 1 + call.module.weight.detach(), call.module.eps)


@register_rule_by_name("transformers", "GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm")
class OffsetRMSNormRule(HFRMSNormRule):
    """``(1 + w) ∘ x / √(mean(x²) + ε)`` over the last axis (Gemma's ``GemmaRMSNorm``, weight ``[E]``
    stored as an offset from one, ``eps``): :class:`HFRMSNormRule` with the weight ``1 + w``."""

    call_view = _OffsetRMSNormCall

    def accepts(self, module: nn.Module) -> bool:
        w = getattr(module, "weight", None)
        return isinstance(w, Tensor) and w.dim() == 1 and isinstance(getattr(module, "eps", None), float)


# The maps a probed norm may compute over the last axis (x̂: x / √(mean(x²) + ε), or x − mean(x)
# over the standard deviation where centred): the rule that serves it, and its weight as read
# from the module's w.
_PROBED_FORMS = (
    ("w ∘ x̂ (Llama)", False, lambda w: w),
    ("(1 + w) ∘ x̂ (Gemma)", False, lambda w: 1 + w),
    ("w ∘ (x − μ)/σ (Cohere's LayerNorm without bias)", True, lambda w: w),
)


def _norm_form(call: Operation) -> Optional[int]:
    """Which of :data:`_PROBED_FORMS` a call of a norm-like module computes, proven on probes,
    or ``None`` (the fallback serves the call).

    The module's own ``forward`` (its hooks bypassed) runs on two random inputs of the call's
    shape, one of unit scale and one of scale ``√ε`` (where ``ε`` decides the result), with a
    random float64 weight, and must agree with the form to float64 rounding, or to float32
    rounding where the module rounds its input to float32 (most of transformers' do). Any other
    map (a norm over groups, a bias, another ε) is ``None``. Kept in the call's scratch for its
    backward pass; read again for every call, as the module's ``forward`` may read attributes
    that change between steps.
    """
    if call.scratch.norm_form is not None:
        return call.scratch.norm_form if call.scratch.norm_form >= 0 else None
    try:
        form = _probe_norm_form(call)
    except Exception:  # noqa: BLE001 - a forward the probes do not fit: the fallback serves it
        form = None
    call.scratch.norm_form = -1 if form is None else form
    return form


def _tensors(obj: Any) -> list[Tensor]:
    """The tensors in a function's arguments or results (nested tuples, lists, dicts)."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


class _RoundingWatch(TorchFunctionMode):
    """Notes whether a torch function called under it rounds float64 data: a float64 tensor
    among its arguments and a floating result below float64 (``x.to(torch.float32)``,
    ``softmax(x, dtype=torch.float)``). A float32 constant made from numbers
    (``torch.tensor(eps)``) or a float32 buffer that float64 data promotes rounds nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.rounded = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.rounded and any(t.dtype == torch.float64 for t in _tensors((args, kwargs))):
            self.rounded = any(t.is_floating_point() and t.dtype != torch.float64 for t in _tensors(out))
        return out


def _probe_norm_form(call: Operation) -> Optional[int]:
    from curvhook.rules.fallback import _replay  # the fallback imports the registry

    module, x = call.module, call.input
    eps = _hf_eps(module)
    gen = torch.Generator().manual_seed(0)
    unit = torch.randn(1, *x.shape[1:], dtype=torch.float64, generator=gen)
    probe = torch.cat([unit, unit * math.sqrt(eps)]).to(x.device)
    weightless = _weightless(module)
    weight = torch.randn(x.shape[-1:], dtype=torch.float64, generator=gen).to(x.device)
    params = {} if weightless else {"weight": weight}
    watch = _RoundingWatch()
    if torch_function_mode_stack_empty():  # (the backward walk runs with torch functions disabled)
        with enable_torch_function(), watch:
            got = _replay(call, params, [probe]).to(torch.float64)
    else:  # a mode of curvhook's would record what the watch passes on: no watch
        got = _replay(call, params, [probe]).to(torch.float64)
    # float64 throughout: agreement to float64 rounding. Only a module that rounds to float32
    # on the way (most of transformers' do: the input, or only the mean square as mT5's
    # ``MT5LayerNorm``) gets float32's tolerance: a map within 1e-5 of a form is otherwise no
    # proof (an unbiased variance differs from the biased one by a factor D / (D − 1), 6e-5 at
    # D = 8192; the review of session 45). A rounding is seen as a float32 result of a torch
    # function inside the forward, or as an output unmoved by a change below float32's
    # resolution (a few entries near a rounding midpoint move: one in 2^16 for a 2^-40 nudge).
    nudged = _replay(call, params, [probe * (1 + 2.0**-40)]).to(torch.float64)
    rounds = watch.rounded or (nudged.shape == got.shape and (nudged == got).double().mean() > 0.99)
    rtol = 1e-5 if rounds else 1e-10
    for index, (_, centered, scale) in enumerate(_PROBED_FORMS):
        if weightless and index not in _WEIGHTLESS_FORMS:
            continue
        z = probe - probe.mean(-1, keepdim=True) if centered else probe
        want = (1 if weightless else scale(weight)) * z * torch.rsqrt(z.square().mean(-1, keepdim=True) + eps)
        if got.shape == want.shape and torch.allclose(got, want, rtol=rtol, atol=rtol * float(want.abs().max())):
            return index
    return None


# The forms a module without a weight may compute (Llama 4's ``Llama4TextWeightlessRMSNorm``,
# its queries' and keys' L2 norm): x̂, and (x − μ)/σ.
_WEIGHTLESS_FORMS = (0, 2)


def _weightless(module: nn.Module) -> bool:
    return next(module.parameters(), None) is None and getattr(module, "weight", None) is None


def _hf_eps(module: nn.Module) -> float:
    """The module's ``variance_epsilon`` (Llama's name) or ``eps``."""
    eps = getattr(module, "variance_epsilon", None)
    return eps if isinstance(eps, float) else module.eps


_SERVING = (RMSNormRule(), LayerNormRule())  # (plain instances: the registry keeps its own)


@register_rule_by_name("transformers", "*RMSNorm", "*LayerNorm")
class ProbedNormRule(LayerRule):
    """transformers' other ``…RMSNorm`` and ``…LayerNorm`` classes: about 150 copies of
    ``LlamaRMSNorm`` (``MixtralRMSNorm``, ``Phi3RMSNorm``, ``OlmoRMSNorm``, …), a few of Gemma's
    offset form, and Cohere's ``CohereLayerNorm`` (centred, no bias).

    A module of the expected attributes (a 1-d ``weight``, its only parameter, or no parameter
    nor ``weight`` at all (Llama 4's ``Llama4TextWeightlessRMSNorm``), and a float
    ``variance_epsilon`` or ``eps``) gets the closed form of ``nn.RMSNorm`` or ``nn.LayerNorm``
    once probes of its ``forward`` prove which form it computes (:func:`_norm_form`); a call
    that fits none goes to the fallback. Exact up to the float32 rounding inside such modules.
    """

    def accepts(self, module: nn.Module) -> bool:
        w = getattr(module, "weight", None)
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if not (isinstance(eps, float) and eps > 0):
            return False
        if _weightless(module):
            return True
        return (
            isinstance(w, nn.Parameter) and w.dim() == 1
            and {n for n, _ in module.named_parameters()} == {"weight"}
        )

    @staticmethod
    def _serving(call: Operation) -> Optional[tuple[LayerRule, _RMSNormCall]]:
        """The rule of the proven form and the call as an ``nn.RMSNorm``/``nn.LayerNorm`` call."""
        form = _norm_form(call)
        if form is None:
            return None
        _, centered, scale = _PROBED_FORMS[form]
        if _weightless(call.module):
            view = _RMSNormCall(call, eps=_hf_eps(call.module), weightless=True)
        else:
            view = _RMSNormCall(call, scale(call.module.weight.detach()), _hf_eps(call.module))
        return _SERVING[1 if centered else 0], view

    def _delegate(self, method: str, call: Operation, *args: Any) -> Tensor:
        """``method`` of the proven form's rule on the call's view, or of the fallback."""
        serving = self._serving(call)
        if serving is None:
            return getattr(fallback_rule(), method)(call, *args)
        return getattr(serving[0], method)(serving[1], *args)

    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        return self._delegate("jac_t_mat_prod", call, mat)

    def param_jac_t_mat_prod(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        return self._delegate("param_jac_t_mat_prod", call, name, mat)

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        return self._delegate("diag_jac_t_diag_jac", call, diag)

    def param_diag(self, call: Operation, name: str, diag: Tensor) -> Tensor:
        return self._delegate("param_diag", call, name, diag)


class _ChannelRMSNormCall(_RMSNormCall):
    """A call of timm's ``RmsNorm2d`` (``[N, C, *spatial]``, normalized over ``C``) as
    :class:`RMSNormRule` reads an ``nn.RMSNorm`` call on ``x.movedim(1, -1)``. (No autograd
    node: the call's own is channels-first.)"""

    node = output = None

    def __init__(self, call: Operation) -> None:
        self._call = call
        m = call.module
        self.input = call.input.movedim(1, -1)
        self.module = SimpleNamespace(weight=m.weight, normalized_shape=(call.input.shape[1],), eps=m.eps, bias=None)


@register_rule_by_name("timm", "RmsNorm2d", "RmsNorm2dFp32")
class ChannelRMSNormRule(RMSNormRule):
    """timm's ``RmsNorm2d``: ``w_c x_c / √(mean_c(x²) + ε)`` over the channel axis at every
    position (MobileNetV5, Gemma 3n's vision tower): :class:`RMSNormRule` on the channels-last
    view. ``RmsNorm2dFp32`` computes in float32 and casts back (exact up to that rounding).
    Before session 44, the fallback's per-sample Jacobians: a DiagGGNApprox step of
    mobilenetv5_base at 64×64 ran past 4 minutes (0.55 s plain)."""

    def accepts(self, module: nn.Module) -> bool:
        w = getattr(module, "weight", None)
        return (
            tuple(getattr(module, "normalized_shape", ())) != () and len(module.normalized_shape) == 1
            and isinstance(getattr(module, "eps", None), float) and not getattr(module, "_fast_norm", False)
            and (w is None or (isinstance(w, Tensor) and w.dim() == 1))
            and {n for n, _ in module.named_parameters()} <= {"weight"}
        )

    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        return super().jac_t_mat_prod(_ChannelRMSNormCall(call), mat.movedim(2, -1)).movedim(-1, 2)

    def param_jac_t_mat_prod(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        return super().param_jac_t_mat_prod(_ChannelRMSNormCall(call), name, mat.movedim(2, -1))

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        return super().diag_jac_t_diag_jac(_ChannelRMSNormCall(call), diag.movedim(1, -1)).movedim(-1, 1)

    def param_diag(self, call: Operation, name: str, diag: Tensor) -> Tensor:
        return super().param_diag(_ChannelRMSNormCall(call), name, diag.movedim(1, -1))


@register_rule_by_name("timm", "GlobalResponseNorm")
class GlobalResponseNormRule(LayerRule):
    """timm's ``GlobalResponseNorm`` (ConvNeXt V2): per sample and channel ``c``,
    ``y_pc = x_pc (1 + γ_c N_c) + β_c`` with ``N_c = G_c / M``, ``G_c = ‖x_:c‖`` over the
    ``P`` positions and ``M = mean_c G_c + ε``.

    With ``u = x / G``, ``a = 1 + γ N``, ``s = γ / M``, ``t = γ G / (M² C)``:
    ``J_(pc),(qc') = δ_cc' (δ_pq a_c + s_c x_pc u_qc) − t_c x_pc u_qc'``, so
    ``Jᵀ m = m a + u (s A − Σ_c t_c A_c)`` with ``A_c = Σ_p m_pc x_pc``, and, with
    ``r = s − t``,
    ``Σ d J² = d_q (a + r x_q u_q)² + r² u_q² Σ_{p≠q} d_p x_p² + u_q² Σ_{c''≠c} t² Σ_p d x²``:
    non-negative terms, the sums over others from exclusive sums (nothing cancels).
    The module is one operation (its whole Jacobian, not its operations). Inputs that
    are not 4-d (timm's module runs on more axes) go to the exact generic fallback.
    """

    def accepts(self, module: nn.Module) -> bool:
        return (tuple(getattr(module, "spatial_dim", ())), getattr(module, "channel_dim", None)) in (
            ((1, 2), -1), ((2, 3), 1),
        ) and isinstance(getattr(module, "eps", None), float)

    @staticmethod
    def _channels_last(module: nn.Module, t: Tensor, lead: int) -> Tensor:
        """``[*lead, N, …] → [*lead, N, P, C]`` (``lead`` leading axes before the batch axis)."""
        if module.channel_dim == 1:
            t = t.movedim(lead + 1, -1)
        return t.flatten(lead + 1, lead + 2)

    @staticmethod
    def _back(module: nn.Module, t: Tensor, shape: torch.Size, lead: int) -> Tensor:
        """The inverse of :meth:`_channels_last`, to ``[*lead, *shape]``."""
        if module.channel_dim == 1:
            n, c, h, w = shape
            return t.unflatten(lead + 1, (h, w)).movedim(-1, lead + 1)
        return t.reshape(*t.shape[:lead], *shape)

    def _terms(self, call: Operation) -> tuple[Tensor, ...]:
        """``x`` ``[N, P, C]``, ``u``, ``N_c``, ``a``, ``s``, ``t`` (``[N, 1, C]``), cached per pass."""
        cached = call.scratch.grn
        if cached is not None:
            return cached
        m = call.module
        x = self._channels_last(m, call.input.detach(), 0)
        g = torch.linalg.vector_norm(x, dim=1, keepdim=True)  # [N, 1, C]
        big_m = g.mean(-1, keepdim=True) + m.eps  # [N, 1, 1]
        gamma = m.weight.detach()
        u = torch.where(g > 0, x / g.clamp_min(torch.finfo(x.dtype).tiny), 0.0)
        norm = g / big_m
        a, s = 1 + gamma * norm, gamma / big_m
        t = gamma * g / (big_m.square() * x.shape[-1])
        call.scratch.grn = (x, u, norm, a, s, t)
        return call.scratch.grn

    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        if call.input.dim() != 4:
            return fallback_rule().jac_t_mat_prod(call, mat)
        x, u, _, a, s, t = self._terms(call)
        m = self._channels_last(call.module, mat, 1)  # [V, N, P, C]
        big_a = (m * x).sum(2, keepdim=True)  # [V, N, 1, C]
        pulled = m * a + u * (s * big_a - (t * big_a).sum(-1, keepdim=True))
        return self._back(call.module, pulled, call.input.shape, 1)

    def param_jac_t_mat_prod(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        if call.input.dim() != 4:
            return fallback_rule().param_jac_t_mat_prod(call, name, mat)
        x, _, norm, _, _, _ = self._terms(call)
        m = self._channels_last(call.module, mat, 1)
        if name == "bias":
            return m.sum(2)
        return (m * x).sum(2) * norm[:, 0]

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        if call.input.dim() != 4:
            return fallback_rule().diag_jac_t_diag_jac(call, diag)
        from curvhook.rules.tensor_ops import sum_of_others

        x, u, _, a, s, t = self._terms(call)
        d = self._channels_last(call.module, diag, 0)  # [N, P, C]
        r = s - t
        dx2 = d * x.square()
        own = d * (a + r * x * u).square() + (r * u).square() * sum_of_others(dx2, 1)
        cross = u.square() * sum_of_others(t.square() * dx2.sum(1, keepdim=True), 2)
        return self._back(call.module, own + cross, call.input.shape, 0)

    def param_diag(self, call: Operation, name: str, diag: Tensor) -> Tensor:
        if call.input.dim() != 4:
            return fallback_rule().param_diag(call, name, diag)
        x, _, norm, _, _, _ = self._terms(call)
        d = self._channels_last(call.module, diag, 0)
        if name == "bias":
            return d.sum((0, 1))
        return (d * x.square()).sum(1).mul(norm[:, 0].square()).sum(0)


class _HFGlobalResponseNormCall:
    """A call of Hugging Face's ``ConvNextV2GRN`` (channels last ``[N, H, W, C]``, weight and bias
    ``[1, 1, 1, C]``, ε = 1e-6 written into its ``forward``) as :class:`GlobalResponseNormRule`
    reads a call of timm's ``GlobalResponseNorm``: the same map."""

    def __init__(self, call: Operation) -> None:
        self._call = call
        m = call.module
        self.module = SimpleNamespace(
            spatial_dim=(1, 2), channel_dim=-1, eps=1e-6, weight=m.weight.reshape(-1), bias=m.bias.reshape(-1)
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


@register_rule_by_name("transformers", "ConvNextV2GRN")
class HFGlobalResponseNormRule(GlobalResponseNormRule):
    """Hugging Face's ``ConvNextV2GRN``: :class:`GlobalResponseNormRule` on the call's view
    (:class:`_HFGlobalResponseNormCall`), the parameters' results in their ``[1, 1, 1, C]`` shape."""

    def accepts(self, module: nn.Module) -> bool:
        w, b = getattr(module, "weight", None), getattr(module, "bias", None)
        return (
            isinstance(w, Tensor) and isinstance(b, Tensor) and w.dim() == 4 and tuple(w.shape[:3]) == (1, 1, 1)
            and b.shape == w.shape and {n for n, _ in module.named_parameters()} == {"weight", "bias"}
        )

    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        if call.input.dim() != 4:
            return fallback_rule().jac_t_mat_prod(call, mat)
        return super().jac_t_mat_prod(_HFGlobalResponseNormCall(call), mat)

    def param_jac_t_mat_prod(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        if call.input.dim() != 4:
            return fallback_rule().param_jac_t_mat_prod(call, name, mat)
        out = super().param_jac_t_mat_prod(_HFGlobalResponseNormCall(call), name, mat)  # [V, N, C]
        return out.reshape(*out.shape[:2], 1, 1, 1, out.shape[-1])

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        if call.input.dim() != 4:
            return fallback_rule().diag_jac_t_diag_jac(call, diag)
        return super().diag_jac_t_diag_jac(_HFGlobalResponseNormCall(call), diag)

    def param_diag(self, call: Operation, name: str, diag: Tensor) -> Tensor:
        if call.input.dim() != 4:
            return fallback_rule().param_diag(call, name, diag)
        return super().param_diag(_HFGlobalResponseNormCall(call), name, diag).reshape(1, 1, 1, -1)
