"""curvhook's laplace-torch backends against laplace's own torch.func and curvlinops backends.

Everything in float64 with tight tolerances: the backends compute the same
numbers by other means. Two models: an MLP, and a residual CNN with GroupNorm
and LayerNorm (where laplace's BackPACK and ASDL backends fail).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

laplace = pytest.importorskip("laplace", reason="laplace-torch is not installed (pip install laplace-torch)")
curvlinops = pytest.importorskip("curvlinops", reason="curvlinops-for-pytorch is not installed")

from laplace import Laplace  # noqa: E402
from laplace.curvature import CurvlinopsEF, CurvlinopsGGN, EFInterface, GGNInterface  # noqa: E402

from curvhook.integrations.laplace import CurvhookEF, CurvhookGGN, functional_variance  # noqa: E402

LIKELIHOODS = ["classification", "regression"]
OUTPUTS = 3
TIGHT = dict(rtol=1e-10, atol=1e-12)


class FuncGGN(GGNInterface):
    """laplace's reference: the GGN from torch.func Jacobians (GGNInterface's own methods)."""


class FuncEF(EFInterface):
    """laplace's reference: the empirical Fisher from torch.func per-sample gradients."""


class ResidualCNN(nn.Module):
    """Conv → GroupNorm → tanh, a residual conv block, pooling, LayerNorm, Linear."""

    def __init__(self, outputs: int = OUTPUTS) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.norm1 = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.norm2 = nn.LayerNorm(16)
        self.fc = nn.Linear(16, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.norm1(self.conv1(x)))
        h = h + torch.tanh(self.conv2(h))
        return self.fc(self.norm2(self.pool(h).flatten(1)))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, OUTPUTS))


MODELS = {"mlp": (_mlp, (4,)), "rescnn": (ResidualCNN, (2, 4, 4))}


def _problem(name: str, likelihood: str, n: int = 8):
    """A float64 model, inputs ``[n, *in]`` and targets (classes ``[n]`` or ``[n, C]``)."""
    torch.manual_seed(1)
    build, shape = MODELS[name]
    model = build().double()
    # Perturb the normalisation parameters away from (1, 0) so that their curvature is generic.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
                module.weight.add_(0.3 * torch.randn_like(module.weight))
                module.bias.add_(0.3 * torch.randn_like(module.bias))
    x = torch.randn(n, *shape, dtype=torch.float64)
    if likelihood == "classification":
        y = torch.randint(OUTPUTS, (n,))
    else:
        y = torch.randn(n, OUTPUTS, dtype=torch.float64)
    return model, x, y


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-10) -> None:
    scale = expected.abs().max().clamp_min(1e-30)
    assert actual.shape == expected.shape
    assert ((actual - expected).abs().max() / scale).item() < rtol


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
class TestAgainstTorchFunc:
    """Each method against laplace's torch.func implementation of the same interface."""

    def test_jacobians(self, name, likelihood):
        model, x, _ = _problem(name, likelihood)
        js, f = CurvhookGGN(model, likelihood).jacobians(x)
        js_ref, f_ref = FuncGGN(model, likelihood).jacobians(x)
        assert js.shape == (len(x), OUTPUTS, sum(p.numel() for p in model.parameters()))
        _close(js, js_ref)
        _close(f, f_ref)

    def test_jacobians_enable_backprop(self, name, likelihood):
        model, x, _ = _problem(name, likelihood)
        x.requires_grad_(True)
        js, f = CurvhookGGN(model, likelihood).jacobians(x, enable_backprop=True)
        assert js.requires_grad and f.requires_grad
        (gx,) = torch.autograd.grad(js.square().sum(), x)
        assert torch.isfinite(gx).all()
        _close(js.detach(), CurvhookGGN(model, likelihood).jacobians(x.detach())[0])

    def test_selected_output_jacobians(self, name, likelihood):
        model, x, _ = _problem(name, likelihood)
        outputs = torch.randint(OUTPUTS, (len(x), 2))
        js, _ = CurvhookGGN(model, likelihood).selected_output_jacobians(x, outputs)
        full, _ = FuncGGN(model, likelihood).jacobians(x)
        _close(js, torch.gather(full, 1, outputs[..., None].expand(-1, -1, full.shape[-1])))

    def test_gradients(self, name, likelihood):
        model, x, y = _problem(name, likelihood)
        gs, loss = CurvhookEF(model, likelihood).gradients(x, y)
        gs_ref, loss_ref = FuncEF(model, likelihood).gradients(x, y)
        _close(gs, gs_ref)
        _close(loss, loss_ref)

    @pytest.mark.parametrize("structure", ["diag", "full"])
    def test_ggn(self, name, likelihood, structure):
        model, x, y = _problem(name, likelihood)
        loss, h = getattr(CurvhookGGN(model, likelihood), structure)(x, y)
        loss_ref, h_ref = getattr(FuncGGN(model, likelihood), structure)(x, y)
        _close(h, h_ref)
        _close(loss, loss_ref)

    @pytest.mark.parametrize("structure", ["diag", "full"])
    def test_ef(self, name, likelihood, structure):
        model, x, y = _problem(name, likelihood)
        loss, h = getattr(CurvhookEF(model, likelihood), structure)(x, y)
        loss_ref, h_ref = getattr(FuncEF(model, likelihood), structure)(x, y)
        _close(h, h_ref)
        _close(loss, loss_ref)

    def test_grad_untouched(self, name, likelihood):
        model, x, y = _problem(name, likelihood)
        for p in model.parameters():
            p.grad = torch.full_like(p, 7.0)
        backend = CurvhookGGN(model, likelihood)
        backend.diag(x, y)
        backend.full(x, y)
        backend.jacobians(x)
        CurvhookEF(model, likelihood).gradients(x, y)
        assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
        assert not any(hasattr(p, "diag_ggn") or hasattr(p, "ggn") for p in model.parameters())

    def test_functional_variance_and_ntk(self, name, likelihood):
        model, x, _ = _problem(name, likelihood)
        backend = CurvhookGGN(model, likelihood)
        js, _ = FuncGGN(model, likelihood).jacobians(x)
        variance = {p: torch.rand_like(p) for p in model.parameters()}
        sigma = torch.cat([v.flatten() for v in variance.values()])
        _close(backend.functional_variance(x, variance), torch.einsum("ncp,p,nkp->nck", js, sigma, js))
        flat = js.reshape(-1, js.shape[-1])
        _close(backend.ntk(x), flat @ flat.T)


