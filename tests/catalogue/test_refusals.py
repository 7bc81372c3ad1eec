"""Issue #20, entries 3, 6, 8, 9 and 18: refusals, crashes and wrong numbers of the catalogue.

One table, ``CASES``: each case builds a small float64 model, its input and
targets, and says what must happen:

- ``Exact``: all four extensions in one block; FullGGN, DiagGGN and
  BatchJacobian against torch.func (``helpers.ggn_reference``, rtol 1e-6) and
  DiagGGNApprox against its definition on the graph (``graph_reference``). A
  case may name a *twin*: the model (sharing the parameters) and input the
  reference is computed on, where the model itself cannot be given to torch.func
  (an in-place operation is replaced by its out-of-place form; data
  preprocessing by the input it produced; a max pooling window without input
  by the constant it outputs).
- ``Raises``: the named extensions raise the error class, with a phrase of the message.
- ``InSubprocess``: a case that hung or crashed the process before its fix runs in
  a child process with a timeout (one child runs all of them, in table order).

Case ids name the entry: ``e9-relu-lin3`` is entry 9.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import curvhook
from curvhook import extend
from curvhook.errors import UnsupportedModelError
from curvhook.extensions import BatchJacobian, DiagGGN, DiagGGNApprox, FullGGN
from graph_reference import diag_ggn_approx_graph
from helpers import close, ggn_reference, run_all

DT = torch.float64
CE = nn.CrossEntropyLoss()
EXTENSIONS = {"DiagGGN": DiagGGN, "FullGGN": FullGGN, "BatchJacobian": BatchJacobian, "DiagGGNApprox": DiagGGNApprox}

# (model, X, y) of a case, and the (model, X) its reference is computed on.
Built = tuple[nn.Module, Tensor, Tensor]
Twin = Callable[[nn.Module, Tensor], tuple[nn.Module, Tensor]]


@dataclass(frozen=True)
class Exact:
    """All four extensions match the float64 references.

    Attributes:
        build: ``() -> (model, X, y)``.
        twin: ``(model, X) -> (reference model, reference X)``, called after the
            curvhook run; the reference model holds the same parameters, in the same order.
        approx_is_diag: DiagGGNApprox equals the exact diagonal (the model is one
            operation, or all its curvature is in its last layer).
    """

    build: Callable[[], Built]
    twin: Optional[Twin] = None
    approx_is_diag: bool = False


@dataclass(frozen=True)
class Raises:
    """Each of ``extensions`` raises ``error`` with ``phrase`` in its message."""

    build: Callable[[], Built]
    phrase: str
    error: type = UnsupportedModelError
    extensions: tuple[str, ...] = tuple(EXTENSIONS)


@dataclass(frozen=True)
class InSubprocess:
    """``script`` prints ``expected`` in a child process that ends within ``timeout`` seconds."""

    script: str
    expected: list = field(default_factory=list)
    timeout: float = 60.0


# ------------------------------------------------------------------ helpers
class Lambda(nn.Module):
    """A leaf module without a rule: ``f(x)``."""

    def __init__(self, f: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.f = f

    def forward(self, x: Tensor) -> Tensor:
        return self.f(x)


def _data(*shape: int, classes: int = 2) -> tuple[Tensor, Tensor]:
    return torch.randn(*shape, dtype=DT), torch.randint(0, classes, (shape[0],))


def _out_of_place(model: nn.Module, X: Tensor) -> tuple[nn.Module, Tensor]:
    """The same model (shared parameters) with every ``inplace`` flag off."""
    twin = copy.copy(model)
    twin._modules = {k: _out_of_place(m, X)[0] for k, m in model._modules.items()}
    if hasattr(model, "inplace"):
        twin.inplace = False
    return twin, X


# ------------------------------------------------------------ entry 3
def _leaf_after_linear(f: Callable[[Tensor], Tensor], n: int = 5) -> Callable[[], Built]:
    def build() -> Built:
        model = nn.Sequential(nn.Linear(4, 3), Lambda(f), nn.Tanh(), nn.Linear(3, 2)).double()
        return (model, *_data(n, 4))

    return build


MIXES = "Module '1' (Lambda) mixes samples"
E3 = {
    **{
        f"e3-center-{ext}": Raises(_leaf_after_linear(lambda x: x - x.mean(0)), MIXES, extensions=(ext,))
        for ext in EXTENSIONS
    },
    "e3-sum0-keepdim": Raises(_leaf_after_linear(lambda x: x * x.sum(0, keepdim=True)), MIXES),
    "e3-batchnorm-like": Raises(_leaf_after_linear(lambda x: (x - x.mean(0)) / (x.var(0) + 1e-5).sqrt()), MIXES),
    # a roll is a permutation: the leaf counts as its operation, which the tape checks
    "e3-roll0": Raises(_leaf_after_linear(lambda x: torch.roll(x, 1, 0)), "roll (in '1') mixes samples"),
    "e3-per-sample-leaf": Exact(_leaf_after_linear(lambda x: x * torch.tanh(x).sum(1, keepdim=True))),
    "e3-center-one-sample": Exact(_leaf_after_linear(lambda x: x - 0.5 * x.mean(0), n=1)),
}


# ------------------------------------------------------------ entry 6
def _pool_sigmoid(dims: int, spatial: tuple[int, ...]) -> Callable[[], Built]:
    """A 1×1 convolution, a max pooling whose windows lie entirely in the padding, sigmoid, head."""

    def build() -> Built:
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](1, 2, 1)
        pool = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[dims](2, stride=2, padding=1, dilation=2, ceil_mode=True)
        X, y = _data(3, 1, *spatial)
        model = nn.Sequential(conv, pool, nn.Sigmoid(), nn.Flatten(), nn.LazyLinear(2)).double()
        model(X)  # materialize the head
        return model, X, y

    return build


class _ConstantPool(nn.Module):
    """The reference of ``_pool_sigmoid``: the pool's output is the constant −inf (every window empty)."""

    def __init__(self, model: nn.Sequential, shape: torch.Size) -> None:
        super().__init__()
        self.model, self.shape = model, shape

    def forward(self, x: Tensor) -> Tensor:
        self.model[0](x)  # the convolution's parameters stay; nothing depends on them
        h = torch.full((x.shape[0], *self.shape[1:]), -torch.inf, dtype=x.dtype)
        return self.model[4](self.model[3](self.model[2](h)))


