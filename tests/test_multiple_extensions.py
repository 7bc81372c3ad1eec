"""Several extensions in one ``extend`` block give what each gives alone, also with
different sources of the loss (named with ``loss=`` or found in the graph)."""

import torch
from torch import nn

from curvhook import extend
from curvhook.extensions import BatchJacobian, DiagGGN, DiagGGNApprox, FullGGN
from helpers import ALL, DT, data, mlp, run_curvhook
from reference import collect, compare, reference


def test_several_extensions_in_one_pass_equal_each_alone():
    model = mlp()
    X, y = data()
    crit = nn.MSELoss()
    target = torch.randn(4, 3, dtype=DT)
    together, matrix, _ = run_curvhook(model, X, lambda out: crit(out, target))
    for name in ALL:
        alone, alone_matrix, _ = run_curvhook(model, X, lambda out: crit(out, target), which=(name,))
        torch.testing.assert_close(alone[name], together[name], rtol=1e-12, atol=0)
        if name == "FullGGN":
            torch.testing.assert_close(alone_matrix, matrix, rtol=1e-12, atol=0)


def test_pairs_of_extensions_with_named_and_found_loss():
    """Extensions with different sources and different loss= share a pass correctly."""
    model = mlp()
    X, y = data()
    crit = nn.CrossEntropyLoss()
    ggn = FullGGN(loss=nn.CrossEntropyLoss())
    with extend(model, DiagGGN(), ggn, DiagGGNApprox(loss=nn.CrossEntropyLoss()), BatchJacobian()):
        crit(model(X), y).backward()
    compare(collect(model, 4), reference(model, X, lambda out: crit(out, y)), ggn.matrix)
