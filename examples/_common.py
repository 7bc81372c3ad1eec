"""What the examples share: the quick mode, the digits data, accuracy, saving a picture.

Not an example itself: ``python examples/<name>.py`` puts this folder on the
import path, and each example imports what it needs from here.
"""

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # pictures are written to files; no display needed
import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import nn

# CURVHOOK_EXAMPLES_QUICK=1: fewer epochs and steps (the smoke test, tests/test_examples.py)
QUICK = os.environ.get("CURVHOOK_EXAMPLES_QUICK") == "1"
# where the pictures go (the smoke test points it at a temporary folder)
IMAGES = Path(os.environ.get("CURVHOOK_EXAMPLES_IMAGES", Path(__file__).resolve().parent / "images"))


def setup_torch() -> None:
    """Two threads at most (small models: more only add overhead) and subnormal floats flushed
    to zero (the tiny gradients and curvatures late in training are slow subnormals on CPUs)."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.set_flush_denormal(True)


def shuffled_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits in a fixed random order: pixels scaled to [0, 1] ``[1797, 64]``, labels ``[1797]``."""
    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    return X[order], y[order]


@torch.no_grad()
def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of correctly classified samples."""
    return (model(X).argmax(1) == y).float().mean().item()


def save_figure(fig, path: Path) -> None:
    """Lay out ``fig``, write it to ``path`` (creating its folder) and close it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
