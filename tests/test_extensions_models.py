"""All four extensions against the torch.func reference on small MLP-like models.

Every test runs BatchJacobian, DiagGGN, DiagGGNApprox and FullGGN in one
``extend`` block and compares each with the brute-force reference in float64.
"""

import pytest
import torch
from torch import nn

from helpers import Chain, check_against_reference
from reference import check

DT = torch.float64


def randomize(model: nn.Module, scale: float = 1.5) -> nn.Module:
    """float64 parameters with a spread large enough to reach every regime of the activations."""
    model.to(DT)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn_like(m.weight) * scale / m.in_features**0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn_like(m.bias))
    return model


def ce(y):
    crit = nn.CrossEntropyLoss()
    return lambda out: crit(out, y)


def mse(y, reduction="mean"):
    crit = nn.MSELoss(reduction=reduction)
    return lambda out: crit(out, y)


def bce(y, reduction="mean"):
    crit = nn.BCEWithLogitsLoss(reduction=reduction)
    return lambda out: crit(out, y)


ACTIVATIONS = {
    "ReLU": lambda: nn.ReLU(),
    "LeakyReLU": lambda: nn.LeakyReLU(0.1),
    "Tanh": lambda: nn.Tanh(),
    "Sigmoid": lambda: nn.Sigmoid(),
    "ELU": lambda: nn.ELU(alpha=0.7),
    "SELU": lambda: nn.SELU(),
    "CELU": lambda: nn.CELU(alpha=1.3),
    "GELU_none": lambda: nn.GELU(approximate="none"),
    "GELU_tanh": lambda: nn.GELU(approximate="tanh"),
    "SiLU": lambda: nn.SiLU(),
    "Mish": lambda: nn.Mish(),
    "Softplus": lambda: nn.Softplus(beta=1.5, threshold=2.0),
    "LogSigmoid": lambda: nn.LogSigmoid(),
    "Hardtanh": lambda: nn.Hardtanh(-0.5, 0.8),
    "ReLU6": lambda: nn.ReLU6(),
    "Hardsigmoid": lambda: nn.Hardsigmoid(),
    "Hardswish": lambda: nn.Hardswish(),
    # in-place variants of every activation that has the flag
    "ReLU_inplace": lambda: nn.ReLU(inplace=True),
    "LeakyReLU_inplace": lambda: nn.LeakyReLU(0.1, inplace=True),
    "ELU_inplace": lambda: nn.ELU(alpha=0.7, inplace=True),
    "SELU_inplace": lambda: nn.SELU(inplace=True),
    "CELU_inplace": lambda: nn.CELU(alpha=1.3, inplace=True),
    "SiLU_inplace": lambda: nn.SiLU(inplace=True),
    "Mish_inplace": lambda: nn.Mish(inplace=True),
    "Hardtanh_inplace": lambda: nn.Hardtanh(-0.5, 0.8, inplace=True),
    "ReLU6_inplace": lambda: nn.ReLU6(inplace=True),
    "Hardsigmoid_inplace": lambda: nn.Hardsigmoid(inplace=True),
    "Hardswish_inplace": lambda: nn.Hardswish(inplace=True),
}


def test_activation_table_covers_every_inplace_flag():
    """Guard: every activation module that has an ``inplace`` flag is tested with it."""
    for name, make in ACTIVATIONS.items():
        if "_" in name and not name.endswith("_inplace"):
            continue
        if hasattr(make(), "inplace") and not name.endswith("_inplace"):
            assert f"{name}_inplace" in ACTIVATIONS, name


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_two_layer_mlp_every_activation(act, n):
    model = randomize(nn.Sequential(nn.Linear(4, 6), ACTIVATIONS[act](), nn.Linear(6, 3)))
    X = 2 * torch.randn(n, 4, dtype=DT)
    y = torch.randint(0, 3, (n,))
    check_against_reference(model, X, ce(y))


@pytest.mark.parametrize("act", ["Tanh", "Sigmoid", "Softplus", "Hardswish_inplace", "ELU_inplace"])
def test_activation_as_last_module_with_mse(act):
    model = randomize(nn.Sequential(nn.Linear(4, 5), ACTIVATIONS[act]()))
    X = 2 * torch.randn(3, 4, dtype=DT)
    check_against_reference(model, X, mse(torch.randn(3, 5, dtype=DT)))


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("loss", ["ce", "mse_mean", "mse_sum", "bce"])
@pytest.mark.parametrize("bias", [True, False])
def test_single_linear(loss, n, bias):
    model = randomize(nn.Sequential(nn.Linear(5, 3, bias=bias)))
    X = torch.randn(n, 5, dtype=DT)
    loss_fn = {
        "ce": lambda: ce(torch.randint(0, 3, (n,))),
        "mse_mean": lambda: mse(torch.randn(n, 3, dtype=DT)),
        "mse_sum": lambda: mse(torch.randn(n, 3, dtype=DT), "sum"),
        "bce": lambda: bce(torch.rand(n, 3, dtype=DT)),
    }[loss]()
    got, ref = check_against_reference(model, X, loss_fn)
    if loss.startswith("mse"):
        # documented: the approximation is exact for a single Linear with MSELoss
        check(got["DiagGGNApprox"], ref.diag_ggn, "DiagGGNApprox")


