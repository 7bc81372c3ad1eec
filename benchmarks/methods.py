"""Every benchmarked method: curvhook's extensions and the peers' equivalents.

A method is built on a :class:`~benchmarks.problems.Problem` and returns a
:class:`Runner` whose ``step()`` is one full computation as a training loop
would run it (forward, loss, backward, plus whatever the library needs), and
whose ``result()`` returns the computed quantity flattened in
``model.parameters()`` order, for the numerical cross-check.

Quantities (what ``result()`` returns, all for the mean-reduced loss):

- ``diag_ggn``: ``diag(G)``, ``[P]``
- ``full_ggn``: ``G``, ``[P, P]``
- ``batch_jacobian``: ``[N, C, P]``
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
    """One method bound to one problem."""

    note: str = ""
    extrapolate: float = 1.0  # multiply the measured time by this (curvlinops chunks)

    def step(self) -> None:
        raise NotImplementedError

    def result(self) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """``(flat result, index of the entries of the reference it covers or None)``."""
        return None, None

    def close(self) -> None:
        pass

    def suspend(self) -> None:
        """Leave whatever the method keeps active between steps (curvhook's block)."""

    def resume(self) -> None:
        """Undo :meth:`suspend`."""


def _zero_grad(params: list[nn.Parameter]) -> None:
    for p in params:
        p.grad = None


def _flat(tensors: list[Tensor], lead: int = 0) -> Tensor:
    """Concatenate per-parameter tensors ``[*lead_dims, *p.shape]`` along a flat P axis."""
    return torch.cat([t.reshape(*t.shape[:lead], -1) for t in tensors], dim=lead)


# ---------------------------------------------------------------------- plain
class Plain(Runner):
    def __init__(self, pb: Problem) -> None:
        self.pb = pb

    def step(self) -> None:
        _zero_grad(self.pb.params)
        self.pb.loss_fn(self.pb.model(self.pb.X), self.pb.y).backward()


# ------------------------------------------------------------------- curvhook
CURVHOOK_QUANTITY = {"DiagGGN": "diag_ggn", "FullGGN": "full_ggn", "BatchJacobian": "batch_jacobian"}


# Variants of an extension, named ``Extension-variant``: the keyword arguments they pass.
VARIANTS = {"split": {"split_attention": True}}


def _extension(module, name: str):
    """Build the extension ``name`` (``DiagGGNApprox`` or a variant such as ``DiagGGNApprox-split``)."""
    base, _, variant = name.partition("-")
    return getattr(module, base)(**VARIANTS[variant]) if variant else getattr(module, base)()


class Curvhook(Runner):
    """Steady state inside an entered ``extend`` block (entry timed separately)."""

    def __init__(self, pb: Problem, names: tuple[str, ...]) -> None:
        from curvhook import extend
        from curvhook import extensions as ext

        self.pb, self.names = pb, names
        self.exts = [_extension(ext, n) for n in names]
        t0 = time.perf_counter()
        self.ctx = extend(pb.model, *self.exts)
        self.ctx.__enter__()
        self.entry_s = time.perf_counter() - t0
        self.note = ""

    def step(self) -> None:
        _zero_grad(self.pb.params)
        self.pb.loss_fn(self.pb.model(self.pb.X), self.pb.y).backward()

    def result(self):
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
        return None, None

    def close(self) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(None, None, None)
            self.ctx = None

    def suspend(self) -> None:
        # The block's global module hooks and torch-function mode would slow down
        # any other method timed in the same process: leave it between blocks of steps.
        self.close()

    def resume(self) -> None:
        from curvhook import extend

        if self.ctx is None:
            self.ctx = extend(self.pb.model, *self.exts)
            self.ctx.__enter__()


# ------------------------------------------------------------------- BackPACK
class Backpack(Runner):
    ATTR = {"DiagGGNExact": "diag_ggn_exact", "DiagGGNMC": "diag_ggn_mc", "BatchGrad": "grad_batch", "KFAC": "kfac"}

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
        if self.name == "DiagGGNExact" and getattr(self, "status", "ok") == "ok":
            return _flat([p.diag_ggn_exact for p in self.params]), None
        return None, None



# ----------------------------------------------------------------- NNGeometry
class NNGeometry(Runner):
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
        return self.out, None


# ----------------------------------------------------------------- curvlinops
class Curvlinops(Runner):
    """``GGNLinearOperator`` applied to identity columns (all, or a chunk)."""

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
        pb = self.pb
        G = self.GGN(
            pb.model, pb.loss_fn, pb.params, [(pb.X, pb.y)],
            progressbar=False, check_deterministic=False, num_data=pb.batch_size,
        )
        self.GE = G @ self.E  # [P, cols]

    def result(self):
        if self.kind == "diag":
            return torch.diagonal(self.GE[: self.cols]), torch.arange(self.cols)
        return self.GE, None


# ------------------------------------------------------------------ torch.func
def _per_sample_jacobian(pb: Problem) -> Tensor:
    """``vmap(jacrev)`` per-sample Jacobian, flattened: ``[N, C, P]``."""
    names = [n for n, p in pb.model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in pb.model.named_parameters() if p.requires_grad}
    buffers = {n: b for n, b in pb.model.named_buffers()}
    frozen = {n: p.detach() for n, p in pb.model.named_parameters() if not p.requires_grad}

    def f(params: dict, x: Tensor) -> Tensor:
        out = functional_call(pb.model, {**params, **frozen, **buffers}, (x.unsqueeze(0),))
        return out.squeeze(0).reshape(-1)

    jac = vmap(jacrev(f), in_dims=(None, 0))(params, pb.X)
    return _flat([jac[n] for n in names], lead=2)


def _loss_hessians(pb: Problem) -> Tensor:
    """Per-sample Hessians of the mean loss w.r.t. the output, ``[N, C, C]``."""
    with torch.no_grad():
        out = pb.model(pb.X)
    n = out.shape[0]

    def per_sample(o: Tensor, t: Tensor) -> Tensor:
        return F.cross_entropy(o.unsqueeze(0), t.unsqueeze(0)) / n

    return vmap(hessian(per_sample))(out, pb.y)


class TorchFunc(Runner):
    def __init__(self, pb: Problem, kind: str) -> None:
        self.pb, self.kind = pb, kind

    def step(self) -> None:
        J = _per_sample_jacobian(self.pb)  # [N, C, P]
        if self.kind == "batch_jacobian":
            self.out = J
            return
        H = _loss_hessians(self.pb)  # [N, C, C]
        HJ = torch.einsum("nij,njp->nip", H, J)
        if self.kind == "diag_ggn":
            self.out = torch.einsum("nip,nip->p", J, HJ)
        else:  # full GGN: Jᵀ H J
            self.out = J.flatten(0, 1).T @ HJ.flatten(0, 1)

    def result(self):
        return self.out, None


# -------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Method:
    name: str
    library: str  # module that must be importable
    quantity: Optional[str]
    build: Callable[[Problem], Runner]
    size: str = "any"  # "dense": needs a [P, P] matrix; "jacobian": an [N, C, P] one

    def skip_reason(self, pb: Problem, num_params: Optional[int] = None) -> Optional[str]:
        """Why this method is not run on ``pb`` (``None``: it is run)."""
        try:
            importlib.import_module(self.library)
        except Exception as err:  # noqa: BLE001 - any import failure means "not available"
            return f"{self.library} not importable ({type(err).__name__})"
        if self.name.endswith("-split") and not any(isinstance(m, nn.MultiheadAttention) for m in pb.model.modules()):
            return "no nn.MultiheadAttention: the same computation as without -split"
        P = pb.num_params if num_params is None else num_params
        if self.size == "dense" and P > MAX_DENSE_P:
            return f"dense P x P with P={P:,} (limit {MAX_DENSE_P:,})"
        if self.size == "jacobian" and pb.batch_size * pb.num_outputs * P > MAX_JACOBIAN_ENTRIES:
            return f"[N, C, P] Jacobian too large ({pb.batch_size * pb.num_outputs * P:,} entries)"
        return None


def _ch(*names: str, size: str = "any") -> Method:
    quantity = CURVHOOK_QUANTITY.get(names[0]) if len(names) == 1 else None
    return Method("curvhook:" + "+".join(names), "curvhook", quantity, lambda pb: Curvhook(pb, names), size)


METHODS: list[Method] = [
    Method("plain", "torch", None, Plain),
    _ch("DiagGGN"),
    _ch("DiagGGNApprox"),
    _ch("DiagGGNApprox-split"),  # DiagGGNApprox(split_attention=True): attention split into its operations
    _ch("DiagGGN", "DiagGGNApprox"),
    _ch("BatchJacobian", size="jacobian"),
    _ch("FullGGN", size="dense"),
    Method("backpack:DiagGGNExact", "backpack", "diag_ggn", lambda pb: Backpack(pb, "DiagGGNExact")),
    Method("backpack:DiagGGNMC", "backpack", None, lambda pb: Backpack(pb, "DiagGGNMC")),
    Method("backpack:BatchGrad", "backpack", None, lambda pb: Backpack(pb, "BatchGrad")),
    Method("backpack:KFAC", "backpack", None, lambda pb: Backpack(pb, "KFAC")),
    Method("nngeometry:FIM-diag", "nngeometry", "diag_ggn", lambda pb: NNGeometry(pb, "diag")),
    Method("nngeometry:FIM-dense", "nngeometry", "full_ggn", lambda pb: NNGeometry(pb, "dense"), "dense"),
    Method("curvlinops:GGN-diag", "curvlinops", "diag_ggn", lambda pb: Curvlinops(pb, "diag")),
    Method("curvlinops:GGN-dense", "curvlinops", "full_ggn", lambda pb: Curvlinops(pb, "dense"), "dense"),
    Method("torchfunc:BatchJacobian", "torch", "batch_jacobian", lambda pb: TorchFunc(pb, "batch_jacobian"), "jacobian"),
    Method("torchfunc:DiagGGN", "torch", "diag_ggn", lambda pb: TorchFunc(pb, "diag_ggn"), "jacobian"),
    Method("torchfunc:FullGGN", "torch", "full_ggn", lambda pb: TorchFunc(pb, "full_ggn"), "dense"),
]

BY_NAME = {m.name: m for m in METHODS}

# The reference for the cross-check of each quantity (computed at a small batch).
REFERENCE = {"diag_ggn": "torchfunc:DiagGGN", "full_ggn": "torchfunc:FullGGN", "batch_jacobian": "torchfunc:BatchJacobian"}


def select(patterns: Optional[list[str]]) -> list[Method]:
    """Methods whose name equals or starts with one of ``patterns`` (all if ``None``).

    ``plain`` is always included: every ratio is taken against it.
    """
    if not patterns:
        return list(METHODS)
    chosen = [m for m in METHODS if m.name == "plain" or any(m.name == p or m.name.startswith(p) for p in patterns)]
    unknown = [p for p in patterns if not any(m.name == p or m.name.startswith(p) for m in METHODS)]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; known: {[m.name for m in METHODS]}")
    return chosen
