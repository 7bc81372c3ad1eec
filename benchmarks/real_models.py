"""Timings on real models: DiagGGNApprox and DiagGGN against a plain training step.

The models are those of the real-model tests (``tests/models/zoo.py``: tiny
configs from torchvision, timm and transformers, random weights), here in
float32 with every parameter trainable, as a user trains them. Each step is
written as the README tells users: a new ``with extend(model, X()):`` block
around forward, loss and backward. The methods take turns round by round, so
that a noisy machine slows them alike; in each round a method runs
``--settle`` untimed steps before its timed one, so that every timed step
follows a step of the same method, as in a training loop (a step's page faults
depend on what the step before it allocated and freed: a plain step right after
a curvhook step, or the reverse, is not what either loop runs). The median per
method is reported with its ratio to the plain step, and the median number of
minor page faults of each method's timed steps is printed below its row.

``--size medium`` builds the same families at a realistic small size
(transformers: hidden 128, 2 layers, 4 heads, 64 tokens, vocabulary 1000;
ViTs: 32×32 images, patches of 4, 2 layers; CNNs as they are, on 32×32 or
64×64 images) instead of the tiny test configs, whose time is mostly fixed
per-operation overhead. ``--methods`` leaves methods out (DiagGGN, with one
backpropagated column per class and position, is slow on language models).

Usage::

    python -m benchmarks.real_models --batch 8 --rounds 15 --markdown real.md
    python -m benchmarks.real_models --size medium --methods plain DiagGGNApprox
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from typing import Callable, Optional

import torch

try:  # page-fault counts (Unix)
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "models"))
import zoo  # noqa: E402
from zoo import MODELS, ZooCase, available  # noqa: E402

from curvhook import extend  # noqa: E402
from curvhook.extensions import DiagGGN, DiagGGNApprox  # noqa: E402


# ------------------------------------------------------------ medium size
M_VOCAB, M_LENGTH, M_CLASSES = 1000, 64, 10
MEDIUM_HF = frozenset({"transformers.Bert", "transformers.DistilBert", "transformers.GPT2", "transformers.Llama"})
MEDIUM_VISION = frozenset({
    "torchvision.resnet18", "torchvision.mobilenet_v3_small", "torchvision.convnext_tiny",
    "torchvision.VisionTransformer", "timm.vit_tiny", "timm.mobilevitv2_050", "timm.convnext_atto", "timm.resnet10t",
})  # the zoo's other families have no medium builder here: benchmarks.real_sizes builds them at full width


def _medium_ids(n: int) -> torch.Tensor:
    return torch.randint(0, M_VOCAB, (n, M_LENGTH))


def _medium_text(n: int, model: torch.nn.Module, language_model: bool) -> ZooCase:
    if language_model:
        return zoo._language_model(model, _medium_ids(n), M_VOCAB, ("",))
    return zoo._classifier(model, "input_ids", _medium_ids(n), M_CLASSES, ("",), logits=lambda out: out.logits)


def _medium_hf(name: str, n: int) -> ZooCase:
    """BERT, DistilBERT, GPT-2, Llama: hidden 128, 2 layers, 4 heads, 64 tokens, vocabulary 1000."""
    import transformers as tf

    common = dict(vocab_size=M_VOCAB, bos_token_id=0, eos_token_id=0)
    if name == "transformers.Bert":
        config = tf.BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                               max_position_embeddings=128, num_labels=M_CLASSES, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0, vocab_size=M_VOCAB)
        return _medium_text(n, tf.BertForSequenceClassification(config), False)
    if name == "transformers.DistilBert":
        config = tf.DistilBertConfig(dim=128, n_layers=2, n_heads=4, hidden_dim=512, max_position_embeddings=128,
                                     num_labels=M_CLASSES, dropout=0.0, attention_dropout=0.0,
                                     seq_classif_dropout=0.0, vocab_size=M_VOCAB)
        return _medium_text(n, tf.DistilBertForSequenceClassification(config), False)
    if name == "transformers.GPT2":
        config = tf.GPT2Config(n_embd=128, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
                               attn_pdrop=0.0, **common)
        return _medium_text(n, tf.GPT2LMHeadModel(config), True)
    if name != "transformers.Llama":
        raise KeyError(f"no medium size of {name}")
    config = tf.LlamaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=344, max_position_embeddings=128, pad_token_id=0, **common)
    return _medium_text(n, tf.LlamaForCausalLM(config), True)


def _medium_vision(name: str, n: int) -> ZooCase:
    """ViTs on 32×32 images (patches of 4, 2 layers); CNNs as they are on 32×32 (MobileViT 64×64)."""
    size = 64 if name == "timm.mobilevitv2_050" else 32
    if name == "torchvision.VisionTransformer":
        import torchvision

        model = torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=2, num_heads=4,
                                                     hidden_dim=128, mlp_dim=512, num_classes=M_CLASSES)
    elif name == "timm.vit_tiny":
        import timm

        model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2,
                                  num_classes=M_CLASSES)  # embed 192, 3 heads
    elif name.startswith("timm."):
        import timm

        model = timm.create_model(name.split(".", 1)[1], num_classes=M_CLASSES).eval()
    else:
        import torchvision

        model = getattr(torchvision.models, name.split(".", 1)[1])(num_classes=M_CLASSES).eval()
    return zoo._classifier(model, "x", zoo._images(size, n), M_CLASSES, ("",))


def medium(name: str, n: int) -> ZooCase:
    """The model family ``name`` of the zoo at a realistic small size (see the module docstring)."""
    return _medium_hf(name, n) if name.startswith("transformers.") else _medium_vision(name, n)


METHODS = ("plain", "DiagGGN", "DiagGGNApprox")


def _step(case, extension) -> Callable[[], None]:
    def plain() -> None:
        case.model.zero_grad(set_to_none=True)
        case.loss(case.logits(case.forward()), case.criterion).backward()

    def extended() -> None:
        case.model.zero_grad(set_to_none=True)
        with extend(case.model, extension()):
            case.loss(case.logits(case.forward()), case.criterion).backward()

    return plain if extension is None else extended


def time_model(
    name: str, batch: int, rounds: int, warmup: int = 2, size: str = "tiny", methods: tuple = METHODS,
    settle: int = 1, faults: Optional[dict[str, float]] = None,
) -> dict[str, float]:
    """Median seconds per step of each of ``methods`` on one model (tiny zoo config or ``size="medium"``).

    Each round runs, per method, ``settle`` untimed steps and then the timed one.
    Where ``faults`` is a dict (and the platform counts them), it receives the median
    number of minor page faults of each method's timed steps.
    """
    _, build = MODELS[name]
    torch.manual_seed(0)
    case = build(batch) if size == "tiny" else medium(name, batch)
    case.model.float()
    for p in case.model.parameters():
        p.requires_grad_(True)
    case.inputs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in case.inputs.items()}
    extensions = {"plain": None, "DiagGGN": DiagGGN, "DiagGGNApprox": DiagGGNApprox}
    steps = {m: _step(case, extensions[m]) for m in methods}
    times: dict[str, list[float]] = {k: [] for k in steps}
    faulted: dict[str, list[int]] = {k: [] for k in steps}
    for r in range(warmup + rounds):
        for label, step in steps.items():
            for _ in range(settle):
                step()
            before = _minor_faults()
            start = time.perf_counter()
            step()
            if r >= warmup:
                times[label].append(time.perf_counter() - start)
                faulted[label].append(_minor_faults() - before)
    if faults is not None and resource is not None:
        faults.update({k: statistics.median(v) for k, v in faulted.items()})
    return {k: statistics.median(v) for k, v in times.items()}


def _minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is missing)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def _row(name: str, t: dict[str, float]) -> str:
    """One table row; ``—`` for a method left out."""
    ms = lambda k: f"{1e3 * t[k]:.1f}" if k in t else "—"  # noqa: E731
    ratio = lambda k: f"{t[k] / t['plain']:.2f}" if k in t else "—"  # noqa: E731
    return f"| {name} | {ms('plain')} | {ms('DiagGGN')} | {ms('DiagGGNApprox')} | {ratio('DiagGGN')} | {ratio('DiagGGNApprox')} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--size", choices=("tiny", "medium"), default="tiny")
    parser.add_argument("--methods", nargs="*", choices=METHODS, default=list(METHODS))
    parser.add_argument("--settle", type=int, default=1, help="untimed steps of a method before its timed one, per round")
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
        if args.size == "medium" and name not in MEDIUM_HF | MEDIUM_VISION:
            print(f"{name}: no medium size, skipped", flush=True)
            continue
        faults: dict[str, float] = {}
        t = time_model(name, args.batch, args.rounds, size=args.size, methods=tuple(dict.fromkeys(["plain", *args.methods])),
                       settle=args.settle, faults=faults)
        row = _row(name, t)
        print(row, flush=True)
        if faults:  # a step that faults many pages in is slowed by malloc, not by its arithmetic
            print("    minor page faults per timed step (median): "
                  + ", ".join(f"{k} {v:,.0f}" for k, v in faults.items()), flush=True)
        rows.append(row)
    header = (
        f"torch {torch.__version__}, float32, size {args.size}, batch {args.batch}, {torch.get_num_threads()} threads, "
        f"median of {args.rounds} interleaved rounds ({args.settle} untimed step(s) of a method before its timed one), "
        "a new extend block per step\n\n"
    )
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(header + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