def _curvlinops_kfac(model, likelihood, x, y, params, fisher_type, **kwargs) -> torch.Tensor:
    """curvlinops' KFAC over ``params`` as a dense matrix, in laplace's scaling (``factor``)."""
    loss = nn.CrossEntropyLoss(reduction="sum") if likelihood == "classification" else nn.MSELoss(reduction="sum")
    op = curvlinops.KFACLinearOperator(
        model, loss, params, [(x, y)], fisher_type=fisher_type, separate_weight_and_bias=True,
        check_deterministic=False, **kwargs,
    )
    size = sum(p.numel() for p in params)
    dense = op @ torch.eye(size, dtype=torch.float64)
    return torch.as_tensor(dense) * (0.5 if likelihood == "regression" else 1.0)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("backend,reference", [(CurvhookGGN, CurvlinopsGGN), (CurvhookEF, CurvlinopsEF)])
@pytest.mark.parametrize("N", [8, 20])
def test_kron_mlp_against_curvlinops_backend(likelihood, backend, reference, N):
    """``kron`` equals laplace's curvlinops backend: factors, order, ½, and the M/N rescaling."""
    model, x, y = _problem("mlp", likelihood)
    loss, kron = backend(model, likelihood).kron(x, y, N=N)
    loss_ref, kron_ref = reference(model, likelihood).kron(x, y, N=N)
    assert [len(block) for block in kron.kfacs] == [len(block) for block in kron_ref.kfacs]
    for block, block_ref in zip(kron.kfacs, kron_ref.kfacs):
        _close(torch.kron(*block) if len(block) == 2 else block[0],
               torch.kron(*block_ref) if len(block_ref) == 2 else block_ref[0])
    _close(kron.to_matrix(), kron_ref.to_matrix())
    _close(loss, loss_ref)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("ef", [False, True])
def test_kron_rescnn(likelihood, approx, ef):
    """Conv/Linear blocks as curvlinops' KFAC; normalisation parameters get their exact GGN diagonal."""
    model, x, y = _problem("rescnn", likelihood)
    backend = (CurvhookEF if ef else CurvhookGGN)(model, likelihood)
    _, kron = backend.kron(x, y, N=len(x), kfac_approx=approx)
    dense = kron.to_matrix()
    params = list(model.parameters())
    starts = torch.tensor([0] + [p.numel() for p in params]).cumsum(0)
    structured = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    structured_params = [p for m in structured for p in m.parameters()]
    index = torch.cat([torch.arange(starts[i], starts[i + 1]) for i, p in enumerate(params)
                       if any(p is q for q in structured_params)])
    fisher = "empirical" if ef else "type-2"
    expected = _curvlinops_kfac(model, likelihood, x, y, structured_params, fisher, kfac_approx=approx)
    _close(dense[index][:, index], expected, rtol=1e-9)
    # Normalisation parameters: diagonal blocks equal to the GGN (EF) diagonal.
    _, diagonal = (FuncEF if ef else FuncGGN)(model, likelihood).diag(x, y)
    rest = torch.tensor([i for i in range(dense.shape[0]) if i not in set(index.tolist())])
    block = dense[rest][:, rest]
    _close(block, torch.diag(diagonal[rest]))


