"""``curvhook/rules/elementwise.py``: every activation with a rule (in place and not),
at kinks, on feature maps and positions, and ``nn.Dropout`` in eval and train mode.

Every test runs BatchJacobian, DiagGGN, DiagGGNApprox and FullGGN in one
``extend`` block and compares each with the brute-force reference in float64.
The table at the end puts activations on inputs with more than one axis per
sample; its cases run for one sample and for a batch of three with a
non-contiguous input, the registered rule (never the torch.func fallback) must
serve every module, and a float32 run is compared with the same reference.
"""

import math

import pytest
import torch
from torch import nn

from helpers import (
    CLASSES,
    DT,
    ce,
    check_against_reference,
    check_layer_batch_noncontiguous_and_float32,
    float_input,
    head,
    leaf_types,
    mse,
    prefix_conv,
    randomize_linear,
    registered_types,
    run_layer_case,
    seq,
)

ACTIVATIONS = {
    "ReLU": lambda: nn.ReLU(),
    "LeakyReLU": lambda: nn.LeakyReLU(0.1),
    "Tanh": lambda: nn.Tanh(),
    "Sigmoid": lambda: nn.Sigmoid(),
    "ELU": lambda: nn.ELU(alpha=0.7),
    "SELU": lambda: nn.SELU(),
    "CELU": lambda: nn.CELU(alpha=1.3),
    "GELU_none": lambda: nn.GELU(approximate="none"),
    "GELU_tanh": lambda: nn.GELU(approximate="tanh"),
    "SiLU": lambda: nn.SiLU(),
    "Mish": lambda: nn.Mish(),
    "Softplus": lambda: nn.Softplus(beta=1.5, threshold=2.0),
    "LogSigmoid": lambda: nn.LogSigmoid(),
    "Hardtanh": lambda: nn.Hardtanh(-0.5, 0.8),
    "ReLU6": lambda: nn.ReLU6(),
    "Hardsigmoid": lambda: nn.Hardsigmoid(),
    "Hardswish": lambda: nn.Hardswish(),
    # in-place variants of every activation that has the flag
    "ReLU_inplace": lambda: nn.ReLU(inplace=True),
    "LeakyReLU_inplace": lambda: nn.LeakyReLU(0.1, inplace=True),
    "ELU_inplace": lambda: nn.ELU(alpha=0.7, inplace=True),
    "SELU_inplace": lambda: nn.SELU(inplace=True),
    "CELU_inplace": lambda: nn.CELU(alpha=1.3, inplace=True),
    "SiLU_inplace": lambda: nn.SiLU(inplace=True),
    "Mish_inplace": lambda: nn.Mish(inplace=True),
    "Hardtanh_inplace": lambda: nn.Hardtanh(-0.5, 0.8, inplace=True),
    "ReLU6_inplace": lambda: nn.ReLU6(inplace=True),
    "Hardsigmoid_inplace": lambda: nn.Hardsigmoid(inplace=True),
    "Hardswish_inplace": lambda: nn.Hardswish(inplace=True),
}


def test_activation_table_covers_every_inplace_flag():
    """Guard: every activation module that has an ``inplace`` flag is tested with it."""
    for name, make in ACTIVATIONS.items():
        if "_" in name and not name.endswith("_inplace"):
            continue
        if hasattr(make(), "inplace") and not name.endswith("_inplace"):
            assert f"{name}_inplace" in ACTIVATIONS, name


def test_activation_table_covers_every_registered_type():
    """Guard: every module type the elementwise rules serve is in the tables of this file."""
    tested = {type(make()) for make in ACTIVATIONS.values()} | leaf_types(CASES)
    assert registered_types("elementwise") <= tested


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_two_layer_mlp_every_activation(act, n):
    model = randomize_linear(nn.Sequential(nn.Linear(4, 6), ACTIVATIONS[act](), nn.Linear(6, 3)))
    X = 2 * torch.randn(n, 4, dtype=DT)
    y = torch.randint(0, 3, (n,))
    check_against_reference(model, X, ce(y))


@pytest.mark.parametrize("act", ["Tanh", "Sigmoid", "Softplus", "Hardswish_inplace", "ELU_inplace"])
def test_activation_as_last_module_with_mse(act):
    model = randomize_linear(nn.Sequential(nn.Linear(4, 5), ACTIVATIONS[act]()))
    X = 2 * torch.randn(3, 4, dtype=DT)
    check_against_reference(model, X, mse(torch.randn(3, 5, dtype=DT)))


