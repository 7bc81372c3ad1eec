"""``curvhook/extensions/batch_jacobian.py``: the Jacobian does not depend on the loss.

BatchJacobian is checked against torch.func in every table of ``tests/rules/``;
its use without a loss, and ``loss=`` refused for it, are in ``tests/test_losses.py``.
"""

from torch import nn

from curvhook import extend
from curvhook.extensions import BatchJacobian
from helpers import data, mlp
from reference import collect, compare, reference


def test_batch_jacobian_does_not_care_how_the_loss_is_used():
    model = mlp()
    X, y = data()
    with extend(model, BatchJacobian()):
        nn.CrossEntropyLoss()(model(X), y).exp().backward()
    ref = reference(model, X, lambda out: out.sum(), approx=False)
    compare(collect(model, 4, ("BatchJacobian",)), ref)
