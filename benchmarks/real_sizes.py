"""One DiagGGNApprox step on vision models at their real widths (random weights).

The real-model tests use tiny configs; this script builds torchvision and timm
models by their own constructors at full width, on small images, and times one
plain step and one DiagGGNApprox step (a new ``extend`` block, as the README
tells users), and lists the operations and modules that took the slow paths
(dense per-sample Jacobians, the fallback). Single runs: the first step's plan
building is included. Cap the memory (``ulimit -v``) when trying a new model:
a dense path can ask for tens of gigabytes.

Usage::

    python -m benchmarks.real_sizes tv.swin_v2_t:64 tv.maxvit_t:224 timm.convnextv2_atto:64
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn

from curvhook import extend
from curvhook.extensions import DiagGGNApprox


def build(name: str, size: int) -> nn.Module:
    """``tv.<torchvision constructor>`` or ``timm.<timm model name>``, 10 classes, eval mode."""
    if name.startswith("tv."):
        import torchvision

        return getattr(torchvision.models, name[3:])(num_classes=10).eval()
    import timm

    try:
        return timm.create_model(name[5:], num_classes=10, img_size=size).eval()
    except TypeError:  # models without an img_size argument
        return timm.create_model(name[5:], num_classes=10).eval()


def run(name: str, size: int, batch: int) -> None:
    torch.manual_seed(0)
    model = build(name, size)
    X, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    start = time.perf_counter()
    nn.CrossEntropyLoss()(model(X), y).backward()
    plain = time.perf_counter() - start
    model.zero_grad()
    for m in model.modules():  # timm's attention biases kept from the plain step (docs/supported.md)
        if isinstance(getattr(m, "attention_bias_cache", None), dict):
            m.attention_bias_cache = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        try:
            with extend(model, DiagGGNApprox()):
                nn.CrossEntropyLoss()(model(X), y).backward()
            result = f"DiagGGNApprox {time.perf_counter() - start:.2f} s"
        except Exception as err:  # noqa: BLE001 - reported, the next model runs
            result = f"{type(err).__name__}: {str(err)[:200]}"
    slow = sorted({str(w.message).split(":")[0] for w in caught if "closed-form" in str(w.message) or "no rule" in str(w.message)})
    print(f"{name} ({size}×{size}, batch {batch}): plain {plain:.2f} s, {result}")
    for line in slow:
        print(f"    slow path: {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="name:image_size, e.g. tv.swin_v2_t:64 or timm.levit_128s:224")
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    for spec in args.models:
        name, _, size = spec.partition(":")
        run(name, int(size or 64), args.batch)


if __name__ == "__main__":
    main()
