"""Clear refusals: wrong arguments to ``extend``, models that return several tensors, and
models whose samples are not independent, all leaving the model clean. (Refused losses
and uses of the loss are in ``tests/test_losses.py``; operations that mix samples in
``tests/rules/test_tensor_ops.py``.)"""

import warnings

import pytest
import torch
from torch import nn

from curvhook import extend
from curvhook.errors import UnsupportedModelError
from curvhook.extensions import DiagGGN, DiagGGNApprox
from helpers import DT, EXTENSIONS, assert_clean, data, mlp, snapshot, warnings_ignored


def test_same_extension_type_twice_is_rejected():
    with pytest.raises(ValueError):
        extend(mlp(), DiagGGN(), DiagGGN())


def test_extend_rejects_non_modules_and_classes():
    with pytest.raises(TypeError):
        extend(lambda x: x, DiagGGN())
    with pytest.raises(TypeError):
        extend(mlp(), DiagGGN)


class TupleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x):
        out = self.a(x)
        return out, out


@pytest.mark.parametrize("ext", sorted(EXTENSIONS))
def test_model_returning_a_tuple_raises(ext):
    model = TupleModel().to(DT)
    before = snapshot(model)
    with extend(model, EXTENSIONS[ext]()):
        with pytest.raises(UnsupportedModelError, match="tuple|one tensor"):
            model(torch.randn(2, 4, dtype=DT))
    assert_clean(model, before)


class DropsBatchAxis(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.flat, self.unflat, self.b = nn.Linear(4, 3), nn.Flatten(0), nn.Unflatten(0, (4, 3)), nn.Linear(3, 3)

    def forward(self, x):
        return self.b(self.unflat(self.flat(self.a(x))))


@pytest.mark.parametrize("ext", sorted(EXTENSIONS))
@pytest.mark.parametrize("case", ["batch_axis_not_kept"])
def test_modules_without_per_sample_structure_raise(case, ext):
    # several distinct differentiable inputs are supported now (tests/rules/test_tensor_ops.py, "two_inputs")
    model = {"batch_axis_not_kept": DropsBatchAxis}[case]().to(DT)
    X, y = data()
    before = snapshot(model)
    with warnings_ignored():
        with extend(model, EXTENSIONS[ext]()):
            loss = nn.CrossEntropyLoss()(model(X), y)
            with pytest.raises(UnsupportedModelError):
                loss.backward()
    assert_clean(model, before)


@pytest.mark.parametrize(
    "case, remedy",
    [
        ("train", "Call model.eval()"),
        ("no_running_stats", "track_running_stats=True"),
    ],
)
def test_batch_statistics_are_refused_with_the_remedy_that_applies(case, remedy):
    """BatchNorm with batch statistics mixes samples. In eval mode without running statistics,
    the message said "Call model.eval()" to a model already in eval mode."""
    norm = {"train": nn.BatchNorm1d(5), "no_running_stats": nn.BatchNorm1d(5, track_running_stats=False)}[case]
    model = nn.Sequential(nn.Linear(4, 5), norm, nn.Linear(5, 3)).to(DT).train(case == "train")
    X, y = data()
    with pytest.raises(UnsupportedModelError, match=remedy):
        with extend(model, DiagGGN()):
            nn.CrossEntropyLoss()(model(X), y).backward()


class _PassesAndComputes(nn.Module):
    """A leaf returning its input unchanged beside a new tensor: ``(x, tanh(x))``."""

    def forward(self, x):
        return x, torch.tanh(x)


class _UsesBoth(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.mid, self.b = nn.Linear(4, 5), _PassesAndComputes(), nn.Linear(5, 3)

    def forward(self, x):
        u, v = self.mid(self.a(x))
        return self.b(u * v)


def test_a_leaf_returning_its_input_beside_a_new_output_names_its_second_output():
    """A leaf that returns its input as it is is no operation, but not when it returns more:
    the use of its second output is refused by name (not as an operation curvhook did not see)."""
    model = _UsesBoth().to(DT)
    X, y = data(4, d_in=4)
    with pytest.raises(UnsupportedModelError, match="second output of module 'mid'"):
        with extend(model, DiagGGN()):
            nn.CrossEntropyLoss()(model(X), y).backward()


@pytest.mark.parametrize("where", ["operation", "module"])
def test_running_out_of_memory_in_torch_func_says_so(where, monkeypatch):
    """An allocation that fails inside the generic rules' dense per-sample Jacobians is reported
    as running out of memory, with what to do (it said 'could not differentiate')."""
    import curvhook.rules.fallback as fallback_rules
    import curvhook.rules.tensor_ops as tensor_op_rules

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    class Odd(nn.Module):  # no rule: the fallback
        def forward(self, x):
            return x * torch.sigmoid(x).square()

    if where == "operation":
        monkeypatch.setattr(tensor_op_rules, "jacrev", no_memory)
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3)).double()
        model.forward = lambda x: model[1](torch.atan2(model[0](x), torch.ones(())))  # no closed form
    else:
        monkeypatch.setattr(fallback_rules, "vjp", no_memory)
        model = nn.Sequential(nn.Linear(4, 4), Odd(), nn.Linear(4, 3)).double()
    X, y = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UnsupportedModelError, match="ran out of memory differentiating.*smaller batch"):
            with extend(model, DiagGGNApprox()):
                nn.CrossEntropyLoss()(model(X), y).backward()


class _ScaledByBatchMax(nn.Module):
    """``h / max(h)`` over every axis (Nystromformer's ``init_option='original'``): one scalar
    from the whole batch."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h * (1 / torch.max(h.abs().sum(-1))))


@pytest.mark.parametrize("ext", [DiagGGN, DiagGGNApprox])
def test_a_scalar_reduced_over_the_whole_batch_is_refused_by_name(ext):
    """Before: "cannot split the operation mul into samples (vmap: Got in_dim=0 for some input,
    but that input is a Tensor of dimensionality 0)". Now the message says what the scalar is
    and how to reduce per sample instead; the model is left clean."""
    model = _ScaledByBatchMax().to(DT)
    X, y = torch.randn(3, 4, dtype=DT), torch.randint(0, 3, (3,))
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match=r"scalar computed from the batch.*mul.*|mul.*scalar computed from the batch"):
        with extend(model, ext()):
            nn.CrossEntropyLoss()(model(X), y).backward()
    assert_clean(model, before)
