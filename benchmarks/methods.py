"""Every benchmarked method: curvhook's extensions and the peers' equivalents.

A method is built on a :class:`~benchmarks.problems.Problem` and returns a
:class:`Runner` whose ``step()`` is one full computation as a training loop
would run it (forward, loss, backward, plus whatever the library needs), and
whose ``result()`` returns the computed quantity flattened in
``model.parameters()`` order, for the numerical cross-check (the flattening is
not part of the timed step).

Every method is given its usage that counts and its fastest form:

- ``curvhook:X`` is written as the README tells users: a new
  ``with extend(model, X()):`` block around forward, loss and backward of every
  step. ``curvhook:X@one-block`` is the steady state inside one block entered
  once (entry timed apart as ``entry_ms``).
- ``torchfunc:BatchJacobian`` is ``vmap(jacrev)`` returning per-parameter
  tensors, as torch.func gives them.
- ``floor:BatchJacobian-write-*`` write a result of BatchJacobian's size once
  (into fresh memory or memory written before): no method that returns it
  can be faster.

Quantities (what ``result()`` returns, all for the mean-reduced loss):

- ``diag_ggn``: ``diag(G)``, ``[P]``
- ``full_ggn``: ``G``, ``[P, P]``
- ``batch_jacobian``: ``[N, C, P]``
- ``batch_grad``: the per-sample gradients of the mean loss, ``[N, P]``
- ``ntk``: the empirical NTK ``[N·C, N·C]``; ``output_covariance``: ``J_n Σ J_nᵀ``
  ``[N, C, C]`` for a fixed diagonal ``Σ``; ``ggn_vector_product``: ``G v`` ``[P]``
  for a fixed direction (:func:`product_arguments`)
- anything else is not cross-checked (stochastic or a different object).

Peers that are not importable are reported as skipped; methods that would
need too much memory or time on a problem say why in :func:`Method.skip_reason`.
"""

from __future__ import annotations

import copy
import importlib
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev, vmap

from benchmarks.problems import Problem

# A dense [P, P] matrix above this P is not attempted (8 bytes * P² ~ 3 GB at 20k).
MAX_DENSE_P = 20_000
# A batch Jacobian [N, C, P] above this many entries is not attempted (~6 GB of float32).
MAX_JACOBIAN_ENTRIES = 1_600_000_000
# curvlinops gets the diagonal column by column; above MAX_DENSE_P it runs this
# many columns and the time is extrapolated to all P columns.
CURVLINOPS_CHUNK = 64


class Runner:
    """One method bound to one problem.

    Attributes:
        note: Shown in the table's note column.
        extrapolate: Multiply the measured time by this (curvlinops' chunks).
    """

    note: str = ""
    extrapolate: float = 1.0

    def step(self) -> None:
        """Run one step: what a training loop runs per batch."""
        raise NotImplementedError

    def result(self) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """The quantity of the last step, for the cross-check.

        Returns:
            ``(flat result, index of the entries of the reference it covers or None)``.
        """
        return None, None

    def close(self) -> None:
        """Release what the method holds."""

    def suspend(self) -> None:
        """Leave whatever the method keeps active between steps (curvhook's block)."""

    def resume(self) -> None:
        """Undo :meth:`suspend`."""


def _zero_grad(params: list[nn.Parameter]) -> None:
    """Set every ``p.grad`` to ``None``, as ``optimizer.zero_grad()`` does."""
    for p in params:
        p.grad = None


def _flat(tensors: list[Tensor], lead: int = 0) -> Tensor:
    """Concatenate per-parameter tensors along a flat ``P`` axis.

    Args:
        tensors: ``[*lead_dims, *p.shape]`` per parameter.
        lead: The number of leading dimensions.

    Returns:
        ``[*lead_dims, P]``.
    """
    return torch.cat([t.reshape(*t.shape[:lead], -1) for t in tensors], dim=lead)


# ---------------------------------------------------------------------- plain
class Plain(Runner):
    """The plain step, ``loss.backward()``: the denominator of the ratios to plain.

    Args:
        pb: The problem.
    """

    def __init__(self, pb: Problem) -> None:
        self.pb = pb

    def step(self) -> None:
        """Forward, loss and backward."""
        _zero_grad(self.pb.params)
        self.pb.loss_fn(self.pb.model(self.pb.X), self.pb.y).backward()


# ------------------------------------------------------------------- curvhook
CURVHOOK_QUANTITY = {
    "DiagGGN": "diag_ggn", "FullGGN": "full_ggn", "BatchJacobian": "batch_jacobian", "BatchGrad": "batch_grad",
    "NTK": "ntk", "OutputCovariance-diag": "output_covariance", "GGNVectorProduct": "ggn_vector_product",
}

# Keyword arguments every extension is built with. ``split_attention`` is passed
# explicitly, so the default measurement counts ``nn.MultiheadAttention`` as its
# operations both before and after the extension's default changes to that.
EXTENSION_KWARGS = {"DiagGGNApprox": {"split_attention": True}}

