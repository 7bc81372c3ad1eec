"""Operations applied to the model output outside the model, before (or beside) the loss.

The contract: operations ``g`` between the model and the loss are part of the
network, ``G = Σ_n J_nᵀ H_n J_n`` with ``J`` the Jacobian of ``g ∘ f`` and ``H``
the loss Hessian at ``g(f)``. Operations that do not lead to the loss change
nothing. Everything curvhook cannot follow raises.
"""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvhook import extend
from curvhook.errors import CurvhookError, UnsupportedLossError, UnsupportedModelError
from curvhook.extensions import (
    BatchGrad, BatchJacobian, BatchL2Grad, DiagGGN, DiagGGNApprox, FullGGN, SumGradSquared,
)
from graph_reference import diag_ggn_approx_graph
from helpers import Chain
from reference import check, collect, compare, reference

DT = torch.float64


def mlp():
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)).to(DT)


def run_and_compare(model, X, g, loss_fn, frozen=()):
    exts = [DiagGGN(), DiagGGNApprox(), FullGGN()]
    with extend(model, *exts):
        loss_fn(g(model(X))).backward()
    for m in frozen:  # the reference differentiates with respect to the model's parameters only
        m.requires_grad_(False)
    whole = Chain(model, g)
    ref = reference(whole, X, loss_fn, approx=False)
    got = collect(model, X.shape[0], ("DiagGGN", "DiagGGNApprox", "FullGGN"))
    compare({k: v for k, v in got.items() if k != "DiagGGNApprox"}, ref, exts[2].matrix)
    check(got["DiagGGNApprox"], diag_ggn_approx_graph(whole, X, ref.H.diagonal()), "DiagGGNApprox")


OPS = {
    "softmax_module_then_mse": (lambda out: nn.Softmax(dim=1)(out), "mse"),
    "chain_of_three": (lambda out: (out * 0.5).sin()[:, 1:] + 1.0, "ce"),
    "reshape_to_pairs": (lambda out: out[:, :4].reshape(-1, 2, 2).sum(-1), "ce"),
    "functional_cross_entropy": (lambda out: 3 * out, "functional"),
}


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("case", sorted(OPS))
def test_operations_before_the_loss_are_part_of_the_network(case, n):
    torch.manual_seed(0)
    model, X = mlp(), torch.randn(n, 4, dtype=DT)
    g, kind = OPS[case]
    if kind == "mse":
        target = torch.rand(n, 5, dtype=DT)
        loss_fn = lambda z: nn.MSELoss(reduction="sum")(z, target)  # noqa: E731
    elif kind == "ce":
        y = torch.randint(0, 2, (n,))
        loss_fn = lambda z: nn.CrossEntropyLoss()(z, y)  # noqa: E731
    else:  # a functional loss is found like its module
        y = torch.randint(0, 5, (n,))
        loss_fn = lambda z: F.cross_entropy(z, y)  # noqa: E731
    run_and_compare(model, X, g, loss_fn)


def test_functional_loss_named_with_operations_after_the_model_raises():
    model, X, y = mlp(), torch.randn(3, 4, dtype=DT), torch.randint(0, 5, (3,))
    with pytest.raises(UnsupportedLossError, match="after the model"):
        with extend(model, DiagGGN(loss=nn.CrossEntropyLoss())):
            F.nll_loss((2 * model(X)).log_softmax(1), y).backward()  # no loss curvhook finds


def test_operations_for_logging_change_nothing():
    """Accuracy or probabilities computed from the output, not backpropagated."""
    torch.manual_seed(1)
    model, X, y = mlp(), torch.randn(4, 4, dtype=DT), torch.randint(0, 5, (4,))
    crit = nn.CrossEntropyLoss()
    with extend(model, DiagGGN(), BatchJacobian()):
        out = model(X)
        probs = out.softmax(1)  # recorded, never reached by the backward
        _ = (probs.argmax(1) == y).double().mean()
        crit(out, y).backward()
    ref = reference(model, X, lambda o: crit(o, y), approx=False)
    compare(collect(model, 4, ("DiagGGN", "BatchJacobian")), ref)


def test_named_loss_still_works_when_logging_operations_are_not_backpropagated():
    torch.manual_seed(2)
    model, X, y = mlp(), torch.randn(3, 4, dtype=DT), torch.randint(0, 5, (3,))
    with extend(model, DiagGGN(loss=nn.CrossEntropyLoss())):
        out = model(X)
        out.softmax(1)  # not part of the backpropagated scalar
        F.cross_entropy(out, y).backward()
    ref = reference(model, X, lambda o: F.cross_entropy(o, y), approx=False)
    compare(collect(model, 3, ("DiagGGN",)), ref)


