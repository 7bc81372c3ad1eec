"""Issue #20, "never silently wrong": the entries on losses and their inputs.

One table, one case per entry and variant (the id names the entry: ``e4-…``):

- e4: loss Hessians at saturated outputs (logits ±40, ±200) against closed forms
  computed without cancellation, entry by entry to ``1e-12`` relative;
- e5: DiagGGNApprox through normalizations of one or two entries and through
  softmax: never negative, and equal to its definition (``reference.py``);
- e10: a batch of size 0 is refused in the forward pass;
- e11: float16 and bfloat16 models against a float64 reference from the same
  (rounded) weights and inputs, to a few machine epsilons; an extra term in
  the backpropagated scalar is still refused;
- e17: a loss on part of the batch (``out[:4]``, ``out[idx]``, ``out[mask]``) is
  refused with an error that says so.

A case either raises a curvhook error with a phrase, or returns the pairs
``(label, actual, expected, rtol)`` that must match.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import pytest
import torch
from torch import Tensor, nn

from curvhook import extend
from curvhook.errors import UnsupportedLossError, UnsupportedModelError
from curvhook.extensions import BatchJacobian, DiagGGN, DiagGGNApprox, FullGGN
from reference import collect, reference

DT = torch.float64
Pairs = list[tuple[str, Tensor, Tensor, float]]


@dataclasses.dataclass
class Case:
    """One catalogue case: ``run()`` returns pairs to compare, or raises ``error`` matching ``phrase``."""

    id: str
    run: Callable[[], Optional[Pairs]]
    error: Optional[type] = None
    phrase: str = ""


def _assert_entrywise(label: str, actual: Tensor, expected: Tensor, rtol: float) -> None:
    """Every entry to ``rtol`` relative (none may hide behind a larger one)."""
    assert actual.shape == expected.shape, label
    actual, expected = actual.to(DT), expected.to(DT)
    assert (expected != 0).all(), f"{label}: the closed form has a zero entry"
    rel = ((actual - expected).abs() / expected.abs()).max().item()
    assert rel <= rtol, f"{label}: relative error {rel:.3e} > {rtol:.1e}\n{actual}\n{expected}"


def _assert_normwise(label: str, actual: Tensor, expected: Tensor, rtol: float) -> None:
    """``max|a - e| <= rtol · max|e|``."""
    assert actual.shape == expected.shape, label
    actual, expected = actual.to(DT), expected.to(DT)
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rtol * scale, f"{label}: error {err:.3e} > {rtol:.1e} · {scale:.3e}"


# ------------------------------------------------------------ e4: saturation
def _others_sum(p: Tensor) -> Tensor:
    """``1 - p_c`` as ``Σ_{o≠c} p_o``, term by term (no subtraction)."""
    c = p.numel()
    return torch.stack([torch.cat([p[:k], p[k + 1 :]]).sum() for k in range(c)])


def _ce_saturated(logits: list[float], reduction: str) -> Pairs:
    """``Linear(1, C)`` with weight ``logits`` on ``x = 1`` (two samples): the GGN is the CE Hessian.

    ``H = α (diag(p) - p pᵀ)`` with ``α`` 1 (sum) or 1/2 (mean over two samples),
    summed over the two samples; ``H_cc = α p_c Σ_{o≠c} p_o`` and ``H_co = -α p_c p_o``.
    """
    z = torch.tensor(logits, dtype=DT)
    model = nn.Linear(1, len(logits), bias=False).to(DT)
    with torch.no_grad():
        model.weight.copy_(z[:, None])
    X, y = torch.ones(2, 1, dtype=DT), torch.zeros(2, dtype=torch.long)
    ggn = FullGGN()
    with extend(model, DiagGGN(), DiagGGNApprox(), ggn):
        nn.CrossEntropyLoss(reduction=reduction)(model(X), y).backward()
    p = torch.softmax(z, 0)
    scale = 2.0 if reduction == "sum" else 1.0  # two samples, α = 1/2 each for the mean
    diag = scale * p * _others_sum(p)
    full = -scale * p[:, None] * p[None, :]
    full.diagonal().copy_(diag)
    w = model.weight
    return [
        ("DiagGGN", w.diag_ggn.flatten(), diag, 1e-12),
        ("DiagGGNApprox", w.diag_ggn_approx.flatten(), diag, 1e-12),
        ("FullGGN", ggn.matrix, full, 1e-12),
    ]


def _bce_saturated(z: float, reduction: str) -> Pairs:
    """``Linear(1, 1)`` with weight ``z``: ``H = coef σ(z) σ(-z)`` (two samples, target 1)."""
    model = nn.Linear(1, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.fill_(z)
    X, y = torch.ones(2, 1, dtype=DT), torch.ones(2, 1, dtype=DT)
    ggn = FullGGN()
    with extend(model, DiagGGN(), DiagGGNApprox(), ggn):
        nn.BCEWithLogitsLoss(reduction=reduction)(model(X), y).backward()
    t = torch.tensor([z], dtype=DT)
    scale = 2.0 if reduction == "sum" else 1.0
    h = scale * torch.sigmoid(t) * torch.sigmoid(-t)
    w = model.weight
    return [
        ("DiagGGN", w.diag_ggn.flatten(), h, 1e-12),
        ("DiagGGNApprox", w.diag_ggn_approx.flatten(), h, 1e-12),
        ("FullGGN", ggn.matrix.flatten(), h, 1e-12),
    ]


def _mse_large(reduction: str) -> Pairs:
    """MSE at outputs ``±1e8``: ``H = 2/numel`` (mean) or ``2`` per entry, whatever the output."""
    model = nn.Linear(1, 3, bias=False).to(DT)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1e8], [-1e8], [3.0]], dtype=DT))
    X, y = torch.ones(2, 1, dtype=DT), torch.zeros(2, 3, dtype=DT)
    with extend(model, DiagGGN(), DiagGGNApprox()):
        nn.MSELoss(reduction=reduction)(model(X), y).backward()
    h = torch.full((3,), 2.0 * 2 / (6 if reduction == "mean" else 1), dtype=DT)
    w = model.weight
    return [("DiagGGN", w.diag_ggn.flatten(), h, 1e-14), ("DiagGGNApprox", w.diag_ggn_approx.flatten(), h, 1e-14)]


def _e4_cases() -> list[Case]:
    logits = {
        "c2-40": [40.0, -40.0],
        "c2-200": [200.0, -200.0],
        "c2-last-40": [-40.0, 40.0],
        "c5-first-40": [40.0, 0.5, -3.0, 1.0, 2.0],
        "c5-last-40": [0.5, -3.0, 1.0, 2.0, 40.0],
        "c5-mid-200": [0.5, -3.0, 200.0, 1.0, 2.0],
        "c5-last-200": [0.5, -3.0, 1.0, 2.0, 200.0],
    }
    cases = []
    for reduction in ("sum", "mean"):
        for name, z in logits.items():
            cases.append(Case(f"e4-ce-{name}-{reduction}", lambda z=z, r=reduction: _ce_saturated(z, r)))
        for z in (40.0, -40.0, 200.0, -200.0):
            cases.append(Case(f"e4-bce-{z:+.0f}-{reduction}", lambda z=z, r=reduction: _bce_saturated(z, r)))
        cases.append(Case(f"e4-mse-1e8-{reduction}", lambda r=reduction: _mse_large(r)))
    return cases


# ------------------------------------------------- e5: non-negative diagonals
def _approx_against_definition(
    build: Callable[[], nn.Module], x_shape: tuple, seeds: int = 8, referenced: int = 1
) -> Pairs:
    """DiagGGNApprox ``≥ 0`` entry by entry over ``seeds`` seeds, and equal to its definition
    for the first ``referenced`` of them (the dense reference is the slow part)."""
    pairs = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = build().to(DT)
        X = torch.randn(4, *x_shape, dtype=DT)
        y = torch.randint(0, 2, (4,))
        crit = nn.CrossEntropyLoss()
        with extend(model, DiagGGNApprox()):
            crit(model(X), y).backward()
        got = collect(model, 4, ("DiagGGNApprox",))["DiagGGNApprox"]
        assert got.min() >= 0, f"seed {seed}: DiagGGNApprox has a negative entry {got.min().item():.3e}"
        if seed >= referenced:
            continue
        ref = reference(model, X, lambda out: crit(out, y)).approx
        pairs.append((f"DiagGGNApprox seed {seed}", got, ref, 1e-9))
    return pairs


def _saturating(linear: nn.Linear, scale: float = 40.0) -> nn.Linear:
    with torch.no_grad():
        linear.weight.mul_(scale)
    return linear


E5_MODELS = {
    "rmsnorm1": (lambda: nn.Sequential(nn.Linear(3, 1), nn.RMSNorm(1), nn.Linear(1, 2)), (3,)),
    "rmsnorm1-eps": (lambda: nn.Sequential(nn.Linear(3, 1), nn.RMSNorm(1, eps=0.1), nn.Linear(1, 2)), (3,)),
    "groupnorm1-1": (lambda: nn.Sequential(nn.Conv1d(2, 1, 1), nn.GroupNorm(1, 1), nn.Flatten(), nn.Linear(3, 2)), (2, 3)),
    "groupnorm1-2-one-position": (
        lambda: nn.Sequential(nn.Conv1d(2, 2, 1), nn.GroupNorm(1, 2), nn.Flatten(), nn.Linear(2, 2)), (2, 1)
    ),
    "layernorm1": (lambda: nn.Sequential(nn.Linear(3, 1), nn.LayerNorm(1), nn.Linear(1, 2)), (3,)),
    "layernorm2": (lambda: nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2), nn.Linear(2, 2)), (3,)),
    "rmsnorm2": (lambda: nn.Sequential(nn.Linear(3, 2), nn.RMSNorm(2), nn.Linear(2, 2)), (3,)),
    "layernorm2-eps": (lambda: nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2, eps=1e-12), nn.Linear(2, 2)), (3,)),
    "groupnorm1-1-two-positions-eps": (
        lambda: nn.Sequential(nn.Conv1d(2, 1, 1), nn.GroupNorm(1, 1, eps=1e-12), nn.Flatten(), nn.Linear(2, 2)), (2, 2)
    ),
    "layernorm3-relu": (
        lambda: nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.ReLU(), nn.Linear(3, 2)), (3,)
    ),
    "softmax-saturated": (lambda: nn.Sequential(_saturating(nn.Linear(3, 4)), nn.Softmax(1), nn.Linear(4, 2)), (3,)),
    "logsoftmax-saturated": (
        lambda: nn.Sequential(_saturating(nn.Linear(3, 4)), nn.LogSoftmax(1), nn.Linear(4, 2)), (3,)
    ),
}


def _softmax_entrywise(logits: list[float], log: bool) -> Pairs:
    """``Linear(1, C)`` (weight = ``logits``, ``x = 1``), ``Softmax``/``LogSoftmax``, ``Linear(C, 2)``, CE.

    The first weight's DiagGGNApprox is ``Σ_o d_o J[o, i]²``, ``d`` what reaches the
    softmax output; ``J[o, i] = s_o (δ_oi - s_i)`` (``δ_oi - s_i`` for LogSoftmax) with
    ``1 - s_i`` formed as ``Σ_{o≠i} s_o``: every term without cancellation.
    """
    z = torch.tensor(logits, dtype=DT)
    c = len(logits)
    first = nn.Linear(1, c, bias=False).to(DT)
    with torch.no_grad():
        first.weight.copy_(z[:, None])
    model = nn.Sequential(first, nn.LogSoftmax(1) if log else nn.Softmax(1), nn.Linear(c, 2).to(DT))
    X, y = torch.ones(1, 1, dtype=DT), torch.tensor([1])
    with extend(model, DiagGGNApprox()):
        nn.CrossEntropyLoss()(model(X), y).backward()
    s = torch.softmax(z, 0)
    q = torch.softmax(model(X)[0].detach(), 0)
    h = q * _others_sum(q)  # the CE Hessian's diagonal at the output (not saturated)
    d = (h[:, None] * model[2].weight.detach().square()).sum(0)  # [C]
    jac = -s[None, :].expand(c, c).clone() if log else -s[:, None] * s[None, :]
    jac.diagonal().copy_(_others_sum(s) if log else s * _others_sum(s))  # J[i, i]
    expected = (d[:, None] * jac.square()).sum(0)
    return [("DiagGGNApprox of the first weight", first.weight.diag_ggn_approx.flatten(), expected, 1e-12)]


def _e5_cases() -> list[Case]:
    cases = [
        Case(f"e5-{name}", lambda b=build, s=shape: _approx_against_definition(b, s))
        for name, (build, shape) in E5_MODELS.items()
    ]
    for log in (False, True):
        for name, z in {"c4-40": [40.0, 0.0, -3.0, 1.0], "c4-last-200": [0.0, -3.0, 1.0, 200.0]}.items():
            kind = "logsoftmax" if log else "softmax"
            cases.append(Case(f"e5-entrywise-{kind}-{name}", lambda z=z, log=log: _softmax_entrywise(z, log)))
    return cases


# ------------------------------------------------------------- e10: empty batch
def _empty_batch(reduction: str) -> None:
    model = nn.Sequential(nn.Linear(4, 3)).to(DT)
    X, y = torch.randn(0, 4, dtype=DT), torch.randint(0, 3, (0,))
    with extend(model, DiagGGN(), BatchJacobian(), DiagGGNApprox(), FullGGN()):
        nn.CrossEntropyLoss(reduction=reduction)(model(X), y).backward()


class _DropsAll(nn.Module):
    """A model whose output keeps no sample of a non-empty input."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x)[:0]


