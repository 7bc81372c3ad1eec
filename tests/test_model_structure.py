"""How a model is put together: a leaf module as the model, nested and custom containers,
registration order unlike call order, keyword inputs, modules never called, empty containers.

Every test runs the four extensions in one ``extend`` block and compares them with
the torch.func reference in float64 (``helpers.check_against_reference``).
"""

import pytest
import torch
from torch import nn

from helpers import DT, Chain, ce, check_against_reference, data, randomize_linear


def test_single_linear_without_sequential():
    """The extended model may itself be a leaf module."""
    model = randomize_linear(nn.Linear(4, 3))
    X = torch.randn(3, 4, dtype=DT)
    check_against_reference(model, X, ce(torch.randint(0, 3, (3,))))


@pytest.mark.parametrize("n", [1, 3])
def test_nested_sequential(n):
    model = randomize_linear(nn.Sequential(
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
    model = randomize_linear(Chain(nn.Sequential(nn.Linear(4, 5), nn.Sigmoid()), Chain(nn.Linear(5, 4), nn.Linear(4, 3))))
    X = torch.randn(n, 4, dtype=DT)
    check_against_reference(model, X, ce(torch.randint(0, 3, (n,))))


def test_custom_container_registration_order_differs_from_call_order():
    model = randomize_linear(nn.Sequential(
        ReversedChain(nn.Linear(4, 5), nn.Tanh()), ReversedChain(nn.Linear(5, 6), nn.Linear(6, 3))
    ))
    X = torch.randn(3, 4, dtype=DT)
    check_against_reference(model, X, ce(torch.randint(0, 3, (3,))))


def test_container_with_frozen_own_parameter_is_fine():
    """A container may own a parameter as long as it is not trained (and is not used)."""
    model = randomize_linear(Chain(nn.Linear(4, 5), nn.Linear(5, 3)))
    model.unused = nn.Parameter(torch.randn(3, dtype=DT), requires_grad=False)
    X = torch.randn(3, 4, dtype=DT)
    check_against_reference(model, X, ce(torch.randint(0, 3, (3,))))
    assert not hasattr(model.unused, "diag_ggn")


def test_module_called_with_keyword_input():
    class KwChain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.act, self.b = nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)

        def forward(self, x):
            return self.b(input=self.act(input=self.a(input=x)))

    model = randomize_linear(KwChain())
    X = torch.randn(3, 4, dtype=DT)
    check_against_reference(model, X, ce(torch.randint(0, 3, (3,))))


def test_module_that_is_never_called_gets_zero_results():
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.spare, self.b = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

        def forward(self, x):
            return self.b(self.a(x))

    model = WithSpare().to(DT)
    X, y = data()
    got, ref = check_against_reference(model, X, lambda out: nn.CrossEntropyLoss()(out, y))
    assert torch.count_nonzero(model.spare.weight.diag_ggn) == 0
    assert torch.count_nonzero(ref.J[:, 25:55]) == 0  # the reference agrees that spare has no effect


def test_empty_sequential_is_no_operation():
    model = nn.Sequential(nn.Linear(4, 5), nn.Sequential(), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    X, y = data()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        check_against_reference(model, X, lambda out: nn.CrossEntropyLoss()(out, y))

