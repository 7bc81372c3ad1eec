"""The spectrum of the empirical neural tangent kernel, before and after training.

The empirical NTK of a network f with parameters θ compares two inputs by
how a step in θ moves both outputs together:

    K[n, c, m, d] = Σ_p ∂f_c(x_n)/∂θ_p · ∂f_d(x_m)/∂θ_p = (J Jᵀ)[(n, c), (m, d)].

Gradient descent on a squared loss moves the outputs of the training points
by ``−η K (f − y)``: the eigenvectors of K with large eigenvalues are learnt
first, those with small ones slowly (the spectral bias). In the infinite-width
limit K stays fixed during training; finite networks move it, and a narrow
network more than a wide one. ``curvhook.extensions.NTK`` computes K from the
Gram matrices of the layers' inputs and backpropagated columns, without
forming the Jacobian J (``[N·C, P]``).

Two MLPs (width 32 and 512) are trained on scikit-learn's digits; the plot
shows the eigenvalues of K on 100 held-out digits (a ``1000 × 1000`` matrix)
at initialisation and after training, on a log scale.

Run: ``python examples/ntk_spectrum.py`` (``CURVHOOK_EXAMPLES_QUICK=1``: fewer epochs).
"""

from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvhook import extend
from curvhook.extensions import NTK

from _common import QUICK, IMAGES, save_figure, setup_torch, shuffled_digits

EPOCHS = 2 if QUICK else 40
WIDTHS = [32, 512]
PROBES = 100  # samples the kernel is evaluated on: K is [PROBES·10, PROBES·10]


def make_data() -> tuple[torch.Tensor, ...]:
    """scikit-learn's digits: a training set and ``PROBES`` held-out samples."""
    X, y = shuffled_digits()
    return X[PROBES:], y[PROBES:], X[:PROBES]


def make_model(width: int) -> nn.Module:
    """A two-hidden-layer tanh MLP of the given width."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))


def ntk(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """The empirical NTK of ``model`` on ``X`` as a ``[N·C, N·C]`` matrix.

    No loss is needed: the backward pass of ``model(X).sum()`` carries the
    identity columns, and ``p.grad`` it leaves is discarded.
    """
    kernel = NTK()
    with extend(model, kernel):
        model(X).sum().backward()
    model.zero_grad(set_to_none=True)
    return kernel.matrix.flatten(0, 1).flatten(1)  # [N, C, N, C] → [N·C, N·C]


def train(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """SGD with momentum on the squared error to one-hot targets (the loss of NTK theory).

    Returns:
        The final training accuracy.
    """
    targets = nn.functional.one_hot(y, 10).float()
    loader = DataLoader(TensorDataset(X, targets), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    criterion = nn.MSELoss()
    for _ in range(EPOCHS):
        for xb, tb in loader:
            optimizer.zero_grad()
            criterion(model(xb), tb).backward()
            optimizer.step()
    with torch.no_grad():
        return (model(X).argmax(1) == y).float().mean().item()


def plot(spectra: dict[int, dict[str, torch.Tensor]], path: Path) -> None:
    """Sorted eigenvalues at initialisation (dashed) and after training (solid), per width."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for colour, (width, spectrum) in zip(colours, spectra.items()):
        for stage, style in (("initialisation", "--"), ("trained", "-")):
            values = spectrum[stage].clamp(min=1e-12)
            ax.plot(range(1, len(values) + 1), values, style, color=colour, label=f"width {width}, {stage}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue index")
    ax.set_ylabel("eigenvalue of the empirical NTK")
    ax.set_title(f"NTK spectrum on {PROBES} digits (K is {PROBES * 10} × {PROBES * 10})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    setup_torch()
    X, y, probes = make_data()
    spectra = {}
    print(f"{'width':>5} {'train acc':>9} {'λ_max init':>11} {'λ_max trained':>14} {'‖K_T − K_0‖/‖K_0‖':>19}")
    for width in WIDTHS:
        model = make_model(width)
        k0 = ntk(model, probes)
        accuracy = train(model, X, y)
        k1 = ntk(model, probes)
        # K is symmetric positive semi-definite: eigvalsh, largest first.
        spectra[width] = {stage: torch.linalg.eigvalsh(k.double()).flip(0) for stage, k in (("initialisation", k0), ("trained", k1))}
        change = ((k1 - k0).norm() / k0.norm()).item()
        print(
            f"{width:>5} {accuracy:>9.3f} {spectra[width]['initialisation'][0].item():>11.1f} "
            f"{spectra[width]['trained'][0].item():>14.1f} {change:>19.3f}"
        )
    path = IMAGES / "ntk_spectrum.png"
    plot(spectra, path)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