def _constant_pool_twin(model: nn.Module, X: Tensor) -> tuple[nn.Module, Tensor]:
    with torch.no_grad():
        pooled = model[1](model[0](X))
    assert torch.isneginf(pooled).all()  # the case's premise: every window is empty
    return _ConstantPool(model, pooled.shape), X


class _IdsChangedAfterUse(nn.Module):
    """An embedding whose integer indices the forward changes in place after the lookup."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(6, 3), nn.Linear(6, 2)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.emb(ids)
        ids.add_(1)  # still in range: only curvhook's stored copy of the rows read would be wrong
        return self.head(h.flatten(1))


def _ids_changed() -> Built:
    return _IdsChangedAfterUse().double(), torch.randint(0, 5, (4, 2)), torch.randint(0, 2, (4,))


E6 = {
    "e6-maxpool1d-empty-window-sigmoid": Exact(_pool_sigmoid(1, (1,)), _constant_pool_twin, approx_is_diag=True),
    "e6-maxpool2d-empty-window-sigmoid": Exact(_pool_sigmoid(2, (1, 1)), _constant_pool_twin, approx_is_diag=True),
    "e6-maxpool2d-empty-columns-sigmoid": Exact(_pool_sigmoid(2, (3, 1)), _constant_pool_twin, approx_is_diag=True),
    "e6-maxpool3d-empty-window-sigmoid": Exact(_pool_sigmoid(3, (1, 1, 1)), _constant_pool_twin, approx_is_diag=True),
    # the audit of rules that index with stored indices: embedding indices changed after the call
    "e6-embedding-indices-changed-in-place-refused": Raises(
        _ids_changed, "were changed in place after the call", extensions=("DiagGGN", "BatchJacobian", "DiagGGNApprox"),
    ),
    # the same pooling on a larger map has no empty window: the usual rule
    "e6-maxpool2d-same-pool-no-empty-window": Exact(_pool_sigmoid(2, (3, 4))),
    "e6-maxpool-linear-after-empty-window-refused": InSubprocess(
        """
        import torch
        from torch import nn
        from curvhook import extend
        from curvhook.errors import UnsupportedModelError
        from curvhook.extensions import BatchJacobian, DiagGGN, DiagGGNApprox, FullGGN
        X, y = torch.randn(3, 1, 1, 1, dtype=torch.float64), torch.randint(0, 2, (3,))
        for ext in (DiagGGN, FullGGN, BatchJacobian, DiagGGNApprox):
            model = nn.Sequential(
                nn.Conv2d(1, 2, 1), nn.MaxPool2d(2, stride=2, padding=1, dilation=2, ceil_mode=True),
                nn.Flatten(), nn.Linear(2, 2),
            ).double()
            try:
                with extend(model, ext()):
                    nn.CrossEntropyLoss()(model(X), y).backward()
                print("no error", ext.__name__)
            except UnsupportedModelError as err:
                print("refused" if "lie entirely in the padding" in str(err) else str(err), ext.__name__)
        """,
        expected=[f"refused {e}" for e in EXTENSIONS],
    ),
}


# ------------------------------------------------------------ entry 8
class _MatmulWhole(nn.Module):
    """``tanh(x @ w)``: no children, no rule, the whole model."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, dtype=DT))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.w)


