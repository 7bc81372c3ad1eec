"""Relative-position logits: timm's ``PosEmbedRel`` (BotNet's ``BottleneckAttn``, HaloNet's ``HaloAttn``).

The module maps queries ``q`` ``[N, …, P, d]`` (``P`` query positions of a ``H × W``
grid or block) to logits ``[N, …, P, K]`` over ``K`` key positions, from two tables
of relative offsets, ``R_w`` ``[2W' − 1, d]`` (``width_rel``) and ``R_h``
``[2H' − 1, d]`` (``height_rel``)::

    y[…, i, j] = q[…, i] · (R_w[ω(i, j)] + R_h[η(i, j)])

with integer offset tables ``ω``, ``η`` ``[L, K]`` (``L`` the flattened axes between the
batch and ``d``): for BotNet, ``ω = x_k − x_q + W − 1`` and ``η = y_k − y_q + H − 1``.
timm computes it with a pad-and-reshape skew per axis; the rule reads ``ω`` and ``η``
off the module itself, by running its ``forward`` on probes (``q = e_0``,
the first column of one table ``1, 2, …`` and everything else ``0``) at every call, and then checks
the closed form against the module at random probes in float64 (the map is bilinear, so a
match at random points proves the structure). A module that fails the check goes to
the exact ``torch.func`` fallback.

With ``E[i, j] = R_w[ω(i, j)] + R_h[η(i, j)]`` ``[L, K, d]`` and ``M_w`` the
backpropagated ``m`` summed over the keys of each offset (``M_w[i, r] = Σ_{j: ω(i,j)=r} m[i, j]``):

- ``J_qᵀ m = M_w R_w + M_h R_h``; ``diag(J_qᵀ D J_q)[i] = Σ_j d[i, j] E[i, j]²``;
- ``J_{R_w}ᵀ m = Σ_i M_w[i]ᵀ q[i]`` per sample; ``diag(J_{R_w}ᵀ D J_{R_w}) = Σ_{n,i} D_w[n, i]ᵀ q[n, i]²``
  (each logit reads one row of ``R_w``, so the diagonal needs no cross terms).

The module is one operation for DiagGGNApprox. It runs on the heads merged into the
batch axis (``[N·heads, HW, d]``), which the reverse walk follows row by row. Without
this rule its attention block went to the fallback: 34 s instead of 0.14 s for one
step of a 64 × 64 botnet26t.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from curvhook.records import Operation
from curvhook.rules.base import LayerRule
from curvhook.rules.registry import fallback_rule, register_rule_by_name

_TABLES = ("width_rel", "height_rel")


def _probe(call: Operation, q: Tensor, tables: dict[str, Tensor]) -> Tensor:
    """The module's own ``forward`` on probe values (its hooks bypassed), ``[n, L, K]``."""
    from curvhook.rules.fallback import _replay  # the fallback imports the registry

    out = _replay(call, tables, [q])
    return out.reshape(q.shape[0], -1, out.shape[-1])


def _read_offsets(call: Operation) -> Optional[tuple[Tensor, Tensor]]:
    """``ω`` and ``η`` ``[L, K]`` (long, on the CPU), or ``None`` where the module is no such map."""
    module, q = call.module, call.input
    sizes = {name: getattr(module, name).shape[0] for name in _TABLES}
    dim = q.shape[-1]  # (HaloNet's module reshapes to its own head size)
    probe = torch.zeros(1, *q.shape[1:], dtype=torch.float64)
    probe[..., 0] = 1
    one_dim = {}
    for name in _TABLES:
        tables = {t: torch.zeros(sizes[t], dim, dtype=torch.float64) for t in _TABLES}
        tables[name][:, 0] = torch.arange(1, sizes[name] + 1, dtype=torch.float64)
        index = _probe(call, probe, tables)[0].round().long() - 1
        if index.min() < 0 or index.max() >= sizes[name]:
            return None
        one_dim[name] = index
    omega, eta = one_dim["width_rel"], one_dim["height_rel"]
    # bilinear in (q, R_w, R_h): agreeing at random points in float64 proves the form
    gen = torch.Generator().manual_seed(0)
    q_r = torch.randn(2, *q.shape[1:], dtype=torch.float64, generator=gen)
    tables = {t: torch.randn(sizes[t], dim, dtype=torch.float64, generator=gen) for t in _TABLES}
    got = _probe(call, q_r, tables)
    edges = tables["width_rel"][omega] + tables["height_rel"][eta]  # [L, K, d]
    want = torch.einsum("nlc,lkc->nlk", q_r.reshape(2, -1, dim), edges)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-12, atol=1e-12):
        return None
    return omega, eta


