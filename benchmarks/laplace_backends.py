"""Fit time and agreement of laplace-torch's curvature backends: curvhook, BackPACK, ASDL, curvlinops.

For each model and Hessian structure, ``Laplace(model, "classification",
subset_of_weights="all", hessian_structure=..., backend=...).fit(loader)`` is
timed (one fit, after an untimed warm-up fit of the same backend where a fit takes
under 2 s) and its
posterior precision compared with a reference:
laplace's torch.func GGN (``GGNInterface``'s own methods) for diag and full,
curvlinops' KFAC for kron. Agreement is ``max |P - P_ref| / max |P_ref|``.

Two small models, float64, CPU, 2 threads:

- an MLP 32-32-32-10 (tanh), and
- a residual CNN on 3×8×8 inputs: conv → GroupNorm → tanh, a residual conv
  block, average pooling, LayerNorm, Linear (normalisation layers: where
  BackPACK and ASDL fail; curvlinops' KFAC refuses the normalisation
  parameters, so kron on it has no reference).

Run from the repository root: ``python -m benchmarks.laplace_backends`` (``python
benchmarks/laplace_backends.py`` would put benchmarks/ first on the path, whose
profile.py hides the standard library's), in a virtualenv with
laplace-torch, BackPACK, ASDL (``asdfghjkl==0.1a4``, laplace's dependency),
curvlinops and curvhook); a few minutes. It prints a Markdown table.
"""

from __future__ import annotations

import copy
import time
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace
from laplace.curvature import AsdlGGN, BackPackGGN, CurvlinopsGGN, GGNInterface

from curvhook.integrations.laplace import CurvhookGGN

torch.set_num_threads(2)
warnings.filterwarnings("ignore")

N_DATA, BATCH, CLASSES = 256, 64, 10


class FuncGGN(GGNInterface):
    """Reference: laplace's GGN from torch.func Jacobians."""


class ResidualCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm1 = nn.GroupNorm(4, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.norm2 = nn.LayerNorm(128)
        self.fc = nn.Linear(128, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.norm1(self.conv1(x)))
        h = h + torch.tanh(self.conv2(h))
        return self.fc(self.norm2(self.pool(h).flatten(1)))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, CLASSES))


PROBLEMS = {
    "MLP": (_mlp, (32,), ["diag", "full", "kron"]),
    "residual CNN + GroupNorm/LayerNorm": (ResidualCNN, (3, 8, 8), ["diag", "full", "kron"]),
}
BACKENDS = {"curvhook": CurvhookGGN, "BackPACK": BackPackGGN, "ASDL": AsdlGGN, "curvlinops": CurvlinopsGGN}


def _loader(shape: tuple) -> DataLoader:
    torch.manual_seed(0)
    x = torch.randn(N_DATA, *shape, dtype=torch.float64)
    y = torch.randint(CLASSES, (N_DATA,))
    return DataLoader(TensorDataset(x, y), batch_size=BATCH)


def _fit(model: nn.Module, loader: DataLoader, structure: str, backend: type) -> tuple[torch.Tensor, float]:
    """The posterior precision (dense) and the seconds of one fit (after a warm-up fit if it is fast)."""
    times = []
    while len(times) < 2 and sum(times) < 2.0:  # fits of seconds need no warm-up
        # A fresh copy each time: BackPACK extends the model it is given in place.
        la = Laplace(copy.deepcopy(model), "classification", subset_of_weights="all", hessian_structure=structure,
                     backend=backend, prior_precision=1.0)
        start = time.perf_counter()
        la.fit(loader)
        times.append(time.perf_counter() - start)
    precision = la.posterior_precision
    if structure == "kron":
        precision = precision.to_matrix()
    return precision.detach(), times[-1]


def _error(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"fails ({type(exc).__name__}: {text[:70]})" if text else f"fails ({type(exc).__name__})"


def main() -> None:
    rows = []
    for name, (build, shape, structures) in PROBLEMS.items():
        torch.manual_seed(0)
        model = build().double()
        params = sum(p.numel() for p in model.parameters())
        loader = _loader(shape)
        for structure in structures:
            reference = None
            try:
                reference, _ = _fit(model, loader, structure, CurvlinopsGGN if structure == "kron" else FuncGGN)
            except Exception:  # noqa: BLE001 - curvlinops' KFAC refuses normalisation layers
                pass
            for label, backend in BACKENDS.items():
                try:
                    precision, seconds = _fit(model, loader, structure, backend)
                except Exception as exc:  # noqa: BLE001 - the table reports which backends fail
                    rows.append((name, params, structure, label, _error(exc), ""))
                    print(f"  {name} {structure} {label}: {rows[-1][4]}", flush=True)
                    continue
                if reference is None:
                    agreement = "no reference"
                else:
                    agreement = f"{((precision - reference).abs().max() / reference.abs().max()).item():.1e}"
                rows.append((name, params, structure, label, f"{seconds:.3f}", agreement))
                print(f"  {name} {structure} {label}: {rows[-1][4]} {agreement}", flush=True)

    print(f"\nN = {N_DATA} ({N_DATA // BATCH} batches of {BATCH}), {CLASSES} classes, float64, "
          f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| model | P | structure | backend | fit time [s] | max rel. difference |")
    print("|---|---|---|---|---|---|")
    for name, params, structure, label, seconds, agreement in rows:
        print(f"| {name} | {params} | {structure} | {label} | {seconds} | {agreement} |")


if __name__ == "__main__":
    main()
