"""The plan cache: one plan per graph, rebuilt whenever anything a check depended on changed.

Every step is one ``with extend(...)`` block, as users write it. A counting
wrapper around ``curvhook.plan.build_plan`` tells when a plan is built, and
``curvhook.plan._PLANS[model]`` holds the cached ones. The results of every step,
with a fresh or a reused plan, are compared with the torch.func references
(``tests/reference.py``; DiagGGNApprox on graphs with ``tests/graph_reference.py``).
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable, Optional

import pytest
import torch
from torch import Tensor, nn

import curvhook.plan as plan_module
from curvhook import extend
from curvhook.errors import UnsupportedLossError, UnsupportedModelError
from curvhook.extensions import DiagGGN, FullGGN
from curvhook.plan import _PLANS, clear_plans
from graph_reference import diag_ggn_approx_graph
from helpers import ALL, run_curvhook
from reference import check, compare, reference

DT = torch.float64
N = 3


@pytest.fixture
def builds(monkeypatch):
    """Empty the cache and count the plans built: the list of the keys passed to ``build_plan``."""
    clear_plans()
    keys = []
    original = plan_module.build_plan

    def counting(trace, shape):
        keys.append(shape.key)
        return original(trace, shape)

    monkeypatch.setattr(plan_module, "build_plan", counting)
    yield keys
    clear_plans()


def cross_entropy(y: Tensor) -> Callable[[Tensor], Tensor]:
    """``out ↦ CE(out, y)`` with one fixed module."""
    crit = nn.CrossEntropyLoss()
    return lambda out: crit(out, y)


def labels(n: int = N, classes: int = 2) -> Tensor:
    """``n`` class labels, every class used."""
    return torch.arange(n) % classes


def exact_step(
    model: nn.Module,
    X: Tensor,
    loss_fn: Optional[Callable[[Tensor], Tensor]] = None,
    which=ALL,
    rtol: float = 1e-6,
    atol_factor: float = 1e-10,
) -> None:
    """One ``extend`` block on ``model``, every result compared with the references.

    The exact extensions against ``reference`` (``jacrev`` and ``hessian``);
    DiagGGNApprox against its definition on the recorded graph, from ``diag(H)``.

    Args:
        model: Any model without train-mode dropout (its references are functional).
        X: The input.
        loss_fn: ``out ↦ ℓ``; cross-entropy with :func:`labels` if ``None``.
        which: The extensions to run.
        rtol, atol_factor: Tolerances of :func:`reference.check`.
    """
    loss_fn = loss_fn or cross_entropy(labels(X.shape[0]))
    got, matrix, _ = run_curvhook(model, X, loss_fn, which, split_attention=False)
    ref = reference(model, X, loss_fn, approx=False)
    compare({k: v for k, v in got.items() if k != "DiagGGNApprox"}, ref, matrix, rtol, atol_factor, " (cache)")
    if "DiagGGNApprox" in got:
        d = torch.func.hessian(loss_fn)(ref.out.to(DT)).reshape(ref.out.numel(), -1).diagonal()
        model64 = model if next(model.parameters()).dtype == DT else _double_copy(model)
        check(got["DiagGGNApprox"], diag_ggn_approx_graph(model64, X.to(DT), d), "DiagGGNApprox (cache)",
              rtol, atol_factor)


def _double_copy(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` (the DiagGGNApprox reference of a float32 model)."""
    return copy.deepcopy(model).to(DT)


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(DT)


# ------------------------------------------------------------ reuse
def test_identical_steps_build_the_plan_once(builds):
    model = mlp()
    X = torch.randn(N, 3, dtype=DT)
    exact_step(model, X)
    assert len(builds) == 1 and len(_PLANS[model]) == 1
    plan = next(iter(_PLANS[model].values()))
    exact_step(model, X)
    exact_step(model, torch.randn(N, 3, dtype=DT))  # new values, same shapes
    assert len(builds) == 1
    assert list(_PLANS[model].values()) == [plan]


def test_reused_plan_follows_new_parameter_values(builds):
    model = mlp()
    X = torch.randn(N, 3, dtype=DT)
    exact_step(model, X)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    exact_step(model, X)
    assert len(builds) == 1


def test_plans_are_per_model(builds):
    a, b = mlp(), mlp()
    X = torch.randn(N, 3, dtype=DT)
    exact_step(a, X)
    exact_step(b, X)
    assert len(builds) == 2 and len(_PLANS[a]) == len(_PLANS[b]) == 1