# Variants of an extension, named ``Extension-variant``: the keyword arguments they
# change, and the module type without which a variant computes what the default does.
VARIANTS = {"attention-as-one": {"split_attention": False}, "mc": {"mc_samples": 1}}
VARIANT_NEEDS = {"attention-as-one": nn.MultiheadAttention}

# Suffix of the methods timed in steady state inside one ``extend`` block.
ONE_BLOCK = "@one-block"


def product_arguments(pb: Problem) -> dict:
    """The fixed inputs of the #22 products on a problem: a diagonal weight covariance and a direction.

    Both are drawn once per problem (seeded) and keyed by parameter, so that
    every method multiplies with the same numbers.
    """
    cached = getattr(pb, "_product_arguments", None)
    if cached is None:
        g = torch.Generator().manual_seed(22)
        cached = {
            "variance": {p: torch.rand(p.shape, generator=g, dtype=p.dtype) for p in pb.params},
            "direction": {p: torch.randn(p.shape, generator=g, dtype=p.dtype) for p in pb.params},
        }
        object.__setattr__(pb, "_product_arguments", cached)
    return cached


# Extensions whose constructor takes problem data (issue #22), by benchmark name.
PROBLEM_EXTENSIONS = {
    "OutputCovariance-diag": lambda ext, pb: ext.OutputCovariance(product_arguments(pb)["variance"]),
    "GGNVectorProduct": lambda ext, pb: ext.GGNVectorProduct(product_arguments(pb)["direction"]),
}


def _extension(module, name: str, pb: Optional[Problem] = None):
    """Build one extension from its benchmark name.

    Args:
        module: ``curvhook.extensions``.
        name: ``DiagGGNApprox`` or a variant such as ``DiagGGNApprox-attention-as-one``.
        pb: The problem, for the extensions of :data:`PROBLEM_EXTENSIONS`.

    Returns:
        The extension, built with :data:`EXTENSION_KWARGS` updated by the variant's.
    """
    if name in PROBLEM_EXTENSIONS:
        return PROBLEM_EXTENSIONS[name](module, pb)
    base, _, variant = name.partition("-")
    kwargs = {**EXTENSION_KWARGS.get(base, {}), **(VARIANTS[variant] if variant else {})}
    return getattr(module, base)(**kwargs)


class Curvhook(Runner):
    """curvhook as the README writes it: a new ``extend`` block around every step.

    Each step builds its extensions, enters ``extend(model, *extensions)``, runs
    forward, loss and ``backward()`` inside it and leaves the block, so that
    the block's entry and exit, and the first pass of a block (which recycles
    no memory), are part of every step.

    Args:
        pb: The problem.
        names: Extension names (see :func:`_extension`), all in one block.
    """

    def __init__(self, pb: Problem, names: tuple[str, ...]) -> None:
        from curvhook import extend
        from curvhook import extensions as ext

        self.extend, self.module = extend, ext
        self.pb, self.names = pb, names
        self.exts = [_extension(ext, n, pb) for n in names]

    def step(self) -> None:
        """Forward, loss and backward inside a fresh ``extend`` block."""
        pb = self.pb
        _zero_grad(pb.params)
        self.exts = [_extension(self.module, n, pb) for n in self.names]
        with self.extend(pb.model, *self.exts):
            loss = pb.loss_fn(pb.model(pb.X), pb.y)
            loss.backward()

    def result(self):
        """The first extension's result, flattened in parameter order."""
        name = self.names[0].partition("-")[0]
        params = self.pb.params
        if name == "DiagGGN":
            return _flat([p.diag_ggn for p in params]), None
        if name == "BatchJacobian":
            return _flat([p.batch_jacobian for p in params], lead=2), None
        if name == "FullGGN":
            return self.exts[0].matrix, None
        if name == "DiagGGNApprox":
            return _flat([p.diag_ggn_approx for p in params]), None
        if name == "BatchGrad":
            return _flat([p.grad_batch for p in params], lead=1), None
        if name == "NTK":
            return self.exts[0].matrix.flatten(0, 1).flatten(1), None
        if name == "OutputCovariance":
            return self.exts[0].covariance, None
        if name == "GGNVectorProduct":
            return _flat([p.ggn_v for p in params]), None
        return None, None


class CurvhookOneBlock(Curvhook):
    """Steady state inside one ``extend`` block entered once (its entry is timed apart).

    Args:
        pb: The problem.
        names: Extension names (see :func:`_extension`), all in one block.
    """

    def __init__(self, pb: Problem, names: tuple[str, ...]) -> None:
        super().__init__(pb, names)
        t0 = time.perf_counter()
        self.ctx = self.extend(pb.model, *self.exts)
        self.ctx.__enter__()
        self.entry_s = time.perf_counter() - t0

    def step(self) -> None:
        """Forward, loss and backward inside the block entered at construction."""
        _zero_grad(self.pb.params)
        self.pb.loss_fn(self.pb.model(self.pb.X), self.pb.y).backward()

    def close(self) -> None:
        """Leave the block."""
        if self.ctx is not None:
            self.ctx.__exit__(None, None, None)
            self.ctx = None

    def suspend(self) -> None:
        """Leave the block between blocks of steps of another method in this process.

        The block's global module hooks and torch-function mode would slow down
        any other method timed in the same process.
        """
        self.close()

    def resume(self) -> None:
        """Enter the block again."""
        if self.ctx is None:
            self.ctx = self.extend(self.pb.model, *self.exts)
            self.ctx.__enter__()


