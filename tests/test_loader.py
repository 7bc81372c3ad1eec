"""``curvhook.accumulate`` over a data loader against one ``extend`` block on the whole data set.

The reference is curvhook's own result on the concatenated batch with the loss
summed (``reduction="sum"``) or averaged (``"mean"``) over all samples: every
extension's correctness on one batch is tested elsewhere against torch.func,
so this checks the bookkeeping of ``accumulate`` (sums, concatenation, the
``1/N`` and ``1/N²`` of the mean, KFAC's averaged ``A``), which has no
reference of its own.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import curvhook
from curvhook import extend
from curvhook.errors import CurvhookError
from curvhook.extensions import (
    KFAC, NTK, BatchGrad, BatchJacobian, BatchL2Grad, DiagGGN, DiagGGNApprox, FullGGN, GGNVectorProduct,
    OutputCovariance, SumGradSquared,
)
from helpers import DT
from reference import check

N, SPLIT = 7, (3, 3, 1)  # batches of unequal sizes, one of a single sample


def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).to(DT)
    X, y = torch.randn(N, 2, 4, dtype=DT), torch.randint(0, 3, (N,))
    return model, X, y


def extensions(model):
    v = {p: torch.randn_like(p) for p in model.parameters()}
    var = {p: torch.rand_like(p) for p in model.parameters()}
    return [DiagGGN(), FullGGN(), KFAC(), BatchGrad(), BatchL2Grad(), SumGradSquared(), DiagGGNApprox(),
            GGNVectorProduct(v), OutputCovariance(var)], [BatchJacobian()]


def loader(X, y):
    start = 0
    for size in SPLIT:
        yield X[start : start + size], y[start : start + size]
        start += size


def results(model, exts):
    out = {}
    for ext in exts:
        if isinstance(ext, FullGGN):
            out["matrix"] = ext.matrix.clone()
        elif isinstance(ext, OutputCovariance):
            out["covariance"] = ext.covariance.clone()
        else:
            for name, p in model.named_parameters():
                value = getattr(p, ext.attribute)
                out[(ext.attribute, name)] = tuple(t.clone() for t in value) if isinstance(value, tuple) else value.clone()
    return out


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_accumulate_equals_one_batch(reduction):
    model, X, y = setup()
    loss_exts, jac_exts = extensions(model)
    with extend(model, *loss_exts):
        nn.CrossEntropyLoss(reduction=reduction)(model(X), y).backward()
    with extend(model, *jac_exts):
        model(X).sum().backward()
    want = results(model, loss_exts + jac_exts)
    for p in model.parameters():
        p.grad = None
    loss_exts2, jac_exts2 = extensions(model)
    # the same directions and variances: GGNVectorProduct and OutputCovariance compare like for like
    loss_exts2[7], loss_exts2[8] = GGNVectorProduct(loss_exts[7].v), OutputCovariance(loss_exts[8].cov)
    got = curvhook.accumulate(model, loader(X, y), *loss_exts2, *jac_exts2, loss_fn=nn.CrossEntropyLoss(),
                              reduction=reduction, progress=False)
    have = results(model, loss_exts2 + jac_exts2)
    assert want.keys() == have.keys()
    for key in want:
        a, b = want[key], have[key]
        for x, z in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            check(z, x, f"accumulate ({key[0] if isinstance(key, tuple) else key})", rtol=1e-10)
    assert got["diag_ggn"]["0.weight"] is model[0].weight.diag_ggn
    assert all(p.grad is None for p in model.parameters())  # the loop's gradients are not left


def test_accumulate_leaves_grad_as_it_was_and_can_leave_no_results():
    model, X, y = setup()
    nn.CrossEntropyLoss()(model(X), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    got = curvhook.accumulate(model, loader(X, y), DiagGGN(), loss_fn=nn.CrossEntropyLoss(), reduction="sum",
                              progress=False, write=False)
    for g, p in zip(grads, model.parameters()):
        assert torch.equal(g, p.grad)
        assert not hasattr(p, "diag_ggn")
    assert set(got["diag_ggn"]) == {name for name, _ in model.named_parameters()}


class KeywordModel(nn.Module):
    """A model called with keyword arguments, as Hugging Face models are."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))

    def forward(self, input_values, scale=None):
        return self.net(input_values * (1.0 if scale is None else scale))


@pytest.mark.parametrize("key", [None, "y"])
def test_accumulate_takes_dict_batches_and_a_device(key):
    torch.manual_seed(1)
    model = KeywordModel().to(DT)
    X, y = torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,))
    name = key or "labels"
    batches = [{"input_values": X[:2], name: y[:2]}, {"input_values": X[2:], name: y[2:]}]
    got = curvhook.accumulate(model, batches, DiagGGN(), loss_fn=nn.CrossEntropyLoss(), reduction="mean",
                              device="cpu", progress=False, target_key=key)
    with extend(model, DiagGGN()):
        nn.CrossEntropyLoss()(model(input_values=X), y).backward()
    for name_p, p in model.named_parameters():
        check(got["diag_ggn"][name_p], p.diag_ggn, "accumulate dict batches", rtol=1e-10)


def test_accumulate_shows_a_progress_bar(monkeypatch):
    model, X, y = setup()
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    curvhook.accumulate(model, loader(X, y), DiagGGN(), loss_fn=nn.CrossEntropyLoss(), reduction="sum", progress=True)
    assert "curvhook.accumulate" in err.getvalue() and "3" in err.getvalue()
    err2 = io.StringIO()
    monkeypatch.setattr("sys.stderr", err2)
    curvhook.accumulate(model, loader(X, y), DiagGGN(), loss_fn=nn.CrossEntropyLoss(), reduction="sum")
    assert err2.getvalue() == ""  # not a terminal: no bar by default


def test_accumulate_refuses_what_cannot_add_up_and_unknown_batches():
    model, X, y = setup()
    with pytest.raises(CurvhookError, match="accumulate"):
        curvhook.accumulate(model, loader(X, y), NTK(), loss_fn=nn.CrossEntropyLoss(), reduction="sum")
    with pytest.raises(ValueError, match="reduction"):
        curvhook.accumulate(model, loader(X, y), DiagGGN(), loss_fn=nn.CrossEntropyLoss(), reduction="none")
    with pytest.raises(ValueError, match="target_key"):
        curvhook.accumulate(model, [{"x": X}], DiagGGN(), loss_fn=nn.CrossEntropyLoss(), reduction="sum")
    with pytest.raises(ValueError, match="inputs, target"):
        curvhook.accumulate(model, [(X,)], DiagGGN(), loss_fn=nn.CrossEntropyLoss(), reduction="sum")