class _FLinearWhole(nn.Module):
    """``tanh(F.linear(x, w))``: no children, no rule, the whole model."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4, dtype=DT))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(F.linear(x, self.w))


class _GatedWhole(nn.Module):
    """``tanh(x w) ⊙ σ(x w)``: not a chain of operations, so the fallback serves the whole model."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, dtype=DT))

    def forward(self, x: Tensor) -> Tensor:
        h = x @ self.w
        return torch.tanh(h) * torch.sigmoid(h)


class _ParameterFirst(nn.Module):
    """A container parameter meets the raw input before any child: ``lin(tanh(x @ w))`` or ``lin(x * s)``."""

    def __init__(self, scale: bool) -> None:
        super().__init__()
        self.scale = scale
        self.w = nn.Parameter(torch.randn(4, dtype=DT) if scale else torch.randn(4, 4, dtype=DT))
        self.lin = nn.Linear(4, 3).double()

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x * self.w if self.scale else torch.tanh(x @ self.w))


def _whole(cls: type) -> Callable[[], Built]:
    return lambda: (cls(), *_data(5, 4, classes=3))


E8 = {
    "e8-matmul-whole-model": Exact(_whole(_MatmulWhole), approx_is_diag=True),
    "e8-F-linear-whole-model": Exact(_whole(_FLinearWhole), approx_is_diag=True),
    "e8-fallback-whole-model": Exact(_whole(_GatedWhole), approx_is_diag=True),
    "e8-x-matmul-w-before-child": Exact(lambda: (_ParameterFirst(False), *_data(5, 4, classes=3))),
    "e8-x-times-scale-before-child": Exact(lambda: (_ParameterFirst(True), *_data(5, 4, classes=3))),
    # BatchJacobian alone on such a model never returned before the fix
    "e8-fallback-whole-model-batch-jacobian-returns": InSubprocess(
        """
        import torch
        from torch import nn
        import torch.nn.functional as F
        from torch.func import functional_call, jacrev
        from curvhook import extend
        from curvhook.extensions import BatchJacobian
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.w = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
            def forward(self, x):
                return torch.tanh(F.linear(x, self.w))
        model, X = M(), torch.randn(5, 4, dtype=torch.float64)
        with extend(model, BatchJacobian()):
            model(X).sum().backward()
        ref = jacrev(lambda w: functional_call(model, {"w": w}, (X,)))(model.w.detach())  # [N, C, 3, 4]
        scale = ref.abs().max()
        torch.testing.assert_close(model.w.batch_jacobian, ref, rtol=1e-10, atol=1e-12 * scale)
        print("exact")
        """,
        expected=["exact"],
    ),
}


