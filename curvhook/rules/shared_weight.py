"""Products of layers whose weight is shared over positions: ``y_nt = W a_nt + b``.

``nn.Linear`` (``a`` the input at each position) and the convolutions with
``groups=1`` (``a`` the unfolded patch of each output position) have this
structure (:meth:`~curvhook.rules.base.LayerRule.position_factors`). Per sample,
with ``m_vnt`` a backpropagated column at position ``t``,

    J_Wᵀ m_vn = Σ_t m_vnt a_ntᵀ   ([O, I], ``W.flatten()`` order row-major)
    J_bᵀ m_vn = Σ_t m_vnt         ([O]).

The functions below contract these products without forming them where a
cheaper form exists; where the products must be formed, a bounded chunk of
output features at a time.

Shapes: ``a`` ``[N, T, I]``, ``m`` ``[V, N, T, O]``.
"""

from __future__ import annotations

from typing import Iterator, Union

import torch
from torch import Tensor

# Entries of the per-sample products held at once where they must be formed (32 MiB of float64).
CHUNK_ENTRIES = 1 << 22

Metric = Union[Tensor, tuple[Tensor, Tensor]]


def _sample_major_products(a: Tensor, m: Tensor) -> Tensor:
    """``Σ_t m_vnt a_ntᵀ`` sample-major, ``[N, V, O, I]``: one batched GEMM over the samples.

    Args:
        a: ``[N, T, I]``.
        m: ``[V, N, T, O]`` (any strides; copied sample-major, ``[N, V·O, T]``, for the GEMM).
    """
    v, n, t, o = m.shape
    columns = m.permute(1, 0, 3, 2).reshape(n, v * o, t)
    return torch.bmm(columns, a).view(n, v, o, a.shape[-1])


