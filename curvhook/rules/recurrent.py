"""``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` (``batch_first=True``): exact rules for the first output.

The rule runs the recurrence again with tensor ops, batched over the samples
(a loop over time steps, none over samples), and differentiates it with
``torch.func.vjp``; the pullback is batched over the ``V`` columns by ``vmap``.
It never calls the fused ``_VF`` kernel, so float32 works on CPU as in float64.

Notation (one layer ``k``, one direction; ``x_t`` the layer input, ``h_{t-1}``
the state before step ``t`` in processing order, ``G`` gates of size ``H``)::

    a_t = x_t W_ihᵀ + b_ih + εa_t        c_t = h_{t-1} W_hhᵀ + b_hh + εc_t
    LSTM: i, f, g, o = σ, σ, tanh, σ of (a_t + c_t);  s_t = f s_{t-1} + i g
          u_t = o tanh(s_t);  h_t = u_t W_hrᵀ + εp_t (proj_size) or u_t
    GRU:  r, z = σ(a_t + c_t) (first two chunks);  n = tanh(a_n + r c_n)
          h_t = (1 - z) n + z h_{t-1}
    RNN:  h_t = tanh or relu of (a_t + c_t)

The ``ε`` are zero perturbations. One pullback of a column ``m`` gives
``J_xᵀ m`` and the cotangents ``δa_t, δc_t, δp_t`` of every layer and direction
(``[V, N, L, ·]``). Every weight enters through them, so per sample::

    J_{W_ih}ᵀ m = Σ_t δa_t x_tᵀ,   J_{W_hh}ᵀ m = Σ_t δc_t h_{t-1}ᵀ,   J_{W_hr}ᵀ m = Σ_t δp_t u_tᵀ
    J_{b_ih}ᵀ m = Σ_t δa_t,        J_{b_hh}ᵀ m = Σ_t δc_t

DiagGGNApprox counts the module as one operation: ``Σ_o d_o (J_oᵀ)²`` over the
rows ``J_o = J_nᵀ e_o`` of each sample's Jacobian, from pullbacks of one-hot
columns, a bounded chunk of output entries at a time.

Declined (the exact generic rule serves them): ``batch_first=False`` and
dropout between layers in train mode. A ``batch_first=False`` module called on
``[L, N, features]`` reaches this rule as its batch-first view
(:mod:`curvhook.rules.batch_axis_view`). An initial state passed by the user is
held fixed (its own gradient slot is refused by :class:`LayerRule`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap
from torch.nn import functional as F

from curvhook.errors import UnsupportedModelError
from curvhook.records import Operation, fill_template
from curvhook.rules.base import LayerRule, sum_of_squared_products
from curvhook.rules.registry import register_rule

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_PARAM = re.compile(r"(weight|bias)_(ih|hh|hr)_l(\d+)(_reverse)?$")
# Entries of the rows held at once by the DiagGGNApprox diagonals (per chunk of one-hot columns).
_ROW_CHUNK_ENTRIES = 1 << 23

Perturbations = list[dict[str, Tensor]]  # per (layer, direction): "a", "c" [N, L, G·H], "p" [N, L, P]


@dataclass(eq=False)
class _Recurrence:
    """The re-run recurrence of one call: its pullback and what the parameter products read.

    Attributes:
        pullback: ``m ↦ (J_xᵀ m, cotangents of the perturbations)`` for one column ``m`` ``[N, L, D·H_out]``.
        layer_inputs: Per layer, its input ``[N, L, I_k]``.
        previous: Per (layer, direction), ``h_{t-1}`` at position ``t``, ``[N, L, H_out]``.
        cell_outputs: Per (layer, direction), ``u_t`` before the projection, ``[N, L, H]``.
        cached: ``(mat, cotangents)`` of the last columns (one matrix per source).
        diagonals: ``(diag, results)`` of the last DiagGGNApprox diagonals.
    """

    pullback: Callable
    layer_inputs: list[Tensor]
    previous: list[Tensor]
    cell_outputs: list[Tensor]
    cached: Optional[tuple] = None
    diagonals: Optional[tuple] = None


def _weights(module: nn.Module, layer: int, direction: int) -> dict[str, Optional[Tensor]]:
    """The detached weights of one layer and direction (``None`` for an absent bias or projection)."""
    sfx = f"_l{layer}{'_reverse' if direction else ''}"
    get = lambda name: getattr(module, name + sfx, None)  # noqa: E731
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
    return {k: (None if get(k) is None else get(k).detach()) for k in names}


def _cell(mode: str, a_t: Tensor, c_t: Tensor, h: Tensor, s: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """One step of the cell: ``(u_t, s_t)`` from the two pre-activations, ``[N, G·H]`` each."""
    if mode == "LSTM":
        i, f, g, o = (a_t + c_t).chunk(4, -1)
        s = torch.sigmoid(f) * s + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(s), s
    if mode == "GRU":
        a_r, a_z, a_n = a_t.chunk(3, -1)
        c_r, c_z, c_n = c_t.chunk(3, -1)
        r, z = torch.sigmoid(a_r + c_r), torch.sigmoid(a_z + c_z)
        n = torch.tanh(a_n + r * c_n)
        return (1 - z) * n + z * h, None
    pre = a_t + c_t
    return (torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)), None


def _direction(
    module: nn.Module, layer: int, direction: int, x_in: Tensor, eps: dict[str, Tensor], state: tuple
) -> tuple[Tensor, Tensor, Tensor]:
    """Run one direction of one layer over the sequence.

    Args:
        module: The recurrent module.
        layer, direction: Which weights.
        x_in: The layer input, ``[N, L, I_k]``.
        eps: The zero perturbations ``"a"``, ``"c"`` (``[N, L, G·H]``) and ``"p"`` (``[N, L, P]``).
        state: ``(h0 [N, H_out], s0 [N, H] or None)``.

    Returns:
        ``(h, h_prev, u)``: the outputs ``[N, L, H_out]``, the state before each step and the
        cell outputs before the projection, both at the step's position.
    """
    w = _weights(module, layer, direction)
    a = (F.linear(x_in, w["weight_ih"], w["bias_ih"]) + eps["a"]).unbind(1)
    ec = eps["c"].unbind(1)
    ep = eps["p"].unbind(1) if "p" in eps else None
    length = x_in.shape[1]
    h, s = state
    outs, prev, cells = [None] * length, [None] * length, [None] * length
    for t in (reversed(range(length)) if direction else range(length)):
        prev[t] = h
        c_t = F.linear(h, w["weight_hh"], w["bias_hh"]) + ec[t]
        u, s = _cell(module.mode, a[t], c_t, h, s)
        h = u if ep is None else F.linear(u, w["weight_hr"]) + ep[t]
        outs[t], cells[t] = h, u
    return torch.stack(outs, 1), torch.stack(prev, 1), torch.stack(cells, 1)


def _run(module: nn.Module, x: Tensor, eps: Perturbations, states: list[tuple]) -> tuple[Tensor, tuple]:
    """The module's first output ``[N, L, D·H_out]`` and, as auxiliary values, what the products read."""
    dirs = 2 if module.bidirectional else 1
    inputs, previous, cells = [], [], []
    for layer in range(module.num_layers):
        inputs.append(x.detach())
        outs = []
        for d in range(dirs):
            h, prev, u = _direction(module, layer, d, x, eps[layer * dirs + d], states[layer * dirs + d])
            outs.append(h)
            previous.append(prev.detach())
            cells.append(u.detach())
        x = outs[0] if dirs == 1 else torch.cat(outs, -1)
    return x, (inputs, previous, cells)