# ------------------------------------------------------------ entry 9
_MODULES = {
    "relu": lambda: nn.ReLU(inplace=True),
    "leaky-relu": lambda: nn.LeakyReLU(0.1, inplace=True),
    "elu": lambda: nn.ELU(inplace=True),
    "hardtanh": lambda: nn.Hardtanh(-0.5, 0.5, inplace=True),
    "silu": lambda: nn.SiLU(inplace=True),
}
_FUNCTIONS = {
    "F-relu-inplace": lambda h: F.relu(h, inplace=True),
    "F-relu_": F.relu_,
    "x-relu_": lambda h: h.relu_(),
    "F-silu-inplace": lambda h: F.silu(h, inplace=True),
    "F-leaky-relu_": lambda h: F.leaky_relu_(h, 0.1),
    "F-hardtanh-inplace": lambda h: F.hardtanh(h, -0.5, 0.5, inplace=True),
    "torch-tanh_": torch.tanh_,
    "x-sigmoid_": lambda h: h.sigmoid_(),
}
_OUT_OF_PLACE = {
    "F-relu-inplace": F.relu, "F-relu_": F.relu, "x-relu_": torch.relu, "F-silu-inplace": F.silu,
    "F-leaky-relu_": lambda h: F.leaky_relu(h, 0.1), "F-hardtanh-inplace": lambda h: F.hardtanh(h, -0.5, 0.5),
    "torch-tanh_": torch.tanh, "x-sigmoid_": torch.sigmoid,
}
# first layer and input: Linear on [N, T, F] and [N, T, S, F] gives a view; Conv2d does not
_FIRST = {
    "lin3": (lambda: nn.Linear(4, 3), (5, 2, 4)),
    "lin4": (lambda: nn.Linear(4, 3), (5, 2, 2, 4)),
    "conv": (lambda: nn.Conv2d(2, 3, 2), (5, 2, 3, 3)),
}


class _Functional(nn.Module):
    """``head(f(first(x)).flatten(1))`` with ``f`` an in-place function in the container's forward."""

    def __init__(self, first: nn.Module, name: str) -> None:
        super().__init__()
        self.first, self.name, self.inplace = first, name, True
        self.head = nn.LazyLinear(2)

    def forward(self, x: Tensor) -> Tensor:
        f = _FUNCTIONS[self.name] if self.inplace else _OUT_OF_PLACE[self.name]
        return self.head(f(self.first(x)).flatten(1))


def _inplace_module(name: str, first: str) -> Callable[[], Built]:
    def build() -> Built:
        layer, shape = _FIRST[first]
        X, y = _data(*shape)
        model = nn.Sequential(layer(), _MODULES[name](), nn.Flatten(), nn.LazyLinear(2)).double()
        with torch.no_grad():
            model(X.clone())
        return model, X, y

    return build


def _inplace_function(name: str, first: str) -> Callable[[], Built]:
    def build() -> Built:
        layer, shape = _FIRST[first]
        X, y = _data(*shape)
        model = _Functional(layer(), name).double()
        with torch.no_grad():
            model(X.clone())
        return model, X, y

    return build


class _InplaceProduct(nn.Module):
    """``h.mul_(w)`` (a layer scale written in place), then ``tanh_``, on ``[N, F]`` or ``[N, T, F]``."""

    def __init__(self, tokens: int) -> None:
        super().__init__()
        self.lin, self.inplace = nn.Linear(4, 3), True
        self.w = nn.Parameter(torch.randn(3))
        self.head = nn.Linear(3 * max(tokens, 1), 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(x)
        h = h.mul_(self.w).tanh_() if self.inplace else torch.tanh(h * self.w)
        return self.head(h.flatten(1))


def _inplace_product(tokens: int) -> Callable[[], Built]:
    return lambda: (_InplaceProduct(tokens).double(), *_data(5, *((tokens,) if tokens else ()), 4))


def _dropout_on_view() -> Built:
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5, inplace=True), nn.Flatten(), nn.Linear(6, 2)).double()
    return (model, *_data(5, 2, 4))


