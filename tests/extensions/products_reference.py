"""References for the product extensions (NTK, OutputCovariance, GGNVectorProduct, LowRankGGN).

Imports nothing from curvhook. Everything is built from ``tests/reference.py``,
which computes, with ``torch.func`` only and in float64, the Jacobian
``J = ∂f/∂θ`` (``[N*C, P]``, trainable parameters in ``model.parameters()``
order) and ``G = Jᵀ H J`` with the per-sample blocks ``H_n`` of the loss
Hessian. From them, by the definitions:

- the empirical NTK ``K[n,c,m,d] = Σ_p J[n,c,p] J[m,d,p]`` and its per-parameter shares;
- the output covariance ``J_n Σ J_nᵀ`` with ``Σ`` dense, assembled from diagonal
  entries and Kronecker blocks ``torch.kron(B, A)`` (the layout of curvhook's KFAC);
- ``G v``;
- the top-k eigensystem of ``G`` from ``torch.linalg.eigh``, and a comparison of
  eigenvectors up to sign and of eigenspaces (projectors) where eigenvalues cluster.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from reference import check, reference, trainable

EPS64 = torch.finfo(torch.float64).eps


# ----------------------------------------------------------------- Jacobians
def jacobian(model: nn.Module, X: Tensor) -> Tensor:
    """``J`` per sample, ``[N, C, P]`` (float64, torch.func)."""
    ref = reference(model, X, None, approx=False)
    return ref.J.reshape(ref.out.shape[0], -1, ref.J.shape[1])


def ggn(model: nn.Module, X: Tensor, loss_fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``G = Σ_n J_nᵀ H_n J_n``, ``[P, P]`` (float64, torch.func)."""
    ref = reference(model, X, loss_fn, approx=False)
    # the supported losses have no cross-sample blocks: the reference's H is the whole Hessian
    torch.testing.assert_close(ref.H_full, ref.H, rtol=0, atol=1e-12 * max(ref.H.abs().max().item(), 1e-300))
    return ref.G


def slices(params: list[nn.Parameter]) -> list[slice]:
    """Where each parameter's entries lie in the flattened ``θ``."""
    out, start = [], 0
    for p in params:
        out.append(slice(start, start + p.numel()))
        start += p.numel()
    return out


# ----------------------------------------------------------------------- NTK
def ntk(J: Tensor) -> Tensor:
    """``K[n,c,m,d] = Σ_p J[n,c,p] J[m,d,p]`` from ``J`` ``[N, C, P]``."""
    return torch.einsum("ncp,mdp->ncmd", J, J)


# --------------------------------------------------------- output covariance
def random_spd(d: int, dtype=torch.float64) -> Tensor:
    """A random symmetric positive definite ``[d, d]`` matrix, well conditioned."""
    M = torch.randn(d, d, dtype=dtype)
    return M @ M.T / d + 0.5 * torch.eye(d, dtype=dtype)


def dense_covariance(cov: dict, params: list[nn.Parameter]) -> Tensor:
    """The dense ``Σ`` ``[P, P]`` that a dict of diagonal entries and ``(A, B)`` factors describes.

    A tensor shaped like ``p`` is the diagonal of ``p``'s block; ``(A, B)`` is the
    block ``torch.kron(B, A)`` in ``p.flatten()`` order. Blocks of different
    parameters are zero.
    """
    blocks = []
    for p in params:
        entry = cov[p]
        if isinstance(entry, tuple):
            A, B = entry
            block = torch.kron(B.to(torch.float64), A.to(torch.float64))
        else:
            assert entry.shape == p.shape
            block = torch.diag(entry.to(torch.float64).flatten())
        assert block.shape == (p.numel(), p.numel())
        blocks.append(block)
    return torch.block_diag(*blocks)


def output_covariance(J: Tensor, sigma: Tensor) -> Tensor:
    """``J_n Σ J_nᵀ`` per sample, ``[N, C, C]``."""
    return torch.einsum("ncp,pq,ndq->ncd", J, sigma, J)


def kronecker_factors(p: nn.Parameter, module: nn.Module) -> tuple[Tensor, Tensor]:
    """Random SPD ``(A, B)`` in KFAC's layout for a Linear or convolution parameter
    (weight: ``A`` ``[I, I]`` with ``I = p[0].numel()``, ``B`` ``[O, O]``; bias: ``A = [[1.]]``)."""
    out = p.shape[0]
    if p is getattr(module, "bias", None):
        return torch.ones(1, 1, dtype=torch.float64), random_spd(out)
    return random_spd(p[0].numel()), random_spd(out)


