"""Results combined over two ``torch.distributed`` processes (gloo, localhost) against one process.

Two processes each run half of a batch; the reference is one process on the
whole batch (curvhook's own results there are tested against torch.func
elsewhere). Under ``DistributedDataParallel`` with a mean-reduced loss the
processes' results, averaged like DDP's gradients, must equal those of the
concatenated batch; with ``distributed="sum"`` and a sum-reduced loss, the sums.
Per-sample results are concatenated in rank order.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from curvhook import extend
from curvhook.errors import CurvhookError
from curvhook.extensions import KFAC, NTK, BatchGrad, BatchL2Grad, DiagGGN, FullGGN, OutputCovariance, SumGradSquared

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
# Samples per process. DDP averages the processes' mean losses, which is the mean over the
# concatenated batch when the processes hold equally many; the sums need no such care, and
# unequal sizes make the concatenation pad.
SIZES = {"mean": (3, 3), "sum": (3, 2)}


def setup(mode: str = "sum"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    n = sum(SIZES[mode])
    X, y = torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))
    return model, X, y


def make_extensions(model):
    var = {p: torch.full_like(p, 0.5) for p in model.parameters()}
    return [DiagGGN(), FullGGN(), KFAC(), BatchGrad(), BatchL2Grad(), SumGradSquared()], OutputCovariance(var)


def collect(model, exts, cov):
    out = {"ggn": exts[1].matrix.clone(), "covariance": cov.covariance.clone()}
    for ext in (exts[0], exts[3], exts[4], exts[5]):
        out[ext.attribute] = torch.cat([getattr(p, ext.attribute).reshape(getattr(p, ext.attribute).shape[0] if ext.concatenates else 1, -1) for p in model.parameters()], 1)
    out["kfac"] = torch.cat([torch.cat([a.flatten(), b.flatten()]) for a, b in (p.kfac for p in model.parameters())])
    return out


def single_process(mode: str):
    model, X, y = setup(mode)
    exts, cov = make_extensions(model)
    crit = nn.CrossEntropyLoss(reduction="mean" if mode == "mean" else "sum")
    with extend(model, *exts):
        crit(model(X), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with extend(model, cov):
        model(X).sum().backward()
    return collect(model, exts, cov), grads


def worker(rank: int, init: str, mode: str, accumulate: bool, queue) -> None:
    """One process: its half of the batch, its results put on ``queue``.

    It leaves with ``os._exit`` once the results are sent, without Python's teardown:
    before torch 2.8 the gloo process group's destructor joins its threads while
    holding the GIL, which a thread still freeing a collective's tensor needs
    (a deadlock: pytorch/pytorch#56297, fixed by #154976; it hung CI on torch 2.6).
    """
    code = 1
    try:
        _work(rank, init, mode, accumulate, queue)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        queue.close()
        queue.join_thread()  # the results are in the pipe
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _work(rank: int, init: str, mode: str, accumulate: bool, queue) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    model, X, y = setup(mode)
    sizes = SIZES[mode]
    start = sum(sizes[:rank])
    Xr, yr = X[start : start + sizes[rank]], y[start : start + sizes[rank]]
    exts, cov = make_extensions(model)
    if mode == "mean":  # DDP: distributed="mean" by default; the loss is each process's mean
        net = nn.parallel.DistributedDataParallel(model)
        crit, kwargs = nn.CrossEntropyLoss(), {}
    else:
        net, crit, kwargs = model, nn.CrossEntropyLoss(reduction="sum"), {"distributed": "sum"}
    if accumulate:  # one sample at a time, combined once when the block ends
        with extend(net, *exts, accumulate=True, **kwargs):
            for i in range(len(Xr)):
                scale = 1.0 / len(Xr) if mode == "mean" else 1.0
                (scale * crit(net(Xr[i : i + 1]), yr[i : i + 1])).backward()
    else:
        with extend(net, *exts, **kwargs):
            crit(net(Xr), yr).backward()
    grads = [p.grad.clone().numpy() for p in model.parameters()]
    with extend(net, cov, **kwargs):
        net(Xr).sum().backward()
    queue.put((rank, {k: v.numpy() for k, v in collect(model, exts, cov).items()}, grads))


def run_two(mode: str, accumulate: bool):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = "file://" + os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=worker, args=(r, init, mode, accumulate, queue)) for r in range(WORLD)]
        for p in procs:
            p.start()
        got = [queue.get(timeout=240) for _ in procs]
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
    return sorted(got, key=lambda g: g[0])


@pytest.mark.parametrize("accumulate", [False, True], ids=["one_backward", "accumulate"])
@pytest.mark.parametrize("mode", ["mean", "sum"], ids=["ddp_mean", "explicit_sum"])
def test_two_processes_equal_one_process_on_the_concatenated_batch(mode, accumulate):
    want, want_grad = single_process(mode)
    got = run_two(mode, accumulate)
    for rank, results, grads in got:
        for key, value in want.items():
            torch.testing.assert_close(torch.from_numpy(results[key]), value, rtol=1e-10, atol=1e-12, msg=lambda m: f"rank {rank} {key}: {m}")
        if mode == "mean":  # DDP's gradient is the concatenated batch's: the convention curvhook follows
            for g, w in zip(grads, want_grad):
                torch.testing.assert_close(torch.from_numpy(g), w, rtol=1e-10, atol=1e-12)


def test_no_process_group_means_no_reduction_and_explicit_modes_need_one():
    model, X, y = setup()
    with extend(model, DiagGGN()):  # not DDP, no group: each process its own (and no error)
        nn.CrossEntropyLoss()(model(X), y).backward()
    with pytest.raises(RuntimeError, match="process group"):
        extend(model, DiagGGN(), distributed="sum")
    with pytest.raises(ValueError, match="distributed"):
        extend(model, DiagGGN(), distributed="max")


def _refusal_worker(rank, init, queue):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        model, _, _ = setup()
        try:
            extend(model, NTK(), distributed="sum")
            queue.put("no error")
        except CurvhookError as err:
            queue.put(str(err))
        extend(model, NTK(), distributed=False)  # each process its own kernel: allowed
    finally:
        dist.destroy_process_group()


def test_ntk_refuses_to_be_combined_across_processes():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = "file://" + os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_refusal_worker, args=(r, init, queue)) for r in range(WORLD)]
        for p in procs:
            p.start()
        messages = [queue.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
    assert all("distributed=False" in m for m in messages), messages
