"""KFAC: Kronecker-factored GGN blocks of the layers that share a weight matrix over positions.

A layer ``y_nt = W a_nt + b`` (``nn.Linear``: ``a`` the input at position ``t``;
``nn.Conv1d/2d/3d`` with ``groups=1``: the unfolded patch of output position ``t``,
``W`` as ``[C_out, C_in·K]``) has, per sample, ``J_Wᵀ s = Σ_t b_t a_tᵀ`` where ``b_t``
is the column ``s`` backpropagated to the layer output at position ``t``. KFAC
approximates the GGN block of ``W`` by one Kronecker product, following curvlinops'
``KFACLinearOperator`` exactly (docs/mathematics.md, "KFAC"):

- ``approx="expand"``: ``A = (1/(N·T)) Σ_{n,t} a_nt a_ntᵀ`` and ``B = Σ_{v,n,t} b_vnt b_vntᵀ``;
- ``approx="reduce"``: ``A = (1/N) Σ_n ā_n ā_nᵀ`` with ``ā_n = (1/T) Σ_t a_nt``, and
  ``B = Σ_{v,n} (Σ_t b_vnt)(Σ_t b_vnt)ᵀ``.

The columns ``s`` are the loss Hessian's square-root factor (``mc_samples=None``:
KFLR, the type-2 Fisher) or ``M`` sampled columns scaled by ``1/√M`` (the MC
Fisher); the reduction of the loss is in them, so ``B`` is the curvature of the
scalar you backpropagate. ``G_W ≈ B ⊗ A`` in the row-major order of ``W.flatten()``
(``A ⊗ B`` for curvlinops' column-stacked ``vec(W)``). The bias gets ``(1, B)``:
its block is ``B``. A layer called several times adds the ``A`` and the ``B``
of its calls (each call's ``A`` with its own ``N·T``), as curvlinops' hooks do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

from curvhook.extensions.base import Extension
from curvhook.extensions.diag_ggn_mc import check_generator, check_mc_samples
from curvhook.records import Operation
from curvhook.rules.base import LayerRule
from curvhook.sources import LossHessianSqrt, SampledLossHessianSqrt, Source

APPROXIMATIONS = ("expand", "reduce")


@dataclass(eq=False)
class _Factors:
    """One parameter's Kronecker factors, summed over the calls that use it.

    Attributes:
        a: ``[I, I]``; ``None`` for a bias (its ``A`` is ``[[1]]``, whatever the calls).
        b: ``[O, O]``.
        n: The samples of the backward pass (to average ``A`` over passes).
    """

    a: Optional[Tensor]
    b: Tensor
    n: int

    def __add__(self, other: "_Term") -> "_Term":
        if isinstance(other, _Unstructured):
            return other
        return _Factors(None if self.a is None else self.a + other.a, self.b + other.b, self.n)


class _Unstructured:
    """A parameter used by an operation without Kronecker structure: it gets no ``kfac``."""

    def __add__(self, other: "_Term") -> "_Term":
        return self

    __radd__ = __add__


_UNSTRUCTURED = _Unstructured()
_Term = Union[_Factors, _Unstructured]


def _gram(rows: Tensor) -> Tensor:
    """``Σ_r x_r x_rᵀ`` over the rows of ``[R, D]``: ``[D, D]``."""
    return torch.mm(rows.T, rows)


def _rows_gram(x: Tensor) -> Tensor:
    """``Σ x_r x_rᵀ`` over every row of ``[..., T, D]``: ``[D, D]``.

    A transposed view of contiguous ``[..., D, T]`` memory (a convolution's
    output columns) is not copied into rows when ``D < T``: the ``[D, D]``
    products of its ``[D, T]`` blocks are formed by one batched GEMM and summed,
    a temporary of ``D/T`` the size of the copy.
    """
    d, t = x.shape[-1], x.shape[-2]
    if not x.is_contiguous() and x.transpose(-1, -2).is_contiguous() and d < t:
        blocks = x.transpose(-1, -2).reshape(-1, d, t)
        return torch.bmm(blocks, blocks.transpose(1, 2)).sum(0)
    return _gram(x.reshape(-1, d))


def kfac_dense(p: nn.Parameter) -> Tensor:
    """The dense ``[p.numel(), p.numel()]`` matrix that ``p.kfac`` represents, in ``p.flatten()`` order.

    For tests and small models: ``B ⊗ A`` (``torch.kron(B, A)``).
    """
    a, b = p.kfac
    return KFAC.dense(a, b)


class KFAC(Extension):
    """Writes ``p.kfac = (A, B)`` for the weight and the bias of ``nn.Linear`` and ``nn.Conv1d/2d/3d``.

    ``A`` is ``[I, I]`` (``I`` the input features, ``C_in·∏kernel`` for a
    convolution; ``[[1]]`` for a bias) and ``B`` is ``[O, O]`` (``O`` the output
    features or channels). The GGN block of ``p``, in ``p.flatten()`` order, is
    approximated by ``torch.kron(B, A)`` (:func:`kfac_dense`). Other parameters
    (normalisation, embeddings, attention, grouped convolutions, functional
    layers) get no ``kfac``: use ``DiagGGN`` or ``FullGGN`` for them.

    Args:
        mc_samples: ``None``: the exact square-root factor of the loss Hessian
            (KFLR). An ``int`` ``M``: ``M`` sampled columns, as in ``DiagGGNMC``.
        approx: ``"expand"`` or ``"reduce"``: how positions (sequence axes, the
            output positions of a convolution) enter the factors.
        generator: A ``torch.Generator`` for the draws (with ``mc_samples`` only).
        loss: See :class:`~curvhook.extensions.base.Extension`.

    With ``accumulate=True`` the ``B`` of successive backward passes are summed
    and the ``A`` averaged, weighted by their numbers of samples: the factors of
    all samples seen, as curvlinops forms them over a data loader.
    """

    attribute = "kfac"
    source_type = LossHessianSqrt

    def __init__(
        self,
        mc_samples: Optional[int] = None,
        approx: str = "expand",
        generator: Optional[torch.Generator] = None,
        loss: Optional[nn.Module] = None,
    ) -> None:
        super().__init__(loss)
        if approx not in APPROXIMATIONS:
            raise ValueError(f"approx must be one of {APPROXIMATIONS}, got {approx!r}.")
        if mc_samples is None and generator is not None:
            raise ValueError("generator= draws samples: pass it together with mc_samples=M.")
        self.mc_samples = None if mc_samples is None else check_mc_samples(mc_samples)
        self.approx = approx
        self.generator = check_generator(generator)
        self._counts: dict[int, int] = {}
        self._last: Optional[tuple] = None

    @property
    def source(self) -> Source:
        if self.mc_samples is None:
            return LossHessianSqrt(self.loss)
        return SampledLossHessianSqrt(self.loss, self.mc_samples, self.generator)

    @staticmethod
    def dense(a: Tensor, b: Tensor) -> Tensor:
        """``B ⊗ A``: the dense block a factor pair represents, in ``p.flatten()`` (row-major) order."""
        return torch.kron(b, a)

    def _factors(self, op: Operation, value: Tensor, a: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
        """``(A, B)`` of one call (computed once for its weight and bias)."""
        last = self._last
        if last is not None and last[0] is op and last[1] is value:
            return last[2]
        n, t = a.shape[:2]
        if self.approx == "expand":  # every position a sample of its own
            A = _rows_gram(a).div_(n * t)
            B = _rows_gram(m)
        else:  # positions reduced: the mean input, the summed output column
            A = _gram(a.mean(1)).div_(n)
            B = _gram(m.sum(2).flatten(0, 1))
        self._last = (op, value, (A, B))
        return A, B

    def param_term(
        self, rule: LayerRule, op: Operation, name: str, value: Tensor, shared: bool
    ) -> _Term:
        if name not in ("weight", "bias"):
            return _UNSTRUCTURED
        factors = rule.position_factors(op, value)
        if factors is None:
            return _UNSTRUCTURED
        a, m = factors
        p = getattr(op.module, name)
        if p.numel() != (a.shape[-1] if name == "weight" else 1) * m.shape[-1]:
            return _UNSTRUCTURED
        A, B = self._factors(op, value, a, m)
        return _Factors(A if name == "weight" else None, B, a.shape[0])

    def finalize(
        self, totals: dict[int, _Term], shared: frozenset[int], params: list[nn.Parameter], root: Tensor
    ) -> dict[int, _Factors]:
        self._last = None
        return {key: term for key, term in totals.items() if isinstance(term, _Factors)}

    def reset(self, params: list[nn.Parameter]) -> None:
        super().reset(params)
        self._counts = {}

    def write(self, results: dict[int, _Factors], params: list[nn.Parameter], accumulate: bool) -> None:
        for p in params:
            term = results.get(id(p))
            if term is None:
                continue
            b = term.b.to(p.dtype)
            a = b.new_ones(1, 1) if term.a is None else term.a.to(p.dtype)
            if accumulate and id(p) in self._written and hasattr(p, self.attribute):
                old_a, old_b = p.kfac
                n_old = self._counts[id(p)]
                a = (old_a * n_old + a * term.n) / (n_old + term.n)
                b = old_b + b
                self._counts[id(p)] = n_old + term.n
            else:
                self._counts[id(p)] = term.n
            setattr(p, self.attribute, (a, b))
            self._written.add(id(p))

    def reduce_across_processes(self, params: list[nn.Parameter], group=None) -> None:
        """``B`` summed; ``A`` averaged over every process's samples (weighted by their numbers)."""
        from curvhook import distributed

        named = [p for p in params if hasattr(p, self.attribute)]
        weights = [torch.tensor([float(self._counts.get(id(p), 0))], dtype=p.kfac[0].dtype, device=p.device) for p in named]
        a_weighted = [p.kfac[0] * w for p, w in zip(named, weights)]
        b = [p.kfac[1] for p in named]
        distributed.sum_in_place([*a_weighted, *b, *weights], group)
        for p, a, b_sum, w in zip(named, a_weighted, b, weights):
            self._counts[id(p)] = int(w.item())
            setattr(p, self.attribute, (a / w.clamp_min(1), b_sum))

    def rescale(self, params: list[nn.Parameter], factor: float) -> None:
        for p in params:  # B carries the loss; A is an average of the inputs
            if hasattr(p, self.attribute):
                a, b = p.kfac
                setattr(p, self.attribute, (a, b * factor))

    def _options(self) -> list[str]:
        options = [] if self.mc_samples is None else [f"mc_samples={self.mc_samples}"]
        if self.approx != "expand":
            options.append(f"approx={self.approx!r}")
        if self.generator is not None:
            options.append(f"generator={self.generator!r}")
        return options + super()._options()
