"""The floor of DiagGGNApprox on chains of Linear and ReLU: what a bare implementation costs.

curvhook's step on the small MLPs is the plain step, the extra arithmetic of
DiagGGNApprox (a ``dᵀ (x∘x)`` and a ``d (W∘W)`` GEMM per ``nn.Linear``) and
the fixed cost of its machinery: recording every module call, the
torch-function mode that finds the loss and follows what is computed from it,
the check that the backpropagated scalar is the loss, the graph checks and the
engine. This script measures how much of the ratio to plain is machinery, by
timing, in one process and alternating round by round:

- ``plain``: forward, cross-entropy, ``backward()``;
- ``curvhook``: the same inside ``extend(model, DiagGGNApprox())``;
- ``bare``: plain forward hooks that keep each layer's input and output, and a
  tensor hook on the model output that computes the same diagonals in
  straight-line code written for this one model and loss. It finds no loss,
  checks nothing and records no operation: the least any hook-based
  implementation can do. Its results are compared with curvhook's first.
- ``guarded``: ``bare`` plus the two guarantees the core issue asks for
  ("never a silent wrong number") at their cheapest: a pass-through
  torch-function mode active in the block (what it takes to see the functions
  of a loss value, ``loss ** 2``, that change the Hessian), and the check, in
  the output hook, that the gradient reaching the output is that of the loss
  (no extra term), with targets checked for ``ignore_index``.

Example::

    python -m benchmarks.floor --problem mlp fullggn --rounds 9
    python -m benchmarks.floor --problem mlp fullggn --batch-size 32 128 512 2048   # how it scales

Only ``nn.Sequential`` models of ``Linear``, ``ReLU`` and ``Flatten`` with a
default ``CrossEntropyLoss`` (mean over class-index targets) are supported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from benchmarks import problems as P

_LAYERS = (nn.Linear, nn.ReLU, nn.Flatten)


def _check_supported(pb: P.Problem) -> None:
    """Raise a clear error unless ``pb`` is a chain the bare implementation covers."""
    model, loss = pb.model, pb.loss_fn
    if not isinstance(model, nn.Sequential) or not all(isinstance(m, _LAYERS) for m in model):
        raise SystemExit(
            f"benchmarks.floor covers nn.Sequential chains of Linear, ReLU and Flatten; "
            f"problem {pb.name!r} is not one (try mlp or fullggn)."
        )
    default = nn.CrossEntropyLoss()
    if not (
        type(loss) is nn.CrossEntropyLoss and loss.reduction == "mean" and loss.weight is None
        and loss.label_smoothing == 0 and not pb.y.dtype.is_floating_point and bool((pb.y >= 0).all())
        and loss.ignore_index == default.ignore_index
    ):
        raise SystemExit("benchmarks.floor needs a default CrossEntropyLoss on class-index targets.")


class PassThrough(TorchFunctionMode):
    """A torch-function mode that only calls the function: the dispatch cost of any mode."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class Bare:
    """DiagGGNApprox for one Linear/ReLU chain with mean cross-entropy, in straight-line code.

    Forward hooks keep ``(input, output)`` of every layer; a hook on the model
    output starts from ``d = (p - p∘p) / N`` (``p = softmax(f)``, ``[N, C]``) and
    walks the layers backwards: ``nn.Linear`` writes ``dᵀ (x∘x)`` (``[out, in]``)
    and ``Σ_n d`` (``[out]``) and passes ``d (W∘W)`` on; ``ReLU`` passes
    ``d ∘ 1[y > 0]`` on; ``Flatten`` reshapes ``d``.

    Args:
        model: The chain.
        guarded: Also check, before using ``d``, that no target is ignored and
            that the gradient at the output is ``(p - one_hot(y)) / N``.
    """

    def __init__(self, model: nn.Sequential, guarded: bool = False) -> None:
        self.model = model
        self.guarded = guarded
        self.layers = list(model)
        self.seen: dict[nn.Module, tuple[Tensor, Tensor, bool]] = {}
        self.results: dict[nn.Parameter, Tensor] = {}
        self._handles = [m.register_forward_hook(self._keep) for m in self.layers]

    def _keep(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self.seen[module] = (args[0].detach(), output.detach(), args[0].requires_grad)

    def forward(self, X: Tensor, y: Tensor) -> Tensor:
        """The model output ``[N, C]``; its gradient will start the diagonal pass (targets ``y``, ``[N]``)."""
        out = self.model(X)
        f = out.detach()  # no reference to ``out`` in its own hook: no cycle
        out.register_hook(lambda grad: self._backward(f, y, grad))
        return out

    def _backward(self, f: Tensor, y: Tensor, grad: Tensor) -> None:
        p = f.softmax(1)
        a = 1.0 / f.shape[0]
        if self.guarded:
            if int(y.min()) < 0:
                raise RuntimeError("ignored targets: not covered")
            residual = torch.sub(grad, p, alpha=a).scatter_(1, y.unsqueeze(1), a, reduce="add")
            diff, size = torch.linalg.vector_norm(torch.stack([residual, grad]), float("inf"), dim=(1, 2)).tolist()
            if diff > 1e-4 * (2 * size + diff):
                raise RuntimeError("the gradient at the output is not that of the loss")
        d = torch.addcmul(p, p, p, value=-1).mul_(a)  # diag of the mean CE Hessian
        for module in reversed(self.layers):
            x, out, x_needs_grad = self.seen.pop(module)
            if isinstance(module, nn.Linear):
                self.results[module.weight] = d.t() @ x.square()
                if module.bias is not None:
                    self.results[module.bias] = d.sum(0)
            if not x_needs_grad:  # a chain: nothing upstream has parameters (curvhook stops too)
                break
            if isinstance(module, nn.Linear):
                d = d @ module.weight.detach().square()
            elif isinstance(module, nn.ReLU):
                d = d * (out > 0)
            else:  # Flatten
                d = d.reshape(x.shape)
        self.seen.clear()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self.seen.clear()


def _median_us(step: Callable[[], None], steps: int) -> float:
    """Median wall time of ``steps`` calls of ``step`` after three warm-up calls, in µs."""
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def agreement(pb: P.Problem) -> float:
    """``max|bare - curvhook| / max|curvhook|`` over all parameters, after one step each."""
    from curvhook import extend
    from curvhook.extensions import DiagGGNApprox

    with extend(pb.model, DiagGGNApprox()):
        pb.loss_fn(pb.model(pb.X), pb.y).backward()
    bare = Bare(pb.model, guarded=True)
    try:
        pb.loss_fn(bare.forward(pb.X, pb.y), pb.y).backward()
    finally:
        bare.close()
    worst = 0.0
    for p in pb.params:
        ref = p.diag_ggn_approx
        worst = max(worst, float((bare.results[p] - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
        del p.diag_ggn_approx
    return worst


def measure(pb: P.Problem, rounds: int, steps: int) -> dict:
    """Alternate plain, curvhook, bare and guarded ``rounds`` times; per-round medians and ratios.

    Returns:
        ``{"times_us": {variant: [per round]}, "ratio": {variant: median ratio to plain}}``.
    """
    from curvhook import extend
    from curvhook.extensions import DiagGGNApprox

    model, X, y, loss_fn, params = pb.model, pb.X, pb.y, pb.loss_fn, pb.params

    def zero_grad() -> None:
        for p in params:
            p.grad = None

    def plain() -> None:
        zero_grad()
        loss_fn(model(X), y).backward()

    times: dict[str, list[float]] = {"plain": [], "curvhook": [], "bare": [], "guarded": []}
    for _ in range(rounds):
        times["plain"].append(_median_us(plain, steps))
        with extend(model, DiagGGNApprox()):
            times["curvhook"].append(_median_us(plain, steps))
        for name in ("bare", "guarded"):
            bare = Bare(model, guarded=name == "guarded")
            try:
                def bare_step() -> None:
                    zero_grad()
                    loss_fn(bare.forward(X, y), y).backward()

                with PassThrough() if bare.guarded else contextlib.nullcontext():
                    times[name].append(_median_us(bare_step, steps))
            finally:
                bare.close()
    ratio = {
        name: statistics.median(t / base for t, base in zip(ts, times["plain"])) for name, ts in times.items()
    }
    return {"times_us": times, "ratio": ratio}


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.floor", description=__doc__.split("\n\n")[0])
    ap.add_argument("--problem", nargs="+", default=["mlp", "fullggn"])
    ap.add_argument("--batch-size", type=int, nargs="+", default=[None],
                    help="one or more batch sizes (default: each problem's own); one row per problem and size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9, help="alternations of the four variants")
    ap.add_argument("--steps", type=int, default=100, help="timed steps per variant and round")
    ap.add_argument("--json", default=None, help="write the results to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    results = {}
    names = ("plain", "curvhook", "bare", "guarded")
    print(f"{'problem':10s}{'N':>6s}" + "".join(f"{n + ' µs':>12s}" for n in names)
          + "   ratio to plain: curvhook, bare, guarded   (bare vs curvhook: max rel. diff)")
    for name in args.problem:
        if name not in P.SPECS:
            raise SystemExit(f"Unknown problem {name!r}; choose from {list(P.SPECS)}.")
        for size in args.batch_size:
            pb = P.make(name, size)
            _check_supported(pb)
            agree = agreement(pb)
            res = measure(pb, args.rounds, args.steps)
            res["agreement"] = agree
            res["batch_size"] = pb.batch_size
            results[name if len(args.batch_size) == 1 else f"{name}@N={pb.batch_size}"] = res
            med = {k: statistics.median(v) for k, v in res["times_us"].items()}
            ratios = ", ".join(f"{res['ratio'][n]:.2f}" for n in names[1:])
            print(f"{name:10s}{pb.batch_size:6d}" + "".join(f"{med[n]:12.0f}" for n in names)
                  + f"   {ratios}   ({agree:.1e})", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=1)
    return results


if __name__ == "__main__":
    main()
