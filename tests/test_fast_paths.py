"""The code paths that exist for speed and memory, forced on small problems.

Chunked reductions (a buffer smaller than one sample), the Kronecker blocks of
the full GGN next to dense ones, the C - 1 column factor of the cross-entropy
Hessian, and huge-page buffers: each against the torch.func references.
"""

import warnings

import pytest
import torch
from torch import nn

from curvhook import _memory, extend
from curvhook.extensions import BatchJacobian, DiagGGN, DiagGGNApprox, FullGGN
from curvhook.extensions import full_ggn as full_ggn_module
from curvhook.losses import _softmax_factor
from curvhook.rules import base as rules_base
from curvhook.rules import fallback as fallback_module
from curvhook.rules import pooling
from curvhook.rules import tensor_ops
from helpers import check_graph_against_reference
from reference import collect, compare, reference

DT = torch.float64


def conv_net(groups: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, groups=groups),
        nn.ReLU(),
        nn.Conv2d(4, 4, 2, stride=2, groups=groups),
        nn.Flatten(),
        nn.Linear(16, 5),
        nn.Tanh(),
        nn.Linear(5, 3),
    ).to(DT)


def run(model, X, y, *exts):
    with extend(model, *exts):
        nn.CrossEntropyLoss()(model(X), y).backward()


@pytest.mark.parametrize("chunk", [1, 40, 10**9])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_diag_ggn_in_chunks(monkeypatch, chunk, groups):
    """``_SQ_CHUNK_ENTRIES = 1``: one sample per chunk; 40: a few; huge: one chunk."""
    monkeypatch.setattr(rules_base, "_SQ_CHUNK_ENTRIES", chunk)
    torch.manual_seed(0)
    model, X, y = conv_net(groups), torch.randn(5, 2, 4, 4, dtype=DT), torch.randint(0, 3, (5,))
    run(model, X, y, DiagGGN(), BatchJacobian())
    ref = reference(model, X, lambda o: nn.CrossEntropyLoss()(o, y), approx=False)
    compare(collect(model, 5, ("DiagGGN", "BatchJacobian")), ref)


@pytest.mark.parametrize("tile", [3, 512])
@pytest.mark.parametrize("n", [1, 5])
def test_full_ggn_kronecker_blocks_next_to_dense_blocks(monkeypatch, tile, n):
    """Linear layers give Kronecker blocks, convolutions dense ones: every pairing."""
    monkeypatch.setattr(full_ggn_module, "_TILE", tile)  # 3: mirror many small tiles
    torch.manual_seed(1)
    model, X, y = conv_net(), torch.randn(n, 2, 4, 4, dtype=DT), torch.randint(0, 3, (n,))
    ggn = FullGGN()
    run(model, X, y, ggn)
    ref = reference(model, X, lambda o: nn.CrossEntropyLoss()(o, y), approx=False)
    compare(collect(model, n, ("FullGGN",)), ref, ggn.matrix)
    torch.testing.assert_close(ggn.matrix, ggn.matrix.T, rtol=1e-12, atol=1e-15)


def test_full_ggn_with_a_frozen_layer_between_kronecker_layers():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2)).to(DT)
    model[2].requires_grad_(False)
    X, y = torch.randn(4, 3, dtype=DT), torch.randint(0, 2, (4,))
    ggn = FullGGN()
    run(model, X, y, ggn)
    ref = reference(model, X, lambda o: nn.CrossEntropyLoss()(o, y), approx=False)
    compare(collect(model, 4, ("FullGGN",)), ref, ggn.matrix)


