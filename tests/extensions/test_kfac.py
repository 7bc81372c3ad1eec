"""``curvhook/extensions/kfac.py``: Kronecker factors against curvlinops' ``KFACLinearOperator``.

curvlinops (3.0.1) computes the same factors with hooks and one backward pass
per column; both are compared factor by factor and as the dense operator, in
both modes (exact square-root factor = curvlinops' ``type-2``; sampled columns =
its ``mc`` with the same draws) and both approximations, on Linear models with
and without a sequence axis and on Conv2d models, with both reductions. A single
Linear layer with one sample and no positions, where KFAC is the GGN block
exactly, is checked against the torch.func reference.
"""

import copy

import pytest
import torch
from torch import nn

from curvhook import extend
from curvhook.extensions import KFAC, DiagGGN, kfac_dense
from helpers import DT
from reference import check, reference

curvlinops = pytest.importorskip("curvlinops", reason="curvlinops-for-pytorch (the test extra) is not installed")
from curvlinops import KFACLinearOperator  # noqa: E402


class Seq(nn.Module):
    """Linear layers on a sequence ``[N, T, D]``; ``pool`` averages the positions before the head."""

    def __init__(self, pool: bool, d=3, h=4, c=3):
        super().__init__()
        self.pool = pool
        self.inp, self.act, self.mid, self.out = nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h), nn.Linear(h, c)

    def forward(self, x):
        h = self.mid(self.act(self.inp(x)))
        if self.pool:
            h = h.mean(1)
        return self.out(self.act(h))


class SeqCE(Seq):
    """Per-position cross-entropy: logits ``[N, C, T]``."""

    def forward(self, x):
        return super().forward(x).transpose(1, 2)


def conv2d():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 2, stride=2), nn.Tanh(),
        nn.Flatten(), nn.Linear(16, 3),
    )


def mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


def shared():
    l = nn.Linear(4, 4)
    return nn.Sequential(l, nn.Tanh(), l, nn.Linear(4, 3))


MODELS = {  # name: (builder, input shape without N, target kind)
    "mlp": (mlp, (4,), "flat"),
    "conv2d": (conv2d, (2, 4, 4), "flat"),
    "shared": (shared, (4,), "flat"),
    "seq_pooled": (lambda: Seq(True), (5, 3), "flat"),
    "seq": (lambda: Seq(False), (5, 3), "seq"),
    "seq_ce": (lambda: SeqCE(False), (5, 3), "seq_ce"),
}


def problem(name, loss, reduction, n, seed=0):
    torch.manual_seed(seed)
    make, shape, kind = MODELS[name]
    model = make().to(DT)
    X = torch.randn(n, *shape, dtype=DT)
    out = model(X).detach()
    if loss == "ce":
        crit = nn.CrossEntropyLoss(reduction=reduction)
        y = torch.randint(0, 3, (n, *out.shape[2:]))
    elif loss == "mse":
        crit, y = nn.MSELoss(reduction=reduction), torch.randn_like(out)
    else:
        crit, y = nn.BCEWithLogitsLoss(reduction=reduction), torch.randint(0, 2, out.shape).to(DT)
    return model, X, y, crit


def layers(model):
    """The modules curvlinops factors, by name, with their parameters."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def layer_params(model):
    params = [p for m in layers(model).values() for p in m.parameters()]
    return list({id(p): p for p in params}.values())


def curvlinops_kfac(model, X, y, crit, mode, approx, mc_samples=1, seed=7, data=None):
    """curvlinops' operator on a copy of ``model``, and the parameters of ``model`` in its order."""
    ours = layer_params(model)
    model = copy.deepcopy(model)
    params = layer_params(model)
    op = KFACLinearOperator(
        model, crit, params, data or [(X, y)], check_deterministic=False, seed=seed,
        fisher_type=mode, mc_samples=mc_samples, kfac_approx=approx,
    )
    op.compute_kronecker_factors()
    return op, ours


def curvhook_kfac(model, X, y, crit, ext):
    with extend(model, ext):
        crit(model(X), y).backward()


