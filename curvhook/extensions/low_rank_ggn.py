"""LowRankGGN: the top-``k`` eigenpairs of the GGN, without forming it where it is large.

``G = Bᵀ B`` with ``B`` ``[V·N, P]`` the stacked products ``J_nᵀ s_vn`` of the
loss Hessian's square-root columns. Three methods:

- ``"gram"`` (exact; ``auto`` when ``V·N ≤ P``): the Gram matrix ``B Bᵀ``
  ``[V·N, V·N]`` from one walk of the square-root columns (the rules contract it
  layer by layer, :meth:`~curvhook.rules.base.LayerRule.param_gram`), its
  eigendecomposition ``B Bᵀ u = λ u``, then ``w = Bᵀ u / √λ`` for the top ``k``
  from a second walk of ``k`` columns summed over the samples. ``G`` and ``B``
  have the same nonzero eigenvalues, so the pairs are exact.
- ``"dense"`` (exact; ``auto`` when ``P < V·N`` and ``P ≤ dense_limit``): ``G``
  itself as ``FullGGN`` forms it, and ``torch.linalg.eigh``.
- ``"randomized"`` (``auto`` otherwise): randomised subspace iteration with
  GGN-vector products (Halko, Martinsson & Tropp 2011, Algorithm 4.4 with a
  Rayleigh–Ritz step): ``Y = G Ω`` for ``k + oversampling`` Gaussian directions,
  ``power_iterations`` rounds of ``Q = qr(Y)``, ``Y = G Q``, then the
  eigenpairs of ``Qᵀ G Q``. It is exact (up to round-off) when the rank of ``G``
  is at most ``k + oversampling``; otherwise the error of the ``j``-th pair
  shrinks with the gap ``λ_{k+oversampling+1} / λ_j`` raised to the power
  ``2·power_iterations + 1``. It costs ``power_iterations + 2`` forward pushes
  and walks of ``k + oversampling`` columns.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from curvhook.errors import CurvhookError
from curvhook.extensions.base import Extension, FollowUp
from curvhook.extensions.full_ggn import FullGGN
from curvhook.extensions.ggn_vector_product import SummedProducts
from curvhook.extensions.ntk import _SUM, summed_grams
from curvhook.records import Operation
from curvhook.rules.base import LayerRule
from curvhook.sources import GGNVectorColumns, GivenColumns, LossHessianSqrt, NoWalk

METHODS = ("auto", "gram", "dense", "randomized")


class _GramOfColumns(Extension):
    """``B Bᵀ`` of the square-root columns, ``[V·N, V·N]`` (LowRankGGN's first walk)."""

    attribute = "_curvhook_gram"

    @property
    def source(self):
        return LossHessianSqrt(self.loss)

    def param_term(self, rule: LayerRule, op: Operation, name: str, value: Tensor, shared: bool) -> Tensor:
        return rule.param_jac_t_mat_prod(op, name, value) if shared else rule.param_gram(op, name, value)

    def add_term(self, totals: dict, p: nn.Parameter, term: Tensor) -> None:
        if term.dim() != 2:
            return super().add_term(totals, p, term)
        old = totals.get(_SUM)
        totals[_SUM] = term if old is None else old.add_(term)

    def finalize(self, totals: dict, shared: frozenset[int], params: list[nn.Parameter], root: Tensor) -> Tensor:
        total, _ = summed_grams(totals, shared, params, 0, root)
        return total


class LowRankGGN(Extension):
    """Writes ``LowRankGGN.eigenvalues`` ``[k]`` (descending) and ``p.ggn_eigvecs`` ``[k, *p.shape]``.

    The top-``k`` eigenpairs of the GGN ``G`` of the scalar you backpropagate
    (as for ``FullGGN``); the eigenvectors are orthonormal over all trainable
    parameters, split per parameter (views of one ``[k, P]`` buffer,
    ``LowRankGGN.eigenvectors``). See the module docstring for the methods.

    Args:
        k: The number of eigenpairs.
        method: ``"auto"``, ``"gram"``, ``"dense"`` or ``"randomized"``.
        oversampling: Extra directions of the randomised method.
        power_iterations: Rounds of subspace iteration of the randomised method.
        generator: A ``torch.Generator`` for the randomised method's directions.
        dense_limit: The largest ``P`` for which ``auto`` forms ``G`` when ``P < V·N``.
        loss: See :class:`~curvhook.extensions.base.Extension`.

    ``k`` above the rank of ``G`` (a batch of ``N`` samples with cross-entropy
    over ``C`` classes gives rank at most ``N·(C − 1)``) warns: the eigenvalues
    beyond the rank are returned as 0; their eigenvectors are orthonormal vectors
    of the null space from ``"dense"`` and ``"randomized"``, and zeros from
    ``"gram"``, whose products do not reach the null space. ``k`` above ``P``, or
    above the ``V·N`` rows of the Gram matrix with ``"gram"``, raises. The
    eigenpairs of a sum are not sums: ``accumulate=True`` is refused.
    """

    attribute = "ggn_eigvecs"
    accumulates = False
    distributes = False
    source_type = NoWalk

    def __init__(
        self, k: int, method: str = "auto", oversampling: int = 10, power_iterations: int = 2,
        generator: Optional[torch.Generator] = None, dense_limit: int = 8192, loss: Optional[nn.Module] = None,
    ) -> None:
        super().__init__(loss)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"LowRankGGN(k) needs an integer k ≥ 1; got {k!r}.")
        if method not in METHODS:
            raise ValueError(f"LowRankGGN(method={method!r}): choose one of {METHODS}.")
        self.k, self.method = k, method
        self.oversampling, self.power_iterations = oversampling, power_iterations
        self.generator, self.dense_limit = generator, dense_limit
        self.eigenvalues: Optional[Tensor] = None
        self.eigenvectors: Optional[Tensor] = None
        self.used_method: Optional[str] = None

    @property
    def source(self):
        return NoWalk(self.loss)

    def param_term(self, rule: LayerRule, op: Operation, name: str, value: Tensor, shared: bool) -> Tensor:
        raise AssertionError("LowRankGGN backpropagates nothing in its first walk")

    # ------------------------------------------------------------------ the methods
    def finalize(self, totals: dict, shared: frozenset[int], params: list[nn.Parameter], root: Tensor) -> FollowUp:
        size = sum(p.numel() for p in params)
        columns = root[0].numel() * root.shape[0]  # V·N for the usual losses (one column per output entry)
        method = self.method
        if method == "auto":
            if columns <= size:
                method = "gram"
            elif size <= self.dense_limit:
                method = "dense"
            else:
                method = "randomized"
        if self.k > size:
            raise CurvhookError(f"LowRankGGN(k={self.k}): the model has only P = {size} trainable parameters.")
        return self._start(method, params, size, root)

    def _start(self, method: str, params: list[nn.Parameter], size: int, root: Tensor) -> FollowUp:
        self.used_method = method
        if method == "gram":
            return FollowUp(LossHessianSqrt(self.loss), _GramOfColumns(self.loss), lambda gram: self._from_gram(gram, params, root))
        if method == "dense":
            full = FullGGN(self.loss)
            return FollowUp(full.source, full, lambda matrix: self._from_matrix(matrix, params))
        return self._randomized(params, size, root)

    def _from_gram(self, gram: Tensor, params: list[nn.Parameter], root: Tensor) -> FollowUp:
        rows = gram.shape[0]
        if self.k > rows and self.method == "auto":  # fewer columns than guessed (cross-entropy has C − 1)
            size = sum(p.numel() for p in params)
            return self._start("dense" if size <= self.dense_limit else "randomized", params, size, root)
        if self.k > rows:
            raise CurvhookError(
                f"LowRankGGN(k={self.k}, method='gram'): the Gram matrix of the batch is {rows} × {rows}, so G "
                f"has at most {rows} nonzero eigenvalues. Ask for k ≤ {rows}, or use method='dense'."
            )
        values, vectors = torch.linalg.eigh(gram)
        values, vectors = values.flip(0)[: self.k], vectors.flip(1)[:, : self.k]
        positive = _positive(values)
        scale = torch.where(positive, values.clamp_min(torch.finfo(values.dtype).tiny).rsqrt(), 0.0)
        n = root.shape[0]
        weights = (vectors * scale).reshape(-1, n, self.k)  # [V, N, k]: w = Bᵀ u / √λ
        walk = SummedProducts(GivenColumns(self.loss, weights))
        return FollowUp(walk.source, walk, lambda sums: self._result(values.clamp_min(0), _stack(sums, params, self.k, root), positive))

    def _from_matrix(self, matrix: Tensor, params: list[nn.Parameter]) -> tuple:
        values, vectors = torch.linalg.eigh(matrix)
        values, vectors = values.flip(0)[: self.k], vectors.flip(1)[:, : self.k]
        return self._result(values.clamp_min(0), vectors.T, _positive(values))

    def _randomized(self, params: list[nn.Parameter], size: int, root: Tensor) -> FollowUp:
        width = min(size, self.k + self.oversampling)
        where = self.generator.device if self.generator is not None else torch.device("cpu")
        omega = torch.randn(size, width, generator=self.generator, device=where, dtype=root.dtype).to(root.device)
        rounds = [self.power_iterations]

        def product(basis: Tensor, then) -> FollowUp:  # G @ basis, [P, K]
            tangents = _split(basis.T, params)
            walk = SummedProducts(GGNVectorColumns(self.loss, tangents))
            return FollowUp(walk.source, walk, lambda sums: then(_stack(sums, params, basis.shape[1], root).T))

        def after(y: Tensor, q: Optional[Tensor] = None):
            if q is not None:  # y = G q: the Rayleigh–Ritz step
                small = q.T @ y
                values, vectors = torch.linalg.eigh((small + small.T) / 2)
                values, vectors = values.flip(0)[: self.k], vectors.flip(1)[:, : self.k]
                return self._result(values.clamp_min(0), (q @ vectors).T, _positive(values))
            basis = torch.linalg.qr(y).Q
            if rounds[0] > 0:
                rounds[0] -= 1
                return product(basis, after)
            return product(basis, lambda z: after(z, basis))

        return product(omega, after)

    def _result(self, values: Tensor, vectors: Tensor, positive: Tensor) -> tuple:
        values = torch.where(positive, values, 0.0)  # round-off below the rank is no eigenvalue
        if not bool(positive.all()):
            warnings.warn(
                f"LowRankGGN: only {int(positive.sum())} of the k = {self.k} top eigenvalues of the GGN are "
                "nonzero; the eigenvectors of the zero eigenvalues are returned as zeros.",
                stacklevel=2,
            )
        return values, vectors

    # ------------------------------------------------------------------ results
    def reset(self, params: list[nn.Parameter]) -> None:
        super().reset(params)
        self.eigenvalues = self.eigenvectors = None

    def rescale(self, params: list[nn.Parameter], factor: float) -> None:
        if self.eigenvalues is not None:
            self.eigenvalues.mul_(factor)  # the eigenvectors stay

    def write(self, results: tuple, params: list[nn.Parameter], accumulate: bool) -> None:
        if accumulate and self.eigenvalues is not None:
            raise CurvhookError(
                "LowRankGGN: the eigenpairs of a sum are not the sums of eigenpairs; accumulate=True and "
                "several forward passes reached by one backward are refused. Pass one batch, or use "
                "GGNVectorProduct (which accumulates) with your own eigensolver."
            )
        values, vectors = results
        dtype = params[0].dtype if params else values.dtype
        self.eigenvalues, self.eigenvectors = values.to(dtype), vectors.to(dtype).contiguous()
        start = 0
        for p in params:
            setattr(p, self.attribute, self.eigenvectors[:, start : start + p.numel()].view(-1, *p.shape))
            start += p.numel()

    def result_bytes(self, params: list[nn.Parameter]) -> int:
        return 0 if self.eigenvectors is None else self.eigenvectors.untyped_storage().nbytes()


def _positive(values: Tensor) -> Tensor:
    """Eigenvalues above round-off relative to the largest."""
    top = values.abs().max() if values.numel() else values.new_zeros(())
    return values > top * values.shape[0] * torch.finfo(values.dtype).eps * 100


def _split(rows: Tensor, params: list[nn.Parameter]) -> dict[int, Tensor]:
    """``[K, P]`` → ``[K, *p.shape]`` by ``id(p)``."""
    out, start = {}, 0
    for p in params:
        out[id(p)] = rows[:, start : start + p.numel()].reshape(-1, *p.shape).to(p.dtype)
        start += p.numel()
    return out


def _stack(sums: dict, params: list[nn.Parameter], k: int, like: Tensor) -> Tensor:
    """``[K, *p.shape]`` by ``id(p)`` → ``[K, P]`` (zeros for a parameter the output does not depend on)."""
    parts = [sums[id(p)].reshape(k, -1) if id(p) in sums else like.new_zeros(k, p.numel()) for p in params]
    return torch.cat(parts, 1)
