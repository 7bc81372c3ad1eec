"""DiagGGNApprox against a plain training step as resnet18 and BERT grow.

The issue's targets (DiagGGNApprox ÷ plain ≤ 2 on resnet18 and BERT) name no
size. At the small sizes of ``benchmarks/real_models.py`` curvhook's fixed
work per recorded operation, and the few-position layers at the end of a CNN
on 32×32 images, weigh most; at the sizes people train, the arithmetic does:
each layer's extra backward is the same GEMMs or convolutions as the plain
backward. This script times both at several sizes (float32, batch 8, every
parameter trainable, a new ``extend`` block per step as the README writes it,
the two methods interleaved, median):

- torchvision ``resnet18`` (10 classes) on ``S×S`` images, ``--images``;
- Hugging Face ``BertForSequenceClassification`` (10 labels, vocabulary 1000,
  dropout 0, ``hidden // 64`` heads, at least 2, MLP ``4·hidden``) given as
  ``hidden,layers,tokens``, ``--berts``.

Usage::

    python -m benchmarks.scaling --images 32 64 128 224 --berts 128,2,64 256,4,128 512,4,128 768,12,128

It needs the ``models`` extra (torchvision, transformers).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Callable

import torch

from curvhook import extend
from curvhook.extensions import DiagGGNApprox


def _resnet18(size: int, batch: int) -> tuple[torch.nn.Module, Callable[[], torch.Tensor]]:
    """resnet18 on ``[batch, 3, size, size]`` images; returns the model and a closure giving the loss."""
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).eval()
    X, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    criterion = torch.nn.CrossEntropyLoss()
    return model, lambda: criterion(model(X), y)


def _bert(hidden: int, layers: int, tokens: int, batch: int) -> tuple[torch.nn.Module, Callable[[], torch.Tensor]]:
    """A BERT classifier on ``[batch, tokens]`` ids; returns the model and a closure giving the loss."""
    import transformers as tf

    config = tf.BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 2),
                           intermediate_size=4 * hidden, max_position_embeddings=max(512, tokens), num_labels=10,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, vocab_size=1000)
    model = tf.BertForSequenceClassification(config)
    ids, y = torch.randint(0, 1000, (batch, tokens)), torch.randint(0, 10, (batch,))
    criterion = torch.nn.CrossEntropyLoss()
    return model, lambda: criterion(model(input_ids=ids).logits, y)


def time_pair(
    model: torch.nn.Module, loss: Callable[[], torch.Tensor], rounds: int, warmup: int = 2, settle: int = 1
) -> tuple[float, float]:
    """Median seconds of a plain step and of a DiagGGNApprox step, interleaved round by round.

    In each round a method runs ``settle`` untimed steps before its timed one, so that the
    timed step follows a step of its own kind, as in a training loop (page faults depend on
    what the previous step allocated and freed).
    """

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        loss().backward()

    def approx() -> None:
        model.zero_grad(set_to_none=True)
        with extend(model, DiagGGNApprox()):
            loss().backward()

    times: dict[str, list[float]] = {"plain": [], "approx": []}
    for r in range(warmup + rounds):
        for label, step in (("plain", plain), ("approx", approx)):
            for _ in range(settle):
                step()
            start = time.perf_counter()
            step()
            if r >= warmup:
                times[label].append(time.perf_counter() - start)
    return statistics.median(times["plain"]), statistics.median(times["approx"])


def _rounds(plain_seconds: float, budget: float, settle: int = 1) -> int:
    """Rounds that fit ``budget`` seconds (a DiagGGNApprox step counted as 2.5 plain steps,
    ``1 + settle`` steps of each per round), 3 to 15."""
    return max(3, min(15, int(budget / (3.5 * (1 + settle) * plain_seconds))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, nargs="*", default=[32, 64, 128, 224], help="resnet18 image sizes")
    parser.add_argument("--berts", nargs="*", default=["128,2,64", "256,4,128", "512,4,128", "768,12,128"],
                        help="BERT sizes as hidden,layers,tokens")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0, help="time budget per size (sets the rounds)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--settle", type=int, default=1, help="untimed steps of a method before its timed one, per round")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [(f"resnet18, {s}×{s} images", lambda s=s: _resnet18(s, args.batch)) for s in args.images]
    for spec in args.berts:
        hidden, layers, tokens = map(int, spec.split(","))
        cases.append((f"BERT, hidden {hidden}, {layers} layers, {tokens} tokens",
                      lambda h=hidden, n=layers, t=tokens: _bert(h, n, t, args.batch)))
    print(f"batch {args.batch}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| model | plain step (ms) | DiagGGNApprox (ms) | DiagGGNApprox ÷ plain |")
    print("|---|---:|---:|---:|")
    for label, build in cases:
        torch.manual_seed(0)
        model, loss = build()
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        loss().backward()  # one plain step sizes the rounds
        rounds = _rounds(time.perf_counter() - start, args.seconds, args.settle)
        plain, approx = time_pair(model, loss, rounds, settle=args.settle)
        print(f"| {label} | {1e3 * plain:.1f} | {1e3 * approx:.1f} | {approx / plain:.2f} |", flush=True)


if __name__ == "__main__":
    main()
