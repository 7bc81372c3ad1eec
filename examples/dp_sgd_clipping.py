"""Per-sample gradient clipping and noise, as in DP-SGD.

DP-SGD (Abadi et al., 2016) bounds how much any one training sample can move
the model: each per-sample gradient ``g_n`` is clipped to norm at most ``C``,
and Gaussian noise is added to their sum before the step,

    ĝ = (1/B) [ Σ_n g_n · min(1, C / ‖g_n‖) + N(0, σ² C² I) ].

An ordinary backward pass only gives ``Σ_n g_n``. curvhook writes, in that
same backward pass, the per-sample gradients (``BatchGrad``: ``p.grad_batch``,
``[B, *p.shape]``) and their squared norms (``BatchL2Grad``: ``p.batch_l2``,
``[B]``, computed without forming ``g_n`` on linear layers). The loss is
summed (``reduction="sum"``) so that ``g_n`` is sample n's own gradient.

The plot compares plain SGD with clipped SGD with and without noise on
scikit-learn's digits, and shows the distribution of per-sample gradient norms
against the clipping threshold. (This is the mechanism only: the privacy
guarantee also needs Poisson sampling of batches and an accountant.)

Run: ``python examples/dp_sgd_clipping.py`` (``CURVHOOK_EXAMPLES_QUICK=1``: fewer epochs).
"""

from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvhook import extend
from curvhook.extensions import BatchGrad, BatchL2Grad

from _common import QUICK, IMAGES, accuracy, save_figure, setup_torch, shuffled_digits

EPOCHS = 3 if QUICK else 25
BATCH = 64
LR = 0.5
CLIP = 1.0  # C, the largest norm one sample's gradient may have


def make_data() -> tuple[torch.Tensor, ...]:
    """scikit-learn's digits split 70/30, pixels scaled to [0, 1]."""
    X, y = shuffled_digits()
    split = int(0.7 * len(X))
    return X[:split], y[:split], X[split:], y[split:]


def make_model() -> nn.Module:
    """A small MLP, the same initial weights for every run."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def per_sample_norms(model: nn.Module) -> torch.Tensor:
    """``‖g_n‖`` over all parameters, ``[B]``, from BatchL2Grad's per-parameter squared norms."""
    return torch.stack([p.batch_l2 for p in model.parameters()]).sum(0).sqrt()


@torch.no_grad()
def privatise_gradients(model: nn.Module, noise: float, generator: torch.Generator) -> torch.Tensor:
    """Replace ``p.grad`` by the clipped, noised mean of the per-sample gradients.

    Args:
        model: A model after a backward pass of a *summed* loss with BatchGrad and
            BatchL2Grad.
        noise: σ, the noise's standard deviation in units of ``CLIP`` (0: clip only).
        generator: The source of the noise.

    Returns:
        The per-sample gradient norms before clipping, ``[B]``.
    """
    norms = per_sample_norms(model)
    factors = (CLIP / (norms + 1e-12)).clamp(max=1.0)  # min(1, C / ‖g_n‖)
    for p in model.parameters():
        clipped_sum = torch.einsum("n,n...->...", factors, p.grad_batch)
        gaussian = torch.randn(p.shape, generator=generator) * noise * CLIP
        p.grad = (clipped_sum + gaussian) / len(norms)
    return norms


def train(X, y, X_test, y_test, noise=None) -> tuple[list[float], torch.Tensor]:
    """Train with plain SGD (``noise=None``) or with clipping and noise σ.

    Returns:
        The test accuracy after every epoch (and before the first), and the
        per-sample gradient norms seen in the last epoch (empty for plain SGD).
    """
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loader = DataLoader(TensorDataset(X, y), batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(2)
    summed = nn.CrossEntropyLoss(reduction="sum")
    history, norms = [accuracy(model, X_test, y_test)], []
    for _ in range(EPOCHS):
        norms = []
        for xb, yb in loader:
            optimizer.zero_grad()
            if noise is None:
                (summed(model(xb), yb) / len(xb)).backward()  # the mean loss
            else:
                with extend(model, BatchGrad(), BatchL2Grad()):
                    summed(model(xb), yb).backward()
                norms.append(privatise_gradients(model, noise, generator))
            optimizer.step()
        history.append(accuracy(model, X_test, y_test))
    return history, torch.cat(norms) if norms else torch.empty(0)


def norms_at_init(X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The per-sample gradient norms of the untrained model over the training set.

    Also checks BatchL2Grad against the norms of BatchGrad's per-sample gradients.
    """
    model = make_model()
    with extend(model, BatchGrad(), BatchL2Grad()):
        nn.CrossEntropyLoss(reduction="sum")(model(X), y).backward()
    from_vectors = torch.cat([p.grad_batch.flatten(1) for p in model.parameters()], 1).norm(dim=1)
    torch.testing.assert_close(per_sample_norms(model), from_vectors)
    return from_vectors


def plot(histories: dict[str, list[float]], norms: dict[str, torch.Tensor], path: Path) -> None:
    """Test accuracy over epochs (left) and histograms of per-sample gradient norms (right)."""
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.9))
    for label, history in histories.items():
        axes[0].plot(history, marker="o", markersize=3, label=label)
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("test accuracy (digits)")
    axes[0].set_ylim(0, 1.02)
    axes[0].grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    axes[0].set_title("training with clipped per-sample gradients")
    high = max(n.max().item() for n in norms.values())
    bins = torch.logspace(-3, torch.log10(torch.tensor(high)).item(), 40).numpy()
    for label, values in norms.items():
        axes[1].hist(values.numpy(), bins=bins, alpha=0.6, label=label)
    axes[1].axvline(CLIP, color="black", linestyle="--", label=f"clipping threshold C = {CLIP:g}")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("per-sample gradient norm ‖g_n‖ (BatchL2Grad)")
    axes[1].set_ylabel("samples")
    axes[1].legend(fontsize=8)
    axes[1].set_title("per-sample gradient norms")
    save_figure(fig, path)


def main() -> None:
    setup_torch()
    X, y, X_test, y_test = make_data()
    runs = {"plain SGD": None, "clipped (σ = 0)": 0.0, "clipped + noise (σ = 1)": 1.0, "clipped + noise (σ = 4)": 4.0}
    histories, last_norms = {}, {}
    for label, noise in runs.items():
        histories[label], last_norms[label] = train(X, y, X_test, y_test, noise)
    norms = {"at initialisation": norms_at_init(X, y), "last epoch, clipped + noise (σ = 1)": last_norms["clipped + noise (σ = 1)"]}

    path = IMAGES / "dp_sgd_clipping.png"
    plot(histories, norms, path)
    print(f"test accuracy after {EPOCHS} epochs (batch {BATCH}, lr {LR}, C = {CLIP:g}):")
    for label, history in histories.items():
        print(f"  {label:<26} {history[-1]:.3f}")
    for label, values in norms.items():
        clipped = (values > CLIP).float().mean().item()
        print(f"per-sample gradient norms, {label}: median {values.median().item():.3f}, {100 * clipped:.0f}% clipped")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
