"""``curvhook/_memory.py``: huge-page buffers, scratch buffers, and the pool that recycles
large temporaries and results nobody kept.

Each forces the code path on a small problem and checks the results against the
torch.func reference. (That no tensor outlives a block is in ``tests/test_leaks.py``.)
"""

import math

import pytest
import torch
from torch import nn

from curvhook import _memory, extend
from curvhook.extensions import BatchJacobian, DiagGGN, DiagGGNApprox, FullGGN
from helpers import DT, conv_net
from reference import collect, compare, reference


def run(model, X, y, *exts):
    with extend(model, *exts):
        nn.CrossEntropyLoss()(model(X), y).backward()


def test_huge_page_buffers_are_ordinary_tensors():
    like = torch.zeros(1, dtype=torch.float32)
    buf = _memory.empty((3, 1 << 20), like=like)  # 12 MiB: above the huge-page threshold
    assert buf.shape == (3, 1 << 20) and buf.dtype == torch.float32 and buf.is_contiguous()
    buf.fill_(2.0)
    assert buf.sum().item() == 2.0 * 3 * (1 << 20)
    assert _memory.zeros((5, 4), like=like.double()).dtype == torch.float64
    assert torch.equal(_memory.zeros((5, 4), like=like), torch.zeros(5, 4))
    assert torch.equal(_memory.ones((300, 300), like=like.double()), torch.ones(300, 300, dtype=torch.float64))
    a, b = torch.randn(4, 1, 3), torch.randn(2, 1, dtype=DT)
    torch.testing.assert_close(_memory.mul(a, b), a * b)


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
    between passes stay within what one pass asked for; every step is exact.
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
            pool = _memory._recycled()  # a free buffer is held only if the pass just ended used it
            assert all(e[1] == _memory._recycling.generation - 1 for e in pool if _memory._unused(e[0]))
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


@pytest.mark.parametrize("floor, most", [(0, None), (None, None), (0, 0)])
def test_each_pass_keeps_the_buffers_it_worked_with_for_the_next(monkeypatch, floor, most):
    """The diagonal extensions: small results, large temporaries. A pass keeps every free
    buffer it used for the next pass, and may pool as many new ones as the last pass
    worked with, so from the third pass on no temporary is made anew, whatever the
    floor of what the first passes may pool (``_HELD_MIN_BYTES``, 0 or the default).
    What the pool holds stays within the results and the buffers one pass asked for.
    With nothing allowed beyond the floor (``_HELD_MAX_BYTES = 0``, floor 0) the
    temporaries are made anew on every pass and only results are held."""
    monkeypatch.setattr(_memory, "_RECYCLE_MIN_BYTES", 1024)
    if floor is not None:
        monkeypatch.setattr(_memory, "_HELD_MIN_BYTES", floor)
    if most is not None:
        monkeypatch.setattr(_memory, "_HELD_MAX_BYTES", most)
    fresh, held, made = _memory._fresh, [], []

    def fresh_and_count(shape, dtype, device):  # what the pool holds whenever a buffer is made
        held.append(sum(_memory.held_bytes()))
        made.append((pass_number[0], math.prod(shape) * dtype.itemsize))
        return fresh(shape, dtype, device)

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
    per_pass = [sum(b for k, b in made if k == step) for step in range(4)]
    assert per_pass[0] > 20 * results  # the temporaries dominate
    if most == 0:
        assert per_pass[3] > 20 * results  # temporaries made anew on every pass
        # pooled while a pass runs: the free buffers kept from the last pass (at most the
        # budget, half the results of the two extensions) and this pass's new ones (at most
        # the results plus that budget): 2·(1 + 2·_HELD_FRACTION)·results, far below the temporaries
        assert max(held) <= (1 + 2 * _memory._HELD_FRACTION) * 2 * results
    else:
        assert per_pass[2] == per_pass[3] == 0  # every temporary and result came from the pool
        assert max(held) <= 2 * results + per_pass[0]
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


