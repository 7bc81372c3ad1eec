"""Run curvhook the way a user does, and compare with the torch.func reference."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from curvhook import extend
from curvhook.extensions import BatchJacobian, DiagGGN, DiagGGNApprox, FullGGN
from graph_reference import diag_ggn_approx_graph
from reference import DropoutMasks, check, collect, compare, reference

ALL = ("BatchJacobian", "DiagGGN", "DiagGGNApprox", "FullGGN")


class Chain(nn.Module):
    """``b(a(x))``: a custom container chaining two children, or a model then a function."""

    def __init__(self, a: Callable[[Tensor], Tensor], b: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.a(x))


def run_curvhook(
    model: nn.Module,
    X: Tensor,
    loss_fn: Callable[[Tensor], Tensor],
    which=ALL,
    record_masks: bool = False,
    split_attention: bool = True,
):
    """One ``with extend(...)`` block: forward, ``loss_fn(out).backward()``.

    ``split_attention`` is DiagGGNApprox's option (``False``: ``nn.MultiheadAttention``
    is one operation, as in ``graph_reference``).

    Returns ``(results, matrix, masks)``: the collected attributes, ``FullGGN.matrix``
    and the dropout-mask recorder (or ``None``).
    """
    ggn = FullGGN()
    approx = DiagGGNApprox(split_attention=split_attention)
    exts = {"BatchJacobian": BatchJacobian(), "DiagGGN": DiagGGN(), "DiagGGNApprox": approx, "FullGGN": ggn}
    masks = DropoutMasks(model) if record_masks else None
    with extend(model, *(exts[k] for k in which)):
        if masks is not None:
            with masks:
                out = model(X)
        else:
            out = model(X)
        loss_fn(out).backward()
    got = collect(model, out.shape[0], which)
    return got, (ggn.matrix if "FullGGN" in which else None), masks


def check_against_reference(
    model: nn.Module,
    X: Tensor,
    loss_fn: Callable[[Tensor], Tensor],
    which=ALL,
    record_masks: bool = False,
    rtol: float = 1e-6,
) -> None:
    """Run curvhook with ``which`` extensions and compare every result with the reference."""
    got, matrix, masks = run_curvhook(model, X, loss_fn, which, record_masks)
    ref = reference(model, X, loss_fn, masks=masks, approx="DiagGGNApprox" in which)
    # the supported losses have no cross-sample Hessian blocks (sanity check of the reference)
    torch.testing.assert_close(ref.H_full, ref.H, rtol=0, atol=1e-12 * ref.H.abs().max().item())
    compare(got, ref, matrix, rtol=rtol)
    return got, ref


def check_graph_against_reference(model: nn.Module, X: Tensor, y: Tensor) -> None:
    """All four extensions on a model with tensor operations between modules, cross-entropy loss.

    The exact quantities against the torch.func reference; DiagGGNApprox against its
    definition on the graph (``graph_reference``), from ``diag(H)`` at the output.
    ``graph_reference`` counts every leaf module as one operation, so DiagGGNApprox
    runs with ``split_attention=False`` (the split form: tests/test_attention.py).
    """
    crit = nn.CrossEntropyLoss()
    got, matrix, _ = run_curvhook(model, X, lambda out: crit(out, y), split_attention=False)
    ref = reference(model, X, lambda out: crit(out, y), approx=False)
    compare({k: v for k, v in got.items() if k != "DiagGGNApprox"}, ref, matrix)
    d = torch.func.hessian(lambda o: crit(o, y))(ref.out).reshape(ref.out.numel(), -1).diagonal()
    check(got["DiagGGNApprox"], diag_ggn_approx_graph(model, X, d), "DiagGGNApprox")