def test_least_recently_used_plan_is_dropped(builds, monkeypatch):
    monkeypatch.setattr(plan_module, "_PLANS_PER_MODEL", 2)
    model = mlp()
    y = labels(3)
    for n in (1, 2, 1, 3):  # 1 is used again before 3 arrives, so 2 is the one dropped
        run_curvhook(model, torch.randn(n, 3, dtype=DT), cross_entropy(y[:n]), ("DiagGGN",))
    assert len(builds) == 3 and len(_PLANS[model]) == 2
    run_curvhook(model, torch.randn(1, 3, dtype=DT), cross_entropy(y[:1]), ("DiagGGN",))
    assert len(builds) == 3
    exact_step(model, torch.randn(2, 3, dtype=DT))
    assert len(builds) == 4


# ------------------------------------------------------------ what changes the key
def test_replaced_submodule_builds_a_new_plan(builds):
    model = mlp()
    X = torch.randn(N, 3, dtype=DT)
    exact_step(model, X)
    old = model[2]  # kept alive, so its id cannot be reused by the new module
    model[2] = nn.Linear(4, 2).to(DT)
    exact_step(model, X)
    assert len(builds) == 2 and len(_PLANS[model]) == 2
    model[2] = old
    exact_step(model, X)
    assert len(builds) == 2


class Conv(nn.Module):
    """Conv2d → adaptive pooling → linear: the output shape does not depend on the conv's geometry."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.lin = nn.Linear(8, 2)

    def forward(self, x):
        return self.lin(self.pool(self.conv(x)).flatten(1))


def _set_stride(m):
    m.conv.stride = (2, 2)


def _set_padding(m):
    m.conv.padding = (0, 0)


def _set_dilation_same_shape(m):
    m.conv.dilation, m.conv.padding = (2, 2), (2, 2)  # still 'same': 4×4 → 4×4


@pytest.mark.parametrize("change", [_set_stride, _set_padding, _set_dilation_same_shape])
def test_conv_configuration_builds_a_new_plan(builds, change):
    model = Conv().to(DT)
    X = torch.randn(2, 1, 4, 4, dtype=DT)
    exact_step(model, X)
    change(model)
    exact_step(model, X)
    assert len(builds) == 2 and len(_PLANS[model]) == 2


def _leaky(slope: float, inplace: bool = False) -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(slope, inplace=inplace), nn.Linear(4, 2)).to(DT)


def test_activation_configuration_builds_a_new_plan(builds):
    model = _leaky(0.01)
    X = torch.randn(N, 3, dtype=DT)
    exact_step(model, X)
    model[1].negative_slope = 0.3
    exact_step(model, X)
    assert len(builds) == 2
    model[1].inplace = True
    exact_step(model, X)
    assert len(builds) == 3
    model[1].inplace, model[1].negative_slope = False, 0.01
    exact_step(model, X)
    assert len(builds) == 3  # back to the first configuration: its plan


def test_dropout_probability_builds_a_new_plan(builds):
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).to(DT).train()
    X = torch.randn(N, 3, dtype=DT)
    y = labels()
    for p in (0.5, 0.2):
        model[1].p = p
        got, matrix, masks = run_curvhook(model, X, cross_entropy(y), record_masks=True)
        compare(got, reference(model, X, cross_entropy(y), masks=masks), matrix, tag=" (cache)")
    assert len(builds) == 2


class Reduce(nn.Module):
    """``lin2(op(lin1(x)))`` with ``op`` chosen per step by an attribute (a flag of the forward)."""

    def __init__(self, op: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.lin1, self.lin2, self.op = nn.Linear(3, 3), nn.Linear(3, 2), op

    def forward(self, x):
        return self.lin2(self.op(self.lin1(x)))


@pytest.mark.parametrize("first, second", [
    (lambda h: h.sum(1), lambda h: h.sum(2)),
    (lambda h: h.mean(1), lambda h: h.mean(dim=2)),
    (lambda h: (h * 0.5).sum(1), lambda h: (h * 2.0).sum(1)),
    (lambda h: h.transpose(1, 2)[:, :, 0], lambda h: h.transpose(1, 1)[:, :, 0]),
], ids=["sum-dim", "mean-dim", "constant-scale", "transpose"])
def test_operation_arguments_build_a_new_plan(builds, first, second):
    model = Reduce(first).to(DT)
    X = torch.randn(N, 3, 3, dtype=DT)
    exact_step(model, X)
    model.op = second
    exact_step(model, X)
    assert len(builds) == 2
    model.op = first
    exact_step(model, X)
    assert len(builds) == 2


def test_operation_moving_the_batch_axis_is_refused_with_the_same_shapes(builds):
    """``transpose(1, 2)`` and ``transpose(0, 1)`` of ``[3, 3, 3]`` have the same shapes;
    only the second mixes samples, and its refusal must not be skipped by the first plan."""
    model = Reduce(lambda h: h.transpose(1, 2).sum(1)).to(DT)
    X = torch.randn(N, 3, 3, dtype=DT)
    exact_step(model, X)
    model.op = lambda h: h.transpose(0, 1).sum(1)
    with pytest.raises(UnsupportedModelError, match="mixes samples"):
        run_curvhook(model, X, cross_entropy(labels()), ("BatchJacobian", "DiagGGN"))
    model.op = lambda h: h.transpose(1, 2).sum(1)
    exact_step(model, X)


class Sequence(nn.Module):
    """Linear over ``[N, T, F]``, mean over positions, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.lin2(torch.tanh(self.lin1(x)).mean(1))


