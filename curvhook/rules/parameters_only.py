"""Rules for tensors computed from parameters only that enter the batch.

Every sample of a transformer shares some tensors: position embeddings looked
up from ``arange(L)``, class and register tokens, relative-position tables.
They are functions ``w(θ)`` of the parameters alone, without a batch axis, and
every sample ``n`` reads them. The per-sample Jacobian of sample ``n``'s output
with respect to ``θ`` goes through ``w``, so what reaches ``w`` is per sample:
columns ``[V, N, *w.shape]`` or a diagonal ``[N, *w.shape]`` (see
:mod:`curvhook.rules.base` for the notation).

Two kinds of recorded operation produce or consume such tensors:

- :class:`ParametersOnlyModuleRule`: a leaf module called on constants (and
  shared tensors) only, whose output has no batch axis
  (``position_embeddings(position_ids)`` with ids ``[1, L]``). Its output
  ``w = m(c; θ)`` receives per-sample values, and its parameters get
  ``J_θᵀ m_vn`` for every sample. Where the constants and the output have a
  leading axis of size one, the call is the module applied to the constant
  repeated for every sample, so the module's own (fast) rule runs on that
  batched view; otherwise ``torch.func`` differentiates the call.
- :class:`ToBatchRule`: a tensor operation that copies a shared tensor along a
  new batch axis (``cls_token.expand(N, -1, -1)``). Every row of its output is
  the same copy ``g(w)`` of ``w``, so each sample's columns at that row are
  pulled back through ``g``; its Jacobian has one entry ``1`` per output
  entry, so a diagonal is pulled back the same way (``Σ_o d_o J_oi² = Jᵀ d``).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp, vmap

from curvhook.errors import UnsupportedModelError
from curvhook.records import BATCHED, CONST, Operation
from curvhook.rules.base import LayerRule
from curvhook.rules.batch_axis_view import _trailing_axes
from curvhook.rules.fallback import _forward, _params, _replay
from curvhook.rules.weight_norm import is_weight_norm, weight_norm_diag

# Tensor operations that copy their first argument along new leading axes.
COPIES_TO_BATCH = frozenset({"expand", "expand_as", "broadcast_to", "repeat"})


class ParametersOnlyModuleRule(LayerRule):
    """A leaf module whose output is computed from parameters only (see the module docstring).

    Args:
        inner: The module's own rule (or the generic fallback).
    """

    def __init__(self, inner: LayerRule) -> None:
        self.inner = inner

    def operations_rule(self) -> LayerRule:
        return parameters_only(self.inner.operations_rule())

    # A parameter of the model passed as an input (``mlp(self.table)``) is named ``"t<slot>"``
    # (:meth:`Operation.slot_of`): its terms are those of that input.

    # ---------------------------------------------------------- columns
    def param_jac_t_mat_prod(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        if _is_input(call, name):
            return self.input_jac_t_mat_prod(call, mat, call.slot_of(name))
        view = _batched_view(call, mat.shape[1])
        if view is not None:
            return self.inner.param_jac_t_mat_prod(view[0], name, _into(mat, 2, view))
        return _columns(_param_function(call, name), _params(call)[name], mat, call.output_shape)

    def param_sq_sum(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        view = _batched_view(call, mat.shape[1])
        if view is not None and not _is_input(call, name):
            return self.inner.param_sq_sum(view[0], name, _into(mat, 2, view))
        return self.param_jac_t_mat_prod(call, name, mat).square().sum((0, 1))

    def param_factors(self, call: Operation, name: str, mat: Tensor):
        view = _batched_view(call, mat.shape[1])
        if view is None or _is_input(call, name):
            return None
        return self.inner.param_factors(view[0], name, _into(mat, 2, view))

    def input_jac_t_mat_prod(self, call: Operation, mat: Tensor, slot: int) -> Tensor:
        """``[V, N, *x]`` for a shared input ``x`` at ``slot``."""
        view = _batched_view(call, mat.shape[1])
        if view is not None:
            return _out_of(self.inner.input_jac_t_mat_prod(view[0], _into(mat, 2, view), slot), 2, view)
        return _columns(_input_function(call, slot), call.inputs[slot].detach(), mat, call.output_shape)

    # -------------------------------------------------------- diagonals
    def param_diag(self, call: Operation, name: str, diag: Tensor) -> Tensor:
        if _is_input(call, name):
            return self.input_diag(call, diag, call.slot_of(name)).sum(0)
        view = _batched_view(call, diag.shape[0])
        if view is not None:
            return self.inner.param_diag(view[0], name, _into(diag, 1, view))
        at = _params(call)[name]
        param = next(p for n, p in call.params if n == name)
        picked = _diagonal_through_tail(call, id(param), at, diag, per_sample=False)
        if picked is not None:
            return picked
        return _diagonal(_param_function(call, name), at, diag, per_sample=False)

    def input_diag(self, call: Operation, diag: Tensor, slot: int) -> Tensor:
        """``[N, *x]`` for a shared input ``x`` at ``slot``."""
        view = _batched_view(call, diag.shape[0])
        if view is not None:
            return _out_of(self.inner.input_diag(view[0], _into(diag, 1, view), slot), 1, view)
        if is_weight_norm(call):  # wav2vec2's positional convolution: w = g · v / ‖v‖
            closed = weight_norm_diag(call, diag, slot)
            if closed is not None:
                return closed
        at = call.inputs[slot].detach()
        picked = _diagonal_through_tail(call, call.input_keys[slot][0], at, diag, per_sample=True)
        if picked is not None:
            return picked
        return _diagonal(_input_function(call, slot), at, diag)


def _is_input(call: Operation, name: str) -> bool:
    """Whether ``name`` is a parameter passed as an input (``"t<slot>"``), not one the module owns."""
    return name[0] == "t" and name[1:].isdigit() and not hasattr(call.module, name)


_WRAPPED: dict[int, ParametersOnlyModuleRule] = {}


def parameters_only(inner: LayerRule) -> ParametersOnlyModuleRule:
    """The (cached) :class:`ParametersOnlyModuleRule` around ``inner``."""
    rule = _WRAPPED.get(id(inner))
    if rule is None or rule.inner is not inner:
        rule = _WRAPPED[id(inner)] = ParametersOnlyModuleRule(inner)
    return rule


def _batched_view(call: Operation, n: int) -> Optional[tuple[Operation, bool]]:
    """The call as the module applied to its constants repeated for ``n`` samples, or ``None``.

    Possible where every input and the output have a leading axis of size one
    (ids ``[1, L]`` → embeddings ``[1, L, D]``): sample ``n`` then reads row 0,
    and the repeated call gives every sample that row. Also for a position-wise
    module (``nn.Linear``, ``nn.LayerNorm``, activations, ``nn.Embedding``; the
    relative-position MLP of a MaxViT on its coordinate table ``[L², 2]``) on
    inputs without such an axis: applied to ``x`` repeated along a new leading
    axis, it gives ``m(x)`` repeated. Cached for the backward pass.

    Returns:
        ``(view, squeezed)``: ``squeezed`` where the call's own leading axis of size
        one is the view's batch axis (values lose it on the way in, see :func:`_into`).
    """
    cached = call.scratch.batched_view
    if cached is not None and cached[0] == n:
        return cached[1]
    _refuse_random(call)
    out = call.output_shape
    view = None
    # (a module called without tensors, BEiT's relative position bias ``bias(window_size)``: none)
    if len(out) and out[0] == 1 and call.inputs and all(x.dim() and x.shape[0] == 1 for x in call.inputs):
        view = (_repeated(call, tuple(x.detach().expand(n, *x.shape[1:]) for x in call.inputs), (n, *out[1:])), True)
    elif len(out) and call.inputs and all(x.dim() for x in call.inputs) and _trailing_axes(call.module) is not None:
        inputs = tuple(x.detach().unsqueeze(0).expand(n, *x.shape) for x in call.inputs)
        view = (_repeated(call, inputs, (n, *out)), False)
    call.scratch.batched_view = (n, view)
    return view


_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _refuse_random(call: Operation) -> None:
    """A dropout in training mode on a tensor computed from parameters only: its mask is
    drawn in the forward pass and not recorded, and a replay would draw another."""
    module = call.module
    if isinstance(module, _DROPOUTS) and call.training and module.p > 0:
        raise UnsupportedModelError(
            f"Module {call.name!r} ({type(module).__name__}) drops entries of a tensor computed from "
            "parameters only, in training mode: curvhook cannot read the mask it drew. Call "
            "model.eval() (dropout is then the identity), or apply the dropout after the tensor "
            "meets the batch."
        )


def _repeated(call: Operation, inputs: tuple, out_shape: tuple) -> Operation:
    """``call`` on ``inputs`` repeated for every sample, with output shape ``out_shape``."""
    expanded = None if call.output is None else call.output.detach().reshape(out_shape[1:]).expand(out_shape)
    return dataclasses.replace(
        call,
        inputs=inputs,
        input_kinds=tuple(CONST if k == CONST else BATCHED for k in call.input_kinds),
        output=expanded,
        output_shapes=(torch.Size(out_shape),),
        node=None,
        from_parameters=False,
        _scratch=None,  # its own, made when first asked
    )


def _into(value: Tensor, axis: int, view: tuple[Operation, bool]) -> Tensor:
    """A value shaped like the call's output (per sample) as the view takes it."""
    return value.squeeze(axis) if view[1] else value