def test_single_linear_without_sequential():
    """The extended model may itself be a leaf module."""
    model = randomize(nn.Linear(4, 3))
    X = torch.randn(3, 4, dtype=DT)
    check_against_reference(model, X, ce(torch.randint(0, 3, (3,))))


DEEP = {
    "tanh_relu": lambda: nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)
    ),
    "sigmoid_gelu_elu": lambda: nn.Sequential(
        nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 5), nn.GELU(), nn.Linear(5, 4), nn.ELU(), nn.Linear(4, 3)
    ),
    "inplace_chain": lambda: nn.Sequential(
        nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 6), nn.Hardswish(inplace=True), nn.Linear(6, 3),
        nn.LeakyReLU(0.2, inplace=True),
    ),
    "two_activations_in_a_row": lambda: nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.SiLU(), nn.Softplus(), nn.Linear(6, 3)
    ),
}


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("loss", ["ce", "mse", "bce_sum"])
@pytest.mark.parametrize("case", sorted(DEEP))
def test_deeper_mlps(case, loss, n):
    model = randomize(DEEP[case]())
    X = torch.randn(n, 4, dtype=DT)
    loss_fn = {
        "ce": lambda: ce(torch.randint(0, 3, (n,))),
        "mse": lambda: mse(torch.randn(n, 3, dtype=DT)),
        "bce_sum": lambda: bce((torch.rand(n, 3, dtype=DT) > 0.5).to(DT), "sum"),
    }[loss]()
    check_against_reference(model, X, loss_fn)


@pytest.mark.parametrize("case", ["tanh_relu", "sigmoid_gelu_elu"])
def test_approx_is_exact_for_last_linear_layer(case):
    """Each weight of the last Linear moves one output entry, so only diag(H) matters there."""
    model = randomize(DEEP[case]())
    X = torch.randn(4, 4, dtype=DT)
    y = torch.randint(0, 3, (4,))
    got, ref = check_against_reference(model, X, ce(y))
    last = sum(p.numel() for p in model[-1].parameters())
    check(got["DiagGGNApprox"][-last:], ref.diag_ggn[-last:], "DiagGGNApprox")
    # ... and the approximation really is an approximation further down
    assert not torch.allclose(got["DiagGGNApprox"][:-last], ref.diag_ggn[:-last], rtol=1e-3)


@pytest.mark.parametrize("n", [1, 3])
def test_flatten_and_identity(n):
    model = randomize(nn.Sequential(
        nn.Flatten(), nn.Linear(6, 5), nn.Identity(), nn.Sigmoid(), nn.Identity(), nn.Linear(5, 3), nn.Identity()
    ))
    X = torch.randn(n, 2, 3, dtype=DT)
    check_against_reference(model, X, ce(torch.randint(0, 3, (n,))))


@pytest.mark.parametrize("n", [1, 3])
def test_flatten_with_start_and_end_dim_and_linear_on_leading_dims(n):
    model = randomize(nn.Sequential(
        nn.Linear(3, 4), nn.Tanh(), nn.Flatten(1, 2), nn.Linear(4, 2), nn.Flatten()
    ))
    X = torch.randn(n, 2, 3, 3, dtype=DT)  # Linear on [N, 2, 3, 3] -> [N, 2, 3, 4] -> [N, 6, 4]
    check_against_reference(model, X, mse(torch.randn(n, 12, dtype=DT)))


@pytest.mark.parametrize("n", [1, 3])
def test_unflatten_in_the_middle(n):
    model = randomize(nn.Sequential(
        nn.Linear(4, 6), nn.Unflatten(1, (2, 3)), nn.Tanh(), nn.Linear(3, 4), nn.Flatten(), nn.Linear(8, 3)
    ))
    X = torch.randn(n, 4, dtype=DT)
    check_against_reference(model, X, ce(torch.randint(0, 3, (n,))))


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("loss", ["mse_on_NTC", "ce_after_flatten"])
def test_linear_with_leading_dims(loss, n):
    layers = [nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)]
    if loss == "ce_after_flatten":
        layers.append(nn.Flatten())
    model = randomize(nn.Sequential(*layers))
    X = torch.randn(n, 4, 3, dtype=DT)  # [N, T, in]
    loss_fn = mse(torch.randn(n, 4, 2, dtype=DT)) if loss == "mse_on_NTC" else ce(torch.randint(0, 8, (n,)))
    check_against_reference(model, X, loss_fn)