def test_input_shapes_build_a_new_plan(builds):
    model = Sequence().to(DT)
    exact_step(model, torch.randn(N, 2, 3, dtype=DT))
    exact_step(model, torch.randn(N, 4, 3, dtype=DT))  # sequence length
    assert len(builds) == 2
    exact_step(model, torch.randn(2, 4, 3, dtype=DT))  # batch size
    assert len(builds) == 3
    exact_step(model, torch.randn(N, 2, 3, dtype=DT))
    assert len(builds) == 3


def test_dtype_builds_a_new_plan(builds):
    model = mlp()
    X = torch.randn(N, 3, dtype=DT)
    exact_step(model, X)
    model.float()
    # float32 results against the float64 references of the float32 parameters
    exact_step(model, X.float(), rtol=1e-4, atol_factor=1e-5)
    assert len(builds) == 2
    model.double()
    exact_step(model, X)
    assert len(builds) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_builds_a_new_plan(builds):
    model = mlp()
    X = torch.randn(N, 3, dtype=DT)
    exact_step(model, X)
    model.cuda()
    loss = cross_entropy(labels().cuda())
    exact_step(model, X.cuda(), loss, which=("BatchJacobian", "DiagGGN", "FullGGN"))
    assert len(builds) == 2
    model.cpu()
    exact_step(model, X)
    assert len(builds) == 2


def test_frozen_parameter_builds_a_new_plan(builds):
    model = mlp()
    X = torch.randn(N, 3, dtype=DT)
    exact_step(model, X)
    model[2].weight.requires_grad_(False)
    exact_step(model, X)  # the references cover the trainable parameters only
    assert len(builds) == 2
    assert not hasattr(model[2].weight, "diag_ggn")
    model[2].weight.requires_grad_(True)
    exact_step(model, X)
    assert len(builds) == 2