def offsets(call: Operation) -> Optional[tuple[Tensor, Tensor]]:
    """``ω`` and ``η`` ``[L, K]`` on the query's device, or ``None`` for the fallback.

    Read for every call (and kept for its backward pass in the call's scratch): the module's
    ``forward`` may read more than its sizes (an attribute, a flag changed between steps), so
    offsets read off another module, or off this one at another step, prove nothing here.
    The probes are one and two queries of the call's shape, a fraction of the call itself.
    """
    try:
        found = _read_offsets(call)
    except Exception:  # noqa: BLE001 - a forward the probes do not fit: the fallback serves it
        return None
    return None if found is None else (found[0].to(call.input.device), found[1].to(call.input.device))


def _scatter(values: Tensor, index: Tensor, size: int) -> Tensor:
    """Sum ``values`` ``[…, L, K]`` over the keys of each offset: ``[…, L, size]``."""
    out = values.new_zeros(*values.shape[:-1], size)
    return out.scatter_add_(-1, index.expand(values.shape), values)


@register_rule_by_name("timm", "PosEmbedRel")
class RelativePositionLogitsRule(LayerRule):
    """timm's ``PosEmbedRel`` (see the module docstring)."""

    def accepts(self, module: nn.Module) -> bool:
        tables = [getattr(module, t, None) for t in _TABLES]
        return (
            all(isinstance(t, nn.Parameter) and t.dim() == 2 for t in tables)
            and tables[0].shape[1] == tables[1].shape[1]
            and {n for n, _ in module.named_parameters()} <= set(_TABLES)
        )

    def _terms(self, call: Operation) -> Optional[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]:
        """``q`` ``[N, L, d]``, ``ω``, ``η``, ``R_w``, ``R_h``, or ``None`` for the fallback."""
        cached = call.scratch.relative_logits
        if cached is not None:
            return cached or None
        found = offsets(call)
        if found is None:
            call.scratch.relative_logits = ()
            return None
        q = call.input.detach()
        q = q.reshape(q.shape[0], -1, q.shape[-1])
        r_w, r_h = (getattr(call.module, t).detach() for t in _TABLES)
        call.scratch.relative_logits = (q, *found, r_w, r_h)
        return call.scratch.relative_logits

    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        terms = self._terms(call)
        if terms is None:
            return fallback_rule().jac_t_mat_prod(call, mat)
        _, omega, eta, r_w, r_h = terms
        m = mat.reshape(*mat.shape[:2], *omega.shape)  # [V, N, L, K]
        pulled = _scatter(m, omega, r_w.shape[0]) @ r_w + _scatter(m, eta, r_h.shape[0]) @ r_h
        return pulled.reshape(*mat.shape[:2], *call.input.shape[1:])

    def param_jac_t_mat_prod(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        terms = self._terms(call)
        if terms is None:
            return fallback_rule().param_jac_t_mat_prod(call, name, mat)
        q, index, table = _parameter_terms(terms, name)
        m = mat.reshape(*mat.shape[:2], *index.shape)
        return torch.einsum("vnlr,nlc->vnrc", _scatter(m, index, table.shape[0]), q)

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        terms = self._terms(call)
        if terms is None:
            return fallback_rule().diag_jac_t_diag_jac(call, diag)
        _, omega, eta, r_w, r_h = terms
        edges_sq = (r_w[omega] + r_h[eta]).square()  # [L, K, d]
        d = diag.reshape(diag.shape[0], *omega.shape)
        return torch.einsum("nlk,lkc->nlc", d, edges_sq).reshape(call.input.shape)

    def param_diag(self, call: Operation, name: str, diag: Tensor) -> Tensor:
        terms = self._terms(call)
        if terms is None:
            return fallback_rule().param_diag(call, name, diag)
        q, index, table = _parameter_terms(terms, name)
        d = diag.reshape(diag.shape[0], *index.shape)
        return torch.einsum("nlr,nlc->rc", _scatter(d, index, table.shape[0]), q.square())


def _parameter_terms(terms: tuple[Tensor, ...], name: str) -> tuple[Tensor, Tensor, Tensor]:
    """``q``, then the offsets and the table of the parameter ``name``: (``ω``, ``R_w``) or (``η``, ``R_h``)."""
    q, omega, eta, r_w, r_h = terms
    return (q, omega, r_w) if name == "width_rel" else (q, eta, r_h)