def test_a_new_block_per_step_recycles_the_results_nobody_kept():
    """The README idiom: each block writes into the memory of the previous block's results,
    unless the user kept them; kept results are never written to, and every result is exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8)).to(DT)  # 64·64·8·8 B: 256 KiB
    loss_fn = nn.CrossEntropyLoss()

    def step(X, y):
        with extend(model, BatchJacobian(), DiagGGN()):
            loss_fn(model(X), y).backward()
        ref = reference(model, X, lambda out: loss_fn(out, y), approx=False)
        compare(collect(model, X.shape[0], ("BatchJacobian", "DiagGGN")), ref, None)
        return model[0].weight.batch_jacobian

    X, y = torch.randn(8, 64, dtype=DT), torch.randint(0, 8, (8,))
    first = step(X, y).data_ptr()
    second = step(X, y)  # the first result was dropped: its memory is written again
    assert second.data_ptr() == first
    kept, kept_values = second, second.clone()
    third = step(torch.randn(8, 64, dtype=DT), y)  # the user holds the second result
    assert third.data_ptr() != kept.data_ptr()
    torch.testing.assert_close(kept, kept_values, rtol=0, atol=0)


def test_temporaries_are_parked_for_the_same_models_next_block_and_freed_with_it():
    """A block per step reuses the scratch buffers of the last block on the same model; they
    are freed when another model's block starts, when the model goes, or by release_memory()."""
    import gc
    import weakref

    import curvhook

    def scratch_ptrs():
        return {k: v[0].data_ptr() for k, v in (getattr(_memory._scratch, "pool", None) or {}).items()}

    def parked_models():
        table = getattr(_memory._parked, "table", None)
        return list(table.keys()) if table is not None else []

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 3)).to(DT)
    X, y = torch.randn(128, 1024, dtype=DT), torch.randint(0, 3, (128,))
    seen = []
    with extend(model, DiagGGN()):
        nn.CrossEntropyLoss()(model(X), y).backward()
        seen.append(scratch_ptrs())
    assert seen[0], "the linear rule should use a scratch buffer for x²"
    assert not getattr(_memory._scratch, "pool", {}), "the active pool outlives the block"
    assert parked_models() == [model]
    with extend(model, DiagGGN()):  # the next step: the same memory
        nn.CrossEntropyLoss()(model(X), y).backward()
        seen.append(scratch_ptrs())
    assert seen[1] == seen[0]
    ref = reference(model, X, lambda out: nn.CrossEntropyLoss()(out, y), approx=False)
    compare(collect(model, 128, ("DiagGGN",)), ref, None)

    other = nn.Sequential(nn.Linear(4, 3)).to(DT)
    with extend(other, DiagGGN()):
        pass
    assert model not in parked_models()  # another model's block dropped them

    with extend(model, DiagGGN()):
        nn.CrossEntropyLoss()(model(X), y).backward()
    assert parked_models() == [model]
    curvhook.release_memory()
    assert parked_models() == []

    with extend(model, DiagGGN()):
        nn.CrossEntropyLoss()(model(X), y).backward()
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None, "parked buffers keep the model alive"
    assert parked_models() == []


def test_a_block_is_freed_without_the_garbage_collector_and_its_full_ggn_recycled():
    """No reference cycle keeps a finished block (and its extensions' results) alive, so the
    next block recycles the full GGN matrix of an extension the user dropped."""
    import gc
    import weakref

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 16), nn.Tanh(), nn.Linear(16, 3)).to(DT)  # P = 707: 4 MB
    X, y = torch.randn(6, 40, dtype=DT), torch.randint(0, 3, (6,))
    loss_fn = nn.CrossEntropyLoss()
    gc.disable()
    try:
        ggn = FullGGN()
        block = extend(model, ggn)
        with block:
            loss_fn(model(X), y).backward()
        first = ggn.matrix.data_ptr()
        gone = weakref.ref(block)
        del block, ggn
        assert gone() is None, "a reference cycle keeps the block alive"
        ggn = FullGGN()
        with extend(model, ggn):
            loss_fn(model(X), y).backward()
    finally:
        gc.enable()
    assert ggn.matrix.data_ptr() == first
    ref = reference(model, X, lambda out: loss_fn(out, y), approx=False)
    compare(collect(model, 6, ("FullGGN",)), ref, ggn.matrix)


