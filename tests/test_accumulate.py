"""Several backward passes in one block (overwrite, or sum with ``accumulate=True``),
several forward passes in one loss, and backward passes through a retained graph:
exact sums or a clear error, never a silently wrong number."""

import pytest
import torch
from torch import nn

from curvhook import extend
from curvhook.errors import CurvhookError
from curvhook.extensions import BatchJacobian, DiagGGN, DiagGGNApprox, FullGGN
from helpers import DT, all_extensions, data, mlp
from reference import check, collect, compare, reference


# ----------------------------------------------- several backward passes
def two_batches(reduction):
    model = mlp()
    (X1, y1), (X2, y2) = data(3), data(2)
    crit = nn.CrossEntropyLoss(reduction=reduction)
    return model, crit, (X1, y1), (X2, y2)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_second_backward_overwrites_by_default(reduction):
    model, crit, (X1, y1), (X2, y2) = two_batches(reduction)
    ggn = FullGGN()
    with extend(model, BatchJacobian(), DiagGGN(), DiagGGNApprox(), ggn):
        crit(model(X1), y1).backward()
        first = {k: v.clone() for k, v in collect(model, 3).items()}
        crit(model(X2), y2).backward()
    compare(collect(model, 2), reference(model, X2, lambda out: crit(out, y2)), ggn.matrix)
    compare(first, reference(model, X1, lambda out: crit(out, y1)))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_accumulate_sums_and_concatenates(reduction):
    model, crit, (X1, y1), (X2, y2) = two_batches(reduction)
    ggn = FullGGN()
    with extend(model, BatchJacobian(), DiagGGN(), DiagGGNApprox(), ggn, accumulate=True):
        crit(model(X1), y1).backward()
        crit(model(X2), y2).backward()
    got = collect(model, 5)
    r1 = reference(model, X1, lambda out: crit(out, y1))
    r2 = reference(model, X2, lambda out: crit(out, y2))
    check(got["DiagGGN"], r1.diag_ggn + r2.diag_ggn, "DiagGGN")
    check(got["DiagGGNApprox"], r1.approx + r2.approx, "DiagGGNApprox")
    check(got["FullGGN"], r1.G + r2.G, "FullGGN")
    check(ggn.matrix, r1.G + r2.G, "FullGGN.matrix")
    check(got["BatchJacobian"], torch.cat([r1.batch_jacobian, r2.batch_jacobian]), "BatchJacobian")
    if reduction == "sum":  # then the sum over batches is the curvature of the combined data
        X, y = torch.cat([X1, X2]), torch.cat([y1, y2])
        compare(got, reference(model, X, lambda out: crit(out, y)), ggn.matrix)


def test_accumulate_over_three_batches_of_different_sizes_with_mse():
    model = mlp()
    crit = nn.MSELoss(reduction="sum")
    batches = [(torch.randn(n, 4, dtype=DT), torch.randn(n, 3, dtype=DT)) for n in (1, 3, 2)]
    ggn = FullGGN()
    with extend(model, BatchJacobian(), DiagGGN(), DiagGGNApprox(), ggn, accumulate=True):
        for X, y in batches:
            crit(model(X), y).backward()
    X, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    compare(collect(model, 6), reference(model, X, lambda out: crit(out, y)), ggn.matrix)


# ------------------------------------------------------- retained graphs
def test_retain_graph_second_backward_recomputes():
    model = mlp()
    X, y = data()
    crit = nn.CrossEntropyLoss()
    ggn = FullGGN()
    with extend(model, DiagGGN(), ggn, accumulate=True):
        loss = crit(model(X), y)
        loss.backward(retain_graph=True)
        loss.backward()
    ref = reference(model, X, lambda out: crit(out, y), approx=False)
    check(collect(model, 4, ("DiagGGN",))["DiagGGN"], 2 * ref.diag_ggn, "DiagGGN")
    check(ggn.matrix, 2 * ref.G, "FullGGN.matrix")


def test_retain_graph_backward_twice_without_new_forward_recomputes():
    model = mlp()
    X, y = data()
    crit = nn.CrossEntropyLoss()
    with extend(model, DiagGGN()):
        loss = crit(model(X), y)
        loss.backward(retain_graph=True)
        first = [p.diag_ggn.clone() for p in model.parameters()]
        loss.backward()
    for a, p in zip(first, model.parameters()):
        torch.testing.assert_close(p.diag_ggn, a, rtol=0, atol=0)


def test_second_backward_through_an_earlier_forward_is_never_silently_dropped():
    """backward(retain_graph=True), a new forward, then backward through the first graph again.

    With accumulate=True the second backward must either be added (2 × G) or raise a
    CurvhookError (context.py has a "released ... Run the forward pass again" error for
    this case); silently ignoring it leaves a sum that misses one backward.
    """
    model = mlp()
    X, y = data()
    crit = nn.CrossEntropyLoss()
    ggn = FullGGN()
    with extend(model, DiagGGN(), ggn, accumulate=True):
        loss = crit(model(X), y)
        loss.backward(retain_graph=True)
        model(X)  # the next forward pass releases what the first one stored
        try:
            loss.backward()
        except CurvhookError:
            return
    ref = reference(model, X, lambda out: crit(out, y), approx=False)
    check(ggn.matrix, 2 * ref.G, "FullGGN.matrix")
    check(collect(model, 4, ("DiagGGN",))["DiagGGN"], 2 * ref.diag_ggn, "DiagGGN")


def test_second_backward_after_a_new_forward_raises_in_both_modes():
    model = mlp()
    X, y = data()
    for accumulate in (False, True):
        with extend(model, DiagGGN(), accumulate=accumulate):
            loss = nn.CrossEntropyLoss()(model(X), y)
            loss.backward(retain_graph=True)
            model(X)
            with pytest.raises(CurvhookError, match="Run the forward pass again"):
                loss.backward()


# ------------------------------------ several forward passes in one loss
def test_two_forward_passes_in_one_loss_are_never_silently_wrong():
    """ℓ = L(model(X1)) + L(model(X2)) in one backward: G is the sum of both GGNs.

    curvhook must either return that sum or raise; returning the GGN of one of
    the two batches would be a silently wrong number.
    """
    model = mlp()
    (X1, y1), (X2, y2) = data(3), data(2)
    crit = nn.CrossEntropyLoss(reduction="sum")
    ggn = FullGGN()
    try:
        with extend(model, DiagGGN(), ggn):
            (crit(model(X1), y1) + crit(model(X2), y2)).backward()
    except CurvhookError:
        return
    X, y = torch.cat([X1, X2]), torch.cat([y1, y2])
    ref = reference(model, X, lambda out: crit(out, y), approx=False)
    check(ggn.matrix, ref.G, "FullGGN.matrix")
    check(collect(model, 5, ("DiagGGN",))["DiagGGN"], ref.diag_ggn, "DiagGGN")


def test_two_forward_passes_in_one_backward_sum_exactly():
    """ℓ = L(model(X1)) + L(model(X2)): every extension covers both batches."""
    model = mlp()
    (X1, y1), (X2, y2) = data(3), data(2)
    crit = nn.CrossEntropyLoss(reduction="sum")
    exts = all_extensions()
    with extend(model, *exts):
        (crit(model(X1), y1) + crit(model(X2), y2)).backward()
    X, y = torch.cat([X1, X2]), torch.cat([y1, y2])
    ref = reference(model, X, lambda out: crit(out, y), approx=False)
    got = collect(model, 5, ("BatchJacobian", "DiagGGN", "FullGGN"))
    compare(got, ref, exts[3].matrix)