def compare_with_curvlinops(model, op, params, rtol=1e-10):
    for name, module in layers(model).items():
        A, B = op._input_covariances[name], op._gradient_covariances[name]
        a, b = module.weight.kfac
        check(a, A, "KFAC A vs curvlinops", rtol=rtol)
        check(b, B, "KFAC B vs curvlinops", rtol=rtol)
        if module.bias is not None:
            one, b_bias = module.bias.kfac
            assert torch.equal(one, torch.ones(1, 1, dtype=DT))
            check(b_bias, B, "KFAC B vs curvlinops", rtol=rtol)
    # the dense operator: Kronecker order and vec order, weight and bias separate
    dense = op @ torch.eye(op.shape[1], dtype=DT)
    ours = torch.block_diag(*[kfac_dense(p) for p in params])
    check(ours, dense, "KFAC dense vs curvlinops", rtol=1e-8)


CASES = [
    ("mlp", "ce"), ("mlp", "mse"), ("mlp", "bce"), ("conv2d", "ce"), ("conv2d", "mse"), ("shared", "ce"),
    ("seq_pooled", "ce"), ("seq", "mse"), ("seq_ce", "ce"),
]


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name, loss", CASES)
def test_exact_factors_match_curvlinops_type2(name, loss, reduction, approx):
    n = 3
    model, X, y, crit = problem(name, loss, reduction, n)
    curvhook_kfac(model, X, y, crit, KFAC(approx=approx))
    op, params = curvlinops_kfac(model, X, y, crit, "type-2", approx)
    if MODELS[name][2] == "flat" or approx == "expand":
        compare_with_curvlinops(model, op, params)
    else:
        exact_reduce_with_a_loss_per_position(model, X, y, crit, op)


def exact_reduce_with_a_loss_per_position(model, X, y, crit, op):
    """KFAC-reduce with one loss term per position: ``B`` against the torch.func GGN.

    ``Σ_t b_vnt`` is the column backpropagated to a shift of every position of the
    layer output by one vector, which is what the bias does: ``B_reduce`` is the
    GGN block of the bias, exactly. curvlinops' ``type-2`` backpropagates column
    ``c`` of every loss position at once, ``(Σ_t' s_ct')``, whose outer products add
    the terms between positions that ``H`` does not have (it is block-diagonal
    over them): it is not this ``B`` (nor the expectation of its own ``mc``).
    ``A`` does not depend on the loss and is compared with curvlinops'.
    """
    ref = reference(model, X, lambda out: crit(out, y), approx=False)
    start, offsets = 0, {}
    for pname, p in model.named_parameters():
        offsets[pname] = slice(start, start + p.numel())
        start += p.numel()
    for name, module in layers(model).items():
        a, b = module.weight.kfac
        check(a, op._input_covariances[name], "KFAC A vs curvlinops", rtol=1e-10)
        block = ref.G[offsets[f"{name}.bias"], offsets[f"{name}.bias"]]
        check(b, block, "KFAC-reduce B vs GGN bias block", rtol=1e-10)
        assert module.bias.kfac[1] is b or torch.equal(module.bias.kfac[1], b)
    assert not torch.allclose(op._gradient_covariances["inp"], model.inp.weight.kfac[1], rtol=1e-3)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name, loss", CASES)
def test_sampled_factors_match_curvlinops_mc_with_the_same_draws(name, loss, reduction, approx):
    """``mc_samples=1`` with a generator seeded as curvlinops seeds its own: the same labels."""
    n = 3
    model, X, y, crit = problem(name, loss, reduction, n)
    curvhook_kfac(model, X, y, crit, KFAC(mc_samples=1, approx=approx, generator=torch.Generator().manual_seed(7)))
    op, params = curvlinops_kfac(model, X, y, crit, "mc", approx, seed=7)
    compare_with_curvlinops(model, op, params)


def _race_is_multinomial():
    """Whether ``M`` calls of ``multinomial(p, 1)`` draw what one exponential race over ``[M, *p]`` draws (torch 2.13)."""
    p = torch.rand(5, 4, dtype=DT).softmax(1)
    g = torch.Generator().manual_seed(0)
    calls = torch.cat([p.multinomial(1, generator=g) for _ in range(3)], 1).T
    g = torch.Generator().manual_seed(0)
    race = (p / torch.empty(3, 5, 4, dtype=DT).exponential_(generator=g)).argmax(-1)
    return torch.equal(calls, race)


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_several_samples_match_curvlinops_mc(loss):
    """``M = 3``: curvhook draws the three at once, curvlinops one after the other; the same numbers."""
    if loss == "ce" and not _race_is_multinomial():
        pytest.skip(f"torch {torch.__version__}'s multinomial(p, 1) draws other numbers than its exponential race")
    model, X, y, crit = problem("conv2d", loss, "mean", 4)
    curvhook_kfac(model, X, y, crit, KFAC(mc_samples=3, generator=torch.Generator().manual_seed(3)))
    op, params = curvlinops_kfac(model, X, y, crit, "mc", "expand", mc_samples=3, seed=3)
    compare_with_curvlinops(model, op, params)


