"""``curvhook/extensions/diag_ggn_mc.py``: the Monte-Carlo GGN diagonal.

- Its expectation is DiagGGN exactly: the labels are enumerated (every label
  tuple run through curvhook, weighted by its probability), against the
  torch.func reference to 1e-10.
- The average over many samples converges to DiagGGN, within a
  concentration bound that a correct implementation violates with probability
  below ``DELTA`` per test (stated with each bound).
- A seeded generator reproduces the result; another seed changes it.
"""

import itertools
import math

import pytest
import torch
from torch import nn

from curvhook import extend
from curvhook.extensions import DiagGGN, DiagGGNMC
from helpers import DT, conv_net, mlp
from reference import check, reference

DELTA = 1e-6  # failure probability of one statistical test with a correct implementation


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.block, self.out = nn.Linear(4, 5), nn.Sequential(nn.Tanh(), nn.Linear(5, 5)), nn.Linear(5, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.out(torch.relu(h + self.block(h)))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.att, self.out = nn.Linear(4, 6), nn.MultiheadAttention(6, 2, batch_first=True), nn.Linear(12, 3)

    def forward(self, x):  # x: [N, 2·4] as two tokens
        h = self.inp(x.unflatten(1, (2, 4)))
        a, _ = self.att(h, h, h, need_weights=False)
        return self.out((h + a).flatten(1))


def shared():
    l = nn.Linear(4, 4)
    return nn.Sequential(l, nn.Tanh(), l, nn.Linear(4, 3))


MODELS = {
    "mlp": (mlp, (4,)),
    "conv": (conv_net, (2, 4, 4)),
    "residual": (Residual, (4,)),
    "attention": (Attention, (8,)),
    "shared": (shared, (4,)),
}


def build(name, n, seed=0):
    torch.manual_seed(seed)
    make, shape = MODELS[name]
    return make().to(DT), torch.randn(n, *shape, dtype=DT)


def run(model, X, crit, y, *exts):
    with extend(model, *exts):
        crit(model(X), y).backward()
    return {type(e).__name__: torch.cat([getattr(p, e.attribute).flatten() for p in model.parameters()]) for e in exts}


# ------------------------------------------------ the exact expectation, labels enumerated
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name, n", [(name, 1) for name in MODELS] + [("mlp", 2), ("conv", 2), ("shared", 2)])
def test_expectation_is_diag_ggn_by_enumerating_the_classes(monkeypatch, name, n, reduction):
    """``E[diag_ggn_mc] = Σ_labels P(labels) · diag_ggn_mc(labels) = diag_ggn``, exactly."""
    model, X = build(name, n)
    y = torch.randint(0, 3, (n,))
    crit = nn.CrossEntropyLoss(reduction=reduction)
    probs = model(X).detach().softmax(1)  # [N, C]
    labels = [None]
    monkeypatch.setattr(torch, "multinomial", lambda rows, k, generator=None: labels[0].clone())
    expectation = 0
    for tup in itertools.product(range(3), repeat=n):
        labels[0] = torch.tensor(tup).unsqueeze(1)  # [N, 1], what multinomial(rows, 1) returns
        weight = math.prod(probs[i, c].item() for i, c in enumerate(tup))
        expectation = expectation + weight * run(model, X, crit, y, DiagGGNMC())["DiagGGNMC"]
    ref = reference(model, X, lambda out: crit(out, y), approx=False)
    check(expectation, ref.diag_ggn, "DiagGGNMC expectation", rtol=1e-10)


def test_expectation_with_class_weights_label_smoothing_and_positions(monkeypatch):
    """Per-position cross-entropy with class weights and label smoothing: α varies by position."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv1d(2, 3, 1), nn.Tanh(), nn.Conv1d(3, 3, 1)).to(DT)  # [N, C=3, T=2]
    X, y = torch.randn(1, 2, 2, dtype=DT), torch.tensor([[0, 2]])
    crit = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5], dtype=DT), label_smoothing=0.1)
    probs = model(X).detach().softmax(1)[0].T  # [T, C]: rows in (n t) order
    labels = [None]
    monkeypatch.setattr(torch, "multinomial", lambda rows, k, generator=None: labels[0].clone())
    expectation = 0
    for tup in itertools.product(range(3), repeat=2):
        labels[0] = torch.tensor(tup).unsqueeze(1)
        weight = probs[0, tup[0]].item() * probs[1, tup[1]].item()
        expectation = expectation + weight * run(model, X, crit, y, DiagGGNMC())["DiagGGNMC"]
    ref = reference(model, X, lambda out: crit(out, y), approx=False)
    check(expectation, ref.diag_ggn, "DiagGGNMC expectation", rtol=1e-10)


# ------------------------------------------------ convergence, with stated failure probability
def _rows(ref, j):
    """Per-sample Jacobian columns of parameter entry ``j``: ``[N, C]``."""
    n = ref.out.shape[0]
    return ref.J[:, j].reshape(n, -1)


def hoeffding_tolerance(y_max, m, entries):
    """``t`` with ``P(|mean of m iid Y ∈ [0, y_max]| - E Y| ≥ t) ≤ DELTA / entries`` (Hoeffding)."""
    return y_max * math.sqrt(math.log(2 * entries / DELTA) / (2 * m))


@pytest.mark.parametrize(
    "name, loss, m",
    [("mlp", "ce", 20000), ("mlp", "bce", 20000), ("shared", "ce", 20000), ("residual", "bce", 20000), ("conv", "ce", 1000)],
)
def test_average_converges_to_diag_ggn_bounded(name, loss, m):
    """Cross-entropy and BCE columns are bounded: ``Y_m = Σ_n (J_nᵀ s_nm)_j² ∈ [0, Y_max]``.

    Hoeffding's inequality with a union bound over the ``P`` entries: a correct
    implementation fails with probability below ``DELTA`` = 1e-6.
    """
    n = 3
    model, X = build(name, n, seed=5)
    if loss == "ce":
        crit, y = nn.CrossEntropyLoss(), torch.randint(0, 3, (n,))
    else:
        crit, y = nn.BCEWithLogitsLoss(), torch.rand(n, 3, dtype=DT)
    g = torch.Generator().manual_seed(11)
    got = run(model, X, crit, y, DiagGGNMC(mc_samples=m, generator=g))["DiagGGNMC"]
    ref = reference(model, X, lambda out: crit(out, y), approx=False)
    out = ref.out
    if loss == "ce":
        p, alpha = out.softmax(1), 1.0 / n
        # max over the drawn class c of |g · (p - e_c)|
        bound = lambda rows: (rows @ p.T).diagonal().unsqueeze(1) - rows  # [N, C]
    else:
        sig, alpha = out.sigmoid(), 1.0 / out.numel()
        bound = lambda rows: (rows.abs() * torch.maximum(sig, 1 - sig)).sum(1, keepdim=True)
    P = got.numel()
    ratios = []
    for j in range(P):
        y_max = alpha * bound(_rows(ref, j)).abs().amax(1).square().sum().item()
        tol = hoeffding_tolerance(y_max, m, P)
        assert abs(got[j].item() - ref.diag_ggn[j].item()) <= tol + 1e-12, (j, got[j], ref.diag_ggn[j], tol)
        if ref.diag_ggn[j] > 0:
            ratios.append(tol / ref.diag_ggn[j].item())
    # and the bound is not vacuous: the tolerance is below the entry itself for most entries
    assert sorted(ratios)[len(ratios) // 2] < 0.5


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_average_converges_to_diag_ggn_gaussian(reduction):
    """MSE: ``(J_nᵀ s_nm)_j ~ N(0, σ_nj²)``, so ``M·mean = Σ_{m,n} σ_nj² ξ²`` (weighted χ²).

    Laurent and Massart (2000, Lemma 1) with ``a = (σ_nj²)`` repeated ``M`` times:
    ``P(Z - E Z ≥ 2‖a‖₂√x + 2‖a‖_∞ x) ≤ e^{-x}`` and ``P(E Z - Z ≥ 2‖a‖₂√x) ≤ e^{-x}``;
    with ``e^{-x} = DELTA / (2P)`` a correct implementation fails with probability below ``DELTA``.
    """
    n, m = 3, 20000
    model, X = build("residual", n, seed=7)
    crit, y = nn.MSELoss(reduction=reduction), torch.randn(n, 3, dtype=DT)
    got = run(model, X, crit, y, DiagGGNMC(mc_samples=m, generator=torch.Generator().manual_seed(2)))["DiagGGNMC"]
    ref = reference(model, X, lambda out: crit(out, y), approx=False)
    scale = 2.0 / ref.out.numel() if reduction == "mean" else 2.0
    P = got.numel()
    x = math.log(2 * P / DELTA)
    for j in range(P):
        var = scale * _rows(ref, j).square().sum(1)  # σ_nj², [N]
        a2, ainf = math.sqrt(m * var.square().sum().item()), var.max().item()
        tol = (2 * a2 * math.sqrt(x) + 2 * ainf * x) / m
        assert abs(got[j].item() - ref.diag_ggn[j].item()) <= tol + 1e-12, (j, got[j], ref.diag_ggn[j], tol)


# ------------------------------------------------ reproducibility
@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_same_seed_same_result_other_seed_other_result(loss):
    model, X = build("conv", 3)
    crit, y = {
        "ce": (nn.CrossEntropyLoss(), torch.randint(0, 3, (3,))),
        "mse": (nn.MSELoss(), torch.randn(3, 3, dtype=DT)),
        "bce": (nn.BCEWithLogitsLoss(reduction="sum"), torch.rand(3, 3, dtype=DT)),
    }[loss]
    results = [
        run(model, X, crit, y, DiagGGNMC(mc_samples=2, generator=torch.Generator().manual_seed(seed)))["DiagGGNMC"]
        for seed in (4, 4, 5)
    ]
    assert torch.equal(results[0], results[1])
    assert not torch.allclose(results[0], results[2])
    torch.manual_seed(9)  # generator=None: torch's default generator
    a = run(model, X, crit, y, DiagGGNMC())["DiagGGNMC"]
    torch.manual_seed(9)
    assert torch.equal(a, run(model, X, crit, y, DiagGGNMC())["DiagGGNMC"])


def test_shares_nothing_with_diag_ggn_and_gives_it_unchanged():
    model, X = build("mlp", 4)
    crit, y = nn.CrossEntropyLoss(), torch.randint(0, 3, (4,))
    got = run(model, X, crit, y, DiagGGN(), DiagGGNMC(generator=torch.Generator().manual_seed(0)))
    ref = reference(model, X, lambda out: crit(out, y), approx=False)
    check(got["DiagGGN"], ref.diag_ggn, "DiagGGN")
    assert (got["DiagGGNMC"] >= 0).all()


def test_arguments_checked():
    with pytest.raises(ValueError, match="mc_samples"):
        DiagGGNMC(mc_samples=0)
    with pytest.raises(TypeError, match="generator"):
        DiagGGNMC(generator=3)
    assert repr(DiagGGNMC(mc_samples=3)) == "DiagGGNMC(mc_samples=3)"
