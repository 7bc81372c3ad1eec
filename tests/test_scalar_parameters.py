"""0-d parameters (a learned temperature or scale, ``nn.Parameter(torch.tensor(1.0))``), used
and unused: every extension runs and gives results of the parameter's shape, ``()``.

They crashed (``torch.zeros()`` without a size for an unused one, ``flatten(2)`` of a
``[V, N]`` term in FullGGN, NTK, OutputCovariance and BatchL2Grad)."""

import pytest
import torch
from torch import nn

from curvhook import extend
from curvhook.extensions import (
    KFAC, NTK, BatchGrad, BatchJacobian, BatchL2Grad, DiagGGN, DiagGGNApprox, DiagGGNMC, FullGGN,
    GGNVectorProduct, LowRankGGN, OutputCovariance, SumGradSquared,
)
from helpers import DT, check_graph_against_reference
from reference import check, reference


class Temperature(nn.Module):
    """Features scaled by a learned temperature and shifted by a learned scalar; one scalar unused."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)
        self.temperature, self.shift = nn.Parameter(torch.tensor(1.3)), nn.Parameter(torch.tensor(0.2))
        self.unused = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)) * self.temperature + self.shift)


@pytest.mark.parametrize("n", [1, 3])
def test_scalar_parameters_are_exact(n):
    torch.manual_seed(0)
    check_graph_against_reference(Temperature().to(DT), torch.randn(n, 4, dtype=DT), torch.randint(0, 3, (n,)))


@pytest.mark.parametrize("n", [1, 3])
def test_every_extension_takes_scalar_parameters(n):
    torch.manual_seed(0)
    model = Temperature().to(DT)
    X, y = torch.randn(n, 4, dtype=DT), torch.randint(0, 3, (n,))
    crit = nn.CrossEntropyLoss()
    params = list(model.parameters())
    v = {p: torch.linspace(-1, 1, p.numel(), dtype=DT).view_as(p) for p in params}
    var = {p: torch.full_like(p, 0.3) for p in params}
    ntk, cov, low = NTK(), OutputCovariance(var), LowRankGGN(2, method="gram")
    with extend(model, BatchGrad(), BatchL2Grad(), SumGradSquared(), GGNVectorProduct(v), KFAC(),
                DiagGGNMC(mc_samples=2, generator=torch.Generator().manual_seed(1))):
        crit(model(X), y).backward()
    ref = reference(model, X, lambda out: crit(out, y), approx=False)
    G = ref.G
    offsets = torch.tensor([0] + [p.numel() for p in params]).cumsum(0).tolist()
    gv = G @ torch.cat([v[p].flatten() for p in params])
    for i, p in enumerate(params):
        assert p.diag_ggn_mc.shape == p.shape and p.ggn_v.shape == p.shape and p.sum_grad_squared.shape == p.shape
        assert p.grad_batch.shape == (n, *p.shape) and p.batch_l2.shape == (n,)
        check(p.grad_batch.sum(0), torch.zeros_like(p) if p.grad is None else p.grad, "BatchGrad summed = p.grad (scalars)")
        check(p.batch_l2, p.grad_batch.reshape(n, -1).square().sum(1), "BatchL2Grad (scalars)")
        check(p.sum_grad_squared, p.grad_batch.square().sum(0), "SumGradSquared (scalars)")
        check(p.ggn_v.flatten(), gv[offsets[i] : offsets[i + 1]], "GGNVectorProduct (scalars)")
    with extend(model, low):
        crit(model(X), y).backward()
    check(low.eigenvalues, torch.linalg.eigvalsh(G).flip(0)[:2], "LowRankGGN eigenvalues (scalars)", rtol=1e-8)
    with extend(model, ntk, cov):
        model(X).sum().backward()
    J = reference(model, X, None, approx=False).J  # [N C, P]
    check(ntk.matrix.reshape(n * 3, n * 3), J @ J.T, "NTK (scalars)")
    sigma = torch.cat([var[p].flatten() for p in params])
    per_sample = ((J * sigma) @ J.T).reshape(n, 3, n, 3).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # J_n Σ J_nᵀ
    check(cov.covariance, per_sample, "OutputCovariance (scalars)")
