"""Activation checkpointing (``torch.utils.checkpoint.checkpoint``) inside an extended model.

``use_reentrant=False``: exact. The block's autograd nodes pack their saved
tensors and recompute them once per backward pass, so curvhook reads none of
them; every extension is compared with the torch.func reference of the same
model without checkpointing.

``use_reentrant=True``: refused with ``UnsupportedModelError`` (the block runs
without autograd in the forward pass), wherever the block is; never a number.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from curvhook import extend
from curvhook.errors import UnsupportedModelError
from curvhook.extensions import BatchJacobian
from graph_reference import diag_ggn_approx_graph
from helpers import DT, all_extensions, assert_clean, ce, mse, run_curvhook, snapshot
from reference import check, compare, reference

PLACES = ("start", "middle", "end", "all")
REENTRANT_MESSAGE = r"use_reentrant=True.*use_reentrant=False.*without checkpointing inside extend"


class Blocks(nn.Module):
    """Three blocks in a row; ``reentrant`` ``None``: no checkpointing, else its mode.

    Args:
        blocks: The three blocks.
        place: Which blocks run checkpointed (``"start"``, ``"middle"``, ``"end"``, ``"all"``).
    """

    def __init__(self, blocks: list[nn.Module], place: str) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.checkpointed = {"start": {0}, "middle": {1}, "end": {2}, "all": {0, 1, 2}}[place]
        self.reentrant: Optional[bool] = None

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.blocks):
            if self.reentrant is not None and i in self.checkpointed:
                x = checkpoint(block, x, use_reentrant=self.reentrant)
            else:
                x = block(x)
        return x


class Residual(nn.Module):
    """``x + f(norm(x))``, checkpointing ``f`` where its owner says so."""

    def __init__(self, f: nn.Module, d: int) -> None:
        super().__init__()
        self.norm, self.f = nn.LayerNorm(d), f
        self.reentrant: Optional[bool] = None

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        if self.reentrant is not None:
            return x + checkpoint(self.f, h, use_reentrant=self.reentrant)
        return x + self.f(h)


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention`` on ``(x, x, x)``, its first output."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(d, 2, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


class Gated(nn.Module):
    """``relu(x) * tanh(proj(x) @ w)``: tensor operations and a parameter between children."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.w = nn.Parameter(torch.randn(d, d) / d**0.5)
        self.reentrant: Optional[bool] = None

    def _gate(self, x: Tensor) -> Tensor:
        return torch.relu(x) * torch.tanh(self.proj(x) @ self.w)

    def forward(self, x: Tensor) -> Tensor:
        if self.reentrant is not None:
            return checkpoint(self._gate, x, use_reentrant=self.reentrant)
        return self._gate(x)


class GatedLeaf(nn.Module):
    """A leaf (calls no module): ``relu(x) * tanh(x @ w)``, checkpointed inside its forward."""

    def __init__(self, d: int, reentrant: bool) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d, dtype=DT) / d**0.5)
        self.reentrant = reentrant

    def forward(self, x: Tensor) -> Tensor:
        return checkpoint(lambda h: torch.relu(h) * torch.tanh(h @ self.w), x, use_reentrant=self.reentrant)


def mlp_blocks(place: str) -> nn.Module:
    return Blocks([
        nn.Sequential(nn.Linear(4, 6), nn.Tanh()),
        nn.Sequential(nn.Linear(6, 6), nn.ReLU(inplace=True), nn.Linear(6, 5), nn.Sigmoid()),
        nn.Sequential(nn.Linear(5, 5), nn.GELU(), nn.Linear(5, 3)),
    ], place).to(DT)


def conv_blocks(place: str) -> nn.Module:
    return Blocks([
        nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(inplace=True)),
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2), nn.ReLU()),
        nn.Sequential(nn.Flatten(), nn.Linear(16, 5), nn.Tanh(), nn.Linear(5, 3), nn.Sigmoid()),
    ], place).to(DT)


def transformer_blocks(place: str) -> nn.Module:
    d = 6
    return Blocks([
        nn.Sequential(nn.Linear(4, d), nn.Tanh()),
        nn.Sequential(
            Residual(SelfAttention(d), d),
            Residual(nn.Sequential(nn.Linear(d, 8), nn.GELU(), nn.Linear(8, d)), d),
            Gated(d),
        ),
        nn.Sequential(nn.LayerNorm(d), nn.Flatten(), nn.Linear(3 * d, 3)),
    ], place).to(DT)


MODELS = {
    "mlp": (mlp_blocks, lambda n: torch.randn(n, 4, dtype=DT)),
    "conv": (conv_blocks, lambda n: torch.randn(n, 2, 4, 4, dtype=DT)),
    "transformer": (transformer_blocks, lambda n: torch.randn(n, 3, 4, dtype=DT)),
}


def set_mode(model: nn.Module, reentrant: Optional[bool]) -> None:
    """Checkpoint the chosen blocks (and the inner blocks) in ``reentrant`` mode; ``None``: plain."""
    for m in model.modules():
        if hasattr(m, "reentrant"):
            m.reentrant = reentrant


def plain_gradients(model: nn.Module, X: Tensor, loss_fn) -> list[Tensor]:
    """``p.grad`` of a plain backward without curvhook and without checkpointing."""
    set_mode(model, None)
    model.zero_grad()
    loss_fn(model(X)).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return grads


