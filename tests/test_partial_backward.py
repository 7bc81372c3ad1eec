"""Backward passes that do not run through the whole model.

``torch.autograd.grad(loss, out)`` (the gradient at the model output, often for
logging) stops at the output; ``torch.autograd.grad(loss, [p])`` and
``loss.backward(inputs=[p])`` run only the nodes on the way to ``p``. Inside a
block all three crashed with ``AttributeError: 'NoneType' object has no
attribute 'shape'``: the autograd nodes the rules apply give no gradient where
the pass does not run them.
"""

import pytest
import torch
from torch import nn

from curvhook import extend
from curvhook.errors import CurvhookError
from curvhook.extensions import BatchGrad, BatchJacobian, DiagGGN, DiagGGNApprox, FullGGN
from helpers import assert_clean, mlp, snapshot
from reference import collect, compare, reference

DT = torch.float64
ALL = ("BatchJacobian", "DiagGGN", "DiagGGNApprox", "FullGGN")


def _setup(n):
    torch.manual_seed(0)
    return mlp(), torch.randn(n, 4, dtype=DT), torch.randint(0, 3, (n,)), nn.CrossEntropyLoss()


@pytest.mark.parametrize("n", [1, 3])
def test_the_gradient_at_the_output_for_logging_changes_nothing(n):
    """``torch.autograd.grad(loss, out)`` before ``loss.backward()``: the results are those of the
    backward alone, exact, and ``p.grad`` is the plain gradient."""
    model, X, y, crit = _setup(n)
    crit(model(X), y).backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ggn, batch_grad = FullGGN(), BatchGrad()
    with extend(model, BatchJacobian(), DiagGGN(), DiagGGNApprox(), ggn, batch_grad):
        out = model(X)
        loss = crit(out, y)
        (at_output,) = torch.autograd.grad(loss, out, retain_graph=True)
        loss.backward()
    assert at_output.shape == out.shape
    compare(collect(model, n, ALL), reference(model, X, lambda o: crit(o, y)), ggn.matrix)
    for p, g in zip(model.parameters(), plain):
        assert torch.equal(p.grad, g)
        torch.testing.assert_close(p.grad_batch.sum(0), g, rtol=1e-12, atol=1e-14)


def test_a_pass_that_stops_at_the_output_writes_nothing():
    model, X, y, crit = _setup(3)
    with extend(model, DiagGGN(), BatchJacobian()):
        out = model(X)
        torch.autograd.grad(crit(out, y), out)
    for p in model.parameters():
        assert p.grad is None
        assert not hasattr(p, "diag_ggn") and not hasattr(p, "batch_jacobian")


def test_backpropagating_a_gradient_taken_at_the_output():
    """``out.backward(g)`` with ``g = ∂L/∂out`` computed first: exact with the loss named (the
    scalar is ``L``, whose module was called but is not on this pass's way)."""
    model, X, y, crit = _setup(3)
    ggn = FullGGN(loss=nn.CrossEntropyLoss())
    with extend(model, DiagGGN(loss=nn.CrossEntropyLoss()), ggn, BatchJacobian()):
        out = model(X)
        (g,) = torch.autograd.grad(crit(out, y), out, retain_graph=True)
        out.backward(g)
    compare(collect(model, 3, ("BatchJacobian", "DiagGGN", "FullGGN")), reference(model, X, lambda o: crit(o, y)), ggn.matrix)


@pytest.mark.parametrize("how", ["backward_inputs", "autograd_grad"])
def test_a_pass_through_part_of_the_model_raises_a_clear_error(how):
    """Gradients of the last layer only: autograd skips the Tanh below it, whose node the rules
    apply. A clear error that says how to backpropagate, and the model is left clean."""
    model, X, y, crit = _setup(3)
    before = snapshot(model)
    with pytest.raises(CurvhookError, match="runs only part of the model"):
        with extend(model, DiagGGN()):
            loss = crit(model(X), y)
            if how == "backward_inputs":
                loss.backward(inputs=[model[4].weight])
            else:
                torch.autograd.grad(loss, [model[4].weight])
    assert_clean(model, before)


def test_the_gradient_with_respect_to_the_input_adds_nothing():
    """``torch.autograd.grad(loss, X)`` (an adversarial example, a saliency map) reaches the model
    output but no parameter. With ``accumulate=True`` it added its GGN to that of the training
    backward after it (twice the result); now only passes that give parameters a gradient count."""
    model, X, y, crit = _setup(3)
    X_adv = (X + 0.1 * torch.randn_like(X))
    with extend(model, DiagGGN(), accumulate=True):
        x = X.clone().requires_grad_()
        (g,) = torch.autograd.grad(crit(model(x), y), x)
        assert g.shape == X.shape
        crit(model(X_adv), y).backward()
    compare(collect(model, 3, ("DiagGGN",)), reference(model, X_adv, lambda o: crit(o, y), approx=False))


def test_the_gradient_with_respect_to_every_parameter_counts():
    """``torch.autograd.grad(loss, params)`` gives every parameter its gradient (captured, not
    accumulated): exact, as ``loss.backward()``."""
    model, X, y, crit = _setup(3)
    ggn = FullGGN()
    with extend(model, DiagGGN(), ggn, BatchJacobian()):
        grads = torch.autograd.grad(crit(model(X), y), list(model.parameters()))
    assert all(p.grad is None for p in model.parameters()) and len(grads) == 6
    compare(collect(model, 3, ("BatchJacobian", "DiagGGN", "FullGGN")), reference(model, X, lambda o: crit(o, y)), ggn.matrix)
