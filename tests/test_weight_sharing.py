"""A module (or its parameters) used several times in one forward pass: exact results with
the cross terms between the uses."""

import pytest
import torch
from torch import nn

from helpers import DT, check_against_reference, data
from reference import reference


@pytest.mark.parametrize("n", [1, 3])
def test_weight_sharing_exact_with_cross_terms(n):
    l = nn.Linear(4, 4)
    model = nn.Sequential(l, nn.Tanh(), l).to(DT)
    X, y = data(n, classes=4)
    got, ref = check_against_reference(model, X, lambda out: nn.CrossEntropyLoss()(out, y))
    assert ref.G.shape == (20, 20)
    # The cross terms matter: summing the diagonals of two untied copies would be wrong.
    import copy

    untied = nn.Sequential(copy.deepcopy(l), nn.Tanh(), copy.deepcopy(l)).to(DT)
    G_untied = reference(untied, X, lambda out: nn.CrossEntropyLoss()(out, y), approx=False).G.diagonal()
    assert not torch.allclose(got["DiagGGN"], G_untied[:20] + G_untied[20:], rtol=1e-3)


def test_weight_sharing_in_custom_container_and_shared_activation():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.l, self.act, self.out = nn.Linear(3, 3), nn.Sigmoid(), nn.Linear(3, 2)

        def forward(self, x):
            return self.out(self.act(self.l(self.act(self.l(x)))))

    model = Twice().to(DT)
    X = torch.randn(3, 3, dtype=DT)
    target = torch.randn(3, 2, dtype=DT)
    check_against_reference(model, X, lambda out: nn.MSELoss()(out, target))


def test_weight_sharing_with_a_frozen_bias():
    l = nn.Linear(4, 4)
    l.bias.requires_grad_(False)
    model = nn.Sequential(l, nn.ELU(), l, nn.Linear(4, 2)).to(DT)
    X, y = data(3)
    y = y % 2
    check_against_reference(model, X, lambda out: nn.CrossEntropyLoss(reduction="sum")(out, y))