def test_kron_refuses_unstructured_matrix_parameter():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(16, 3)).double()
    x, y = torch.randn(4, 2, 4, 4, dtype=torch.float64), torch.randint(3, (4,))
    with pytest.raises(ValueError, match="no Kronecker factors"):
        CurvhookGGN(model, "classification").kron(x, y, N=4)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_stochastic(likelihood):
    """DiagGGNMC, sampled full and KFAC(mc_samples): unbiased, close to the exact ones with many samples."""
    model, x, y = _problem("mlp", likelihood)
    exact = CurvhookGGN(model, likelihood)
    mc = CurvhookGGN(model, likelihood, stochastic=True)
    torch.manual_seed(3)
    _close(mc.diag(x, y, mc_samples=4000)[1], exact.diag(x, y)[1], rtol=0.1)
    _close(mc.full(x, y, mc_samples=4000)[1], exact.full(x, y)[1], rtol=0.1)
    _close(mc.kron(x, y, N=8, mc_samples=4000)[1].to_matrix(), exact.kron(x, y, N=8)[1].to_matrix(), rtol=0.1)
    one = CurvhookGGN(model, likelihood, stochastic=True, num_samples=1).diag(x, y)[1]
    assert not torch.allclose(one, exact.diag(x, y)[1])


def _loader(name: str, likelihood: str) -> tuple[nn.Module, DataLoader]:
    model, x, y = _problem(name, likelihood, n=12)
    return model, DataLoader(TensorDataset(x, y), batch_size=5)  # batches of 5, 5, 2


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("structure", ["diag", "full", "kron"])
def test_laplace_end_to_end(name, likelihood, structure):
    """``Laplace(..., backend=CurvhookGGN).fit`` gives the reference backend's posterior precision."""
    model, loader = _loader(name, likelihood)
    if structure == "kron" and name == "rescnn":
        reference = None  # curvlinops' KFAC refuses the normalisation parameters
    else:
        reference = CurvlinopsGGN if structure == "kron" else FuncGGN
    la = Laplace(model, likelihood, subset_of_weights="all", hessian_structure=structure,
                 backend=CurvhookGGN, prior_precision=0.5)
    la.fit(loader)
    precision = la.posterior_precision
    if structure == "kron":
        precision = precision.to_matrix()
    assert torch.isfinite(precision).all()
    if reference is None:
        return
    la_ref = Laplace(model, likelihood, subset_of_weights="all", hessian_structure=structure,
                     backend=reference, prior_precision=0.5)
    la_ref.fit(loader)
    precision_ref = la_ref.posterior_precision
    if structure == "kron":
        precision_ref = precision_ref.to_matrix()
    _close(precision, precision_ref, rtol=1e-9)
    _close(la.log_marginal_likelihood(), la_ref.log_marginal_likelihood(), rtol=1e-9)


@pytest.mark.parametrize("structure", ["diag", "full"])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_functional_variance_of_fitted_laplace(structure, likelihood):
    model, loader = _loader("rescnn", likelihood)
    la = Laplace(model, likelihood, subset_of_weights="all", hessian_structure=structure, backend=CurvhookGGN)
    la.fit(loader)
    x = next(iter(loader))[0]
    js, _ = la.backend.jacobians(x)
    _close(functional_variance(la, x), la.functional_variance(js), rtol=1e-9)


def test_functional_variance_refuses_kron():
    model, loader = _loader("mlp", "classification")
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron", backend=CurvhookGGN)
    la.fit(loader)
    with pytest.raises(NotImplementedError, match="KronLaplace"):
        functional_variance(la, next(iter(loader))[0])


@pytest.mark.parametrize("structure", ["diag", "full", "kron"])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_last_layer_laplace(structure, likelihood):
    """Last-layer Laplace: curvhook runs on the last layer, on the detached features."""
    model, loader = _loader("rescnn", likelihood)
    precisions = []
    for backend in (CurvhookGGN, CurvlinopsGGN if structure == "kron" else FuncGGN):
        la = Laplace(model, likelihood, subset_of_weights="last_layer", hessian_structure=structure,
                     backend=backend)
        la.fit(loader)
        precision = la.posterior_precision
        precisions.append(precision.to_matrix() if structure == "kron" else precision)
    _close(*precisions, rtol=1e-9)
