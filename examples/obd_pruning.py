"""Pruning by Optimal Brain Damage against pruning by magnitude.

Setting weight θ_i to zero changes the loss, to second order around a
minimum (where the gradient vanishes), by

    ΔL ≈ ½ Σ_ij δθ_i H_ij δθ_j ≈ ½ θ_i² H_ii,     δθ = −θ_i e_i,

when the off-diagonal terms are ignored. Optimal Brain Damage (LeCun et al.,
1990) removes the weights with the smallest saliency ``½ θ_i² H_ii``; with the
GGN in place of the Hessian, ``H_ii`` is ``diag(G)`` of the training loss,
which ``curvhook.accumulate`` sums over the whole training set. Magnitude
pruning ranks by ``|θ_i|`` alone: it assumes every weight is equally curved.

An MLP is trained on scikit-learn's digits; its weights (not biases) are
pruned globally, across layers, to each sparsity without retraining, and the
test accuracy is plotted over the sparsity. The quadratic model holds only
near the weights it was computed at: removing most weights at once by one
ranking (one-shot) breaks it, while recomputing diag(G) after every 2% of
the weights (iterative OBD, still no retraining) follows the pruned network.

Run: ``python examples/obd_pruning.py`` (``CURVHOOK_EXAMPLES_QUICK=1``: fewer epochs).
"""

from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvhook
from curvhook.extensions import DiagGGN

from _common import QUICK, IMAGES, accuracy, save_figure, setup_torch, shuffled_digits

EPOCHS = 10 if QUICK else 40
SPARSITIES = [0.0, 0.5, 0.8, 0.9] if QUICK else [0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98]
STEP = 0.1 if QUICK else 0.02  # the fraction of the weights iterative OBD removes per round


def make_data() -> tuple[torch.Tensor, ...]:
    """scikit-learn's digits split 70/30, pixels scaled to [0, 1]."""
    X, y = shuffled_digits()
    split = int(0.7 * len(X))
    return X[:split], y[:split], X[split:], y[split:]


def train(X: torch.Tensor, y: torch.Tensor) -> nn.Module:
    """An MLP trained to convergence with Adam."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    loader = DataLoader(TensorDataset(X, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    for _ in range(EPOCHS):
        for xb, yb in loader:
            optimizer.zero_grad()
            criterion(model(xb), yb).backward()
            optimizer.step()
    return model


def saliencies(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """The two pruning scores of every weight matrix, by parameter name.

    Returns:
        ``{"OBD": {name: ½ θ² diag(G)}, "magnitude": {name: |θ|}}``, ``G`` the GGN of
        the summed training loss.
    """
    loader = DataLoader(TensorDataset(X, y), batch_size=256)
    results = curvhook.accumulate(
        model, loader, DiagGGN(), loss_fn=nn.CrossEntropyLoss(), reduction="sum", progress=False, write=False
    )
    weights = {name: p.detach() for name, p in model.named_parameters() if name.endswith("weight")}
    return {
        "OBD": {name: 0.5 * w**2 * results["diag_ggn"][name] for name, w in weights.items()},
        "magnitude": {name: w.abs() for name, w in weights.items()},
    }


@torch.no_grad()
def pruned_accuracy(model: nn.Module, scores: dict[str, torch.Tensor], sparsity: float, X, y) -> float:
    """Test accuracy after zeroing the fraction ``sparsity`` of weights with the lowest scores.

    The threshold is global: one ranking over the weights of all layers.
    """
    state = {name: value.clone() for name, value in model.state_dict().items()}
    everything = torch.cat([s.flatten() for s in scores.values()])
    count = int(sparsity * everything.numel())
    if count > 0:
        threshold = everything.kthvalue(count).values
        for name, p in model.named_parameters():
            if name in scores:
                p.mul_(scores[name] > threshold)
    result = accuracy(model, X, y)
    model.load_state_dict(state)
    return result


@torch.no_grad()
def iterative_obd(model: nn.Module, X: torch.Tensor, y: torch.Tensor, X_test, y_test, step: float = STEP) -> list[float]:
    """Test accuracy at each of ``SPARSITIES``, removing ``step`` of the weights at a time.

    Every round recomputes diag(G) on the pruned network (the curvature of the
    remaining weights changes as others are removed) and removes the weights
    with the lowest saliency among those still present. The model is restored
    afterwards.
    """
    state = {name: value.clone() for name, value in model.state_dict().items()}
    weights = {name: p for name, p in model.named_parameters() if name.endswith("weight")}
    total = sum(w.numel() for w in weights.values())
    pruned, curve = 0, []
    for sparsity in SPARSITIES:
        while pruned < int(sparsity * total):
            with torch.enable_grad():
                scores = saliencies(model, X, y)["OBD"]
            # Weights already removed rank last; the lowest of the others go.
            flat = torch.cat([torch.where(w != 0, scores[name], torch.inf).flatten() for name, w in weights.items()])
            count = min(int(sparsity * total) - pruned, max(1, int(step * total)))
            keep = torch.ones_like(flat)
            keep[flat.topk(count, largest=False).indices] = 0
            for w, mask in zip(weights.values(), keep.split([w.numel() for w in weights.values()])):
                w.mul_(mask.view_as(w))
            pruned += count
        curve.append(accuracy(model, X_test, y_test))
    model.load_state_dict(state)
    return curve


def plot(curves: dict[str, list[float]], path: Path) -> None:
    """Test accuracy over sparsity, one line per score."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, values in curves.items():
        ax.plot([100 * s for s in SPARSITIES], values, marker="o", label=label)
    ax.set_xlabel("weights removed (%), no retraining")
    ax.set_ylabel("test accuracy (digits)")
    ax.set_ylim(0, 1.02)
    ax.set_title("Optimal Brain Damage (½ θ² diag G) against magnitude pruning")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    save_figure(fig, path)


def main() -> None:
    setup_torch()
    X, y, X_test, y_test = make_data()
    model = train(X, y)
    scores = saliencies(model, X, y)
    curves = {
        label: [pruned_accuracy(model, by_name, s, X_test, y_test) for s in SPARSITIES]
        for label, by_name in (("magnitude |θ|, one-shot", scores["magnitude"]), ("OBD ½ θ² diag(G), one-shot", scores["OBD"]))
    }
    curves["OBD, diag(G) recomputed every 2%"] = iterative_obd(model, X, y, X_test, y_test)
    path = IMAGES / "obd_pruning.png"
    plot(curves, path)
    print("test accuracy by sparsity (weights pruned globally, no retraining):")
    print("  sparsity  " + "  ".join(f"{100 * s:>5.0f}%" for s in SPARSITIES))
    for label, values in curves.items():
        print(f"  {label}\n            " + "  ".join(f"{v:>6.3f}" for v in values))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