@pytest.mark.parametrize("n", [1, 3])
def test_dropout_eval_mode(n):
    model = randomize(nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.ReLU(), nn.Linear(6, 3)))
    model.eval()
    X = torch.randn(n, 4, dtype=DT)
    check_against_reference(model, X, ce(torch.randint(0, 3, (n,))))


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("n", [1, 5])
def test_dropout_train_mode_uses_the_mask_of_this_forward(n, inplace):
    model = randomize(nn.Sequential(
        nn.Linear(4, 8), nn.Dropout(0.4, inplace=inplace), nn.Tanh(), nn.Linear(8, 6), nn.Dropout(0.3), nn.Linear(6, 3)
    ))
    model.train()
    X = torch.randn(n, 4, dtype=DT)
    check_against_reference(model, X, ce(torch.randint(0, 3, (n,))), record_masks=True)


def test_dropout_train_mode_as_last_module():
    model = randomize(nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5)))
    X = torch.randn(4, 4, dtype=DT)
    check_against_reference(model, X, mse(torch.randn(4, 6, dtype=DT)), record_masks=True)


@pytest.mark.parametrize("n", [1, 3])
def test_nested_sequential(n):
    model = randomize(nn.Sequential(
        nn.Sequential(nn.Linear(4, 5), nn.Tanh()),
        nn.Sequential(nn.Sequential(nn.Linear(5, 5)), nn.Sequential(), nn.ReLU()),
        nn.Sequential(nn.Linear(5, 3)),
    ))
    X = torch.randn(n, 4, dtype=DT)
    check_against_reference(model, X, ce(torch.randint(0, 3, (n,))))


class ReversedChain(nn.Module):
    """Children registered in the opposite order of the calls."""

    def __init__(self, first, second):
        super().__init__()
        self.second = second
        self.first = first

    def forward(self, x):
        return self.second(self.first(x))


@pytest.mark.parametrize("n", [1, 3])
def test_custom_container(n):
    model = randomize(Chain(nn.Sequential(nn.Linear(4, 5), nn.Sigmoid()), Chain(nn.Linear(5, 4), nn.Linear(4, 3))))
    X = torch.randn(n, 4, dtype=DT)
    check_against_reference(model, X, ce(torch.randint(0, 3, (n,))))


def test_custom_container_registration_order_differs_from_call_order():
    model = randomize(nn.Sequential(
        ReversedChain(nn.Linear(4, 5), nn.Tanh()), ReversedChain(nn.Linear(5, 6), nn.Linear(6, 3))
    ))
    X = torch.randn(3, 4, dtype=DT)
    check_against_reference(model, X, ce(torch.randint(0, 3, (3,))))


def test_container_with_frozen_own_parameter_is_fine():
    """A container may own a parameter as long as it is not trained (and is not used)."""
    model = randomize(Chain(nn.Linear(4, 5), nn.Linear(5, 3)))
    model.unused = nn.Parameter(torch.randn(3, dtype=DT), requires_grad=False)
    X = torch.randn(3, 4, dtype=DT)
    check_against_reference(model, X, ce(torch.randint(0, 3, (3,))))
    assert not hasattr(model.unused, "diag_ggn")


KINKS = {
    # activation, pre-activation value exactly at a kink
    "ReLU": (lambda: nn.ReLU(), 0.0),
    "ReLU_inplace": (lambda: nn.ReLU(inplace=True), 0.0),
    "LeakyReLU": (lambda: nn.LeakyReLU(0.1), 0.0),
    "Hardtanh_upper": (lambda: nn.Hardtanh(-0.5, 0.8), 0.8),
    "Hardtanh_lower_inplace": (lambda: nn.Hardtanh(-0.5, 0.8, inplace=True), -0.5),
    "ReLU6_at_6": (lambda: nn.ReLU6(), 6.0),
    "Hardsigmoid_at_3": (lambda: nn.Hardsigmoid(), 3.0),
    "Hardswish_at_-3": (lambda: nn.Hardswish(), -3.0),
    "ELU_at_0": (lambda: nn.ELU(alpha=0.5), 0.0),
}


@pytest.mark.parametrize("case", sorted(KINKS))
def test_derivative_at_kinks_matches_autograd(case):
    """Some pre-activations sit exactly on a kink: the result must follow autograd's convention."""
    make, value = KINKS[case]
    model = randomize(nn.Sequential(nn.Linear(4, 6), make(), nn.Linear(6, 3)))
    with torch.no_grad():
        model[0].weight[:3] = 0.0
        model[0].bias[:3] = value
    X = torch.randn(3, 4, dtype=DT)
    check_against_reference(model, X, ce(torch.randint(0, 3, (3,))))


def test_flatten_that_changes_nothing():
    """``Flatten`` on an already flat tensor (an alias of its input) in the middle and at the end."""
    model = randomize(nn.Sequential(nn.Linear(4, 5), nn.Flatten(), nn.Tanh(), nn.Linear(5, 3), nn.Flatten()))
    X = torch.randn(3, 4, dtype=DT)
    check_against_reference(model, X, ce(torch.randint(0, 3, (3,))))


def test_module_called_with_keyword_input():
    class KwChain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.act, self.b = nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)

        def forward(self, x):
            return self.b(input=self.act(input=self.a(input=x)))

    model = randomize(KwChain())
    X = torch.randn(3, 4, dtype=DT)
    check_against_reference(model, X, ce(torch.randint(0, 3, (3,))))