def test_the_walk_lets_go_of_the_previous_results_it_did_not_reuse():
    """Results of the last block that the reverse walk did not write into again (a
    convolution's weight gradient allocates its own) are freed once the walk is done,
    before autograd allocates the gradients: held until the end of the backward pass,
    they made every step of a training loop fault tens of MB of fresh pages in."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.Flatten(), nn.Linear(64 * 9, 3)
    ).to(DT)
    big = model[2].weight  # 64·64·9·8 B: above the recycling threshold, 9 positions: weight-gradient route
    assert big.nbytes >= _memory._RECYCLE_MIN_BYTES
    loss_fn = nn.CrossEntropyLoss()
    X, y = torch.randn(2, 3, 3, 3, dtype=DT, requires_grad=True), torch.randint(0, 3, (2,))
    held_after_walk = []
    for _ in range(3):
        with extend(model, DiagGGNApprox()):
            handle = X.register_hook(lambda g: held_after_walk.append(_memory.held_bytes()))
            loss_fn(model(X), y).backward()
            handle.remove()
    compare(collect(model, 2, ("DiagGGNApprox",)), reference(model, X.detach(), lambda o: loss_fn(o, y)), None)
    # X's gradient comes after the walk: from the second block on, no idle result is held then
    assert all(free < big.nbytes for _, free in held_after_walk[1:]), held_after_walk


def test_few_position_convolution_weight_diagonals_are_recycled():
    """The GEMM route of a convolution's weight diagonal (at most four output positions
    per sample) writes into the memory of the previous block's result."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 4, 3)).to(DT)
    weight = model[0].weight
    loss_fn = nn.CrossEntropyLoss()
    assert weight.nbytes >= _memory._RECYCLE_MIN_BYTES
    X, y = torch.randn(3, 64, 2, 2, dtype=DT), torch.randint(0, 3, (3,))
    ptrs = []
    for _ in range(3):
        with extend(model, DiagGGNApprox()):
            loss_fn(model(X), y).backward()
        ptrs.append(_storage(weight.diag_ggn_approx))
    compare(collect(model, 3, ("DiagGGNApprox",)), reference(model, X, lambda o: loss_fn(o, y)), None)
    assert ptrs[0] == ptrs[1] == ptrs[2], ptrs  # each block writes into the last one's result


@pytest.mark.parametrize("case", ["two_forward_passes", "long_block", "two_models"])
def test_buffers_stay_for_a_later_walk_of_the_same_backward(monkeypatch, case):
    """One backward pass that reaches two walks (two forward passes, or two models' blocks):
    the first walk does not let go of what the second reuses, so that from the third step
    on no large buffer is made anew."""
    torch.manual_seed(5)

    def net():
        return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4)).to(DT)  # 512 KiB weight

    model, other = net(), net()
    loss_fn = nn.CrossEntropyLoss()
    fresh, made = [], _memory._fresh

    def counting(shape, dtype, device):
        out = made(shape, dtype, device)
        fresh[-1] += out.nbytes
        return out

    monkeypatch.setattr(_memory, "_fresh", counting)
    long_block = extend(model, DiagGGNApprox()) if case == "long_block" else None
    if long_block is not None:
        long_block.__enter__()
    try:
        for _ in range(5):
            fresh.append(0)
            X1, X2 = torch.randn(3, 256, dtype=DT), torch.randn(3, 256, dtype=DT)
            y1, y2 = torch.randint(0, 4, (3,)), torch.randint(0, 4, (3,))
            if case == "two_models":
                with extend(model, DiagGGNApprox()), extend(other, DiagGGNApprox()):
                    (loss_fn(model(X1), y1) + loss_fn(other(X2), y2)).backward()
            elif case == "long_block":
                (loss_fn(model(X1), y1) + loss_fn(model(X2), y2)).backward()
            else:
                with extend(model, DiagGGNApprox()):
                    (loss_fn(model(X1), y1) + loss_fn(model(X2), y2)).backward()
    finally:
        if long_block is not None:
            long_block.__exit__(None, None, None)
    assert fresh[0] > 0 and fresh[2:] == [0, 0, 0], fresh
    if case != "two_models":  # the results of the last step, against the reference of both losses
        X = torch.cat([X1, X2])
        compare(collect(model, 6, ("DiagGGNApprox",)), reference(model, X, lambda o: loss_fn(o[:3], y1) + loss_fn(o[3:], y2)), None)


def test_a_block_refused_at_entry_leaves_no_block_behind():
    """An extension that refuses the model when the block starts (here GGNVectorProduct
    without a vector for a trainable parameter) leaves the memory bookkeeping as it was:
    a later block still lets go of the buffers its walk did not reuse."""
    from curvhook.errors import CurvhookError
    from curvhook.extensions import GGNVectorProduct

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    active = getattr(_memory._blocks, "active", 0)
    vectors = {p: torch.zeros_like(p) for p in list(model.parameters())[1:]}
    with pytest.raises(CurvhookError):
        with extend(model, GGNVectorProduct(vectors)):
            pass
    assert getattr(_memory._blocks, "active", 0) == active