def _empty_output() -> None:
    model = _DropsAll().to(DT)
    with extend(model, DiagGGN()):
        nn.CrossEntropyLoss(reduction="sum")(model(torch.randn(3, 4, dtype=DT)), torch.zeros(0, dtype=torch.long)).backward()


def _empty_batch_then_full() -> Pairs:
    """Refused, then the same block goes on: an empty batch under no_grad, then a full one."""
    model = nn.Sequential(nn.Linear(4, 3)).to(DT)
    X, y = torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,))
    crit = nn.CrossEntropyLoss()
    with extend(model, DiagGGN()):
        with pytest.raises(UnsupportedModelError, match="batch size 0"):
            model(X[:0])
        with torch.no_grad():
            assert model(X[:0]).shape == (0, 3)
        crit(model(X), y).backward()
    ref = reference(model, X, lambda out: crit(out, y), approx=False)
    return [("DiagGGN", model[0].weight.diag_ggn.flatten(), ref.diag_ggn[:12], 1e-10)]


def _e10_cases() -> list[Case]:
    return [
        Case("e10-mean", lambda: _empty_batch("mean"), UnsupportedModelError, "batch size 0.*Skip empty batches"),
        Case("e10-sum", lambda: _empty_batch("sum"), UnsupportedModelError, "batch size 0.*Skip empty batches"),
        Case("e10-empty-output", _empty_output, UnsupportedModelError, "output has batch size 0"),
        Case("e10-block-goes-on", _empty_batch_then_full),
    ]