# ----------------------------------------------------------- eigensystems
def top_eigensystem(G: Tensor) -> tuple[Tensor, Tensor]:
    """All eigenvalues of ``G`` in descending order and the eigenvectors as rows."""
    values, vectors = torch.linalg.eigh(G)
    return values.flip(0), vectors.flip(1).T


def numerical_rank(G: Tensor, rtol: float = 1e-9) -> int:
    values = torch.linalg.eigvalsh(G)
    return int((values > rtol * values.abs().max()).sum())


def check_eigensystem(
    values: Tensor,
    vectors: Tensor,
    G: Tensor,
    label: str,
    rtol: float = 1e-8,
    vector_tol: Optional[float] = None,
    cluster_rtol: float = 1e-6,
) -> None:
    """Compare a top-k eigensystem (``values`` ``[k]``, ``vectors`` ``[k, P]`` rows) with ``eigh(G)``.

    - eigenvalues: the k largest of ``G``, descending, to ``rtol`` (absolute
      floor ``1e-12·λ_max`` for eigenvalues near zero);
    - the vectors are orthonormal;
    - eigenvalues that differ by less than ``cluster_rtol·λ_max`` form a cluster;
      a singleton's vector is compared up to sign, a cluster's vectors by the
      projector onto their span; a cluster cut by the k-th eigenvalue only
      requires the returned vectors to lie in the cluster's eigenspace.
    - The tolerance of a cluster is ``vector_tol`` if given, else the
      Davis–Kahan bound ``1e4·ε·λ_max / gap`` (gap to the other eigenvalues),
      at least ``1e-10``.
    """
    k = values.shape[0]
    all_values, all_vectors = top_eigensystem(G.to(torch.float64))
    scale = all_values[0].abs().item()
    vals, vecs = values.detach().to(torch.float64), vectors.detach().to(torch.float64)
    assert vecs.shape == (k, G.shape[0]), f"{label}: eigenvectors {tuple(vecs.shape)}, expected {(k, G.shape[0])}"
    assert (vals[:-1] >= vals[1:]).all(), f"{label}: eigenvalues not in descending order: {vals}"
    check(vals, all_values[:k], label + " eigenvalues", rtol=rtol, atol_factor=max(1e-12, rtol * 1e-3))
    eye = torch.eye(k, dtype=torch.float64)
    check(vecs @ vecs.T, eye, label + " orthonormal", rtol=0, atol_factor=max(1e-10, (vector_tol or 0)))
    i = 0
    while i < k:
        j = i + 1
        while j < all_values.shape[0] and all_values[j - 1] - all_values[j] <= cluster_rtol * scale:
            j += 1
        lower = all_values[i - 1] - all_values[i] if i > 0 else float("inf")
        upper = all_values[j - 1] - all_values[j] if j < all_values.shape[0] else float("inf")
        gap = float(min(lower, upper))
        tol = vector_tol if vector_tol is not None else max(1e-10, 1e4 * EPS64 * scale / max(gap, 1e-300))
        U = all_vectors[i:j]  # reference basis of the cluster, rows
        if j - i == 1:
            got, want = vecs[i], U[0]
            sign = 1.0 if torch.dot(got, want) >= 0 else -1.0
            torch.testing.assert_close(
                sign * got, want, rtol=0, atol=tol, msg=lambda m: f"{label}: eigenvector {i} (up to sign): {m}"
            )
        elif j <= k:
            torch.testing.assert_close(
                vecs[i:j].T @ vecs[i:j], U.T @ U, rtol=0, atol=tol,
                msg=lambda m: f"{label}: eigenspace of eigenvalues {i}..{j - 1}: {m}",
            )
        else:  # the k-th eigenvalue cuts the cluster: the vectors lie in its eigenspace
            inside = vecs[i:k] @ U.T @ U
            torch.testing.assert_close(
                inside, vecs[i:k], rtol=0, atol=tol,
                msg=lambda m: f"{label}: eigenvectors {i}..{k - 1} outside the eigenspace: {m}",
            )
        i = j


def flatten_per_parameter(values: dict, params: list[nn.Parameter], leading: int = 0) -> Tensor:
    """Concatenate per-parameter tensors ``[*lead, *p.shape]`` into ``[*lead, P]``."""
    return torch.cat([values[p].reshape(*values[p].shape[:leading], -1) for p in params], -1)


__all__ = [
    "check", "check_eigensystem", "dense_covariance", "flatten_per_parameter", "ggn", "jacobian",
    "kronecker_factors", "ntk", "numerical_rank", "output_covariance", "random_spd", "slices",
    "top_eigensystem", "trainable",
]
