"""Inputs with and without ``requires_grad`` before the first layer, float32 and float64
models, results in the parameters' dtype and device, and a float64 default dtype."""

import pytest
import torch
from torch import nn

from curvhook import extend
from curvhook.extensions import BatchJacobian, DiagGGN, DiagGGNApprox, FullGGN
from helpers import ATTRS, DT, check_against_reference, data, mlp, run_curvhook
from reference import collect, compare, reference


@pytest.mark.parametrize("x_requires_grad", [False, True])
@pytest.mark.parametrize("first", ["Linear", "Tanh", "Flatten", "ReLU_inplace_after_Linear"])
def test_first_layer_input_with_and_without_grad(first, x_requires_grad):
    head = {
        "Linear": [],
        "Tanh": [nn.Tanh()],
        "Flatten": [nn.Flatten()],
        "ReLU_inplace_after_Linear": [nn.Linear(4, 4), nn.ReLU(inplace=True)],
    }[first]
    model = nn.Sequential(*head, nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3)).to(DT)
    X, y = data()
    X.requires_grad_(x_requires_grad)
    check_against_reference(model, X, lambda out: nn.CrossEntropyLoss()(out, y))


def test_float32_smoke():
    model = mlp(torch.float32)
    X, y = data(dtype=torch.float32)
    crit = nn.CrossEntropyLoss()
    got, matrix, _ = run_curvhook(model, X, lambda out: crit(out, y))
    for v in list(got.values()) + [matrix]:
        assert v.dtype == torch.float32
    ref = reference(model, X, lambda out: crit(out.to(torch.float64), y), dtype=torch.float64)
    assert ref.G.dtype == torch.float64
    compare(got, ref, matrix, rtol=1e-4, atol_factor=1e-5, tag=" (float32)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_result_dtype_follows_parameter_dtype(dtype):
    model = mlp(dtype)
    X, y = data(dtype=dtype)
    ggn = FullGGN()
    with extend(model, BatchJacobian(), DiagGGN(), DiagGGNApprox(), ggn):
        nn.CrossEntropyLoss()(model(X), y).backward()
    assert ggn.matrix.dtype == dtype
    for p in model.parameters():
        for a in ATTRS:
            assert getattr(p, a).dtype == dtype, a
            assert getattr(p, a).device == p.device


def test_default_dtype_float64_without_explicit_casts():
    torch.set_default_dtype(torch.float64)  # restored by the autouse fixture
    model = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2))
    X, y = torch.randn(3, 3), torch.randint(0, 2, (3,))
    check_against_reference(model, X, lambda out: nn.CrossEntropyLoss()(out, y))


class _DictInput(nn.Module):
    """A model whose one positional argument is a mapping (laplace-torch's dict data, Hugging Face batches)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, data):
        return self.net(data["x"])


@pytest.mark.parametrize("wrap", [dict, __import__("collections").UserDict, lambda d: (d["x"],)],
                         ids=["dict", "UserDict", "tuple"])
def test_inputs_inside_a_mapping_or_a_tuple(wrap):
    """The batch tensor is found inside a dict, a ``UserDict`` or a tuple passed as the one argument:
    the results are those of the inner network called on the tensor (checked against torch.func)."""
    torch.manual_seed(0)
    model = _DictInput()
    if wrap not in (dict, __import__("collections").UserDict):
        model.forward = lambda data: model.net(data[0])  # a tuple argument
    X, y = data(4)
    _, ref = check_against_reference(model.net, X, lambda out: nn.CrossEntropyLoss()(out, y))
    with extend(model, DiagGGN(), BatchJacobian()):
        nn.CrossEntropyLoss()(model(wrap({"x": X})), y).backward()
    compare(collect(model.net, 4, ("DiagGGN", "BatchJacobian")), ref)
