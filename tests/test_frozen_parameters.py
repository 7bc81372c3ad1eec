"""Parameters with ``requires_grad=False`` get no result and are left out of the full GGN,
also when frozen after a block or when all are frozen."""

from torch import nn

from curvhook import extend
from curvhook.extensions import BatchJacobian, DiagGGN, DiagGGNApprox, FullGGN
from helpers import ATTRS, DT, check_against_reference, data, mlp
from reference import collect, compare, reference, trainable


def test_frozen_parameters_get_no_attribute_and_are_excluded():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).to(DT)
    model[0].weight.requires_grad_(False)
    model[2].requires_grad_(False)
    X, y = data()
    ggn = FullGGN()
    with extend(model, BatchJacobian(), DiagGGN(), DiagGGNApprox(), ggn):
        nn.CrossEntropyLoss()(model(X), y).backward()
    frozen = [model[0].weight, model[2].weight, model[2].bias]
    for p in frozen:
        for a in ATTRS:
            assert not hasattr(p, a), a
    _, params = trainable(model)
    P = sum(p.numel() for p in params)
    assert P == 6 + 5 * 3 + 3
    assert ggn.matrix.shape == (P, P)
    compare(collect(model, 4), reference(model, X, lambda out: nn.CrossEntropyLoss()(out, y)), ggn.matrix)


def test_all_parameters_frozen_except_last_layer():
    model = mlp()
    for p in list(model.parameters())[:-2]:
        p.requires_grad_(False)
    X, y = data()
    check_against_reference(model, X, lambda out: nn.CrossEntropyLoss()(out, y))


def test_parameter_frozen_after_a_block_keeps_no_stale_result():
    """Frozen parameters get no attribute: not even a stale one from an earlier block."""
    model = mlp()
    X, y = data()
    with extend(model, DiagGGN(), BatchJacobian()):
        nn.CrossEntropyLoss()(model(X), y).backward()
    model[0].weight.requires_grad_(False)
    with extend(model, DiagGGN(), BatchJacobian()):
        nn.CrossEntropyLoss()(model(X), y).backward()
    assert not hasattr(model[0].weight, "diag_ggn")
    assert not hasattr(model[0].weight, "batch_jacobian")


def test_all_parameters_frozen_and_input_requires_grad():
    """Input gradients inside the block (P = 0): nothing to compute, nothing must break."""
    model = mlp()
    model.requires_grad_(False)
    X, y = data()
    X.requires_grad_(True)
    ggn = FullGGN()
    with extend(model, BatchJacobian(), DiagGGN(), DiagGGNApprox(), ggn):
        nn.CrossEntropyLoss()(model(X), y).backward()
    assert X.grad is not None
    assert ggn.matrix is None or ggn.matrix.shape == (0, 0)
    for p in model.parameters():
        for a in ATTRS:
            assert not hasattr(p, a)