# ------------------------------------------------------------------- BackPACK
class Backpack(Runner):
    """A BackPACK extension, as its documentation writes it.

    The model and the loss are ``backpack.extend``-ed copies; the forward pass
    and the loss run outside ``with backpack(ext):``, the backward inside.
    BackPACK's extensions have no options that make them faster.

    Args:
        pb: The problem.
        name: The extension's class name in ``backpack.extensions``.
    """

    ATTR = {
        "DiagGGNExact": "diag_ggn_exact", "DiagGGNMC": "diag_ggn_mc", "BatchGrad": "grad_batch", "KFAC": "kfac",
        "KFLR": "kflr", "BatchL2Grad": "batch_l2", "SumGradSquared": "sum_grad_squared",
    }

    def __init__(self, pb: Problem, name: str) -> None:
        import backpack
        from backpack import extensions as bext

        self.backpack = backpack.backpack
        self.name = name
        self.ext = getattr(bext, name)()
        # BackPACK's extend() keeps its hooks on the module: work on copies.
        self.model = backpack.extend(copy.deepcopy(pb.model))
        self.loss_fn = backpack.extend(copy.deepcopy(pb.loss_fn))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.X, self.y = pb.X, pb.y

    def step(self) -> None:
        """Forward and loss, then backward inside ``with backpack(ext):``."""
        _zero_grad(self.params)
        attr = self.ATTR[self.name]
        for p in self.params:  # so that a missing result is seen below
            if hasattr(p, attr):
                delattr(p, attr)
        loss = self.loss_fn(self.model(self.X), self.y)
        with self.backpack(self.ext):
            loss.backward()
        # BackPACK only warns when it meets a module it has no rule for and leaves
        # the attribute off its parameters: report that instead of a clean "ok".
        missing = [p for p in self.params if not hasattr(p, attr)]
        if missing:
            self.status = "incomplete"
            self.note = f"no {attr} on {len(missing)} of {len(self.params)} parameters"

    def result(self):
        """DiagGGNExact's diagonal or BatchGrad's per-sample gradients, flattened."""
        if getattr(self, "status", "ok") != "ok":
            return None, None
        if self.name == "DiagGGNExact":
            return _flat([p.diag_ggn_exact for p in self.params]), None
        if self.name == "BatchGrad":
            return _flat([p.grad_batch for p in self.params], lead=1), None
        return None, None


# --------------------------------------------------------------------- Opacus
class Opacus(Runner):
    """Opacus' ``GradSampleModule`` (its default ``hooks`` mode): per-sample gradients ``p.grad_sample``.

    The model is wrapped once (a copy: the wrapper keeps hooks on it); a step
    clears the per-sample gradients as ``optimizer.zero_grad()`` does, then runs
    forward, loss and backward. ``loss_reduction="mean"`` makes Opacus scale
    ``grad_sample`` by ``N`` (the gradient of each sample's own loss); ``result()``
    divides by ``N`` outside the timed step, to compare with ``BatchGrad``.

    Args:
        pb: The problem.
    """

    def __init__(self, pb: Problem) -> None:
        from opacus import GradSampleModule

        # Opacus records activations only in training mode (the problems run in eval mode;
        # mlp and 3c3d have no layer whose output depends on the mode).
        self.model = GradSampleModule(copy.deepcopy(pb.model).train(), loss_reduction="mean")
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.pb = pb

    def step(self) -> None:
        """Clear ``grad``/``grad_sample``, then forward, loss and backward."""
        self.model.zero_grad(set_to_none=True)
        self.pb.loss_fn(self.model(self.pb.X), self.pb.y).backward()

    def result(self):
        """The per-sample gradients of the mean loss, ``[N, P]``."""
        return _flat([p.grad_sample / self.pb.batch_size for p in self.params], lead=1), None

    def close(self) -> None:
        """Remove Opacus' hooks."""
        self.model._close()