# ------------------------------------------------------------- e11: fp16, bf16
def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _half(dtype: torch.dtype, crit: nn.Module, target: Callable[[Tensor], Tensor]) -> Pairs:
    """All four extensions in ``dtype`` against float64 from the same rounded weights and inputs.

    Normwise relative error up to ``16 ε`` of the dtype (measured: about ``2 ε``).
    """
    model = _mlp().to(dtype)
    X = torch.randn(5, 4).to(dtype)
    y = target(X)
    ggn = FullGGN()
    with extend(model, BatchJacobian(), DiagGGN(), DiagGGNApprox(), ggn):
        out = model(X)
        crit(out, y).backward()
    got = collect(model, 5)
    ref = reference(model, X, lambda o: crit(o, y.to(DT) if y.is_floating_point() else y))
    tol = 16 * torch.finfo(dtype).eps
    for p in model.parameters():
        assert p.diag_ggn.dtype == dtype
    return [
        ("BatchJacobian", got["BatchJacobian"], ref.batch_jacobian, tol),
        ("DiagGGN", got["DiagGGN"], ref.diag_ggn, tol),
        ("DiagGGNApprox", got["DiagGGNApprox"], ref.approx, tol),
        ("FullGGN", got["FullGGN"], ref.G, tol),
    ]