def _out_of(value: Tensor, axis: int, view: tuple[Operation, bool]) -> Tensor:
    """A value the view gave for an input, shaped like that input (per sample)."""
    return value.unsqueeze(axis) if view[1] else value


def _param_function(call: Operation, name: str) -> Callable[[Tensor], Tensor]:
    params = _params(call)
    inputs = [x.detach() for x in call.inputs]
    return lambda theta: _replay(call, {**params, name: theta}, inputs)


def _input_function(call: Operation, slot: int) -> Callable[[Tensor], Tensor]:
    return partial(_forward(call, slot), _params(call))


def _columns(fn: Callable[[Tensor], Tensor], at: Tensor, mat: Tensor, out_shape) -> Tensor:
    """``J_fᵀ m_vn`` for every column of every sample: ``[V, N, *at.shape]``."""
    v, n = mat.shape[:2]
    _, pull = vjp(fn, at)
    pulled = vmap(lambda m: pull(m)[0])(mat.reshape(v * n, *out_shape))
    return pulled.reshape(v, n, *at.shape)


# Entries of the Jacobian columns or rows held at once by :func:`_diagonal`.
_CHUNK_ENTRIES = 1 << 24


def _diagonal(fn: Callable[[Tensor], Tensor], at: Tensor, diag: Tensor, per_sample: bool = True) -> Tensor:
    """``Σ_o d_no J_oi²`` of ``fn`` at ``at``: ``[N, *at.shape]``, or summed over the samples.

    ``J`` is the same for every sample, and is never held whole (BEiT's relative
    position bias maps a table of 8.8k entries to 466k: 33 GB in float64). Its
    columns ``J e_i`` (forward mode) or its rows ``Jᵀ e_o`` (reverse mode), whichever
    are fewer, are formed a bounded chunk at a time, squared and weighted by ``d``.
    With ``per_sample=False`` the samples' ``d`` are summed first: one weight vector.

    Args:
        fn: The map from ``at`` to the output, ``[*out]``.
        at: Where it is differentiated.
        diag: ``d``, ``[N, *out]``.
        per_sample: Keep the sample axis (a shared input's diagonal) or sum over it
            (a parameter's).
    """
    at = at.detach()
    n, outs, size = diag.shape[0], diag[0].numel(), at.numel()
    d = diag.reshape(n, outs)
    if not per_sample:
        d = d.sum(0, keepdim=True)
    total = d.new_zeros(d.shape[0], size)
    # a chunk of ``step`` columns (rows) holds ``step · outs`` (``step · size``) entries, and the
    # replay inside ``vmap`` makes several temporaries of that size: 1/16 of the budget each
    step = max(1, _CHUNK_ENTRIES // max(1, 16 * outs, 16 * size))
    if size <= outs:  # columns: one jvp per entry of ``at``
        flat = at.reshape(-1)
        try:
            for start in range(0, size, step):
                stop = min(start + step, size)
                tangents = flat.new_zeros(stop - start, size)
                tangents[torch.arange(stop - start), torch.arange(start, stop)] = 1
                cols = vmap(lambda t: jvp(fn, (at,), (t.view_as(at),))[1])(tangents).reshape(stop - start, outs)
                total[:, start:stop] = d @ cols.square().T
            return total.reshape(-1, *at.shape) if per_sample else total.reshape(at.shape)
        except NotImplementedError:  # an operation without forward mode (torch's weight norm,
            total.zero_()  # wav2vec2's positional convolution): the rows below instead
    # rows: one vjp per output entry
    out, pull = vjp(fn, at)
    for start in range(0, outs, step):
        stop = min(start + step, outs)
        cotangents = d.new_zeros(stop - start, outs)
        cotangents[torch.arange(stop - start), torch.arange(start, stop)] = 1
        rows = vmap(lambda c: pull(c.view_as(out))[0])(cotangents).reshape(stop - start, size)
        total += d[:, start:stop] @ rows.square()
    return total.reshape(-1, *at.shape) if per_sample else total.reshape(at.shape)


def _diagonal_through_tail(call: Operation, source_id: int, at: Tensor, diag: Tensor, per_sample: bool) -> Optional[Tensor]:
    """:func:`_diagonal` with ``d`` pulled back through the entries the call picks at its end
    (:mod:`curvhook.selection_tail`), or ``None`` where it picks none or its recorded
    operations do not replay it.

    Args:
        call: The leaf call, computed from parameters only.
        source_id: ``id`` of the parameter or argument differentiated.
        at: Its value, detached.
        diag: ``d``, ``[N, *out]``.
        per_sample: As for :func:`_diagonal`.
    """
    tail = call.selection_tail
    if tail is None:
        return None
    if not tail.reads(source_id):  # (read only for a constant: detached, a condition)
        return at.new_zeros(diag.shape[0], *at.shape) if per_sample else torch.zeros_like(at)
    if not tail.replays(source_id, at):
        return None
    pulled = tail.pull(diag if per_sample else diag.sum(0, keepdim=True))  # Sᵀ d: [N or 1, *u]
    if tail.u_key[0] == source_id:  # the copies read the source itself: g is the identity
        return pulled.reshape(-1, *at.shape) if per_sample else pulled.reshape(at.shape)
    return _diagonal(tail.head_function(source_id), at, pulled, per_sample)


class ToBatchRule(LayerRule):
    """A copy of a shared tensor along a new batch axis (see the module docstring).

    Where the copy makes ``k`` merged rows per sample (``call.rows``, DeBERTa's
    ``w.repeat(N, 1, 1)``; :mod:`curvhook.row_groups`), each sample's block of ``k``
    rows is the same copy of ``w``.
    """

    def input_jac_t_mat_prod(self, call: Operation, mat: Tensor, slot: int) -> Tensor:
        """``[V, N, *w]``: each sample's columns at its row (or rows), pulled back through the copy."""
        rows, out = call.rows, call.output_shape[1:]
        if rows > 1:  # [V, N·k, *out] -> [V, N, k, *out]
            mat, out = mat.unflatten(1, (mat.shape[1] // rows, rows)), (rows, *out)
        return _columns(_row_function(call), call.inputs[0].detach(), mat, out)

    def input_diag(self, call: Operation, diag: Tensor, slot: int) -> Tensor:
        """``[N, *w]``: ``Jᵀ d`` per sample (one entry ``1`` per output entry)."""
        return self.input_jac_t_mat_prod(call, diag.unsqueeze(0), slot)[0]

    def param_jac_t_mat_prod(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        return self.input_jac_t_mat_prod(call, mat, call.slot_of(name))

    def param_diag(self, call: Operation, name: str, diag: Tensor) -> Tensor:
        return self.input_diag(call, diag, call.slot_of(name)).sum(0)


def _row_function(call: Operation) -> Callable[[Tensor], Tensor]:
    """``w ↦ op(w)[0]``: one row of the copy (every row is the same function of ``w``), or the
    first sample's ``k`` rows where the copy makes merged rows."""
    fixed = [x.detach() for x in call.inputs]
    rows = call.rows
    if rows > 1:
        return lambda w: call.invoke([w, *fixed[1:]])[:rows]
    return lambda w: call.invoke([w, *fixed[1:]])[0]


TO_BATCH = ToBatchRule()