def test_losses_on_different_functions_of_the_output_raise():
    model, X, y = mlp(), torch.randn(3, 4, dtype=DT), torch.randint(0, 5, (3,))
    crit = nn.CrossEntropyLoss()
    with pytest.raises(UnsupportedLossError, match="different functions"):
        with extend(model, DiagGGN()):
            out = model(X)
            (crit(out, y) + crit(2 * out, y)).backward()


@pytest.mark.parametrize("named", [False, True])
def test_outputs_of_two_forward_passes_combined_raise(named):
    model, y = mlp(), torch.randint(0, 5, (3,))
    ext = DiagGGN(loss=nn.CrossEntropyLoss()) if named else DiagGGN()
    with pytest.raises(CurvhookError):
        with extend(model, ext):
            a, b = model(torch.randn(3, 4, dtype=DT)), model(torch.randn(3, 4, dtype=DT))
            F.cross_entropy(a + b, y).backward() if named else nn.CrossEntropyLoss()(a + b, y).backward()


def test_a_second_network_after_the_model_is_a_constant_map():
    """A head outside the extended model: its weights are constants of g, not parameters."""
    torch.manual_seed(3)
    model, head = mlp(), nn.Linear(5, 3).to(DT)
    X, y = torch.randn(4, 4, dtype=DT), torch.randint(0, 3, (4,))
    run_and_compare(model, X, head, lambda z: nn.CrossEntropyLoss()(z, y), frozen=[head])


def test_operations_after_the_model_that_mix_samples_raise():
    model, X = mlp(), torch.randn(3, 4, dtype=DT)
    y = torch.randint(0, 5, (3,))
    with pytest.raises(CurvhookError):
        with extend(model, DiagGGN()):
            out = model(X)
            nn.CrossEntropyLoss()(out - out.mean(0, keepdim=True), y).backward()


def test_forward_with_operations_after_it_is_freed_without_backward():
    model = mlp()
    refs = []
    with extend(model, DiagGGN()):
        for _ in range(3):
            out = model(torch.randn(3, 4, dtype=DT))
            z = 2 * out.tanh()
            refs += [weakref.ref(out), weakref.ref(z)]
            nn.CrossEntropyLoss()(z, torch.randint(0, 5, (3,)))  # no backward
            del out, z
        gc.collect()
        alive = sum(r() is not None for r in refs)
    assert alive == 0, f"{alive} tensors of dropped forward passes are still alive inside the block"


class Scaled(nn.Module):
    """A parameter used inside the forward and again, by the caller, after it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.scale = nn.Parameter(torch.rand(5) + 0.5)

    def forward(self, x):
        return torch.tanh(self.lin(x) * self.scale)


def test_model_parameter_used_again_after_the_model_keeps_its_cross_terms():
    """The sum over both uses comes before the square, as for weight sharing inside the model.

    The reference is written out here: ``g`` reads ``model.scale`` itself, which the
    chain-of-modules reference cannot substitute.
    """
    torch.manual_seed(6)
    model = Scaled().to(DT)
    X, y = torch.randn(4, 4, dtype=DT), torch.randint(0, 5, (4,))
    crit = nn.CrossEntropyLoss()
    ggn = FullGGN()
    with extend(model, DiagGGN(), ggn):
        crit(model(X) * model.scale, y).backward()

    params = {k: v.detach() for k, v in model.named_parameters()}

    def network(p):
        return (torch.func.functional_call(model, p, (X,)) * p["scale"]).reshape(-1)

    jac = torch.func.jacrev(network)(params)
    J = torch.cat([jac[k].reshape(X.shape[0] * 5, -1) for k in params], 1)
    H = torch.func.hessian(lambda z: crit(z.reshape(-1, 5), y))(network(params))
    G = J.T @ H @ J
    torch.testing.assert_close(ggn.matrix, G, rtol=1e-10, atol=1e-12)
    got = torch.cat([p.diag_ggn.flatten() for p in model.parameters()])
    torch.testing.assert_close(got, G.diagonal(), rtol=1e-10, atol=1e-12)


# --------------------------------------------- a loss over merged axes
class Tagger(nn.Module):
    """A per-position classifier: ``[N, L, 4]`` → ``[N, L, 5]`` logits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))

    def forward(self, x):
        return self.body(x)


