"""FullGGN: the full generalized Gauss-Newton matrix.

``G = Σ_n J_nᵀ H_n J_n = Bᵀ B`` where ``B`` stacks the per-sample products
``J_nᵀ s_vn`` of all ``V·N`` backpropagated columns: ``[V·N, P]``.

``G`` is assembled block by block (``G_pq`` for parameters ``p ≤ q``, the
lower blocks mirrored). Where a layer's products are Kronecker-structured,
``J_pᵀ s_vn = a_vn ⊗ b_n`` (``nn.Linear``: ``a = s``, ``b = x``), the sum over
the ``V`` columns is taken first:

    G_pq = Σ_n (Σ_v a_vn c_vnᵀ) ⊗ (b_n d_nᵀ),

which costs ``N·P_p·P_q`` instead of the ``V·N·P_p·P_q`` of ``B_pᵀ B_q``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

from curvhook import _memory
from curvhook.records import Operation
from curvhook.sources import LossHessianSqrt
from curvhook.extensions.base import Extension
from curvhook.rules.base import LayerRule

# Tile edge of the mirrored copies (a transposed copy tile by tile stays in cache).
_TILE = 512


@dataclass(eq=False)
class Kron:
    """Per-sample products ``a_vn ⊗ b_n`` kept as their two factors.

    Attributes:
        a: ``[V, N, A]``.
        b: ``[N, B]``.
    """

    a: Tensor
    b: Tensor


Block = Union[Tensor, Kron]  # dense: [V, N, P_p]


def _gram(x: Tensor, y: Tensor) -> Tensor:
    """``Σ_v x_vn y_vnᵀ`` per sample: ``[V, N, A], [V, N, C] → [N, A, C]``."""
    return torch.einsum("vna,vnc->nac", x, y)


def _kron_kron_into(out: Tensor, p: Kron, q: Kron, gram: Tensor) -> None:
    """Write ``Σ_n gram_n ⊗ (b_n d_nᵀ)`` into ``out``, ``[A·B, C·D]`` (rows ``(a, b)``, columns ``(c, d)``).

    One GEMM with the samples as its inner dimension,
    ``Y[(a, c), (b, d)] = Σ_n gram[n, a, c] (b_n ⊗ d_n)[(b, d)]``, then ``Y``
    permuted into place. (Contracting over ``n`` last, as ``[(a b c), n] @ [n, d]``,
    would need an ``[N, A, B, C]`` intermediate and a GEMM whose inner dimension
    is a chunk of samples: memory-bound.)
    """
    n, A, C = gram.shape
    B, D = p.b.shape[1], q.b.shape[1]
    bd = (p.b[:, :, None] * q.b[:, None, :]).reshape(n, B * D)
    y = _memory.scratch((A * C, B * D), gram, "fullggn_kron_block")
    torch.mm(gram.reshape(n, A * C).T, bd, out=y)
    out.view(A, B, C, D).copy_(y.view(A, C, B, D).permute(0, 2, 1, 3))


def _kron_dense(p: Kron, q: Tensor) -> Tensor:
    """``Σ_{v,n} (a_vn ⊗ b_n) B_vnᵀ`` as ``[A·B, Q]``."""
    m = _gram(p.a, q)  # [N, A, Q]
    return torch.einsum("nb,naq->abq", p.b, m).reshape(-1, q.shape[-1])


def _mirror(matrix: Tensor, rows: slice, cols: slice) -> None:
    """Copy the block ``matrix[rows, cols]`` transposed into ``matrix[cols, rows]``, tile by tile."""
    for r in range(rows.start, rows.stop, _TILE):
        r_end = min(r + _TILE, rows.stop)
        for c in range(cols.start, cols.stop, _TILE):
            c_end = min(c + _TILE, cols.stop)
            matrix[c:c_end, r:r_end].copy_(matrix[r:r_end, c:c_end].T)


def _block_into(out: Tensor, p: Block, q: Block, grams: dict) -> None:
    """Write ``G_pq = Σ_{v,n} (J_pᵀ s_vn)(J_qᵀ s_vn)ᵀ`` into ``out``, ``[P_p, P_q]``."""
    if isinstance(p, Kron) and isinstance(q, Kron):
        key = (id(p.a), id(q.a))
        if key not in grams:
            grams[key] = _gram(p.a, q.a)
        _kron_kron_into(out, p, q, grams[key])
    elif isinstance(p, Kron):
        out.copy_(_kron_dense(p, q))
    elif isinstance(q, Kron):
        out.copy_(_kron_dense(q, p).T)
    else:
        out.copy_(p.flatten(0, 1).T @ q.flatten(0, 1))


class FullGGN(Extension):
    """Writes ``p.ggn`` with shape ``[p.numel(), P]``: the rows of ``G`` that belong to ``p``.

    Columns run over all trainable parameters in ``model.parameters()`` order.
    After the backward, ``FullGGN.matrix`` holds the whole ``[P, P]`` matrix;
    every ``p.ggn`` is a view of it, so no extra memory is used.

    Example::

        ggn = FullGGN()
        with extend(model, ggn):
            criterion(model(X), y).backward()
        G = ggn.matrix  # [P, P]
    """

    attribute = "ggn"
    source_type = LossHessianSqrt

    def __init__(self, loss: Optional[nn.Module] = None) -> None:
        super().__init__(loss)
        self.matrix: Optional[Tensor] = None

    def param_term(
        self, rule: LayerRule, op: Operation, name: str, value: Tensor, shared: bool
    ) -> Block:
        if not shared:  # a parameter used once: its factors are never summed with another operation's
            factors = rule.param_factors(op, name, value)
            if factors is not None:
                a, b = factors
                return Kron(a, b if b is not None else a.new_ones(a.shape[1], 1))
        out = rule.param_jac_t_mat_prod(op, name, value)  # [V, N, *p]; a 0-d p has no axes to flatten
        return out.reshape(*out.shape[:2], -1)

    def finalize(
        self, totals: dict[int, Block], shared: frozenset[int], params: list[nn.Parameter], root: Tensor
    ) -> Tensor:
        """The whole ``[P, P]`` matrix, block by block."""
        sizes = [p.numel() for p in params]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        like = next((t.a if isinstance(t, Kron) else t for t in totals.values()), root)
        matrix = _memory.empty((sum(sizes), sum(sizes)), like=like)
        grams: dict = {}
        for i, p in enumerate(params):
            rows = slice(starts[i], starts[i] + sizes[i])
            for j in range(i, len(params)):
                cols = slice(starts[j], starts[j] + sizes[j])
                tp, tq = totals.get(id(p)), totals.get(id(params[j]))
                if tp is None or tq is None:  # a parameter the output does not depend on
                    matrix[rows, cols] = 0
                else:
                    _block_into(matrix[rows, cols], tp, tq, grams)
                if j > i:
                    _mirror(matrix, rows, cols)
        return matrix

    def reset(self, params: list[nn.Parameter]) -> None:
        super().reset(params)
        self.matrix = None

    def reduce_across_processes(self, params: list[nn.Parameter], group=None) -> None:
        from curvhook import distributed

        if self.matrix is not None:
            distributed.sum_in_place([self.matrix], group)  # every p.ggn is a view of it

    def rescale(self, params: list[nn.Parameter], factor: float) -> None:
        if self.matrix is not None:
            self.matrix.mul_(factor)  # every p.ggn is a view of it

    def write(self, results: Tensor, params: list[nn.Parameter], accumulate: bool) -> None:
        dtype = params[0].dtype if params else None
        matrix = results.to(dtype)
        if accumulate and self.matrix is not None:
            self.matrix += matrix
        else:
            self.matrix = matrix
        start = 0
        for p in params:
            setattr(p, self.attribute, self.matrix[start : start + p.numel()])
            start += p.numel()