def product_chunks(a: Tensor, m: Tensor) -> Iterator[tuple[slice, Tensor]]:
    """The weight products ``Σ_t m_vnt a_ntᵀ`` a chunk of output features at a time, sample-major.

    Yields:
        ``(rows, P)``: the output features ``rows`` and ``P`` ``[N, V, len(rows), I]`` (contiguous).
    """
    v, n, t, o = m.shape
    i = a.shape[-1]
    # the chunk of products [N, V, o', I] and the copy of the columns the GEMM reads, [N, V, o', T]
    step = max(1, min(o, CHUNK_ENTRIES // max(1, v * n * max(i, t))))
    for start in range(0, o, step):
        rows = slice(start, min(start + step, o))
        yield rows, _sample_major_products(a, m[..., rows])


def _blocks(rows: int) -> list[slice]:
    """Row blocks of a Gram matrix for :func:`add_gram_`: up to 4 of at least 256 rows."""
    count = max(1, min(4, rows // 256))
    edges = [rows * b // count for b in range(count + 1)]
    return [slice(edges[b], edges[b + 1]) for b in range(count)]


def add_gram_(out: Tensor, p: Tensor) -> None:
    """``out += p pᵀ`` on the blocks on and above the diagonal only (see :func:`mirror_gram_`).

    A Gram matrix is symmetric: with 4 row blocks the GEMMs do 10 of the 16 block
    products, 5/8 of the operations of ``p pᵀ``.

    Args:
        out: ``[R, R]``.
        p: ``[R, K]``.
    """
    blocks = _blocks(out.shape[0])
    for i, rows in enumerate(blocks):
        for cols in blocks[i:]:
            out[rows, cols].addmm_(p[rows], p[cols].T)


def mirror_gram_(out: Tensor) -> Tensor:
    """Complete a Gram matrix that :func:`add_gram_` filled on and above the diagonal blocks."""
    blocks = _blocks(out.shape[0])
    for i, rows in enumerate(blocks):
        for cols in blocks[i + 1 :]:
            out[cols, rows] = out[rows, cols].T
    return out


def _to_column_major(gram: Tensor, v: int, n: int) -> Tensor:
    """A Gram matrix over ``(n, v)`` pairs, ``n`` slowest, reordered to ``(v, n)``."""
    return gram.view(n, v, n, v).permute(1, 0, 3, 2).reshape(v * n, v * n)


def gram(a: Tensor, m: Tensor, bias: bool) -> Tensor:
    """``⟨J_θᵀ m_vn, J_θᵀ m_wk⟩`` for every pair of columns and samples: ``[V·N, V·N]``.

    Without positions (``T = 1``) the weight's Gram matrix is the entrywise product
    ``(m_vn·m_wk)(a_n·a_k)`` of two small Gram matrices, ``(VN)²(O + I)`` operations
    instead of the ``(VN)² O I`` of the products. With positions it is either
    ``Σ_{t,s} (m_vnt·m_wks)(a_nt·a_ks)`` (two Gram matrices over positions) or the
    products' Gram matrix, chunk by chunk over the output features, whichever costs
    fewer operations.
    """
    v, n, t, o = m.shape
    i = a.shape[-1]
    if bias:
        s = m.sum(2) if t > 1 else m[:, :, 0]
        s = s.reshape(v * n, o)
        return s @ s.T
    if t == 1:
        mm = m.reshape(v * n, o)
        aa = a.reshape(n, i)
        return (mm @ mm.T).view(v, n, v, n).mul_((aa @ aa.T)[None, :, None, :]).view(v * n, v * n)
    vn, vnt = v * n, v * n * t
    by_positions = vnt * vnt * o + (n * t) ** 2 * i + vnt * vnt
    by_products = vnt * o * i + vn * vn * o * i
    if by_positions < by_products and vnt * vnt <= 16 * CHUNK_ENTRIES:
        gm = m.reshape(vnt, o) @ m.reshape(vnt, o).T  # [(v n t), (w k s)]
        ga = a.reshape(n * t, i) @ a.reshape(n * t, i).T  # [(n t), (k s)]
        return torch.einsum("vntwks,ntks->vnwk", gm.view(v, n, t, v, n, t), ga.view(n, t, n, t)).reshape(vn, vn)
    out = m.new_zeros(vn, vn)  # over (n, v) pairs: the products are sample-major
    for _, p in product_chunks(a, m):
        add_gram_(out, p.view(vn, -1))
    return _to_column_major(mirror_gram_(out), v, n)


def metric_gram(a: Tensor, m: Tensor, bias: bool, metric: Metric) -> Tensor:
    """``(J_θᵀ m_vn)ᵀ Σ_θ (J_θᵀ m_wn)`` per sample: ``[N, V, V]``.

    Args:
        a: ``[N, T, I]``.
        m: ``[V, N, T, O]``.
        bias: The bias (``J_bᵀ m = Σ_t m_t``) instead of the weight.
        metric: ``Σ_θ`` as a diagonal shaped like the parameter (``[O, I]`` entries, or
            ``[O]`` for the bias), or Kronecker factors ``(A, B)``: ``Σ_θ = B ⊗ A`` in
            row-major order, ``A`` ``[I, I]`` (``[[1]]`` for the bias), ``B`` ``[O, O]``.
    """
    v, n, t, o = m.shape
    if bias:
        s = m.sum(2) if t > 1 else m[:, :, 0]  # [V, N, O]
        if isinstance(metric, tuple):
            a_factor, b_factor = metric
            ws = (s @ b_factor.T) * a_factor.reshape(())
        else:
            ws = s * metric.reshape(o)
        return torch.einsum("vno,wno->nvw", ws, s)
    i = a.shape[-1]
    if isinstance(metric, tuple):
        a_factor, b_factor = metric
        if t == 1:  # (m_vᵀ B m_w)(aᵀ A a)
            m0, a0 = m[:, :, 0], a[:, 0]
            scale = torch.einsum("ni,ni->n", a0 @ a_factor.T, a0)
            return torch.einsum("vno,wno->nvw", m0 @ b_factor.T, m0) * scale[:, None, None]
        # ⟨P_v, B P_w Aᵀ⟩ with the products P formed a chunk of samples at a time
        out = m.new_empty(n, v, v)
        step = max(1, CHUNK_ENTRIES // max(1, v * o * max(i, t)))
        for start in range(0, n, step):
            rows = slice(start, min(start + step, n))
            p = _sample_major_products(a[rows], m[:, rows])  # [n', V, O, I]
            q = torch.matmul(torch.matmul(b_factor, p), a_factor.T)
            k = rows.stop - start
            torch.bmm(p.view(k, v, -1), q.view(k, v, -1).transpose(1, 2), out=out[rows])
        return out
    sigma = metric.reshape(o, i)
    if t == 1:  # Σ_{o,i} σ_oi m_vo m_wo a_i²
        m0, a0 = m[:, :, 0], a[:, 0]
        weights = a0.square() @ sigma.T  # [N, O]
        return torch.einsum("vno,wno->nvw", m0 * weights, m0)
    out = m.new_zeros(n, v, v)
    for rows, p in product_chunks(a, m):
        flat = p.view(n, v, -1)
        out.baddbmm_(flat * sigma[rows].reshape(1, 1, -1), flat.transpose(1, 2))
    return out


def summed_products(a: Tensor, m: Tensor, bias: bool) -> Tensor:
    """``Σ_n J_θᵀ m_vn`` for every column: ``[V, O, I]`` (``[V, O]`` for the bias); one GEMM per column."""
    v, n, t, o = m.shape
    if bias:
        return m.sum((1, 2))
    return torch.matmul(m.reshape(v, n * t, o).transpose(1, 2), a.reshape(n * t, -1))
