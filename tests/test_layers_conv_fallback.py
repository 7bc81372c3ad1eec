"""Convolution and max-pool rules, the torch.func fallback and custom rules against torch.func."""

import warnings
from typing import NamedTuple

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from curvhook import LayerRule, extend, register_rule
from curvhook.errors import UnsupportedModelError
from curvhook.extensions import BatchJacobian, DiagGGN, DiagGGNApprox, FullGGN
from curvhook.rules import registry


def ggn_reference(model, X, y, criterion):
    """``J`` ``[N*C, P]`` and ``G = Jᵀ H J`` from torch.func, in the model's dtype."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    out = functional_call(model, params, (X,))
    n, c = out.shape[0], out[0].numel()
    jac = jacrev(lambda pr: functional_call(model, pr, (X,)))(params)
    J = torch.cat([jac[k].reshape(n * c, -1) for k in params], 1)
    H = hessian(lambda o: criterion(o, y))(out).reshape(n * c, n * c)
    return J, J.T @ H @ J


def run_all(model, X, y, criterion):
    ggn = FullGGN()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with extend(model, DiagGGN(), ggn, BatchJacobian(), DiagGGNApprox()):
            criterion(model(X), y).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    n = X.shape[0]
    return {
        "diag": torch.cat([p.diag_ggn.flatten() for p in params]),
        "full": ggn.matrix,
        "jac": torch.cat([p.batch_jacobian.reshape(n, p.batch_jacobian.shape[1], -1) for p in params], 2),
        "approx": torch.cat([p.diag_ggn_approx.flatten() for p in params]),
    }


def close(actual, expected, rtol=1e-6):
    scale = expected.abs().max().clamp(min=1e-30)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def assert_exact(model, X, y, criterion):
    """Run every extension and compare FullGGN, DiagGGN and BatchJacobian with torch.func."""
    got = run_all(model, X, y, criterion)
    J, G = ggn_reference(model, X, y, criterion)
    close(got["full"], G)
    close(got["diag"], G.diagonal())
    close(got["jac"].reshape(-1, J.shape[1]), J)


class SquaredWeight(nn.Module):
    """Not linear in its parameter: ``y = x (W∘W)ᵀ + b``."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in))
        self.bias = nn.Parameter(torch.randn(d_out))

    def forward(self, x):
        return x @ (self.weight * self.weight).T + self.bias


CONV_MODELS = {
    "conv1d_stride_dilation": (lambda: nn.Sequential(
        nn.Conv1d(2, 4, 3, stride=2, padding=1, dilation=2), nn.ReLU(), nn.MaxPool1d(3, 2, 1),
        nn.Flatten(), nn.Linear(12, 3)), (2, 11)),
    "conv2d_same_groups_depthwise": (lambda: nn.Sequential(
        nn.Conv2d(4, 6, 3, padding="same", groups=2), nn.Tanh(), nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(6, 6, 2, padding="same", groups=6, bias=False), nn.Flatten(), nn.Linear(54, 3)), (4, 5, 5)),
    # the stride skips input entries at the end (the input pullback needs output padding)
    "conv2d_stride_remainder_dilation_groups": (lambda: nn.Sequential(
        nn.Conv2d(4, 4, 1), nn.Tanh(), nn.Conv2d(4, 6, 3, stride=(2, 3), padding=(1, 0), dilation=(1, 2), groups=2), nn.Tanh(),
        nn.Flatten(), nn.Linear(48, 3)), (4, 8, 9)),
    "conv3d_valid_pool_padding": (lambda: nn.Sequential(
        nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding="valid"), nn.ReLU(),
        nn.MaxPool3d(2, padding=1), nn.Flatten(), nn.Linear(24, 3)), (2, 4, 5, 4)),
}


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("case", sorted(CONV_MODELS))
def test_conv_and_maxpool_match_reference(case, n):
    torch.manual_seed(0)
    build, shape = CONV_MODELS[case]
    model = build().double()
    X = torch.randn(n, *shape, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    criterion = nn.CrossEntropyLoss()
    assert_exact(model, X, y, criterion)


@pytest.mark.parametrize("case", sorted(CONV_MODELS))
def test_fast_rules_agree_with_fallback_for_approx(case):
    """DiagGGNApprox of the fast conv/pool rules equals the dense per-sample fallback."""
    torch.manual_seed(0)
    build, shape = CONV_MODELS[case]
    model = build().double()
    X = torch.randn(2, *shape, dtype=torch.float64)
    y = torch.randint(0, 3, (2,))
    fast = run_all(model, X, y, nn.CrossEntropyLoss())
    saved = dict(registry._RULES)
    try:
        for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d):
            registry._RULES.pop(t)
        slow = run_all(model, X, y, nn.CrossEntropyLoss())
    finally:
        registry._RULES.clear()
        registry._RULES.update(saved)
    for key in fast:
        close(fast[key], slow[key], rtol=1e-10)


