"""Rules for merged rows followed as pseudo-samples (see :mod:`curvhook.row_groups`).

- :data:`REGROUP`: the reshape that merges the batch axis with the axes after it
  (``[N, L, H] → [N·L, H]``) or splits the rows again. A reshape keeps every
  entry in row-major order, so its Jacobian is a relabelling of the entries:
  ``J_xᵀ m`` is ``m`` reshaped to the input, for every column at once, and a
  diagonal travels the same way (``Σ_o d_o J_oi² = d`` relabelled). Only the
  leading axis of the travelling values changes: ``[V, N·k, …]`` against
  ``[V, N, …]``.
- :data:`GATHERED_ROWS`: a boolean mask that picks ``c`` entries of every sample,
  recorded as the positions it picks (:mod:`curvhook.mask_index`): ``c`` merged
  rows per sample, each the copy of one input entry. Its Jacobian selects, so
  ``J_xᵀ m`` is the call's own vector-Jacobian product (entries scattered back),
  and ``Σ_o d_o J_oi² = Σ_o d_o J_oi`` is the same product applied to ``d``.
- :data:`REPEATED_ROWS`: ``g.repeat_interleave(k, dim=0)``, each row of a sample copied to
  ``k`` rows of that sample (GCViT's global query repeated to the windows of its image).
- :class:`GroupedRowsRule`: an operation on merged rows, around its own rule.
  Everything that travels is exact row by row; the per-sample parameter product
  of sample ``n`` is the sum of its rows' products,
  ``J_θᵀ m_vn = Σ_j J_{θ,nj}ᵀ m_vnj``. Products that are squared, normed or
  paired per sample are formed from that sum; a layer shared over positions
  (:meth:`~curvhook.rules.base.LayerRule.position_factors`) keeps its factored
  forms with the sample's rows as more positions, ``[N·k, T, I] → [N, k·T, I]``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from curvhook.records import Operation
from curvhook.row_groups import group_rows
from curvhook.rules.base import LayerRule, sum_of_squared_products
from curvhook.rules.tensor_ops import TENSOR_OPS


class RegroupRule(LayerRule):
    """The merge or split of rows: a reshape of the whole tensor (see the module docstring)."""

    def keeps_samples_apart(self, call: Operation, n: int) -> bool:
        return True

    def input_jac_t_mat_prod(self, call: Operation, mat, slot: int) -> Tensor:
        x = call.inputs[slot]
        if slot != 0:  # ``view_as(y)``: ``y`` gives only a shape
            return x.new_zeros(_lead(mat), *_batch_first(x.shape, _in_axis(call, slot)))
        if call.batch_axes is None:
            return _first(mat).reshape(_lead(mat), *x.shape)
        # a moved batch axis: what travels has it first, the reshape acts on the tensor's own layout
        m = _first(mat).movedim(1, 1 + call.batch_axes[1][0])
        return m.reshape(_lead(mat), *x.shape).movedim(1 + _in_axis(call), 1)

    def input_diag(self, call: Operation, diag, slot: int) -> Tensor:
        x = call.inputs[slot]
        if slot != 0:
            return x.new_zeros(_batch_first(x.shape, _in_axis(call, slot)))
        if call.batch_axes is None:
            return _first(diag).reshape(x.shape)
        return _first(diag).movedim(0, call.batch_axes[1][0]).reshape(x.shape).movedim(_in_axis(call), 0)

    def jvp(self, call: Operation, tangents: list[Optional[Tensor]], param_tangents: dict) -> list[Optional[Tensor]]:
        t = tangents[0]
        return [None if t is None else t.reshape(t.shape[0], *call.output_shape)]


def _in_axis(call: Operation, slot: int = 0) -> int:
    """The batch axis of input ``slot`` (first unless moved: SAM's ``[3, N, H, L, d]``)."""
    return 0 if call.batch_axes is None else call.batch_axes[0][slot] or 0


def _batch_first(shape, axis: int) -> tuple:
    shape = tuple(shape)
    return shape if axis == 0 else (shape[axis], *shape[:axis], *shape[axis + 1:])


def _first(value) -> Tensor:
    return value[0] if isinstance(value, list) else value


def _lead(mat) -> int:
    return _first(mat).shape[0]


REGROUP = RegroupRule()


class GatheredRowsRule(LayerRule):
    """``x[rows, idx]`` with ``rows`` each sample's index repeated ``c`` times (see the module
    docstring): the picks of one sample come from that sample only, by construction."""

    def keeps_samples_apart(self, call: Operation, n: int) -> bool:
        return True

    def input_jac_t_mat_prod(self, call: Operation, mat, slot: int) -> Tensor:
        return TENSOR_OPS._pull_whole(call, [_first(mat)], slot)

    def input_diag(self, call: Operation, diag, slot: int) -> Tensor:
        # a selection: each output entry is one input entry with coefficient 1, so J_oi² = J_oi
        return TENSOR_OPS._pull_whole(call, [_first(diag).unsqueeze(0)], slot)[0]


GATHERED_ROWS = GatheredRowsRule()


class RepeatedRowsRule(LayerRule):
    """``g.repeat_interleave(k, dim=0)``, ``[N·r, …] → [N·r·k, …]``: every row copied to ``k``
    consecutive rows of the same sample (:func:`curvhook.row_groups.note_repeated_rows`).
    Its Jacobian copies, so ``J_xᵀ m`` sums each row's ``k`` copies, and so does the diagonal:
    ``Σ_o d_o J_oi² = Σ_{o copies i} d_o`` (every ``J_oi`` is 0 or 1)."""

    def keeps_samples_apart(self, call: Operation, n: int) -> bool:
        return True

    def input_jac_t_mat_prod(self, call: Operation, mat, slot: int) -> Tensor:
        m, k = _first(mat), call.rows // call.rows_in
        return m.unflatten(1, (m.shape[1] // k, k)).sum(2)

    def input_diag(self, call: Operation, diag, slot: int) -> Tensor:
        d, k = _first(diag), call.rows // call.rows_in
        return d.unflatten(0, (d.shape[0] // k, k)).sum(1)

    def jvp(self, call: Operation, tangents: list[Optional[Tensor]], param_tangents: dict) -> list[Optional[Tensor]]:
        t = tangents[0]
        return [None if t is None else t.repeat_interleave(call.rows // call.rows_in, dim=1)]


REPEATED_ROWS = RepeatedRowsRule()


class GroupedRowsRule(LayerRule):
    """An operation on merged rows: ``inner`` row by row, parameter products summed per sample.

    Args:
        inner: The operation's own rule (after the source's choice).
        rows: Rows per sample, ``k``.
    """

    def __init__(self, inner: LayerRule, rows: int) -> None:
        self.inner, self.rows = inner, rows

    # ---------------------------------------------- row by row: unchanged
    def input_jac_t_mat_prod(self, call: Operation, mat, slot: int) -> Tensor:
        return self.inner.input_jac_t_mat_prod(call, mat, slot)

    def input_diag(self, call: Operation, diag, slot: int) -> Tensor:
        return self.inner.input_diag(call, diag, slot)

    def param_diag(self, call: Operation, name: str, diag: Tensor) -> Tensor:
        return self.inner.param_diag(call, name, diag)  # a sum over every row and sample

    def param_summed_products(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        return self.inner.param_summed_products(call, name, mat)  # Σ over rows and samples

    def jvp(self, call: Operation, tangents: list, param_tangents: dict) -> list:
        return self.inner.jvp(call, tangents, param_tangents)

    # ---------------------------------------------- per sample: the rows summed
    def param_jac_t_mat_prod(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        """``[V, N, *θ]``: the rows' products ``[V, N·k, *θ]`` summed over each sample's ``k`` rows."""
        return group_rows(self.inner.param_jac_t_mat_prod(call, name, mat), self.rows, matrix=True)

    def param_factors(self, call: Operation, name: str, mat: Tensor):
        return None  # k rows per sample: a sum of outer products, not one

    def position_factors(self, call: Operation, mat: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        """The inner layer's ``a [N·k, T, I]``, ``m [V, N·k, T, O]`` as ``[N, k·T, I]``, ``[V, N, k·T, O]``."""
        factors = self.inner.position_factors(call, mat)
        if factors is None:
            return None
        a, m = factors
        k = self.rows
        return a.reshape(a.shape[0] // k, k * a.shape[1], a.shape[2]), m.reshape(
            m.shape[0], m.shape[1] // k, k * m.shape[2], m.shape[3]
        )

    def param_sq_sum(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        """``Σ_{v,n} (J_θᵀ m_vn)²`` with the sample's rows summed first; one GEMM per column
        and chunk of samples where the layer is shared over positions."""
        factors = self._shared_weight(call, name, mat)
        if factors is not None:
            a, m = factors
            theta = dict(call.params)[name]
            if name == "bias":
                return m.sum(2).square().sum((0, 1)).reshape(theta.shape)
            return sum_of_squared_products(m.transpose(2, 3), a).reshape(theta.shape)
        return super().param_sq_sum(call, name, mat)


def grouped(rule: LayerRule, rows: int) -> LayerRule:
    """``rule`` for an operation on ``rows`` merged rows per sample (``rule`` itself for one)."""
    return rule if rows <= 1 else GroupedRowsRule(rule, rows)