@pytest.mark.parametrize("c", [1, 2, 3, 10])
def test_softmax_factor_squares_to_the_cross_entropy_hessian(c):
    torch.manual_seed(3)
    logits = torch.randn(6, c, dtype=DT) * 3
    logits[0] = torch.tensor([60.0] + [0.0] * (c - 1), dtype=DT)  # saturated: p is one-hot
    p = logits.softmax(-1)
    q = _softmax_factor(p)
    assert q.shape == (6, c, c - 1)
    factor = q * p.sqrt().unsqueeze(-1)
    for i in range(6):
        f = lambda z: torch.nn.functional.cross_entropy(z[None], torch.tensor([0]))  # noqa: E731
        hess = torch.func.hessian(f)(logits[i])
        torch.testing.assert_close(factor[i] @ factor[i].T, hess, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(q[i].T @ q[i], torch.eye(c - 1, dtype=DT), rtol=0, atol=1e-12)


def test_huge_page_buffers_are_ordinary_tensors():
    like = torch.zeros(1, dtype=torch.float32)
    buf = _memory.empty((3, 1 << 20), like=like)  # 12 MiB: above the huge-page threshold
    assert buf.shape == (3, 1 << 20) and buf.dtype == torch.float32 and buf.is_contiguous()
    buf.fill_(2.0)
    assert buf.sum().item() == 2.0 * 3 * (1 << 20)
    assert _memory.zeros((5, 4), like=like.double()).dtype == torch.float64
    a, b = torch.randn(4, 1, 3), torch.randn(2, 1, dtype=DT)
    torch.testing.assert_close(_memory.mul(a, b), a * b)


class Bilinear(nn.Module):
    """No registered rule: goes through the torch.func fallback."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4, dtype=DT))

    def forward(self, x):
        return torch.tanh(x @ self.w) * x.sum(-1, keepdim=True)


@pytest.mark.parametrize("chunk", [1, 7, 10**9])
def test_fallback_diagonals_in_chunks_of_rows(monkeypatch, chunk):
    monkeypatch.setattr(fallback_module, "_ROW_CHUNK_ENTRIES", chunk)
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(2, 3), Bilinear(), nn.Linear(4, 3)).to(DT)
    X, y = torch.randn(5, 2, dtype=DT), torch.randint(0, 3, (5,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback warns once per module type
        run(model, X, y, DiagGGNApprox())
    ref = reference(model, X, lambda o: nn.CrossEntropyLoss()(o, y))
    compare(collect(model, 5, ("DiagGGNApprox",)), ref)


@pytest.mark.parametrize("chunk", [1, 30, 10**9])
def test_linear_over_positions_diag_ggn_in_chunks(monkeypatch, chunk):
    """``nn.Linear`` on ``[N, T, in]``: the per-sample products sum over positions before squaring."""
    monkeypatch.setattr(rules_base, "_SQ_CHUNK_ENTRIES", chunk)
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Flatten(), nn.Linear(10, 3)).to(DT)
    X, y = torch.randn(4, 5, 3, dtype=DT), torch.randint(0, 3, (4,))
    run(model, X, y, DiagGGN(), BatchJacobian())
    ref = reference(model, X, lambda o: nn.CrossEntropyLoss()(o, y), approx=False)
    compare(collect(model, 4, ("DiagGGN", "BatchJacobian")), ref)


def test_scratch_buffers_are_reused_and_released_with_the_block():
    like = torch.zeros(1)
    a = _memory.scratch((256, 512), like, "test_slot")
    b = _memory.scratch((128, 512), like, "test_slot")
    assert a.data_ptr() == b.data_ptr()  # the same memory, no fresh pages
    assert _memory.scratch((128, 512), like, "test_slot") is b  # the same shape again: the same view
    c = _memory.scratch((512, 256), like, "test_slot")
    assert c.shape == (512, 256) and c.data_ptr() == a.data_ptr()
    assert _memory.scratch((1024, 512), like, "test_slot").shape == (1024, 512)  # grows
    model = nn.Sequential(nn.Linear(1024, 3))
    X, y = torch.randn(128, 1024), torch.randint(0, 3, (128,))
    run(model, X, y, DiagGGN())
    assert not getattr(_memory._scratch, "pool", {}), "scratch buffers outlive the block"


def _storage(t):
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_large_buffers_are_recycled_only_when_nothing_uses_them(monkeypatch, net):
    """Every buffer counts as large; steps with new inputs, results dropped or kept.

    The first pass holds nothing (no results known yet); from the third on, a
    result nobody kept lends its memory to the next pass. A kept result (the
    tensor, or only a view of it) is never written to; free buffers held
    between passes stay within half the results; every step is exact.
    """
    monkeypatch.setattr(_memory, "_RECYCLE_MIN_BYTES", 1)
    torch.manual_seed(7)
    if net == "mlp":
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).to(DT)
        shape = (5, 4)
    else:
        model, shape = conv_net(), (5, 2, 4, 4)
    first = next(model.parameters())
    ggn = FullGGN()
    exts = (DiagGGN(), DiagGGNApprox(), BatchJacobian(), ggn)
    kept, steps = [], []
    with extend(model, *exts):
        for step in range(5):
            X, y = torch.randn(*shape, dtype=DT), torch.randint(0, 3, (5,))
            before = _storage(first.batch_jacobian) if step else None
            nn.CrossEntropyLoss()(model(X), y).backward()
            steps.append((X, y, collect(model, 5), ggn.matrix.clone()))  # copies, checked below
            results = sum(e.result_bytes(list(model.parameters())) for e in exts)
            used, free = _memory.held_bytes()
            assert free <= _memory.held_budget(results)
            assert (used > 0 and free > 0) == (step > 0)  # results and temporaries held from pass 2 on
            if step == 2:  # nothing was kept after step 1: its memory came back
                assert _storage(first.batch_jacobian) == before
            if step in (2, 3):  # keep the Jacobian of step 2, a view of step 3's, and G
                held = first.batch_jacobian if step == 2 else first.batch_jacobian[1:, 0]
                kept.append((held, held.clone(), ggn.matrix, ggn.matrix.clone()))
        for held, value, matrix, matrix_value in kept:
            assert torch.equal(held, value) and torch.equal(matrix, matrix_value)
        assert _storage(first.batch_jacobian) not in {_storage(h) for h, *_ in kept}
    assert not getattr(_memory._recycling, "pool", []), "recycled buffers outlive the block"
    for X, y, got, matrix in steps:
        ref = reference(model, X, lambda o, y=y: nn.CrossEntropyLoss()(o, y))
        compare(got, ref, matrix=matrix, tag=" (recycled buffers)")


@pytest.mark.parametrize("floor", [0, None])
def test_the_diagonal_extensions_hold_at_most_their_results_and_the_budget(monkeypatch, floor):
    """Their results are small and their temporaries large. What the pool holds stays
    within the results plus the budget (half the results, at least ``_HELD_MIN_BYTES``).
    Without the floor the temporaries are not held; with the default floor (32 MiB)
    a small model's temporaries are recycled: after the second pass none is made anew."""
    monkeypatch.setattr(_memory, "_RECYCLE_MIN_BYTES", 1024)
    if floor is not None:
        monkeypatch.setattr(_memory, "_HELD_MIN_BYTES", floor)
    fresh, held, made = _memory._fresh, [], []

    def fresh_and_count(*args):  # what the pool holds whenever a buffer is made
        held.append(sum(_memory.held_bytes()))
        made.append(pass_number[0])
        return fresh(*args)

    monkeypatch.setattr(_memory, "_fresh", fresh_and_count)
    torch.manual_seed(8)
    widths = [8, 48, 40, 56, 24, 64]  # temporaries of distinct sizes: none reused within a pass
    layers = [m for a, b in zip(widths, widths[1:]) for m in (nn.Linear(a, b), nn.Tanh())]
    model = nn.Sequential(*layers, nn.Linear(widths[-1], 3)).to(DT)
    X, y = torch.randn(512, widths[0], dtype=DT), torch.randint(0, 3, (512,))  # temporaries ≫ results
    results = 8 * sum(p.numel() for p in model.parameters())
    pass_number = [0]
    with extend(model, DiagGGN(), DiagGGNApprox()):
        for step in range(4):
            pass_number[0] = step
            nn.CrossEntropyLoss()(model(X), y).backward()
            collected = collect(model, 512, ("DiagGGN", "DiagGGNApprox"))
    assert len(held) >= 10 and max(held) <= 2 * results + 2 * _memory.held_budget(2 * results)
    if floor == 0:
        assert max(held) <= (1 + _memory._HELD_FRACTION) * 2 * results
        assert made.count(3) >= 10  # temporaries made anew on every pass
    else:
        assert made.count(3) == 0  # every temporary and result came from the pool
    compare(collected, reference(model, X, lambda o: nn.CrossEntropyLoss()(o, y)), tag=" (recycled buffers)")


def test_diagonal_results_are_recycled_and_kept_ones_are_left_alone():
    """At the default threshold (256 KiB) a weight diagonal reuses the memory of the
    previous one when nobody kept it. Results kept from some step on are never
    written to, and the pool forgets them instead of growing with every step."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 3)).to(DT)  # 256 KiB weight
    weight = model[0].weight
    assert weight.nbytes >= _memory._RECYCLE_MIN_BYTES
    ptrs, kept, steps, pool_sizes = [], [], [], []
    with extend(model, DiagGGN(), DiagGGNApprox()):
        for step in range(7):
            X, y = torch.randn(4, 128, dtype=DT), torch.randint(0, 3, (4,))
            nn.CrossEntropyLoss()(model(X), y).backward()
            ptrs.append((_storage(weight.diag_ggn), _storage(weight.diag_ggn_approx)))
            steps.append((X, y, collect(model, 4, ("DiagGGN", "DiagGGNApprox"))))
            pool_sizes.append(len(_memory._recycling.pool))
            if step >= 4:  # keep every result from here on
                kept += [(r, r.clone()) for r in (weight.diag_ggn, weight.diag_ggn_approx)]
    assert ptrs[1] == ptrs[2] == ptrs[3] == ptrs[4]  # the first pass recycles nothing
    assert len({p for pair in ptrs[4:] for p in pair}) == 6  # kept ones are not reused
    assert min(pool_sizes[1:]) >= 2 and max(pool_sizes) <= 4  # both weight diagonals held, no more
    for held, value in kept:
        assert torch.equal(held, value)
    for X, y, got in steps:
        compare(got, reference(model, X, lambda o, y=y: nn.CrossEntropyLoss()(o, y)), tag=" (recycled results)")


def test_results_of_the_previous_backward_are_removed_when_the_next_starts():
    """They are replaced by the new ones; reading them during the next backward finds none."""
    model = nn.Sequential(nn.Linear(3, 2)).to(DT)
    X, y = torch.randn(4, 3, dtype=DT), torch.randint(0, 2, (4,))
    seen = []
    with extend(model, DiagGGN()):
        nn.CrossEntropyLoss()(model(X), y).backward()
        out = model(X)
        out.register_hook(lambda g: seen.append(hasattr(model[0].weight, "diag_ggn")))
        nn.CrossEntropyLoss()(out, y).backward()
    assert seen == [False] and model[0].weight.diag_ggn.shape == (2, 3)


class ResidualMean(nn.Module):
    """A functional residual (``+``), a difference and a global mean: the direct pullbacks."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(2, 2, 3, padding=1), nn.Linear(2, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x) + x)
        return self.fc((h - 0.5 * x).mean((2, 3)))


@pytest.mark.parametrize("n", [1, 3])
def test_sums_and_means_are_pulled_back_without_torch_func(monkeypatch, n):

    def refuse(*args, **kwargs):
        raise AssertionError("torch.func used for a sum or a mean")

    torch.manual_seed(0)
    model = ResidualMean().to(DT)
    X, y = torch.randn(n, 2, 3, 3, dtype=DT), torch.randint(0, 3, (n,))
    monkeypatch.setattr(tensor_ops, "vjp", refuse)
    monkeypatch.setattr(tensor_ops, "vmap", refuse)
    run(model, X, y, BatchJacobian(), DiagGGN(), DiagGGNApprox(), FullGGN())  # raises on torch.func
    monkeypatch.undo()
    check_graph_against_reference(model, X, y)


@pytest.mark.parametrize(
    "pool, dims, saved",
    [(nn.MaxPool2d(3, 2, 1), 2, True), (nn.AdaptiveMaxPool2d(3), 2, True), (nn.MaxPool3d(2), 3, True), (nn.MaxPool1d(3, 2, 1), 1, False)],
)
def test_max_pooling_reads_the_indices_of_its_forward_pass(monkeypatch, pool, dims, saved):
    """2d and 3d pooling take the indices their autograd node saved; 1d computes them again."""
    recomputed = []

    def counting(compute):
        def count(call):
            recomputed.append(call.name)
            return compute(call)

        return staticmethod(count)

    for rule in (pooling.MaxPoolRule, pooling.AdaptiveMaxPoolRule):
        monkeypatch.setattr(rule, "_compute_indices", counting(rule._compute_indices))
    torch.manual_seed(0)
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](2, 3, 3)
    model = nn.Sequential(conv, nn.ReLU(), pool, nn.Flatten(), nn.LazyLinear(3)).to(DT)
    X, y = torch.randn(4, 2, *([8] * dims), dtype=DT), torch.randint(0, 3, (4,))
    model(X)
    run(model, X, y, BatchJacobian(), DiagGGN())
    assert bool(recomputed) is not saved
    ref = reference(model, X, lambda o: nn.CrossEntropyLoss()(o, y), approx=False)
    compare(collect(model, 4, ("BatchJacobian", "DiagGGN")), ref)