# ----------------------------------------------------------------- NNGeometry
class NNGeometry(Runner):
    """NNGeometry's ``FIM(variant="classif_logits")`` (the GGN of the mean cross-entropy).

    Args:
        pb: The problem.
        rep: ``"diag"`` (``PMatDiag``) or ``"dense"`` (``PMatDense``).
    """

    def __init__(self, pb: Problem, rep: str) -> None:
        from nngeometry.metrics import FIM
        from nngeometry.object import PMatDense, PMatDiag
        from torch.utils.data import DataLoader, TensorDataset

        self.FIM = FIM
        self.rep = {"diag": PMatDiag, "dense": PMatDense}[rep]
        self.kind = rep
        from nngeometry.layercollection import LayerCollection

        self.model = pb.model
        self.loader = DataLoader(TensorDataset(pb.X, pb.y), batch_size=pb.batch_size)
        self.matrix = None
        # NNGeometry takes every parameter of a layer, trainable or not: when some are
        # frozen, name the trainable layers (it raises on layers it does not know).
        self.lc = None
        if any(not p.requires_grad for p in pb.model.parameters()):
            self.lc = LayerCollection()
            for m in pb.model.modules():
                own = list(m.parameters(recurse=False))
                if own and all(p.requires_grad for p in own):
                    self.lc.add_layer_from_model(pb.model, m)

    def step(self) -> None:
        """Build the matrix from a one-batch loader and read it out."""
        # FIM(variant="classif_logits") is the exact Fisher of the softmax = the GGN
        # of the mean cross-entropy; NNGeometry runs its own forward/backward passes.
        self.matrix = self.FIM(
            self.model, self.loader, self.rep, variant="classif_logits", layer_collection=self.lc
        )
        if self.kind == "diag":
            self.out = self.matrix.get_diag()
        else:
            self.out = self.matrix.to_torch()

    def result(self):
        """The diagonal or the dense matrix."""
        return self.out, None


# ----------------------------------------------------------------- curvlinops
class Curvlinops(Runner):
    """``GGNLinearOperator`` applied to identity columns (all, or a chunk).

    curvlinops 3 has no exact diagonal of its own (``hutchinson_diag`` and
    ``xdiag`` are estimates), so its exact diagonal is read off ``G @ I``.

    Args:
        pb: The problem.
        kind: ``"diag"`` or ``"dense"``.
    """

    def __init__(self, pb: Problem, kind: str) -> None:
        from curvlinops import GGNLinearOperator

        self.GGN = GGNLinearOperator
        self.pb, self.kind = pb, kind
        P = pb.num_params
        self.cols = P if P <= MAX_DENSE_P else min(CURVLINOPS_CHUNK, P)
        self.E = torch.eye(P, self.cols)
        if self.cols < P:
            self.extrapolate = P / self.cols
            self.note = f"timed {self.cols} of {P} columns, extrapolated x{self.extrapolate:.0f}"

    def step(self) -> None:
        """Build the operator and multiply it with the identity columns."""
        pb = self.pb
        G = self.GGN(
            pb.model, pb.loss_fn, pb.params, [(pb.X, pb.y)],
            progressbar=False, check_deterministic=False, num_data=pb.batch_size,
        )
        self.GE = G @ self.E  # [P, cols]

    def result(self):
        """The diagonal (of the columns computed) or the dense matrix."""
        if self.kind == "diag":
            return torch.diagonal(self.GE[: self.cols]), torch.arange(self.cols)
        return self.GE, None


class CurvlinopsKFAC(Runner):
    """``KFACLinearOperator`` built and its factors computed, as once per training step.

    Every problem's parameters belong to ``nn.Linear`` and ``nn.Conv2d`` layers,
    the layers curvlinops factors. ``num_data`` and the loss terms per sample
    are given, so that building the operator does not traverse the data.

    Args:
        pb: The problem.
        fisher_type: ``"type-2"`` (exact square-root factor: curvhook's
            ``KFAC()``) or ``"mc"`` (one sampled column: ``KFAC(mc_samples=1)``).
    """

    def __init__(self, pb: Problem, fisher_type: str, with_gradient: bool = False) -> None:
        from curvlinops import KFACLinearOperator

        self.KFAC = KFACLinearOperator
        self.pb, self.fisher_type = pb, fisher_type
        # A training step needs p.grad too, which KFACLinearOperator does not compute
        # (curvhook's and BackPACK's steps include it): the plain step before it.
        self.plain = Plain(pb) if with_gradient else None
        if with_gradient:
            self.note = "the plain step (p.grad), then the operator's factors"

    def step(self) -> None:
        """Build the operator and compute its Kronecker factors (forward, loss, backward(s))."""
        pb = self.pb
        if self.plain is not None:
            self.plain.step()
        self.op = self.KFAC(
            pb.model, pb.loss_fn, pb.params, [(pb.X, pb.y)], check_deterministic=False,
            fisher_type=self.fisher_type, num_data=pb.batch_size, num_per_example_loss_terms=1,
        )
        self.op.compute_kronecker_factors()


