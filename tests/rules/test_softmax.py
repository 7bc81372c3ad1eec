"""``curvhook/rules/softmax.py``: ``nn.Softmax``, ``nn.LogSoftmax`` and ``nn.Softmax2d`` over
any dimension but the batch axis.

Every case of the table runs BatchJacobian, DiagGGN, DiagGGNApprox and FullGGN in
one ``extend`` block and compares them in float64 with the brute-force reference
(``tests/reference.py``), for one sample and for a batch of three with a
non-contiguous input; the registered rule (never the torch.func fallback) must
serve every module; a float32 run is compared with the same reference.
"""

import warnings

import pytest
import torch
from torch import nn

from curvhook import extend
from curvhook.errors import UnsupportedModelError
from curvhook.extensions import BatchJacobian
from helpers import (
    layer_table_tests,
    CLASSES,
    DT,
    check_against_reference,
    float_input,
    head,
    mse,
    prefix_conv,
    randomize_layers,
    seq,
)

# name -> (model builder, input builder)
CASES = {
    "softmax_features": (
        seq(nn.Linear(4, 5), nn.Softmax(dim=1), nn.Linear(5, CLASSES)),
        float_input((4,)),
    ),
    "softmax_middle_dim": (
        seq(prefix_conv(1, 4), nn.Softmax(dim=1), *head()),
        float_input((4, 3)),
    ),
    "softmax_last_dim_negative": (
        seq(nn.Linear(3, 5), nn.Softmax(dim=-1), *head()),
        float_input((2, 3)),
    ),
    "logsoftmax_dim2": (
        seq(prefix_conv(2, 2), nn.LogSoftmax(dim=2), *head()),
        float_input((2, 4, 3)),
    ),
    "logsoftmax_features": (
        seq(nn.Linear(4, 5), nn.LogSoftmax(dim=1), nn.Linear(5, CLASSES)),
        float_input((4,)),
    ),
    "softmax2d": (
        seq(prefix_conv(2, 3), nn.Softmax2d(), *head()),
        float_input((3, 2, 3)),
    ),
    "logsoftmax3d_channels": (
        seq(prefix_conv(3, 2), nn.LogSoftmax(dim=1), *head()),
        float_input((2, 2, 2, 2)),
    ),
    "softmax_first_layer_last_dim": (
        seq(nn.Softmax(dim=-1), *head()),
        float_input((2, 4)),
    ),
}


test_layer_one_sample, test_layer_batch_noncontiguous_and_float32, test_table_covers_every_registered_type = (
    layer_table_tests(CASES, "softmax")
)


LAST_LAYER = {
    "logsoftmax": (lambda: nn.Sequential(nn.Linear(3, 4), nn.LogSoftmax(dim=1)), (3,)),
    "softmax_implicit_dim": (lambda: nn.Sequential(nn.Linear(3, 4), nn.Softmax()), (3,)),
}


@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize("case", sorted(LAST_LAYER))
def test_new_layer_as_the_model_output_with_mse(case):
    """The layer under test produces the model output (the loss Hessian reaches it first)."""
    build, shape = LAST_LAYER[case]
    model = randomize_layers(build())
    X = torch.randn(3, *shape, dtype=DT)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Implicit dimension choice")
        with torch.no_grad():
            y = torch.randn_like(model(X))
        check_against_reference(model, X, mse(y))


def test_softmax_over_the_batch_axis_is_rejected():
    model = nn.Sequential(nn.Linear(3, 4), nn.Softmax(dim=0)).to(DT)
    X = torch.randn(2, 3, dtype=DT)
    with pytest.raises(UnsupportedModelError, match="batch axis"):
        with extend(model, BatchJacobian()):
            model(X).sum().backward()