MERGES = {
    "reshape(-1, V)": lambda f: f.reshape(-1, f.shape[-1]),
    "view(-1, V)": lambda f: f.view(-1, f.shape[-1]),
    "flatten(0, 1)": lambda f: f.flatten(0, 1),
    "slice then reshape": lambda f: f[:, 1:].reshape(-1, f.shape[-1]),
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("merge", list(MERGES))
@pytest.mark.parametrize("n", [1, 3])
def test_loss_over_the_batch_axis_merged_with_positions(merge, reduction, n):
    """``crit(logits.reshape(-1, V), y.reshape(-1))``: each sample is its block of rows.

    The exact extensions against the reference of ``g ∘ f`` (its Hessian is
    block-diagonal over the samples); DiagGGNApprox equals that of the same
    loss written per position, ``crit(logits.transpose(1, 2), y)``.
    """
    torch.manual_seed(0)
    model = Tagger().to(DT)
    X = torch.randn(n, 4, 4, dtype=DT)
    g = MERGES[merge]
    rows = g(torch.zeros(n, 4, 5)).shape[0]
    y = torch.randint(0, 5, (rows,))
    crit = nn.CrossEntropyLoss(reduction=reduction)
    ggn = FullGGN()
    with extend(model, DiagGGN(), DiagGGNApprox(), ggn):
        crit(g(model(X)), y).backward()
    got = collect(model, n, ("DiagGGN", "DiagGGNApprox", "FullGGN"))
    ref = reference(model, X, lambda out: crit(g(out), y), approx=False)
    compare({k: v for k, v in got.items() if k != "DiagGGNApprox"}, ref, ggn.matrix)
    if merge == "slice then reshape":
        return
    per_position = y.reshape(n, 4)
    with extend(model, DiagGGNApprox()):
        crit(model(X).transpose(1, 2), per_position).backward()
    expected = torch.cat([p.diag_ggn_approx.flatten() for p in model.parameters()])
    check(got["DiagGGNApprox"], expected, "DiagGGNApprox (merged rows)", rtol=1e-12)


def test_merged_rows_with_mse_and_several_losses():
    """Two losses on the same merged tensor, MSE over rows ``[N·L, V]``."""
    torch.manual_seed(0)
    model = Tagger().to(DT)
    X, t = torch.randn(2, 4, 4, dtype=DT), torch.randn(8, 5, dtype=DT)
    mse, mse_sum = nn.MSELoss(), nn.MSELoss(reduction="sum")
    loss_fn = lambda out: mse(out.reshape(-1, 5), t) + 0.5 * mse_sum(out.reshape(-1, 5), t)  # noqa: E731
    ggn = FullGGN()
    with extend(model, DiagGGN(), ggn):
        out = model(X).reshape(-1, 5)
        (mse(out, t) + 0.5 * mse_sum(out, t)).backward()
    got = collect(model, 2, ("DiagGGN", "FullGGN"))
    compare(got, reference(model, X, loss_fn, approx=False), ggn.matrix)


class WithTemperature(nn.Module):
    """A classifier whose temperature the training loop applies: ``crit(model(X) / model.T, y)``."""

    def __init__(self):
        super().__init__()
        self.net = mlp()
        self.T = nn.Parameter(torch.tensor(1.7, dtype=DT))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("ext", [BatchGrad, BatchL2Grad, SumGradSquared])
def test_per_sample_gradients_refuse_a_parameter_used_after_the_model(ext):
    """``T``'s per-sample gradients do not pass through the model output, where these extensions
    start: they were all zeros (``Σ_n g_n ≠ T.grad``); now a clear error."""
    torch.manual_seed(0)
    model, X, y = WithTemperature(), torch.randn(3, 4, dtype=DT), torch.randint(0, 5, (3,))
    with pytest.raises(UnsupportedModelError, match="used after the model returned"):
        with extend(model, ext()):
            nn.CrossEntropyLoss()(model(X) / model.T, y).backward()


def test_per_sample_gradients_with_a_parameter_used_after_the_model_for_logging_only():
    """The same temperature in a logged quantity the backward does not reach: exact per-sample
    gradients against torch.func."""
    torch.manual_seed(0)
    model, X, y = WithTemperature(), torch.randn(3, 4, dtype=DT), torch.randint(0, 5, (3,))
    crit = nn.CrossEntropyLoss()
    with extend(model, BatchGrad()):
        out = model(X)
        _ = (out / model.T).softmax(1).max(1).values.mean()  # logged, not backpropagated
        crit(out, y).backward()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_of_sample(ps, x, t):
        return F.cross_entropy(torch.func.functional_call(model, ps, (x[None],)), t[None]) / X.shape[0]

    expected = torch.func.vmap(torch.func.grad(loss_of_sample), in_dims=(None, 0, 0))(params, X, y)
    for name, p in model.named_parameters():
        check(p.grad_batch, expected[name], f"BatchGrad/{name}", rtol=1e-10)