# ------------------------------------------------------------------ torch.func
def _per_sample_jacobian(pb: Problem) -> dict[str, Tensor]:
    """Per-sample Jacobians by ``vmap(jacrev)``: ``{name: [N, C, *p.shape]}``.

    The fastest torch.func form on the benchmark problems: ``jacrev`` of the
    function of one sample, mapped over the batch, its results left per
    parameter as torch.func returns them (no concatenation into ``[N, C, P]``).
    ``jacrev`` of the batched model is slower (each of its ``N C`` pullbacks runs
    over the whole batch), and ``vmap(..., chunk_size=...)`` too.

    Args:
        pb: The problem.

    Returns:
        The Jacobian of every trainable parameter, keyed by its name.
    """
    params = {n: p.detach() for n, p in pb.model.named_parameters() if p.requires_grad}
    buffers = {n: b for n, b in pb.model.named_buffers()}
    frozen = {n: p.detach() for n, p in pb.model.named_parameters() if not p.requires_grad}

    def f(params: dict, x: Tensor) -> Tensor:
        out = functional_call(pb.model, {**params, **frozen, **buffers}, (x.unsqueeze(0),))
        return out.squeeze(0).reshape(-1)

    return vmap(jacrev(f), in_dims=(None, 0))(params, pb.X)


def _loss_hessians(pb: Problem) -> Tensor:
    """Per-sample Hessians of the mean loss w.r.t. the output.

    Args:
        pb: The problem.

    Returns:
        ``[N, C, C]``.
    """
    with torch.no_grad():
        out = pb.model(pb.X)
    n = out.shape[0]

    def per_sample(o: Tensor, t: Tensor) -> Tensor:
        return F.cross_entropy(o.unsqueeze(0), t.unsqueeze(0)) / n

    return vmap(hessian(per_sample))(out, pb.y)


def _per_sample_gradients(pb: Problem) -> dict[str, Tensor]:
    """Per-sample gradients of the mean loss by ``vmap(grad)``: ``{name: [N, *p.shape]}``.

    Sample ``n``'s term of the mean cross-entropy is its own loss over ``N``.

    Args:
        pb: The problem.

    Returns:
        The per-sample gradient of every trainable parameter, keyed by its name.
    """
    params = {n: p.detach() for n, p in pb.model.named_parameters() if p.requires_grad}
    rest = {n: b for n, b in pb.model.named_buffers()}
    rest.update({n: p.detach() for n, p in pb.model.named_parameters() if not p.requires_grad})
    n = pb.batch_size

    def loss(params: dict, x: Tensor, t: Tensor) -> Tensor:
        out = functional_call(pb.model, {**params, **rest}, (x.unsqueeze(0),))
        return pb.loss_fn(out, t.unsqueeze(0)) / n

    return vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, pb.X, pb.y)


class TorchFunc(Runner):
    """The torch.func formulations: batch Jacobian, GGN diagonal, full GGN, per-sample gradients.

    - ``batch_jacobian``: :func:`_per_sample_jacobian`, per parameter.
    - ``diag_ggn``: per parameter, ``Σ_{n,c} J ∘ (H J)`` with ``H`` the per-sample
      loss Hessians (no ``[N, C, P]`` concatenation).
    - ``full_ggn``: ``Jᵀ (H J)`` as one GEMM over ``[N C, P]`` (the one place that
      needs the concatenated Jacobian).

    Args:
        pb: The problem.
        kind: One of the three quantities above.
    """

    def __init__(self, pb: Problem, kind: str) -> None:
        self.pb, self.kind = pb, kind
        self.names = [n for n, p in pb.model.named_parameters() if p.requires_grad]

    def step(self) -> None:
        """Compute the quantity; it is kept in ``self.out``."""
        if self.kind == "batch_grad":
            self.out = _per_sample_gradients(self.pb)
            return
        J = _per_sample_jacobian(self.pb)  # {name: [N, C, *p.shape]}
        if self.kind == "batch_jacobian":
            self.out = J
            return
        H = _loss_hessians(self.pb)  # [N, C, C]
        if self.kind == "diag_ggn":
            self.out = {}
            for name, j in J.items():
                flat = j.flatten(2)
                self.out[name] = (flat * torch.bmm(H, flat)).sum((0, 1)).view(j.shape[2:])
            return
        Jf = _flat([J[n] for n in self.names], lead=2)  # [N, C, P]
        HJ = torch.bmm(H, Jf)
        self.out = Jf.flatten(0, 1).T @ HJ.flatten(0, 1)  # full GGN: Jᵀ H J

    def result(self):
        """The quantity flattened in parameter order (outside the timed step)."""
        if self.kind == "full_ggn":
            return self.out, None
        lead = {"batch_jacobian": 2, "batch_grad": 1}.get(self.kind, 0)
        return _flat([self.out[n] for n in self.names], lead=lead), None


