"""``curvhook/rules/reshape.py``: ``Identity``, ``Flatten``, ``Unflatten``, ``PixelShuffle``,
``PixelUnshuffle``, ``Unfold`` and ``Fold``.

Every test runs BatchJacobian, DiagGGN, DiagGGNApprox and FullGGN in one
``extend`` block and compares each with the brute-force reference in float64.
The table's cases run for one sample and for a batch of three with a
non-contiguous input; the registered rule (never the torch.func fallback) must
serve every module; a float32 run is compared with the same reference.
"""

import pytest
import torch
from torch import nn

from helpers import (
    layer_table_tests,
    CLASSES,
    DT,
    ce,
    check_against_reference,
    float_input,
    head,
    mse,
    prefix_conv,
    randomize_linear,
    seq,
)

# name -> (model builder, input builder)
CASES = {
    "pixel_shuffle": (
        seq(prefix_conv(2, 8), nn.PixelShuffle(2), prefix_conv(2, 2), *head()),
        float_input((8, 3, 2)),
    ),
    "pixel_unshuffle": (
        seq(prefix_conv(2, 2), nn.PixelUnshuffle(2), prefix_conv(2, 8), *head()),
        float_input((2, 4, 6)),
    ),
    "pixel_shuffle_first_layer": (seq(nn.PixelShuffle(2), *head()), float_input((4, 2, 2))),
    "flatten_conv_maps": (seq(prefix_conv(2, 2), nn.Flatten(), nn.Linear(18, CLASSES)), float_input((2, 3, 3))),
    "flatten_middle_axes_of_3d_maps": (
        seq(prefix_conv(3, 2), nn.Flatten(2, 3), prefix_conv(2, 2), *head()),
        float_input((2, 2, 3, 2)),
    ),
    "unflatten_features_to_conv1d": (
        seq(nn.Linear(6, 8), nn.Unflatten(1, (2, 4)), prefix_conv(1, 2), *head()),
        float_input((6,)),
    ),
    "unflatten_last_axis_of_conv_maps": (
        seq(prefix_conv(1, 2), nn.Unflatten(-1, (2, 3)), prefix_conv(2, 2), *head()),
        float_input((2, 6)),
    ),
    "identity_between_convs": (seq(prefix_conv(2, 2), nn.Identity(), *head()), float_input((2, 2, 3))),
    # (the fallback served them before session 44: VOLO's outlook attention)
    "unfold_patches": (seq(prefix_conv(2, 2), nn.Unfold(2), nn.Tanh(), *head()), float_input((2, 3, 3))),
    "unfold_strided_padded_dilated": (
        seq(prefix_conv(2, 2), nn.Unfold((2, 3), dilation=(1, 2), padding=1, stride=2), nn.Tanh(), *head()),
        float_input((2, 4, 5)),
    ),
    "fold_overlapping": (
        seq(prefix_conv(1, 8), nn.Fold((3, 4), 2, padding=(1, 0), stride=(1, 2)), nn.Tanh(), *head()),
        float_input((8, 8)),
    ),
}


test_layer_one_sample, test_layer_batch_noncontiguous_and_float32, test_table_covers_every_registered_type = (
    layer_table_tests(CASES, "reshape")
)


@pytest.mark.parametrize("n", [1, 3])
def test_flatten_and_identity(n):
    model = randomize_linear(nn.Sequential(
        nn.Flatten(), nn.Linear(6, 5), nn.Identity(), nn.Sigmoid(), nn.Identity(), nn.Linear(5, 3), nn.Identity()
    ))
    X = torch.randn(n, 2, 3, dtype=DT)
    check_against_reference(model, X, ce(torch.randint(0, 3, (n,))))


@pytest.mark.parametrize("n", [1, 3])
def test_flatten_with_start_and_end_dim_and_linear_on_leading_dims(n):
    model = randomize_linear(nn.Sequential(
        nn.Linear(3, 4), nn.Tanh(), nn.Flatten(1, 2), nn.Linear(4, 2), nn.Flatten()
    ))
    X = torch.randn(n, 2, 3, 3, dtype=DT)  # Linear on [N, 2, 3, 3] -> [N, 2, 3, 4] -> [N, 6, 4]
    check_against_reference(model, X, mse(torch.randn(n, 12, dtype=DT)))


@pytest.mark.parametrize("n", [1, 3])
def test_unflatten_in_the_middle(n):
    model = randomize_linear(nn.Sequential(
        nn.Linear(4, 6), nn.Unflatten(1, (2, 3)), nn.Tanh(), nn.Linear(3, 4), nn.Flatten(), nn.Linear(8, 3)
    ))
    X = torch.randn(n, 4, dtype=DT)
    check_against_reference(model, X, ce(torch.randint(0, 3, (n,))))


def test_flatten_that_changes_nothing():
    """``Flatten`` on an already flat tensor (an alias of its input) in the middle and at the end."""
    model = randomize_linear(nn.Sequential(nn.Linear(4, 5), nn.Flatten(), nn.Tanh(), nn.Linear(5, 3), nn.Flatten()))
    X = torch.randn(3, 4, dtype=DT)
    check_against_reference(model, X, ce(torch.randint(0, 3, (3,))))