def _half_extra_term(dtype: torch.dtype) -> None:
    model = _mlp().to(dtype)
    X, y = torch.randn(5, 4).to(dtype), torch.randint(0, 3, (5,))
    with extend(model, DiagGGN()):
        out = model(X)
        (nn.CrossEntropyLoss()(out, y) + 0.5 * out.square().sum()).backward()


def _e11_cases() -> list[Case]:
    cases = []
    targets = {
        "ce": (nn.CrossEntropyLoss(), lambda X: torch.randint(0, 3, (X.shape[0],))),
        "ce-sum": (nn.CrossEntropyLoss(reduction="sum"), lambda X: torch.randint(0, 3, (X.shape[0],))),
        "mse": (nn.MSELoss(), lambda X: torch.randn(X.shape[0], 3).to(X.dtype)),
        "bce": (nn.BCEWithLogitsLoss(), lambda X: torch.rand(X.shape[0], 3).to(X.dtype)),
    }
    for short, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        for name, (crit, target) in targets.items():
            cases.append(Case(f"e11-{short}-{name}", lambda d=dtype, c=crit, t=target: _half(d, c, t)))
        cases.append(
            Case(f"e11-{short}-extra-term", lambda d=dtype: _half_extra_term(d), UnsupportedLossError,
                 "not that of the loss")
        )
    return cases