class TorchFuncProducts(Runner):
    """The torch.func formulations of the #22 products, from ``vmap(jacrev)``'s Jacobians.

    - ``ntk``: ``Σ_p J_p J_pᵀ`` over the per-parameter Jacobians ``[N·C, P_p]``
      (one GEMM each; no ``[N, C, P]`` concatenation).
    - ``output_covariance``: ``Σ_p J_p,n diag(σ_p) J_p,nᵀ`` per sample, one batched
      GEMM per parameter.
    - ``ggn_vector_product``: the functorch tutorial's matrix-free form,
      ``vjp(f)(H jvp(f)(v))``: ``jvp`` of the batched model, the per-sample loss
      Hessians applied, and ``vjp``; plus the plain step for ``p.grad``.

    Args:
        pb: The problem.
        kind: One of the three.
    """

    def __init__(self, pb: Problem, kind: str) -> None:
        self.pb, self.kind = pb, kind
        self.names = [n for n, p in pb.model.named_parameters() if p.requires_grad]
        self.plain = Plain(pb) if kind == "ggn_vector_product" else None
        if self.plain is not None:
            self.note = "the plain step (p.grad), then jvp, loss Hessian, vjp"

    def step(self) -> None:
        """Compute the quantity; it is kept in ``self.out``."""
        pb = self.pb
        if self.kind == "ggn_vector_product":
            self.plain.step()
            self.out = self._ggn_vector_product()
            return
        J = _per_sample_jacobian(pb)
        n, c = pb.batch_size, pb.num_outputs
        if self.kind == "ntk":
            out = None
            for j in J.values():
                flat = j.reshape(n * c, -1)
                out = flat @ flat.T if out is None else out.addmm_(flat, flat.T)
            self.out = out
            return
        variance = product_arguments(pb)["variance"]
        out = None
        for (name, j), p in zip(J.items(), pb.params):
            flat = j.reshape(n, c, -1)
            term = torch.bmm(flat * variance[p].reshape(1, 1, -1), flat.transpose(1, 2))
            out = term if out is None else out.add_(term)
        self.out = out

    def _ggn_vector_product(self) -> dict[str, Tensor]:
        from torch.func import jvp, vjp

        pb = self.pb
        params = {n: p.detach() for n, p in pb.model.named_parameters() if p.requires_grad}
        direction = product_arguments(pb)["direction"]
        tangents = {n: direction[p] for (n, _), p in zip(params.items(), pb.params)}
        f = lambda theta: functional_call(pb.model, theta, (pb.X,))  # noqa: E731
        out, jv = jvp(f, (params,), (tangents,))
        out = out.detach()
        hjv = torch.func.jvp(lambda o: torch.func.grad(lambda z: pb.loss_fn(z, pb.y))(o), (out,), (jv,))[1]
        _, pull = vjp(f, params)
        return pull(hjv)[0]

    def result(self):
        """The quantity flattened in parameter order (outside the timed step)."""
        if self.kind == "ggn_vector_product":
            return _flat([self.out[n] for n in self.names]), None
        return self.out, None


class CurvlinopsGGNVector(Runner):
    """``GGNLinearOperator @ v`` for one vector: the operator built and applied once per step.

    Args:
        pb: The problem.
    """

    def __init__(self, pb: Problem) -> None:
        from curvlinops import GGNLinearOperator

        self.GGN = GGNLinearOperator
        self.pb = pb
        direction = product_arguments(pb)["direction"]
        self.v = torch.cat([direction[p].flatten() for p in pb.params])

    def step(self) -> None:
        """Build the operator and multiply it with the direction."""
        pb = self.pb
        G = self.GGN(
            pb.model, pb.loss_fn, pb.params, [(pb.X, pb.y)],
            progressbar=False, check_deterministic=False, num_data=pb.batch_size,
        )
        self.out = G @ self.v

    def result(self):
        """``G v``."""
        return self.out, None


# ---------------------------------------------------------------------- floor
class WriteFloor(Runner):
    """The floor of BatchJacobian (or BatchGrad): writing a result of its size once.

    One step writes ``[N, C, *p.shape]`` (``columns=False``: ``[N, *p.shape]``,
    BatchGrad's result) for every trainable parameter with ``fill_``:

    - ``fresh``: into tensors allocated in the step (``torch.empty``), whose
      pages the write touches first: allocation and page faults included. The
      previous step's tensors are freed first, as a loop that drops its results
      does, so the large ones are new pages from the kernel.
    - ``touched``: into the same tensors on every step, written once before.

    - with ``plain=True``, after the plain step (forward, loss, backward): the
      least a method that also computes ``p.grad`` does.

    Args:
        pb: The problem.
        fresh: Which of the two.
        columns: Write ``[N, C, *p.shape]`` (BatchJacobian) or ``[N, *p.shape]`` (BatchGrad).
        plain: Run the plain step first.
    """

    def __init__(self, pb: Problem, fresh: bool, columns: bool = True, plain: bool = False) -> None:
        lead = (pb.batch_size, pb.num_outputs) if columns else (pb.batch_size,)
        self.specs = [((*lead, *p.shape), p.dtype) for p in pb.params]
        self.plain = Plain(pb) if plain else None
        self.fresh = fresh
        self.out: Optional[list[Tensor]] = None
        if not fresh:
            self.out = [torch.empty(shape, dtype=dtype).fill_(0.0) for shape, dtype in self.specs]
        nbytes = sum(torch.Size(shape).numel() * dtype.itemsize for shape, dtype in self.specs)
        where = "fresh memory (torch.empty + fill_)" if fresh else "memory written before (fill_)"
        self.note = ("the plain step, then " if plain else "") + f"writes {nbytes / 2**20:,.0f} MiB into {where}"

    def step(self) -> None:
        """Write every parameter's result once (after the plain step, with ``plain``)."""
        if self.plain is not None:
            self.plain.step()
        if self.fresh:
            self.out = None
            self.out = [torch.empty(shape, dtype=dtype).fill_(1.0) for shape, dtype in self.specs]
        else:
            for t in self.out:
                t.fill_(1.0)

    def close(self) -> None:
        """Free the tensors."""
        self.out = None