KINKS = {
    # activation, pre-activation value exactly at a kink
    "ReLU": (lambda: nn.ReLU(), 0.0),
    "ReLU_inplace": (lambda: nn.ReLU(inplace=True), 0.0),
    "LeakyReLU": (lambda: nn.LeakyReLU(0.1), 0.0),
    "Hardtanh_upper": (lambda: nn.Hardtanh(-0.5, 0.8), 0.8),
    "Hardtanh_lower_inplace": (lambda: nn.Hardtanh(-0.5, 0.8, inplace=True), -0.5),
    "ReLU6_at_6": (lambda: nn.ReLU6(), 6.0),
    "Hardsigmoid_at_3": (lambda: nn.Hardsigmoid(), 3.0),
    "Hardswish_at_-3": (lambda: nn.Hardswish(), -3.0),
    "ELU_at_0": (lambda: nn.ELU(alpha=0.5), 0.0),
}


@pytest.mark.parametrize("case", sorted(KINKS))
def test_derivative_at_kinks_matches_autograd(case):
    """Some pre-activations sit exactly on a kink: the result must follow autograd's convention."""
    make, value = KINKS[case]
    model = randomize_linear(nn.Sequential(nn.Linear(4, 6), make(), nn.Linear(6, 3)))
    with torch.no_grad():
        model[0].weight[:3] = 0.0
        model[0].bias[:3] = value
    X = torch.randn(3, 4, dtype=DT)
    check_against_reference(model, X, ce(torch.randint(0, 3, (3,))))


# ------------------------------------------------------------------ dropout
@pytest.mark.parametrize("n", [1, 3])
def test_dropout_eval_mode(n):
    model = randomize_linear(nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.ReLU(), nn.Linear(6, 3)))
    model.eval()
    X = torch.randn(n, 4, dtype=DT)
    check_against_reference(model, X, ce(torch.randint(0, 3, (n,))))


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("n", [1, 5])
def test_dropout_train_mode_uses_the_mask_of_this_forward(n, inplace):
    model = randomize_linear(nn.Sequential(
        nn.Linear(4, 8), nn.Dropout(0.4, inplace=inplace), nn.Tanh(), nn.Linear(8, 6), nn.Dropout(0.3), nn.Linear(6, 3)
    ))
    model.train()
    X = torch.randn(n, 4, dtype=DT)
    check_against_reference(model, X, ce(torch.randint(0, 3, (n,))), record_masks=True)


def test_dropout_train_mode_as_last_module():
    model = randomize_linear(nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5)))
    X = torch.randn(4, 4, dtype=DT)
    check_against_reference(model, X, mse(torch.randn(4, 6, dtype=DT)), record_masks=True)


# ------------------------------------- activations on more than one axis per sample
class NewGELUActivation(nn.Module):
    """Hugging Face's GPT-2 activation (``transformers.activations``): several operations, elementwise."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GELUActivation(nn.Module):
    """Hugging Face's ``GELUActivation``: ``F.gelu``, one autograd operation."""

    def forward(self, x):
        return nn.functional.gelu(x)