class _FunctionalDropout(nn.Module):
    """``F.dropout(h, training=True)`` on a hidden tensor in ``forward``: a mask curvhook cannot replay."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.b(F.dropout(self.a(x), 0.5, training=True))


def _functional_dropout() -> Built:
    return (_FunctionalDropout().double(), *_data(5, 4))


E9 = {
    **{f"e9-{name}-{first}": Exact(_inplace_module(name, first), _out_of_place) for name in _MODULES for first in ("lin3", "lin4")},
    **{f"e9-{name}-lin3": Exact(_inplace_function(name, "lin3"), _out_of_place) for name in _FUNCTIONS},
    "e9-F-relu-inplace-lin4": Exact(_inplace_function("F-relu-inplace", "lin4"), _out_of_place),
    "e9-torch-tanh_-lin4": Exact(_inplace_function("torch-tanh_", "lin4"), _out_of_place),
    # after a convolution (no view): as before
    "e9-relu-conv": Exact(_inplace_module("relu", "conv"), _out_of_place),
    "e9-torch-tanh_-conv": Exact(_inplace_function("torch-tanh_", "conv"), _out_of_place),
    "e9-mul_-w-then-tanh_-2d": Exact(_inplace_product(0), _out_of_place),
    "e9-mul_-w-then-tanh_-3d": Exact(_inplace_product(2), _out_of_place),
    # train-mode dropout in place on a view: its mask cannot be replayed, so it stays refused
    "e9-dropout-inplace-on-view-refused": Raises(_dropout_on_view, "cannot read the derivative of the in-place module '1' (Dropout)"),
    # the message named vmap's randomness flags; it names the remedy now
    "e9-functional-dropout-on-hidden-refused": Raises(_functional_dropout, "use nn.Dropout, whose mask curvhook records"),
}


# ------------------------------------------------------------ entry 18
class _Preprocessed(nn.Module):
    """``head(tanh(lin(p(x))))``, or with ``late``: ``head(tanh(lin(x)) * p(x))``.

    ``p`` acts on the raw input (no parameter): data preprocessing, which may mix
    samples or draw random numbers. ``seen`` keeps what it produced for the reference.
    """

    def __init__(self, p: Callable[[Tensor], Tensor], late: bool = False) -> None:
        super().__init__()
        self.p, self.late = p, late
        self.lin, self.head = nn.Linear(4, 4), nn.Linear(4, 3)
        self.seen: Optional[Tensor] = None
        self.reference = False

    def forward(self, x: Tensor) -> Tensor:
        if self.late:
            if not self.reference:
                self.seen = self.p(x).detach()
            return self.head(torch.tanh(self.lin(x)) * self.seen)
        if self.reference:  # x is what the preprocessing produced
            return self.head(torch.tanh(self.lin(x)))
        p = self.p(x)
        self.seen = p.detach()
        return self.head(torch.tanh(self.lin(p)))


def _preprocessed(p: Callable[[Tensor], Tensor], late: bool = False) -> Callable[[], Built]:
    def build() -> Built:
        return (_Preprocessed(p, late).double(), *_data(5, 4, classes=3))

    return build


def _data_twin(model: nn.Module, X: Tensor) -> tuple[nn.Module, Tensor]:
    """The same parameters on the data the preprocessing produced in the curvhook run."""
    twin = copy.copy(model)
    twin.reference = True
    return twin, X if model.late else model.seen


E18 = {
    "e18-softmax-dim0-on-input": Exact(_preprocessed(lambda x: torch.softmax(x, 0)), _data_twin),
    "e18-center-on-input": Exact(_preprocessed(lambda x: x - x.mean(0)), _data_twin),
    "e18-functional-dropout-on-input": Exact(_preprocessed(lambda x: F.dropout(x, 0.5, training=True)), _data_twin),
    "e18-batch-statistics-of-input-enter-later": Exact(_preprocessed(lambda x: x.std(0), late=True), _data_twin),
}

CASES = {**E3, **E6, **E8, **E9, **E18}


# ------------------------------------------------------------------ runners
def _check_exact(case: Exact) -> None:
    model, X, y = case.build()
    got = run_all(model, X, y, CE)
    ref_model, ref_X = case.twin(model, X) if case.twin is not None else (model, X)
    J, G = ggn_reference(ref_model, ref_X, y, CE)
    close(got["full"], G)
    close(got["diag"], G.diagonal())
    close(got["jac"].reshape(-1, J.shape[1]), J)
    if case.approx_is_diag:
        close(got["approx"], G.diagonal())
    else:
        out = ref_model(ref_X).detach()
        d = torch.func.hessian(lambda o: CE(o, y))(out).reshape(out.numel(), -1).diagonal()
        close(got["approx"], diag_ggn_approx_graph(ref_model, ref_X, d))


def _check_raises(case: Raises) -> None:
    for name in case.extensions:
        model, X, y = case.build()
        with pytest.raises(case.error, match=re.escape(case.phrase)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with extend(model, EXTENSIONS[name]()):
                    CE(model(X), y).backward()


# One child process runs every ``InSubprocess`` case in turn (one torch import);
# ``@@ <id>`` starts the output of each.
_CHILD = """
import traceback
for name, script in CHILD_CASES:
    print("@@", name, flush=True)
    try:
        exec(compile(script, name, "exec"), {"__name__": "__main__"})
    except BaseException:
        traceback.print_exc()
        print("raised", flush=True)
