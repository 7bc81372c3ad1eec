"""Elastic weight consolidation (EWC): learn task B without forgetting task A.

A network trained on task A and then on task B forgets A: gradient descent on
B moves every weight, also those A depends on. EWC (Kirkpatrick et al., 2017)
treats the weights after A as the mean of a Gaussian posterior whose precision
is the curvature of A's loss, and trains B with the quadratic penalty

    L_B(θ) + λ/2 Σ_i F_i (θ_i − θ_A,i)²,     F = diag(G_A),

so weights that A's loss is curved along stay where they are and flat ones
are free to move. G_A is the generalized Gauss-Newton matrix of A's mean loss
(equal to the Fisher information for cross-entropy), and its diagonal is
accumulated over all of A's data in one pass with ``curvhook.accumulate``.

Tasks: scikit-learn's 8x8 digits (task A), and the same digits with their 64
pixels shuffled by a fixed permutation (task B). The plot shows the accuracy on
A while the network trains on B, with and without the penalty.

Run: ``python examples/ewc_two_tasks.py`` (``CURVHOOK_EXAMPLES_QUICK=1``: fewer epochs).
"""

from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvhook
from curvhook.extensions import DiagGGN

from _common import QUICK, IMAGES, accuracy, save_figure, setup_torch, shuffled_digits

EPOCHS_A = 10 if QUICK else 30
EPOCHS_B = 4 if QUICK else 30
EWC_STRENGTH = 100.0


def make_tasks() -> dict[str, tuple[torch.Tensor, ...]]:
    """Task A: the digits; task B: the same digits with their pixels permuted.

    Returns:
        ``{"A": (X_train, y_train, X_test, y_test), "B": ...}``, pixels scaled to [0, 1].
    """
    X, y = shuffled_digits()
    split = int(0.7 * len(X))
    permutation = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    tasks = {}
    for name, pixels in (("A", X), ("B", X[:, permutation])):
        tasks[name] = (pixels[:split], y[:split], pixels[split:], y[split:])
    return tasks


def make_model() -> nn.Module:
    """A two-hidden-layer MLP shared by both tasks (one 10-way head)."""
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, penalty=None) -> None:
    """One epoch on the mean cross-entropy, plus ``penalty(model)`` if given."""
    criterion = nn.CrossEntropyLoss()
    for X, y in loader:
        optimizer.zero_grad()
        loss = criterion(model(X), y)
        if penalty is not None:
            loss = loss + penalty(model)
        loss.backward()
        optimizer.step()


def ewc_penalty(anchor: dict, fisher: dict, strength: float):
    """``λ/2 Σ F (θ − θ_A)²`` over all parameters, as a function of the model.

    Args:
        anchor: θ_A by parameter name.
        fisher: F (here diag(G_A)) by parameter name.
        strength: λ.

    Returns:
        ``model → penalty``, the model's parameters read by name.
    """

    def penalty(m: nn.Module) -> torch.Tensor:
        total = 0.0
        for name, p in m.named_parameters():
            total = total + (fisher[name] * (p - anchor[name]) ** 2).sum()
        return 0.5 * strength * total

    return penalty


def diag_ggn_of_task(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """diag(G) of the task's *mean* cross-entropy, accumulated over its training set.

    ``reduction="mean"`` makes the penalty's scale independent of the number of
    samples; it is then on the scale of the mean loss that task B is trained on.
    """
    loader = DataLoader(TensorDataset(X, y), batch_size=256)
    results = curvhook.accumulate(
        model, loader, DiagGGN(), loss_fn=nn.CrossEntropyLoss(), reduction="mean", progress=False, write=False
    )
    return {name: value.clone() for name, value in results["diag_ggn"].items()}


def continue_on_b(model_a: nn.Module, tasks: dict, penalty=None) -> dict[str, list[float]]:
    """Train a copy of the task-A model on task B.

    Args:
        model_a: The model trained on task A (left unchanged).
        tasks: The output of :func:`make_tasks`.
        penalty: ``model → penalty``, or ``None`` for plain training.

    Returns:
        ``{"A": [...], "B": [...]}``: each task's test accuracy before and after every epoch.
    """
    model = make_model()
    model.load_state_dict(model_a.state_dict())
    XB, yB, _, _ = tasks["B"]
    loader = DataLoader(TensorDataset(XB, yB), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    history = {task: [] for task in tasks}
    for epoch in range(EPOCHS_B + 1):
        if epoch > 0:
            train_epoch(model, loader, optimizer, penalty)
        for task, (_, _, X_test, y_test) in tasks.items():
            history[task].append(accuracy(model, X_test, y_test))
    return history


def plot(histories: dict[str, dict[str, list[float]]], path: Path) -> None:
    """Both tasks' test accuracy over the epochs on task B, one line per method."""
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.9), sharey=True)
    titles = {"A": "task A (digits): forgetting", "B": "task B (permuted pixels): learning"}
    for ax, task in zip(axes, ("A", "B")):
        for label, history in histories.items():
            ax.plot(history[task], marker="o", markersize=3, label=label)
        ax.set_title(titles[task])
        ax.set_xlabel("epochs of training on task B")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[0].set_ylim(0, 1.02)
    axes[0].legend(loc="lower left", fontsize=8)
    save_figure(fig, path)


def main() -> None:
    setup_torch()
    torch.manual_seed(0)
    tasks = make_tasks()
    XA, yA, XA_test, yA_test = tasks["A"]

    model_a = make_model()
    loader_a = DataLoader(TensorDataset(XA, yA), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.SGD(model_a.parameters(), lr=0.05, momentum=0.9)
    for _ in range(EPOCHS_A):
        train_epoch(model_a, loader_a, optimizer)
    print(f"after task A: test accuracy on A {accuracy(model_a, XA_test, yA_test):.3f}")

    fisher = diag_ggn_of_task(model_a, XA, yA)
    anchor = {name: p.detach().clone() for name, p in model_a.named_parameters()}

    # The same penalty with every F_i replaced by the mean of F: an L2 pull towards θ_A
    # of equal total strength that ignores which weights matter to task A.
    mean_f = torch.cat([f.flatten() for f in fisher.values()]).mean()
    uniform = {name: torch.full_like(f, mean_f.item()) for name, f in fisher.items()}

    runs = {
        "plain SGD": None,
        f"L2 to θ_A (uniform F), λ = {EWC_STRENGTH:g}": ewc_penalty(anchor, uniform, EWC_STRENGTH),
        f"EWC (diag GGN), λ = {EWC_STRENGTH:g}": ewc_penalty(anchor, fisher, EWC_STRENGTH),
    }
    histories = {label: continue_on_b(model_a, tasks, penalty) for label, penalty in runs.items()}

    path = IMAGES / "ewc_two_tasks.png"
    plot(histories, path)
    print(f"after {EPOCHS_B} epochs on task B (test accuracy):")
    for label, history in histories.items():
        print(f"  {label:<34} on A {history['A'][-1]:.3f}, on B {history['B'][-1]:.3f}")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
