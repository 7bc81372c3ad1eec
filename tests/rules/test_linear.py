"""``curvhook/rules/linear.py``: ``nn.Linear`` on features and on leading (position) axes.

Every case of the table runs BatchJacobian, DiagGGN, DiagGGNApprox and FullGGN in
one ``extend`` block and compares them in float64 with the brute-force reference
(``tests/reference.py``), for one sample and for a batch of three with a
non-contiguous input; the registered rule (never the torch.func fallback) must
serve every module; a float32 run is compared with the same reference.
"""

import pytest
import torch
from torch import nn

from curvhook import extend
from curvhook.extensions import BatchJacobian, DiagGGN
from curvhook.rules import base as rules_base
from helpers import (
    layer_table_tests,
    CLASSES,
    DT,
    bce,
    ce,
    check_against_reference,
    float_input,
    head,
    mse,
    prefix_conv,
    randomize_linear,
    seq,
)
from reference import check, collect, compare, reference

class Conv1D(nn.Module):
    """Hugging Face's ``Conv1D`` (GPT-2) as ``transformers.pytorch_utils`` writes it: weight ``[nx, nf]``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.5)
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


Conv1D.__module__ = "transformers.pytorch_utils"  # matched by name, as the real one (no import of transformers)


# name -> (model builder, input builder)
CASES = {
    "hf_conv1d_positions": (seq(nn.Linear(3, 4), Conv1D(5, 4), nn.Tanh(), *head()), float_input((2, 3))),
    "hf_conv1d_features": (seq(nn.Linear(4, 4), Conv1D(CLASSES, 4)), float_input((4,))),
    "first_layer": (seq(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, CLASSES)), float_input((4,))),
    "no_bias_after_linear": (
        seq(nn.Linear(4, 4), nn.Linear(4, 5, bias=False), nn.Tanh(), nn.Linear(5, CLASSES)),
        float_input((4,)),
    ),
    "one_output_feature": (seq(nn.Linear(4, 1), nn.Tanh(), nn.Linear(1, CLASSES)), float_input((4,))),
    "one_input_feature_no_bias": (seq(nn.Linear(1, 3, bias=False), nn.Sigmoid(), nn.Linear(3, CLASSES)), float_input((1,))),
    "positions": (seq(nn.Linear(3, 4), nn.Linear(4, 2), *head()), float_input((5, 3))),
    "positions_2d_no_bias": (seq(nn.Linear(3, 4, bias=False), nn.Sigmoid(), *head()), float_input((2, 3, 3))),
    "last_axis_of_conv_maps": (seq(prefix_conv(1, 2), nn.Linear(5, 3), *head()), float_input((2, 5))),
    "output_layer_only": (seq(nn.Linear(6, CLASSES)), float_input((6,))),
}


test_layer_one_sample, test_layer_batch_noncontiguous_and_float32, test_table_covers_every_registered_type = (
    layer_table_tests(CASES, "linear")
)


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("loss", ["ce", "mse_mean", "mse_sum", "bce"])
@pytest.mark.parametrize("bias", [True, False])
def test_single_linear(loss, n, bias):
    model = randomize_linear(nn.Sequential(nn.Linear(5, 3, bias=bias)))
    X = torch.randn(n, 5, dtype=DT)
    loss_fn = {
        "ce": lambda: ce(torch.randint(0, 3, (n,))),
        "mse_mean": lambda: mse(torch.randn(n, 3, dtype=DT)),
        "mse_sum": lambda: mse(torch.randn(n, 3, dtype=DT), "sum"),
        "bce": lambda: bce(torch.rand(n, 3, dtype=DT)),
    }[loss]()
    got, ref = check_against_reference(model, X, loss_fn)
    if loss.startswith("mse"):
        # documented: the approximation is exact for a single Linear with MSELoss
        check(got["DiagGGNApprox"], ref.diag_ggn, "DiagGGNApprox")


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("loss", ["mse_on_NTC", "ce_after_flatten"])
def test_linear_with_leading_dims(loss, n):
    layers = [nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)]
    if loss == "ce_after_flatten":
        layers.append(nn.Flatten())
    model = randomize_linear(nn.Sequential(*layers))
    X = torch.randn(n, 4, 3, dtype=DT)  # [N, T, in]
    loss_fn = mse(torch.randn(n, 4, 2, dtype=DT)) if loss == "mse_on_NTC" else ce(torch.randint(0, 8, (n,)))
    check_against_reference(model, X, loss_fn)


@pytest.mark.parametrize("chunk", [1, 30, 10**9])
def test_linear_over_positions_diag_ggn_in_chunks(monkeypatch, chunk):
    """``nn.Linear`` on ``[N, T, in]``: the per-sample products sum over positions before squaring."""
    monkeypatch.setattr(rules_base, "_SQ_CHUNK_ENTRIES", chunk)
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Flatten(), nn.Linear(10, 3)).to(DT)
    X, y = torch.randn(4, 5, 3, dtype=DT), torch.randint(0, 3, (4,))
    with extend(model, DiagGGN(), BatchJacobian()):
        nn.CrossEntropyLoss()(model(X), y).backward()
    ref = reference(model, X, lambda o: nn.CrossEntropyLoss()(o, y), approx=False)
    compare(collect(model, 4, ("DiagGGN", "BatchJacobian")), ref)


def test_conv1d_named_class_of_another_package_gets_no_rule():
    """The rule matches the class name only in the package that defines it."""
    from curvhook.rules.linear import Conv1DRule
    from curvhook.rules.registry import rule_for

    assert isinstance(rule_for(Conv1D(3, 4)), Conv1DRule)
    other = type("Conv1D", (Conv1D,), {"__module__": "mypackage.layers"})
    assert rule_for(other(3, 4)) is None
