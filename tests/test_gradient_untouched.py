"""``extend`` leaves ``.grad`` alone: parameter and input gradients are bit-for-bit those of a plain backward."""

import pytest
import torch
from torch import nn

from curvhook import extend
from helpers import DT, all_extensions, data, mlp


GRAD_MODELS = {
    "mlp": lambda: mlp(),
    "inplace_relu": lambda: mlp(inplace=True),
    "dropout_eval_flatten": lambda: nn.Sequential(
        nn.Flatten(), nn.Linear(4, 6), nn.Dropout(0.3), nn.SiLU(inplace=True), nn.Linear(6, 3)
    ).to(DT).eval(),
    "shared": lambda: (lambda l: nn.Sequential(l, nn.Tanh(), l, nn.Linear(4, 3)))(nn.Linear(4, 4)).to(DT),
}


@pytest.mark.parametrize("x_requires_grad", [False, True])
@pytest.mark.parametrize("case", sorted(GRAD_MODELS))
def test_grad_identical_to_plain_backward(case, x_requires_grad):
    model = GRAD_MODELS[case]()
    X, y = data()
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)

    X1 = X.clone().requires_grad_(x_requires_grad)
    crit(model(X1), y).backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    X2 = X.clone().requires_grad_(x_requires_grad)
    with extend(model, *all_extensions()):
        crit(model(X2), y).backward()
    for g, p in zip(plain, model.parameters()):
        assert torch.equal(g, p.grad)
    if x_requires_grad:
        assert torch.equal(X1.grad, X2.grad)