@pytest.mark.parametrize("n", [1, 4])
def test_fallback_is_exact_for_nonlinear_parameters_layernorm_and_embedding(n):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 5), nn.Flatten(), nn.Linear(15, 6), nn.LayerNorm(6),
                          nn.Tanh(), SquaredWeight(6, 3)).double()
    X = torch.randint(0, 7, (n, 3))
    y = torch.randn(n, 3, dtype=torch.float64)
    criterion = nn.MSELoss(reduction="sum")
    assert_exact(model, X, y, criterion)


def test_fallback_approx_is_exact_for_single_nonlinear_layer_with_mse():
    """A single layer with MSE: the approximation only drops off-diagonals of a diagonal H."""
    torch.manual_seed(0)
    model = nn.Sequential(SquaredWeight(4, 1)).double()
    X = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randn(5, 1, dtype=torch.float64)
    got = run_all(model, X, y, nn.MSELoss())
    _, G = ggn_reference(model, X, y, nn.MSELoss())
    close(got["approx"], G.diagonal())


def test_fallback_warns_once_per_type():
    from curvhook.rules import fallback

    class Cube(nn.Module):
        def forward(self, x):
            return x ** 3

    fallback._WARNED.discard(Cube)
    model = nn.Sequential(nn.Linear(3, 3), Cube(), Cube(), nn.Linear(3, 2))
    X = torch.randn(4, 3)
    with pytest.warns(UserWarning, match="Cube.*register_rule") as record:
        with extend(model, DiagGGN()):
            nn.CrossEntropyLoss()(model(X), torch.randint(0, 2, (4,))).backward()
    assert sum("Cube" in str(w.message) for w in record) == 1


def test_batchnorm_in_train_mode_raises_and_eval_mode_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).double()
    X = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (5,))
    with pytest.raises(UnsupportedModelError, match="eval"):
        with extend(model, BatchJacobian()):
            model(X).sum().backward()
    model.eval()
    got = run_all(model, X, y, nn.CrossEntropyLoss())
    _, G = ggn_reference(model, X, y, nn.CrossEntropyLoss())
    close(got["diag"], G.diagonal())


class Scale(nn.Module):
    def __init__(self, features):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features))

    def forward(self, x):
        return x * self.weight


def test_custom_rule_from_docs():
    @register_rule(Scale)
    class ScaleRule(LayerRule):
        def jac_t_mat_prod(self, call, mat):
            return mat * call.module.weight

        def param_jac_t_mat_prod(self, call, name, mat):
            return mat * call.input

        def diag_jac_t_diag_jac(self, call, diag):
            return diag * call.module.weight.square()

        def param_diag(self, call, name, diag):
            return (diag * call.input.square()).sum(0)

    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), Scale(4), nn.Sigmoid(), nn.Linear(4, 2)).double()
        X = torch.randn(3, 3, dtype=torch.float64)
        y = torch.randint(0, 2, (3,))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a registered rule must not fall back
            got = run_all(model, X, y, nn.CrossEntropyLoss())
        J, G = ggn_reference(model, X, y, nn.CrossEntropyLoss())
        close(got["full"], G)
        close(got["jac"].reshape(-1, J.shape[1]), J)
    finally:
        registry._RULES.pop(Scale, None)


def test_register_rule_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        register_rule(int)(LayerRule)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_conv_with_nonzero_padding_mode_goes_to_the_exact_fallback(mode):
    """The fast conv rule covers zero padding only; other padding modes must not use it."""
    from curvhook.rules import fallback

    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode)
    assert registry.rule_for(conv) is None
    assert registry.rule_for(nn.Conv2d(2, 3, 3, padding=1)) is not None
    model = nn.Sequential(nn.Conv2d(2, 2, 1), conv, nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 5, 3)).double()
    X = torch.randn(2, 2, 4, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (2,))
    fallback._WARNED.discard(nn.Conv2d)
    with pytest.warns(UserWarning, match="no rule for Conv2d"):
        with extend(model, DiagGGN()):
            nn.CrossEntropyLoss()(model(X), y).backward()
    got = run_all(model, X, y, nn.CrossEntropyLoss())
    J, G = ggn_reference(model, X, y, nn.CrossEntropyLoss())
    close(got["full"], G)
    close(got["diag"], G.diagonal())
    close(got["jac"].reshape(-1, J.shape[1]), J)


