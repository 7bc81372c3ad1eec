"""Timings on real models: DiagGGNApprox and DiagGGN against a plain training step.

The models are those of the real-model tests (``tests/models/zoo.py``: tiny
configs from torchvision, timm and transformers, random weights), here in
float32 with every parameter trainable, as a user trains them. Each step is
written as the README tells users: a new ``with extend(model, X()):`` block
around forward, loss and backward. The methods take turns, one step each per
round, so that a noisy machine slows them alike; the median per method is
reported with its ratio to the plain step.

Usage::

    python -m benchmarks.real_models --batch 8 --rounds 15 --markdown real.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from typing import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "models"))
from zoo import MODELS, available  # noqa: E402

from curvhook import extend  # noqa: E402
from curvhook.extensions import DiagGGN, DiagGGNApprox  # noqa: E402


def _step(case, extension) -> Callable[[], None]:
    def plain() -> None:
        case.model.zero_grad(set_to_none=True)
        case.loss(case.logits(case.forward()), case.criterion).backward()

    def extended() -> None:
        case.model.zero_grad(set_to_none=True)
        with extend(case.model, extension()):
            case.loss(case.logits(case.forward()), case.criterion).backward()

    return plain if extension is None else extended


def time_model(name: str, batch: int, rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per step of plain, DiagGGN and DiagGGNApprox on one model."""
    _, build = MODELS[name]
    torch.manual_seed(0)
    case = build(batch)
    case.model.float()
    for p in case.model.parameters():
        p.requires_grad_(True)
    case.inputs = {k: v.float() if v.is_floating_point() else v for k, v in case.inputs.items()}
    steps = {"plain": _step(case, None), "DiagGGN": _step(case, DiagGGN), "DiagGGNApprox": _step(case, DiagGGNApprox)}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(warmup + rounds):
        for label, step in steps.items():
            start = time.perf_counter()
            step()
            if r >= warmup:
                times[label].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows = [
        f"| model | plain step (ms) | DiagGGN (ms) | DiagGGNApprox (ms) | DiagGGN ÷ plain | DiagGGNApprox ÷ plain |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in args.models:
        package, _ = MODELS[name]
        if not available(package):
            print(f"{name}: {package} not installed, skipped", flush=True)
            continue
        t = time_model(name, args.batch, args.rounds)
        row = (
            f"| {name} | {1e3 * t['plain']:.1f} | {1e3 * t['DiagGGN']:.1f} | {1e3 * t['DiagGGNApprox']:.1f} "
            f"| {t['DiagGGN'] / t['plain']:.2f} | {t['DiagGGNApprox'] / t['plain']:.2f} |"
        )
        print(row, flush=True)
        rows.append(row)
    header = (
        f"torch {torch.__version__}, float32, batch {args.batch}, {torch.get_num_threads()} threads, "
        f"median of {args.rounds} interleaved rounds, a new extend block per step\n\n"
    )
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(header + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