# -------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Method:
    """One benchmarked method.

    Attributes:
        name: ``library:what``, e.g. ``curvhook:DiagGGN`` or ``backpack:DiagGGNExact``.
        library: The module that must be importable.
        quantity: What ``result()`` returns (see the module docstring), or ``None``.
        build: Builds the method's :class:`Runner` on a problem.
        size: ``"dense"``: needs a ``[P, P]`` matrix; ``"jacobian"``: an ``[N, C, P]`` one.
    """

    name: str
    library: str
    quantity: Optional[str]
    build: Callable[[Problem], Runner]
    size: str = "any"

    def skip_reason(self, pb: Problem, num_params: Optional[int] = None) -> Optional[str]:
        """Why this method is not run on ``pb``.

        Args:
            pb: The problem.
            num_params: ``P`` to assume instead of the problem's.

        Returns:
            The reason, or ``None`` if it is run.
        """
        try:
            importlib.import_module(self.library)
        except Exception as err:  # noqa: BLE001 - any import failure means "not available"
            return f"{self.library} not importable ({type(err).__name__})"
        variant = self.name.partition(":")[2].split(ONE_BLOCK)[0].partition("-")[2]
        needs = VARIANT_NEEDS.get(variant) if self.library == "curvhook" else None
        if needs is not None and not any(isinstance(m, needs) for m in pb.model.modules()):
            return f"no nn.{needs.__name__}: the same computation as without -{variant}"
        P = pb.num_params if num_params is None else num_params
        if self.size == "dense" and P > MAX_DENSE_P:
            return f"dense P x P with P={P:,} (limit {MAX_DENSE_P:,})"
        if self.size == "jacobian" and pb.batch_size * pb.num_outputs * P > MAX_JACOBIAN_ENTRIES:
            return f"[N, C, P] Jacobian too large ({pb.batch_size * pb.num_outputs * P:,} entries)"
        return None


def _ch(*names: str, size: str = "any", one_block: bool = False) -> Method:
    """A curvhook method: the README idiom, or the steady state in one block (``@one-block``).

    Args:
        *names: Extension names (see :func:`_extension`), computed in one block.
        size: See :class:`Method`.
        one_block: Time the steady state inside one block entered once.

    Returns:
        The method, named ``curvhook:A+B`` (plus ``@one-block``).
    """
    quantity = CURVHOOK_QUANTITY.get(names[0]) if len(names) == 1 else None
    name = "curvhook:" + "+".join(names) + (ONE_BLOCK if one_block else "")
    runner = CurvhookOneBlock if one_block else Curvhook
    return Method(name, "curvhook", quantity, lambda pb: runner(pb, names), size)


