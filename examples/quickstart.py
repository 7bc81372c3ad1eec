"""Train a small classifier for a few steps and inspect its curvature.

Every step computes the gradient, the exact GGN diagonal (DiagGGN) and its
one-backward approximation (DiagGGNApprox) in the same backward pass. The
table compares them per parameter.

Run: ``python examples/quickstart.py``
"""

import torch
from torch import nn

from curvhook import extend
from curvhook.extensions import DiagGGN, DiagGGNApprox


def make_data(n: int = 256, dim: int = 20, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic classification problem: class = argmax of a random linear map."""
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(n, dim, generator=generator)
    y = (X @ torch.randn(dim, classes, generator=generator)).argmax(1)
    return X, y


def main() -> None:
    torch.manual_seed(0)
    X, y = make_data()
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

    with extend(model, DiagGGN(), DiagGGNApprox()):
        for step in range(5):
            optimizer.zero_grad()
            loss = criterion(model(X), y)
            loss.backward()
            optimizer.step()
            print(f"step {step}: loss {loss.item():.4f}")

    print()
    header = f"{'parameter':<10} {'shape':<10} {'|grad|':>9} {'sum DiagGGN':>12} {'sum Approx':>12} {'cosine':>7} {'rel. err':>9}"
    print(header)
    print("-" * len(header))
    for name, p in model.named_parameters():
        exact, approx = p.diag_ggn.flatten(), p.diag_ggn_approx.flatten()
        cosine = torch.nn.functional.cosine_similarity(exact, approx, dim=0).item()
        rel = ((approx - exact).norm() / exact.norm()).item()
        shape = "x".join(map(str, p.shape))
        print(
            f"{name:<10} {shape:<10} {p.grad.norm().item():>9.4f} {exact.sum().item():>12.5f} "
            f"{approx.sum().item():>12.5f} {cosine:>7.4f} {rel:>9.4f}"
        )
    print("\nIn the last layer the two agree exactly: each of its weights moves one logit, so only")
    print("diag(H) enters. Deeper layers mix the logits, and DiagGGNApprox drops those cross terms.")


if __name__ == "__main__":
    main()