# ------------------------------------------------------------------ exact: use_reentrant=False
@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_non_reentrant_is_exact(name, place):
    make, inputs = MODELS[name]
    model, X = make(place), inputs(3)
    y = torch.randint(0, 3, (3,))
    grads = plain_gradients(model, X, ce(y))
    set_mode(model, False)
    before = snapshot(model)
    got, matrix, _ = run_curvhook(model, X, ce(y), split_attention=False)
    assert_clean(model, before)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)

    set_mode(model, None)  # the reference: the same function, without checkpointing
    crit = nn.CrossEntropyLoss()
    ref = reference(model, X, lambda out: crit(out, y), approx=False)
    compare({k: v for k, v in got.items() if k != "DiagGGNApprox"}, ref, matrix)
    d = torch.func.hessian(lambda o: crit(o, y))(ref.out).reshape(ref.out.numel(), -1).diagonal()
    check(got["DiagGGNApprox"], diag_ggn_approx_graph(model, X, d), "DiagGGNApprox")


def test_non_reentrant_train_mode_dropout_is_exact():
    """The checkpoint recomputes its block with the same random numbers; curvhook uses the same mask."""
    model = Blocks([
        nn.Sequential(nn.Linear(4, 6), nn.Tanh()),
        nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.5), nn.Linear(6, 5), nn.ReLU()),
        nn.Linear(5, 3),
    ], "middle").to(DT)
    X, y = torch.randn(4, 4, dtype=DT), torch.randn(4, 3, dtype=DT)
    set_mode(model, False)
    got, matrix, masks = run_curvhook(model, X, mse(y), record_masks=True)
    set_mode(model, None)
    compare(got, reference(model, X, mse(y), masks=masks), matrix)


def test_non_reentrant_whole_model_inside_checkpoint():
    """``checkpoint(model, X)`` called inside the block: the model's own output node is packed too."""
    model = mlp_blocks("start")
    X, y = torch.randn(3, 4, dtype=DT), torch.randint(0, 3, (3,))
    crit = nn.CrossEntropyLoss()
    with extend(model, *all_extensions()):
        crit(checkpoint(model, X, use_reentrant=False), y).backward()
    diag = torch.cat([p.diag_ggn.flatten() for p in model.parameters()])
    ref = reference(model, X, lambda out: crit(out, y), approx=False)
    check(diag, ref.diag_ggn, "DiagGGN")


def test_non_reentrant_two_backward_passes():
    """A second forward and backward in the same block recompute again; the results are replaced."""
    model = conv_blocks("all")
    X, y = torch.randn(2, 2, 4, 4, dtype=DT), torch.randint(0, 3, (2,))
    set_mode(model, False)
    crit = nn.CrossEntropyLoss()
    with extend(model, *all_extensions()):
        for _ in range(2):
            crit(model(X), y).backward()
    diag = torch.cat([p.diag_ggn.flatten() for p in model.parameters()])
    set_mode(model, None)
    check(diag, reference(model, X, lambda out: crit(out, y), approx=False).diag_ggn, "DiagGGN")


# ----------------------------------------------------------------- refused: use_reentrant=True
@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_reentrant_is_refused(name, place):
    make, inputs = MODELS[name]
    model, X = make(place), inputs(3)
    set_mode(model, True)
    before = snapshot(model)
    exts = all_extensions()
    with pytest.raises(UnsupportedModelError, match=REENTRANT_MESSAGE):
        with extend(model, *exts):
            model(X).sum().backward()
    assert_clean(model, before)
    for p in model.parameters():
        assert not hasattr(p, "diag_ggn") and not hasattr(p, "batch_jacobian")


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.parametrize("place", ("start", "middle", "end"))
def test_reentrant_tensor_operations_only_are_refused(place):
    """A checkpointed function that calls no module: seen by the tape, not by the module hooks."""
    i = {"start": 0, "middle": 1, "end": 2}[place]
    layers = [nn.Linear(4, 4).to(DT) for _ in range(3)]
    layers[i] = GatedLeaf(4, reentrant=True)
    model = nn.Sequential(*layers)
    with pytest.raises(UnsupportedModelError, match=REENTRANT_MESSAGE):
        with extend(model, *all_extensions()):
            model(torch.randn(3, 4, dtype=DT)).sum().backward()


def test_non_reentrant_inside_a_leaf_without_rule_is_refused():
    """The fallback replays a leaf's forward with torch.func, which cannot run checkpointing."""
    model = nn.Sequential(nn.Linear(4, 4), GatedLeaf(4, reentrant=False), nn.Linear(4, 3)).to(DT)
    with pytest.raises(UnsupportedModelError, match="saved tensor hooks"), pytest.warns(UserWarning):
        with extend(model, BatchJacobian()):
            model(torch.randn(3, 4, dtype=DT)).sum().backward()


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_reentrant_under_no_grad_is_a_plain_forward():
    """No backward can follow a forward under ``no_grad``: nothing to refuse."""
    model = mlp_blocks("middle")
    set_mode(model, True)
    X = torch.randn(3, 4, dtype=DT)
    with extend(model, *all_extensions()), torch.no_grad():
        out = model(X)
    set_mode(model, None)
    torch.testing.assert_close(out, model(X))