def test_rule_that_declines_a_module_falls_back():
    from curvhook.rules.fallback import FALLBACK

    class Picky(LayerRule):
        def accepts(self, module):
            return module.out_features != 2

    saved = dict(registry._RULES)
    try:
        register_rule(nn.Linear)(Picky)
        assert registry.rule_for(nn.Linear(3, 4)) is registry._RULES[nn.Linear]
        assert registry.rule_for(nn.Linear(3, 2)) is None
        assert registry.rule_or_fallback(nn.Linear(3, 2)) is FALLBACK
    finally:
        registry._RULES.clear()
        registry._RULES.update(saved)


class SquaredLinear(nn.Module):
    """``y = x (W∘W)ᵀ + b``: not linear in its parameter."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in))
        self.bias = nn.Parameter(torch.randn(d_out))

    def forward(self, x):
        return x @ (self.weight * self.weight).T + self.bias


@pytest.mark.parametrize("n", [1, 3])
def test_custom_rule_with_only_the_two_products_serves_all_four_extensions(n):
    """DiagGGNApprox's diagonals default to exact ones derived from the two products."""
    from helpers import check_against_reference

    @register_rule(SquaredLinear)
    class SquaredLinearRule(LayerRule):
        def jac_t_mat_prod(self, call, mat):
            return mat @ call.module.weight.square()

        def param_jac_t_mat_prod(self, call, name, mat):
            if name == "bias":
                return mat
            # ∂y_o/∂W_oi = 2 W_oi x_i
            return 2 * torch.einsum("vno,ni->vnoi", mat, call.input) * call.module.weight

    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), SquaredLinear(4, 5), nn.Sigmoid(), nn.Linear(5, 2)).double()
        X = torch.randn(n, 3, dtype=torch.float64)
        y = torch.randint(0, 2, (n,))
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*fallback")  # the registered rule is used
            check_against_reference(model, X, lambda out: nn.CrossEntropyLoss()(out, y))
    finally:
        registry._RULES.pop(SquaredLinear, None)


@pytest.mark.parametrize("ext", [BatchJacobian, DiagGGN, DiagGGNApprox, FullGGN])
@pytest.mark.parametrize(
    "random_layer",
    [lambda: nn.RReLU(0.1, 0.9), lambda: nn.MultiheadAttention(4, 2, dropout=0.5, batch_first=True)],
    ids=["RReLU", "attention_dropout"],
)
def test_fallback_refuses_a_module_that_draws_random_numbers(random_layer, ext):
    """The fallback replays the forward pass: a train-mode random module would get other numbers."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.layer, self.b = nn.Linear(4, 4), random_layer(), nn.Linear(4, 2)

        def forward(self, x):  # x: [N, T, 4]
            h = self.a(x)
            h = self.layer(h, h, h, need_weights=False)[0] if isinstance(self.layer, nn.MultiheadAttention) else self.layer(h)
            return self.b(h.mean(1))

    torch.manual_seed(0)
    model = Model().double().train()
    X, y = torch.randn(3, 5, 4, dtype=torch.float64), torch.randint(0, 2, (3,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UnsupportedModelError, match="random numbers.*model.eval"):
            with extend(model, ext()):
                nn.CrossEntropyLoss()(model(X), y).backward()
        model.eval()  # deterministic: exact
        got = run_all(model, X, y, nn.CrossEntropyLoss())
    _, G = ggn_reference(model, X, y, nn.CrossEntropyLoss())
    close(got["full"], G)


def test_fallback_leaves_the_random_number_stream_alone():
    class Cube(nn.Module):
        def forward(self, x):
            return x**3

    model = nn.Sequential(nn.Linear(3, 3), Cube(), nn.Linear(3, 2))
    X, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    torch.manual_seed(1)
    nn.CrossEntropyLoss()(model(X), y).backward()
    expected = torch.rand(3)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with extend(model, DiagGGN(), DiagGGNApprox(), BatchJacobian()):
            nn.CrossEntropyLoss()(model(X), y).backward()
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


class _Pair(NamedTuple):
    a: torch.Tensor
    b: torch.Tensor


class PairGate(nn.Module):
    """A leaf without a rule that takes a namedtuple of tensors and reads it by field name."""

    def __init__(self, width):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, pair):
        return pair.a * self.w + torch.tanh(pair.b)


class PairNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.gate = PairGate(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.lin(x)
        return self.head(self.gate(_Pair(h, h * h)))


@pytest.mark.parametrize("n", [1, 3])
def test_fallback_replays_a_namedtuple_argument_as_that_namedtuple(n):
    """The exact fallback calls the module again; a namedtuple argument must reach it as one."""
    torch.manual_seed(0)
    model = PairNet().double()
    X = torch.randn(n, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (n,))
    criterion = nn.CrossEntropyLoss()
    assert_exact(model, X, y, criterion)