class QuickGELUActivation(nn.Module):
    """CLIP's activation: ``x * sigmoid(1.702 x)``. Its output node is a product whose first edge
    is ``x``: taken for a one-operation call, it gave ``sigmoid(1.702 x)`` as the slope
    (BatchJacobian 0.17 off on the model below, CLIP's DiagGGN up to 0.28)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class LinearActivation(nn.Module):
    """Returns its input as it is: refused before ("overwritten in place" inside a checkpoint)."""

    def forward(self, x):
        return x


for _cls in (NewGELUActivation, GELUActivation, QuickGELUActivation, LinearActivation):
    _cls.__module__ = "transformers.activations"  # matched by name, as the real ones


def _prelu(channels):
    """``nn.PReLU`` with distinct slopes, negative ones included."""
    module = nn.PReLU(channels)
    with torch.no_grad():
        module.weight.copy_(torch.linspace(-0.6, 0.9, channels) if channels > 1 else torch.tensor([0.3]))
    return module


# name -> (model builder, input builder)
CASES = {
    "hf_new_gelu_positions": (seq(nn.Linear(3, 4), NewGELUActivation(), *head()), float_input((2, 3))),
    "hf_gelu_conv1d_maps": (seq(prefix_conv(1, 3), GELUActivation(), *head()), float_input((3, 4))),
    "hf_quick_gelu_positions": (seq(nn.Linear(3, 4), QuickGELUActivation(), *head()), float_input((2, 3))),
    "hf_quick_gelu_features": (seq(nn.Linear(3, 4), QuickGELUActivation(), nn.Linear(4, CLASSES)), float_input((3,))),
    "hf_linear_activation": (seq(nn.Linear(3, 4), LinearActivation(), nn.Tanh(), nn.Linear(4, CLASSES)), float_input((3,))),
    "relu_conv2d_maps": (seq(prefix_conv(2, 2), nn.ReLU(), *head()), float_input((2, 3, 3))),
    "sigmoid_conv1d_maps": (seq(prefix_conv(1, 3), nn.Sigmoid(), *head()), float_input((3, 4))),
    "silu_inplace_conv3d_maps": (seq(prefix_conv(3, 1), nn.SiLU(inplace=True), *head()), float_input((1, 2, 2, 3))),
    "hardswish_conv2d_maps": (seq(prefix_conv(2, 2), nn.Hardswish(), *head()), float_input((2, 3, 2))),
    "elu_inplace_conv1d_maps": (seq(prefix_conv(1, 2), nn.ELU(inplace=True), *head()), float_input((2, 5))),
    "gelu_tanh_positions": (seq(nn.Linear(3, 4), nn.GELU(approximate="tanh"), *head()), float_input((2, 3))),
    "softplus_positions": (seq(nn.Linear(3, 3), nn.Softplus(beta=2.0), *head()), float_input((4, 3))),
    "logsigmoid_first_layer": (seq(nn.LogSigmoid(), *head()), float_input((2, 3))),
    "tanh_first_layer_then_conv": (seq(nn.Tanh(), prefix_conv(2, 2), *head()), float_input((2, 2, 3))),
    "dropout_eval_conv2d_maps": (seq(prefix_conv(2, 2), nn.Dropout(0.5), *head()), float_input((2, 3, 3))),
    # PReLU: slopes of their own per channel (3 channels: as many as the batch, where
    # torch.func's batching of its parameter gradient goes wrong), one slope for all
    "prelu_per_channel_conv2d_maps": (seq(prefix_conv(2, 3), _prelu(3), *head()), float_input((3, 3, 2))),
    "prelu_per_channel_conv1d_maps": (seq(prefix_conv(1, 2), _prelu(2), *head()), float_input((2, 4))),
    "prelu_per_feature": (seq(nn.Linear(3, 4), _prelu(4), nn.Linear(4, CLASSES)), float_input((3,))),
    "prelu_one_slope_positions": (seq(nn.Linear(3, 3), _prelu(1), *head()), float_input((4, 3))),
    "prelu_first_layer": (seq(_prelu(2), prefix_conv(1, 2), *head()), float_input((2, 3))),
}


@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_one_sample(case):
    run_layer_case(CASES[case], 1, contiguous=True)


@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_batch_noncontiguous_and_float32(case):
    check_layer_batch_noncontiguous_and_float32(CASES[case])


def test_the_tanh_gelu_of_gpt2_takes_its_closed_form_slope_not_a_replay(monkeypatch):
    """``NewGELUActivation`` computes ``F.gelu(x, approximate="tanh")`` in fifteen operations;
    its slope comes from aten's closed-form derivative instead of a replay of the module
    (which still serves the other multi-operation activations). Exact in float64."""
    from curvhook.rules import elementwise

    def no_replay(call):
        raise AssertionError(f"replayed {call.name}")

    monkeypatch.setattr(elementwise, "_replayed_slope", no_replay)
    torch.manual_seed(5)
    model = randomize_linear(nn.Sequential(nn.Linear(3, 4), NewGELUActivation(), nn.Flatten(), nn.Linear(8, CLASSES)))
    X = torch.randn(3, 2, 3, dtype=DT)
    X[0, 0] = 0.0  # the slope at 0 (1/2)
    check_against_reference(model, X, ce(torch.randint(0, CLASSES, (3,))))
