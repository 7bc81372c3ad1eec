"""Nothing outlives its use: inputs, activations and outputs are freed with the block or
with their graph (also without a backward pass, or under no_grad), and steps make no
reference cycles. (The buffer pool of ``curvhook/_memory.py`` is in ``tests/test_memory.py``.)"""

import gc
import weakref

import pytest
import torch
from torch import nn

from curvhook import extend
from curvhook.extensions import BatchJacobian, DiagGGN, DiagGGNApprox, FullGGN
from helpers import DT, all_extensions, data, warnings_ignored
from reference import collect, compare, reference


class Keep(nn.Module):
    """Records a weak reference to what passes through (a leaf module of the model)."""

    def __init__(self):
        super().__init__()
        self.refs = []

    def forward(self, x):
        self.refs.append(weakref.ref(x))
        return x


def leak_model():
    keep = Keep()
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), keep, nn.Linear(6, 3)).to(DT)
    return model, keep


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("keep_context", [False, True])
def test_no_tensor_outlives_the_block(backward, keep_context):
    model, keep = leak_model()
    X, y = data()
    x_ref = weakref.ref(X)
    exts = [DiagGGN(), BatchJacobian(), FullGGN(), DiagGGNApprox()]
    ctx = extend(model, *exts)
    with warnings_ignored():
        with ctx:
            out = model(X)
            out_ref = weakref.ref(out)
            loss = nn.CrossEntropyLoss()(out, y)
            if backward:
                loss.backward()
    del out, loss, X
    if not keep_context:
        del ctx
    gc.collect()
    assert keep.refs and keep.refs[0]() is None, "an intermediate activation is still alive"
    assert x_ref() is None, "the input is still alive"
    assert out_ref() is None, "the model output is still alive"


class ResidualNet(nn.Module):
    """Leaf modules and functional operations (``+``, ``relu``, ``mean``) between them."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = torch.tanh(self.b(h)) + h
        return self.out(h - h.mean(1, keepdim=True))


@pytest.mark.parametrize(
    "make",
    [lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)), ResidualNet],
    ids=["sequential", "residual"],
)
def test_steps_make_no_reference_cycles(make):
    """Stored tensors are freed by reference counting, not left to the garbage collector
    (a cycle per step made Python's full collections run, ~0.1 s each on a real model).
    Layers with rules only: torch.func, used by the fallback, makes cycles of its own."""
    model = make().to(DT)
    X, y = data()
    with extend(model, DiagGGN(), BatchJacobian(), FullGGN(), DiagGGNApprox()):
        nn.CrossEntropyLoss()(model(X), y).backward()
        gc.collect()
        gc.disable()
        try:
            for _ in range(3):
                nn.CrossEntropyLoss()(model(X), y).backward()
            assert gc.collect() == 0
        finally:
            gc.enable()


def test_forward_without_backward_leaks_nothing_after_the_block():
    model, keep = leak_model()
    with warnings_ignored():
        with extend(model, DiagGGN(), BatchJacobian()):
            for _ in range(3):
                X, y = data()
                nn.CrossEntropyLoss()(model(X), y)  # no backward, result dropped
            del X
    gc.collect()
    assert len(keep.refs) == 3
    assert all(r() is None for r in keep.refs)


def test_forward_without_backward_is_released_when_its_graph_is_dropped_inside_the_block():
    """docs/index.md (Memory): stored tensors are released "when the block exits or when the
    graph is freed". An evaluation loop run with grad enabled inside a long block must not
    keep every pass alive until the block ends."""
    model, keep = leak_model()
    with warnings_ignored():
        with extend(model, DiagGGN(), BatchJacobian()):
            for _ in range(3):
                X, y = data()
                nn.CrossEntropyLoss()(model(X), y)  # no backward, result dropped
            del X
            gc.collect()
            alive_inside = sum(r() is not None for r in keep.refs)
    assert alive_inside == 0, f"{alive_inside} of 3 dropped forward passes still alive inside the block"


def test_trace_is_freed_with_its_graph_for_every_extension():
    model, keep = leak_model()
    with warnings_ignored():
        with extend(model, *all_extensions()):
            out = model(torch.randn(3, 4, dtype=DT))
            nn.CrossEntropyLoss()(out, torch.tensor([0, 1, 2]))
            del out
            gc.collect()
            assert keep.refs[0]() is None


def test_forward_under_no_grad_inside_the_block_then_training_step():
    model, keep = leak_model()
    X, y = data()
    ggn = FullGGN()
    with warnings_ignored():
        with extend(model, DiagGGN(), ggn):
            with torch.no_grad():
                model(torch.randn(5, 4, dtype=DT))  # evaluation
            gc.collect()
            assert keep.refs[0]() is None  # nothing kept for a pass without graph
            nn.CrossEntropyLoss()(model(X), y).backward()
    compare(collect(model, 4, ("DiagGGN", "FullGGN")), reference(model, X, lambda out: nn.CrossEntropyLoss()(out, y)), ggn.matrix)


def test_a_cached_plan_holds_no_tensor_of_an_in_place_write_through_a_view():
    """The record of an in-place operation on a view replays the views from their base; it sits
    in the plan's key, which outlives the step, and must hold none of the step's tensors (it
    held the views' records, their inputs and so the step's graph)."""

    class WritesThroughAView(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.refs = nn.Linear(4, 6), nn.Linear(6, 3), []

        def forward(self, x):
            h = self.a(x) * 1.0
            self.refs.append(weakref.ref(h))
            h[:, 2:4].mul_(3)
            return self.b(torch.tanh(h))

    model = WritesThroughAView().to(DT)
    for _ in range(2):  # a new block per step, as the README writes it
        X, y = data()
        with extend(model, DiagGGN(), DiagGGNApprox()):
            nn.CrossEntropyLoss()(model(X), y).backward()
    gc.collect()
    assert all(ref() is None for ref in model.refs)