class Scaled(nn.Module):
    """``lin2(lin1(x) * w)``: a parameter passed to a tensor operation."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(3, 4), nn.Linear(4, 2)
        self.w = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x):
        return self.lin2(torch.tanh(self.lin1(x) * self.w))


def test_frozen_parameter_of_a_tensor_operation_builds_a_new_plan(builds):
    model = Scaled().to(DT)
    X = torch.randn(N, 3, dtype=DT)
    exact_step(model, X)
    model.w.requires_grad_(False)
    exact_step(model, X)
    assert len(builds) == 2


def test_input_requiring_grad_builds_a_new_plan(builds):
    model = mlp()
    X = torch.randn(N, 3, dtype=DT)
    exact_step(model, X)
    exact_step(model, X.clone().requires_grad_())
    assert len(builds) == 2
    exact_step(model, X)
    assert len(builds) == 2


def _batch_norm() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(DT)
    with torch.no_grad():  # running statistics that are not the identity map
        model[1].running_mean.copy_(torch.randn(4))
        model[1].running_var.copy_(torch.rand(4) + 0.5)
    return model


def test_batch_norm_train_mode_refused_eval_mode_exact(builds):
    model = _batch_norm().eval()
    X = torch.randn(N, 3, dtype=DT)
    exact_step(model, X)
    model.train()
    with pytest.raises(UnsupportedModelError, match="statistics"):
        run_curvhook(model, X, cross_entropy(labels()), ("DiagGGN",))
    with pytest.raises(UnsupportedModelError, match="statistics"):  # a refusal is not cached as a plan
        run_curvhook(model, X, cross_entropy(labels()), ("DiagGGN",))
    model.eval()
    exact_step(model, X)
    assert len(builds) == 3 and len(_PLANS[model]) == 1


@pytest.mark.parametrize("eval_step_first", [False, True])
def test_batch_norm_forward_in_train_mode_backward_in_eval_mode_refused(builds, eval_step_first):
    """The forward used batch statistics: switching to eval before ``backward`` changes nothing."""
    model = _batch_norm()
    X = torch.randn(N, 3, dtype=DT)
    crit, y = nn.CrossEntropyLoss(), labels()
    if eval_step_first:
        exact_step(model.eval(), X)
    for _ in range(2):  # and the refusal is not cached away either
        with pytest.raises(UnsupportedModelError, match="statistics"):
            with extend(model, DiagGGN()):
                out = model.train()(X)
                model.eval()
                crit(out, y).backward()
    model.train()
    with pytest.raises(UnsupportedModelError, match="statistics"):
        run_curvhook(model, X, cross_entropy(y), ("DiagGGN",))


def test_dropout_train_and_eval_build_a_plan_each(builds):
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).to(DT)
    X = torch.randn(N, 3, dtype=DT)
    y = labels()

    def train_step():
        got, matrix, masks = run_curvhook(model.train(), X, cross_entropy(y), record_masks=True)
        compare(got, reference(model, X, cross_entropy(y), masks=masks), matrix, tag=" (cache)")

    train_step()
    exact_step(model.eval(), X)
    assert len(builds) == 2
    train_step()  # a new mask, the same plan
    assert len(builds) == 2


# ------------------------------------------------------------ per step, whatever the plan
def test_nonlinear_function_of_the_loss_refused_after_a_good_step(builds):
    model = mlp()
    X = torch.randn(N, 3, dtype=DT)
    crit, y = nn.CrossEntropyLoss(), labels()
    exact_step(model, X)
    with pytest.raises(UnsupportedLossError, match="nonlinear function"):
        with extend(model, DiagGGN()):
            crit(model(X), y).exp().backward()
    exact_step(model, X)
    assert len(builds) == 1


def test_extra_term_refused_after_a_good_step(builds):
    model = mlp()
    X = torch.randn(N, 3, dtype=DT)
    crit, y = nn.CrossEntropyLoss(), labels()
    exact_step(model, X)
    with pytest.raises(UnsupportedLossError, match="not that of the loss"):
        with extend(model, DiagGGN(), FullGGN()):
            out = model(X)
            (crit(out, y) + out.sum()).backward()
    assert len(builds) == 1  # the same graph: the cached plan, and the check all the same


class SortSamples(nn.Module):
    """``torch.msort`` of the hidden features, along the batch axis: a permutation of samples unless already sorted.

    With increasing inputs and positive weights the features are sorted, the sort
    is the identity and keeps samples apart; with other inputs it mixes them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(1, 3), nn.Linear(3, 2)
        with torch.no_grad():
            self.lin1.weight.copy_(torch.rand(3, 1) + 0.5)

    def forward(self, x):
        return self.lin2(torch.tanh(torch.msort(self.lin1(x))))


def test_operation_mixing_samples_for_some_values_is_checked_every_step(builds):
    model = SortSamples().to(DT)
    ordered = torch.tensor([[-1.0], [0.2], [1.5]], dtype=DT)
    exact_step(model, ordered)
    shuffled = ordered[[2, 0, 1]]
    for which in (("BatchJacobian",), ("DiagGGN",), ("DiagGGNApprox",)):
        with pytest.raises(UnsupportedModelError, match="mixes samples"):
            run_curvhook(model, shuffled, cross_entropy(labels()), which)
    exact_step(model, ordered * 2)
    assert len(builds) == 1


class _Gain(nn.Module):
    """``y = x ∘ w``: a custom leaf, first through the fallback, then through a rule."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, 4, dtype=DT))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


def test_rule_registered_between_steps_builds_a_new_plan(builds, monkeypatch):
    """A cached plan keeps the rule it resolved: registering one must not leave it in use."""
    from curvhook import LayerRule, register_rule
    from curvhook.rules import registry

    monkeypatch.setattr(registry, "_RULES", dict(registry._RULES))
    used = []

    class GainRule(LayerRule):
        def jac_t_mat_prod(self, call, mat):
            used.append("rule")
            return mat * call.module.weight

        def param_jac_t_mat_prod(self, call, name, mat):
            return mat * call.input

    model = nn.Sequential(nn.Linear(3, 4), _Gain(), nn.Linear(4, 2)).to(DT)
    X = torch.randn(N, 3, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's warning
        exact_step(model, X, which=("BatchJacobian", "DiagGGN"))
    assert len(builds) == 1 and not used
    register_rule(_Gain)(GainRule)
    exact_step(model, X, which=("BatchJacobian", "DiagGGN"))
    assert len(builds) == 2 and used, "the plan cached before the registration was reused"