def test_one_layer_one_sample_is_the_ggn_block():
    """One Linear layer, N = 1, no positions: ``B ⊗ A`` is the GGN block of the weight, ``B`` that of the bias."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).to(DT)
    X, y = torch.randn(1, 4, dtype=DT), torch.tensor([2])
    crit = nn.CrossEntropyLoss()
    curvhook_kfac(model, X, y, crit, KFAC())
    G = reference(model, X, lambda out: crit(out, y), approx=False).G
    w, b = model[0].weight, model[0].bias
    check(kfac_dense(w), G[:12, :12], "KFAC one layer vs GGN", rtol=1e-10)
    check(kfac_dense(b), G[12:, 12:], "KFAC one layer vs GGN", rtol=1e-10)


def test_accumulated_batches_match_curvlinops_over_a_data_loader():
    """``accumulate=True`` over two batches: ``A`` averaged over all samples, ``B`` summed."""
    model, X, y, crit = problem("conv2d", "ce", "sum", 5)
    batches = [(X[:2], y[:2]), (X[2:], y[2:])]
    with extend(model, KFAC(), accumulate=True):
        for xb, yb in batches:
            crit(model(xb), yb).backward()
    op, params = curvlinops_kfac(model, X, y, crit, "type-2", "expand", data=batches)
    compare_with_curvlinops(model, op, params)


def test_conv1d_and_conv3d_as_conv2d():
    """Conv1d with kernel k and Conv3d with kernel (1, 1, k) are Conv2d with kernel (1, k)."""
    torch.manual_seed(4)
    c2 = nn.Sequential(nn.Conv2d(2, 3, (1, 3), padding=(0, 1)), nn.Tanh(), nn.Flatten(), nn.Linear(15, 3)).to(DT)
    c1 = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(15, 3)).to(DT)
    c3 = nn.Sequential(nn.Conv3d(2, 3, (1, 1, 3), padding=(0, 0, 1)), nn.Tanh(), nn.Flatten(), nn.Linear(15, 3)).to(DT)
    with torch.no_grad():
        for m in (c1, c3):
            m[0].weight.copy_(c2[0].weight.reshape(m[0].weight.shape))
            m[0].bias.copy_(c2[0].bias)
            m[3].load_state_dict(c2[3].state_dict())
    X, y = torch.randn(3, 2, 1, 5, dtype=DT), torch.tensor([0, 2, 1])
    for approx in ("expand", "reduce"):
        got = []
        for m, x in ((c2, X), (c1, X[:, :, 0]), (c3, X[:, :, None])):
            curvhook_kfac(m, x, y, nn.CrossEntropyLoss(), KFAC(approx=approx))
            got.append(m[0].weight.kfac)
        for a, b in got[1:]:
            check(a, got[0][0], "KFAC conv1d/3d vs conv2d", rtol=1e-12)
            check(b, got[0][1], "KFAC conv1d/3d vs conv2d", rtol=1e-12)


def test_parameters_without_kronecker_structure_get_no_attribute():
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(64, 6),
        nn.LayerNorm(6), nn.Linear(6, 3),
    ).to(DT)
    X, y = torch.randn(3, 2, 4, 4, dtype=DT), torch.tensor([0, 1, 2])
    with extend(model, KFAC(), DiagGGN()):
        nn.CrossEntropyLoss()(model(X), y).backward()
    have = {name for name, p in model.named_parameters() if hasattr(p, "kfac")}
    assert have == {"3.weight", "3.bias", "5.weight", "5.bias"}
    assert all(hasattr(p, "diag_ggn") for p in model.parameters())


def test_arguments_checked():
    with pytest.raises(ValueError, match="approx"):
        KFAC(approx="mean")
    with pytest.raises(ValueError, match="mc_samples"):
        KFAC(mc_samples=0)
    with pytest.raises(ValueError, match="generator"):
        KFAC(generator=torch.Generator())
    assert repr(KFAC(mc_samples=2, approx="reduce")) == "KFAC(mc_samples=2, approx='reduce')"
