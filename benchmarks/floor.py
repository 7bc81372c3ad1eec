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

Example::

    python -m benchmarks.floor --problem mlp fullggn --rounds 9

Only ``nn.Sequential`` models of ``Linear``, ``ReLU`` and ``Flatten`` with a
default ``CrossEntropyLoss`` (mean over class-index targets) are supported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor, nn

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


class Bare:
    """DiagGGNApprox for one Linear/ReLU chain with mean cross-entropy, in straight-line code.

    Forward hooks keep ``(input, output)`` of every layer; a hook on the model
    output starts from ``d = (p - p∘p) / N`` (``p = softmax(f)``, ``[N, C]``) and
    walks the layers backwards: ``nn.Linear`` writes ``dᵀ (x∘x)`` (``[out, in]``)
    and ``Σ_n d`` (``[out]``) and passes ``d (W∘W)`` on; ``ReLU`` passes
    ``d ∘ 1[y > 0]`` on; ``Flatten`` reshapes ``d``.
    """

    def __init__(self, model: nn.Sequential) -> None:
        self.model = model
        self.layers = list(model)
        self.seen: dict[nn.Module, tuple[Tensor, Tensor, bool]] = {}
        self.results: dict[nn.Parameter, Tensor] = {}
        self._handles = [m.register_forward_hook(self._keep) for m in self.layers]

    def _keep(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self.seen[module] = (args[0].detach(), output.detach(), args[0].requires_grad)

    def forward(self, X: Tensor) -> Tensor:
        out = self.model(X)
        f = out.detach()  # no reference to ``out`` in its own hook: no cycle
        out.register_hook(lambda grad: self._backward(f))
        return out

    def _backward(self, f: Tensor) -> None:
        p = f.softmax(1)
        d = torch.addcmul(p, p, p, value=-1).div_(f.shape[0])  # diag of the mean CE Hessian
        for module in reversed(self.layers):
            x, y, x_needs_grad = self.seen.pop(module)
            if isinstance(module, nn.Linear):
                self.results[module.weight] = d.t() @ x.square()
                if module.bias is not None:
                    self.results[module.bias] = d.sum(0)
            if not x_needs_grad:  # a chain: nothing upstream has parameters (curvhook stops too)
                break
            if isinstance(module, nn.Linear):
                d = d @ module.weight.detach().square()
            elif isinstance(module, nn.ReLU):
                d = d * (y > 0)
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
    bare = Bare(pb.model)
    try:
        pb.loss_fn(bare.forward(pb.X), pb.y).backward()
    finally:
        bare.close()
    worst = 0.0
    for p in pb.params:
        ref = p.diag_ggn_approx
        worst = max(worst, float((bare.results[p] - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
        del p.diag_ggn_approx
    return worst


def measure(pb: P.Problem, rounds: int, steps: int) -> dict:
    """Alternate plain, curvhook and bare ``rounds`` times; per-round medians and ratios.

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

    times: dict[str, list[float]] = {"plain": [], "curvhook": [], "bare": []}
    for _ in range(rounds):
        times["plain"].append(_median_us(plain, steps))
        with extend(model, DiagGGNApprox()):
            times["curvhook"].append(_median_us(plain, steps))
        bare = Bare(model)
        try:
            def bare_step() -> None:
                zero_grad()
                loss_fn(bare.forward(X), y).backward()

            times["bare"].append(_median_us(bare_step, steps))
        finally:
            bare.close()
    ratio = {
        name: statistics.median(t / base for t, base in zip(ts, times["plain"])) for name, ts in times.items()
    }
    return {"times_us": times, "ratio": ratio}


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.floor", description=__doc__.split("\n\n")[0])
    ap.add_argument("--problem", nargs="+", default=["mlp", "fullggn"])
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9, help="alternations of the three variants")
    ap.add_argument("--steps", type=int, default=100, help="timed steps per variant and round")
    ap.add_argument("--json", default=None, help="write the results to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    results = {}
    print(f"{'problem':10s} {'plain µs':>9s} {'curvhook':>9s} {'bare':>9s}  ratio to plain: curvhook, bare  "
          "(medians over rounds; bare vs curvhook max rel. diff)")
    for name in args.problem:
        if name not in P.SPECS:
            raise SystemExit(f"Unknown problem {name!r}; choose from {list(P.SPECS)}.")
        pb = P.make(name, args.batch_size)
        _check_supported(pb)
        agree = agreement(pb)
        res = measure(pb, args.rounds, args.steps)
        res["agreement"] = agree
        results[name] = res
        med = {k: statistics.median(v) for k, v in res["times_us"].items()}
        print(f"{name:10s} {med['plain']:9.0f} {med['curvhook']:9.0f} {med['bare']:9.0f}  "
              f"{res['ratio']['curvhook']:.2f}, {res['ratio']['bare']:.2f}  ({agree:.1e})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=1)
    return results


if __name__ == "__main__":
    main()