METHODS: list[Method] = [
    Method("plain", "torch", None, Plain),
    _ch("DiagGGN"),
    _ch("DiagGGN", one_block=True),
    _ch("DiagGGNApprox"),  # DiagGGNApprox(split_attention=True): attention counted as its operations
    _ch("DiagGGNApprox", one_block=True),
    _ch("DiagGGNApprox-attention-as-one"),  # DiagGGNApprox(split_attention=False)
    _ch("DiagGGN", "DiagGGNApprox"),
    _ch("BatchJacobian", size="jacobian"),
    _ch("BatchJacobian", size="jacobian", one_block=True),
    _ch("FullGGN", size="dense"),
    _ch("FullGGN", size="dense", one_block=True),
    # issue #21: per-sample gradients and their squares
    _ch("BatchGrad"),
    _ch("BatchGrad", one_block=True),
    _ch("BatchL2Grad"),
    _ch("BatchL2Grad", one_block=True),
    _ch("SumGradSquared"),
    _ch("DiagGGNMC"),  # #21: one sampled column (mc_samples=1)
    _ch("KFAC"),  # #21: KFAC() is KFLR, the exact square-root factor (BackPACK's KFLR, curvlinops' type-2)
    _ch("KFAC-mc"),  # #21: KFAC(mc_samples=1) (BackPACK's KFAC, curvlinops' mc)
    _ch("NTK"),  # #22: products without Jacobians
    _ch("OutputCovariance-diag"),
    _ch("GGNVectorProduct"),
    Method("backpack:DiagGGNExact", "backpack", "diag_ggn", lambda pb: Backpack(pb, "DiagGGNExact")),
    Method("backpack:DiagGGNMC", "backpack", None, lambda pb: Backpack(pb, "DiagGGNMC")),
    Method("backpack:BatchGrad", "backpack", "batch_grad", lambda pb: Backpack(pb, "BatchGrad")),
    Method("backpack:KFAC", "backpack", None, lambda pb: Backpack(pb, "KFAC")),
    Method("backpack:BatchL2Grad", "backpack", None, lambda pb: Backpack(pb, "BatchL2Grad")),
    Method("backpack:SumGradSquared", "backpack", None, lambda pb: Backpack(pb, "SumGradSquared")),
    Method("opacus:GradSampleModule", "opacus", "batch_grad", Opacus),
    Method("backpack:KFLR", "backpack", None, lambda pb: Backpack(pb, "KFLR")),
    Method("nngeometry:FIM-diag", "nngeometry", "diag_ggn", lambda pb: NNGeometry(pb, "diag")),
    Method("nngeometry:FIM-dense", "nngeometry", "full_ggn", lambda pb: NNGeometry(pb, "dense"), "dense"),
    Method("curvlinops:GGN-diag", "curvlinops", "diag_ggn", lambda pb: Curvlinops(pb, "diag")),
    Method("curvlinops:GGN-dense", "curvlinops", "full_ggn", lambda pb: Curvlinops(pb, "dense"), "dense"),
    Method("curvlinops:KFAC-type2", "curvlinops", None, lambda pb: CurvlinopsKFAC(pb, "type-2")),
    Method("curvlinops:KFAC-mc", "curvlinops", None, lambda pb: CurvlinopsKFAC(pb, "mc")),
    Method("curvlinops:KFAC-type2+grad", "curvlinops", None, lambda pb: CurvlinopsKFAC(pb, "type-2", True)),
    Method("curvlinops:KFAC-mc+grad", "curvlinops", None, lambda pb: CurvlinopsKFAC(pb, "mc", True)),
    Method("torchfunc:BatchJacobian", "torch", "batch_jacobian", lambda pb: TorchFunc(pb, "batch_jacobian"), "jacobian"),
    Method("torchfunc:DiagGGN", "torch", "diag_ggn", lambda pb: TorchFunc(pb, "diag_ggn"), "jacobian"),
    Method("torchfunc:FullGGN", "torch", "full_ggn", lambda pb: TorchFunc(pb, "full_ggn"), "dense"),
    Method("torchfunc:BatchGrad", "torch", "batch_grad", lambda pb: TorchFunc(pb, "batch_grad")),
    Method("torchfunc:NTK", "torch", "ntk", lambda pb: TorchFuncProducts(pb, "ntk"), "jacobian"),
    Method("torchfunc:OutputCovariance-diag", "torch", "output_covariance",
           lambda pb: TorchFuncProducts(pb, "output_covariance"), "jacobian"),
    Method("torchfunc:GGNVectorProduct", "torch", "ggn_vector_product",
           lambda pb: TorchFuncProducts(pb, "ggn_vector_product")),
    Method("curvlinops:GGN-matvec", "curvlinops", "ggn_vector_product", CurvlinopsGGNVector),
    Method("floor:BatchJacobian-write-fresh", "torch", None, lambda pb: WriteFloor(pb, fresh=True), "jacobian"),
    Method("floor:BatchJacobian-write-touched", "torch", None, lambda pb: WriteFloor(pb, fresh=False), "jacobian"),
    Method("floor:BatchGrad-plain+write-fresh", "torch", None, lambda pb: WriteFloor(pb, True, columns=False, plain=True)),
    Method("floor:BatchGrad-plain+write-touched", "torch", None, lambda pb: WriteFloor(pb, False, columns=False, plain=True)),
]

BY_NAME = {m.name: m for m in METHODS}

# The reference for the cross-check of each quantity (computed at a small batch).
REFERENCE = {
    "diag_ggn": "torchfunc:DiagGGN", "full_ggn": "torchfunc:FullGGN", "batch_jacobian": "torchfunc:BatchJacobian",
    "batch_grad": "torchfunc:BatchGrad", "ntk": "torchfunc:NTK", "output_covariance": "torchfunc:OutputCovariance-diag",
    "ggn_vector_product": "torchfunc:GGNVectorProduct",
}


def select(patterns: Optional[list[str]]) -> list[Method]:
    """The methods that ``patterns`` name, in :data:`METHODS` order.

    A pattern that is a method's exact name selects that method only; any other
    pattern selects every method whose name starts with it (``curvhook``,
    ``backpack:``). ``plain`` is always included: every ratio is taken against it.

    Args:
        patterns: Names or prefixes; ``None`` or empty: all methods.

    Returns:
        The selected methods.

    Raises:
        SystemExit: A pattern matches no method.
    """
    if not patterns:
        return list(METHODS)

    def matches(name: str, pattern: str) -> bool:
        return name == pattern if pattern in BY_NAME else name.startswith(pattern)

    unknown = [p for p in patterns if not any(matches(m.name, p) for m in METHODS)]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; known: {[m.name for m in METHODS]}")
    return [m for m in METHODS if m.name == "plain" or any(matches(m.name, p) for p in patterns)]