"""


@functools.lru_cache(maxsize=None)
def _child_outputs() -> tuple[dict[str, list[str]], str]:
    """The printed lines of every ``InSubprocess`` case by id, and the child's stderr.

    A case that does not finish in its time ends the child: it and the cases
    after it get no lines (their tests fail and say so).
    """
    cases = [(name, textwrap.dedent(c.script)) for name, c in CASES.items() if isinstance(c, InSubprocess)]
    timeout = sum(c.timeout for c in CASES.values() if isinstance(c, InSubprocess))
    root = Path(curvhook.__file__).resolve().parents[1]  # the curvhook under test
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    program = f"CHILD_CASES = {cases!r}\n{_CHILD}"
    try:
        done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=timeout, env=env)
        stdout, stderr = done.stdout, done.stderr + f"\n(exit {done.returncode})"
    except subprocess.TimeoutExpired as err:
        as_text = lambda b: b.decode() if isinstance(b, bytes) else (b or "")  # noqa: E731
        stdout, stderr = as_text(err.stdout), as_text(err.stderr) + f"\n(timed out after {timeout} s)"
    outputs: dict[str, list[str]] = {}
    current: Optional[list[str]] = None
    for line in stdout.splitlines():
        if line.startswith("@@ "):
            current = outputs[line[3:]] = []
        elif current is not None:
            current.append(line)
    return outputs, stderr


def _check_in_subprocess(name: str, case: InSubprocess) -> None:
    outputs, stderr = _child_outputs()
    names = [n for n, c in CASES.items() if isinstance(c, InSubprocess)]
    after = names[names.index(name) + 1 :]
    finished = name in outputs and (after[0] in outputs if after else "(exit 0)" in stderr)
    assert finished, f"the case did not finish (hung or crashed the process):\n{stderr[-3000:]}"
    assert outputs[name] == case.expected, "\n".join(outputs[name]) + stderr[-3000:]


@pytest.mark.parametrize("name", list(CASES))
def test_catalogue_entry(name: str) -> None:
    case = CASES[name]
    if isinstance(case, Exact):
        _check_exact(case)
    elif isinstance(case, Raises):
        _check_raises(case)
    else:
        _check_in_subprocess(name, case)


# ------------------------------------- found by the random-architecture search
class _MaskedEncoder(nn.Module):
    """A Transformer encoder layer with a causal ``[T, T]`` mask, then a linear head."""

    def __init__(self, tokens: int) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4 * tokens, 2)
        self.mask = nn.Transformer.generate_square_subsequent_mask(tokens)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(x, src_mask=self.mask).flatten(1))


@pytest.mark.parametrize("n", [3, 2], ids=["T-equals-N", "T-differs"])
def test_shared_attention_mask_whose_length_equals_the_batch_size(n: int) -> None:
    """A ``[T, T]`` attention mask with ``T == N`` is shared, not one row per sample
    (the fallback sliced it as per-sample: "attn_mask is [1, 3], should be (3, 3)")."""
    torch.manual_seed(0)
    model = _MaskedEncoder(3).double().eval()
    X, y = torch.randn(n, 3, 4, dtype=torch.float64), torch.randint(0, 2, (n,))
    got = run_all(model, X, y, CE)
    J, G = ggn_reference(model, X, y, CE)
    close(got["full"], G)
    close(got["diag"], G.diagonal())
    close(got["jac"].reshape(-1, J.shape[1]), J)