def _initial_states(call: Operation, n: int, like: Tensor) -> list[tuple]:
    """Per (layer, direction), ``(h0 [N, H_out], s0 [N, H] or None)``: the user's or zeros."""
    m = call.module
    args, kwargs = fill_template(call.args, call.kwargs, list(call.inputs))
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    out_size = m.proj_size if getattr(m, "proj_size", 0) > 0 else m.hidden_size
    count = m.num_layers * (2 if m.bidirectional else 1)
    if hx is None:
        h0 = like.new_zeros(count, n, out_size)
        s0 = like.new_zeros(count, n, m.hidden_size) if m.mode == "LSTM" else None
    else:
        h0, s0 = (hx if m.mode == "LSTM" else (hx, None))
        h0, s0 = h0.detach(), (None if s0 is None else s0.detach())
    return [(h0[j], None if s0 is None else s0[j]) for j in range(count)]


def _recurrence(call: Operation) -> _Recurrence:
    """Re-run the recurrence under ``vjp`` once per call and backward pass."""
    if call.scratch.recurrent is not None:
        return call.scratch.recurrent
    m = call.module
    x = call.input.detach()
    if x.dim() != 3:
        raise UnsupportedModelError(
            f"Module {call.name!r} ({type(m).__name__}) got an input of shape {tuple(x.shape)}; "
            "curvhook's recurrent rule needs a batched tensor [N, L, features] (batch_first=True), "
            "not an unbatched sequence or a PackedSequence."
        )
    if call.training and m.dropout > 0 and m.num_layers > 1:
        raise UnsupportedModelError(
            f"Module {call.name!r} ({type(m).__name__}) applies dropout between its layers in "
            "train mode, which curvhook cannot replay. Call model.eval() or set dropout=0."
        )
    n, length = x.shape[:2]
    gh = _GATES[m.mode] * m.hidden_size
    proj = getattr(m, "proj_size", 0)
    count = m.num_layers * (2 if m.bidirectional else 1)
    eps = [
        {"a": x.new_zeros(n, length, gh), "c": x.new_zeros(n, length, gh),
         **({"p": x.new_zeros(n, length, proj)} if proj > 0 else {})}
        for _ in range(count)
    ]
    states = _initial_states(call, n, x)
    _, pullback, (inputs, previous, cells) = vjp(lambda x_, e_: _run(m, x_, e_, states), x, eps, has_aux=True)
    rec = _Recurrence(pullback, inputs, previous, cells)
    call.scratch.recurrent = rec
    return rec


