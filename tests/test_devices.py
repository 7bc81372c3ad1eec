"""Every extension on every available device: results on the model's device, equal to the CPU's.

CPU always runs; CUDA runs where a GPU is present (skipped otherwise, with the
reason). The reference is the float64 CPU result of the same extension, which
the other tests check against torch.func; on a GPU the same model runs in
float64 too, so the tolerance stays tight (no TF32).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvhook
from curvhook import extend
from curvhook.extensions import (
    KFAC, NTK, BatchGrad, BatchJacobian, BatchL2Grad, DiagGGN, DiagGGNApprox, DiagGGNMC, FullGGN,
    GGNVectorProduct, LowRankGGN, OutputCovariance, SumGradSquared,
)
from reference import check

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


def model_and_data(device: str):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.GroupNorm(1, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 5), nn.Tanh(),
        nn.Linear(5, 3),
    ).double().to(device)
    X = torch.randn(4, 2, 4, 4, dtype=torch.float64, device=device)
    y = torch.tensor([0, 2, 1, 2], device=device)
    return model, X, y


def extensions(model: nn.Module, device: str):
    g = torch.Generator(device=device).manual_seed(3)
    v = {p: torch.linspace(-1, 1, p.numel(), dtype=p.dtype, device=device).view_as(p) for p in model.parameters()}
    var = {p: torch.full_like(p, 0.3) for p in model.parameters()}
    loss_based = [DiagGGN(), DiagGGNApprox(), FullGGN(), DiagGGNMC(mc_samples=2, generator=g), KFAC(),
                  BatchGrad(), BatchL2Grad(), SumGradSquared(), GGNVectorProduct(v)]
    return loss_based, [BatchJacobian(), NTK(), OutputCovariance(var)], [LowRankGGN(3, method="gram")]


def run(device: str) -> dict:
    model, X, y = model_and_data(device)
    loss_based, output_based, eig = extensions(model, device)
    with extend(model, *loss_based):
        nn.CrossEntropyLoss()(model(X), y).backward()
    with extend(model, *eig):
        nn.CrossEntropyLoss()(model(X), y).backward()
    with extend(model, *output_based):
        model(X).sum().backward()
    out = {}
    for name, p in model.named_parameters():
        for attr in ("diag_ggn", "diag_ggn_approx", "ggn", "diag_ggn_mc", "grad_batch", "batch_l2",
                     "sum_grad_squared", "ggn_v", "batch_jacobian", "ggn_eigvecs"):
            value = getattr(p, attr)
            assert value.device == p.device and value.dtype == p.dtype, (attr, value.device, value.dtype)
            out[(attr, name)] = value
        if hasattr(p, "kfac"):
            for i, f in enumerate(p.kfac):
                assert f.device == p.device
                out[("kfac", name, i)] = f
    out["ntk"], out["covariance"], out["eigenvalues"] = output_based[1].matrix, output_based[2].covariance, eig[0].eigenvalues
    for key in ("ntk", "covariance", "eigenvalues"):
        assert out[key].device.type == torch.device(device).type
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_every_extension_runs_on_the_device_and_agrees_with_the_cpu(device):
    want = run("cpu")
    got = run(device)
    for key, value in want.items():
        if key[0] == "diag_ggn_mc" and device != "cpu":
            continue  # other random streams on another device
        if key[0] == "ggn_eigvecs":  # up to sign
            sign = torch.sign((got[key].cpu() * value).flatten(1).sum(1)).view(-1, *[1] * (value.dim() - 1))
            check(got[key].cpu() * sign, value, f"{key[0]} on {device}", rtol=1e-8, atol_factor=1e-8)
            continue
        check(got[key].cpu(), value, f"{key[0]} on {device}", rtol=1e-10, atol_factor=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_accumulate_moves_batches_to_the_device(device):
    model, X, y = model_and_data(device)
    batches = [(X[:2].cpu(), y[:2].cpu()), (X[2:].cpu(), y[2:].cpu())]
    got = curvhook.accumulate(model, batches, DiagGGN(), loss_fn=nn.CrossEntropyLoss(), reduction="sum",
                              device=device, progress=False)
    assert all(t.device.type == torch.device(device).type for t in got["diag_ggn"].values())