# ------------------------------------------------- e17: loss on part of the batch
def _part_loss(take: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], ext=DiagGGN) -> None:
    model = nn.Sequential(nn.Linear(4, 3)).to(DT)
    X, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    with extend(model, ext()):
        out, target = take(model(X), y)
        nn.CrossEntropyLoss()(out, target).backward()


_IDX = torch.tensor([0, 2, 3])
_MASK = torch.tensor([True, False, True, True, False, True])


def _part_logged_whole_backpropagated() -> Pairs:
    """A loss on a slice for logging only: the whole-batch loss still gives exact results."""
    model = nn.Sequential(nn.Linear(4, 3)).to(DT)
    X, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    crit = nn.CrossEntropyLoss()
    with extend(model, DiagGGN()):
        out = model(X)
        logged = crit(out[:4], y[:4]).item()
        crit(out, y).backward()
    assert logged > 0
    ref = reference(model, X, lambda o: crit(o, y), approx=False)
    got = torch.cat([p.diag_ggn.flatten() for p in model.parameters()])
    return [("DiagGGN", got, ref.diag_ggn, 1e-10)]


def _e17_cases() -> list[Case]:
    part = "part of the batch.*model\\(X\\[:4\\]\\)"
    takes = {
        "slice": lambda o, y: (o[:4], y[:4]),
        "index": lambda o, y: (o[_IDX], y[_IDX]),
        "mask": lambda o, y: (o[_MASK], y[_MASK]),
        "narrow": lambda o, y: (o.narrow(0, 1, 3), y[1:4]),
        "one-sample": lambda o, y: (o[0], y[0]),
        "slice-then-scaled": lambda o, y: (2 * o[:4], y[:4]),
    }
    cases = [Case(f"e17-{name}", lambda t=t: _part_loss(t), UnsupportedLossError, part) for name, t in takes.items()]
    cases.append(Case("e17-slice-approx", lambda: _part_loss(takes["slice"], DiagGGNApprox), UnsupportedLossError, part))
    cases.append(Case("e17-slice-named-loss", lambda: _part_loss(takes["slice"], lambda: DiagGGN(loss=nn.CrossEntropyLoss())),
                      UnsupportedLossError, part))
    cases.append(Case("e17-slice-plus-whole", _slice_plus_whole, UnsupportedLossError, part))
    cases.append(Case("e17-slice-logged-only", _part_logged_whole_backpropagated))
    return cases


def _slice_plus_whole() -> None:
    model = nn.Sequential(nn.Linear(4, 3)).to(DT)
    X, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    crit = nn.CrossEntropyLoss()
    with extend(model, DiagGGN()):
        out = model(X)
        (crit(out, y) + crit(out[:4], y[:4])).backward()


# ------------------------------------------------------------------ the table
CASES = [*_e4_cases(), *_e5_cases(), *_e10_cases(), *_e11_cases(), *_e17_cases()]
_ENTRYWISE = ("e4-", "e5-entrywise-")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_catalogue(case: Case) -> None:
    if case.error is not None:
        with pytest.raises(case.error, match=case.phrase):
            case.run()
        return
    pairs = case.run()
    assert pairs, "a case that raises nothing must compare something"
    compare = _assert_entrywise if case.id.startswith(_ENTRYWISE) else _assert_normwise
    for label, actual, expected, rtol in pairs:
        compare(f"{case.id} {label}", actual, expected, rtol)