def _cotangents(call: Operation, mat: Tensor) -> tuple[Tensor, Perturbations]:
    """``(J_xᵀ m [V, N, L, I], per (layer, direction) δa, δc [V, N, L, G·H] and δp [V, N, L, P])``.

    Computed once per backpropagated matrix: the input and every parameter share it.
    """
    rec = _recurrence(call)
    if rec.cached is None or rec.cached[0] is not mat:
        rec.cached = (mat, vmap(rec.pullback)(mat))
    return rec.cached[1]


def _parse(call: Operation, name: str) -> tuple[str, str, int]:
    """``"weight_hh_l1_reverse"`` → ``("weight", "hh", index of (layer 1, reverse))``."""
    match = _PARAM.match(name)
    if match is None:
        raise UnsupportedModelError(
            f"Module {call.name!r} has a parameter {name!r} that the recurrent rule does not know."
        )
    kind, part, layer, reverse = match.groups()
    dirs = 2 if call.module.bidirectional else 1
    return kind, part, int(layer) * dirs + (1 if reverse else 0)


def _factors(call: Operation, rec: _Recurrence, name: str, eps: Perturbations) -> tuple[Tensor, Optional[Tensor]]:
    """``J_θᵀ m = Σ_t δ_t ⊗ z_t``: ``(δ [V, N, L, A], z [N, L, B])``; ``z = None`` for a bias (``Σ_t δ_t``)."""
    kind, part, j = _parse(call, name)
    dirs = 2 if call.module.bidirectional else 1
    delta = eps[j][{"ih": "a", "hh": "c", "hr": "p"}[part]]
    if kind == "bias":
        return delta, None
    z = {"ih": rec.layer_inputs[j // dirs], "hh": rec.previous[j], "hr": rec.cell_outputs[j]}[part]
    return delta, z


def _product(delta: Tensor, z: Optional[Tensor]) -> Tensor:
    """``Σ_t δ_vnt z_ntᵀ`` ``[V, N, A, B]`` (``Σ_t δ_vnt`` ``[V, N, A]`` for a bias)."""
    if z is None:
        return delta.sum(2)
    return torch.matmul(delta.transpose(-1, -2), z)  # [V, N, A, L] @ [N, L, B], broadcast over V


@register_rule(nn.LSTM, nn.GRU, nn.RNN)
class RecurrentRule(LayerRule):
    """Exact rules for ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` with ``batch_first=True`` (first output)."""

    def accepts(self, module: nn.Module) -> bool:
        """Decline ``batch_first=False`` and dropout between layers in train mode (the fallback serves them)."""
        if not module.batch_first or module.mode not in _GATES:
            return False
        return not (module.training and module.dropout > 0 and module.num_layers > 1)

    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        return _cotangents(call, mat)[0]

    def param_jac_t_mat_prod(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        eps = _cotangents(call, mat)[1]
        return _product(*_factors(call, _recurrence(call), name, eps))

    def param_sq_sum(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        delta, z = _factors(call, _recurrence(call), name, _cotangents(call, mat)[1])
        if z is None:
            return delta.sum(2).square().sum((0, 1))
        # Σ_{v,n} (Σ_t δ_vnt z_ntᵀ)²: the time steps are the inner dimension of a GEMM
        return sum_of_squared_products(delta.transpose(2, 3), z)

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        return _approx_diagonals(call, diag)["input"]

    def param_diag(self, call: Operation, name: str, diag: Tensor) -> Tensor:
        return _approx_diagonals(call, diag)[name]


def _approx_diagonals(call: Operation, diag: Tensor) -> dict[str, Tensor]:
    """``Σ_o d_no (J_nᵀ e_o)²`` for the input (per sample) and every parameter (summed over samples).

    The module is one operation (DiagGGNApprox's definition): the rows of each sample's
    exact Jacobian come from pullbacks of one-hot columns, a chunk of output entries at a time.

    Args:
        call: The recorded call.
        diag: ``d``, ``[N, L, D·H_out]``.

    Returns:
        ``{"input": [N, L, I], parameter name: [*θ.shape]}`` for the parameters of ``call.params``.
    """
    rec = _recurrence(call)
    if rec.diagonals is not None and rec.diagonals[0] is diag:
        return rec.diagonals[1]
    n, outs = diag.shape[0], diag[0].numel()
    d = diag.reshape(n, outs)
    names = [name for name, _ in call.params]
    # per column and sample: the one-hot column, J_xᵀ e_o, every cotangent δ and each parameter row
    cotangents = sum(t[0].numel() for t in rec.previous) * (2 * _GATES[call.module.mode] + 1)
    sizes = [outs, call.input[0].numel(), cotangents, *(p.numel() for _, p in call.params)]
    step = max(1, _ROW_CHUNK_ENTRIES // (n * max(sizes)))
    total: dict[str, Tensor] = {}
    for start in range(0, outs, step):
        stop = min(start + step, outs)
        cols = diag.new_zeros(stop - start, n, outs)
        cols[torch.arange(stop - start), :, torch.arange(start, stop)] = 1
        dx, eps = vmap(rec.pullback)(cols.view(stop - start, *diag.shape))
        w = d[:, start:stop].t()  # [c, N]
        parts = {"input": (dx.square() * w.view(*w.shape, 1, 1)).sum(0)}
        for name in names:
            rows = _product(*_factors(call, rec, name, eps))  # [c, N, *θ]
            # Σ_{c,n} w_cn rows_cn²: a matrix-vector product over the (c, n) pairs
            sq = rows.square_().reshape(w.numel(), -1)
            parts[name] = torch.mv(sq.t(), w.reshape(-1)).view(rows.shape[2:])
        for key, value in parts.items():
            total[key] = value if key not in total else total[key].add_(value)
    rec.diagonals = (diag, total)
    return total
