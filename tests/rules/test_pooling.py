"""``curvhook/rules/pooling.py``: max, average, adaptive max and adaptive average pooling, 1d/2d/3d.

Every case of the table runs BatchJacobian, DiagGGN, DiagGGNApprox and FullGGN in
one ``extend`` block and compares them in float64 with the brute-force reference
(``tests/reference.py``), for one sample and for a batch of three with a
non-contiguous input; the registered rule (never the torch.func fallback) must
serve every module; a float32 run is compared with the same reference.
Convolutions followed by max pooling are in ``tests/rules/test_conv.py``.
"""

import pytest
import torch
from torch import nn

from curvhook import extend
from curvhook.extensions import BatchJacobian, DiagGGN
from curvhook.rules import pooling
from helpers import (
    layer_table_tests,
    DT,
    check_against_reference,
    float_input,
    head,
    mse,
    prefix_conv,
    randomize_layers,
    seq,
)
from reference import collect, compare, reference

# name -> (model builder, input builder)
CASES = {
    "avgpool1d_ceil_exclude_pad": (
        seq(prefix_conv(1, 2), nn.AvgPool1d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
            *head()),
        float_input((2, 8)),
    ),
    "avgpool1d_overlap_include_pad": (
        seq(prefix_conv(1, 2), nn.AvgPool1d(2, stride=1, padding=1, count_include_pad=True), *head()),
        float_input((2, 7)),
    ),
    "avgpool2d_ceil_include_pad": (
        seq(prefix_conv(2, 2), nn.AvgPool2d((3, 2), stride=(2, 1), padding=(1, 1), ceil_mode=True), *head()),
        float_input((2, 5, 4)),
    ),
    "avgpool2d_ceil_exclude_pad": (
        seq(prefix_conv(2, 2), nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
            *head()),
        float_input((2, 6, 5)),
    ),
    "avgpool2d_divisor_override": (
        seq(prefix_conv(2, 2), nn.AvgPool2d(2, stride=1, padding=1, divisor_override=3), *head()),
        float_input((2, 4, 5)),
    ),
    "avgpool3d_ceil_exclude_pad": (
        seq(prefix_conv(3, 2), nn.AvgPool3d(2, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
            *head()),
        float_input((2, 3, 3, 4)),
    ),
    "avgpool3d_divisor_override": (
        seq(prefix_conv(3, 2), nn.AvgPool3d((2, 1, 2), divisor_override=5), *head()),
        float_input((2, 3, 3, 4)),
    ),
    "adaptive_avgpool1d": (
        seq(prefix_conv(1, 2), nn.AdaptiveAvgPool1d(3), *head()),
        float_input((2, 7)),
    ),
    "adaptive_avgpool2d_none": (
        seq(prefix_conv(2, 2), nn.AdaptiveAvgPool2d((3, None)), *head()),
        float_input((2, 5, 4)),
    ),
    "adaptive_avgpool3d_upsampling": (
        seq(prefix_conv(3, 2), nn.AdaptiveAvgPool3d((2, 4, 3)), *head()),
        float_input((2, 3, 3, 5)),
    ),
    "adaptive_maxpool1d": (
        seq(prefix_conv(1, 2), nn.AdaptiveMaxPool1d(4), *head()),
        float_input((2, 7)),
    ),
    "adaptive_maxpool2d_none": (
        seq(prefix_conv(2, 2), nn.AdaptiveMaxPool2d((None, 3)), *head()),
        float_input((2, 5, 4)),
    ),
    "adaptive_maxpool3d": (
        seq(prefix_conv(3, 2), nn.AdaptiveMaxPool3d(2), *head()),
        float_input((2, 3, 5, 3)),
    ),
    "maxpool1d_dilation_ceil": (
        seq(prefix_conv(1, 2), nn.MaxPool1d(3, stride=2, padding=1, dilation=2, ceil_mode=True), *head()),
        float_input((2, 8)),
    ),
    "maxpool2d_dilation_padding_ceil": (
        seq(prefix_conv(2, 2), nn.MaxPool2d(3, stride=2, padding=1, dilation=(2, 1), ceil_mode=True), *head()),
        float_input((2, 7, 5)),
    ),
    "maxpool3d_ceil_padding": (
        seq(prefix_conv(3, 2), nn.MaxPool3d(2, stride=2, padding=1, ceil_mode=True), *head()),
        float_input((2, 4, 3, 5)),
    ),
    # first layers (the input needs no Jacobian), default strides, global pooling
    "maxpool2d_first_layer": (seq(nn.MaxPool2d(2), *head()), float_input((2, 4, 5))),
    "avgpool1d_first_layer": (seq(nn.AvgPool1d(2), *head()), float_input((2, 5))),
    "adaptive_avgpool2d_global": (seq(prefix_conv(2, 3), nn.AdaptiveAvgPool2d(1), *head()), float_input((3, 3, 4))),
    "maxpool1d_overlapping_windows": (
        seq(prefix_conv(1, 2), nn.MaxPool1d(3, stride=1), *head()),
        float_input((2, 6)),
    ),
}


test_layer_one_sample, test_layer_batch_noncontiguous_and_float32, test_table_covers_every_registered_type = (
    layer_table_tests(CASES, "pooling")
)


LAST_LAYER = {
    "avgpool_after_conv": (lambda: nn.Sequential(nn.Conv1d(1, 2, 2), nn.AvgPool1d(2, ceil_mode=True)), (1, 6)),
}


@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize("case", sorted(LAST_LAYER))
def test_new_layer_as_the_model_output_with_mse(case):
    """The layer under test produces the model output (the loss Hessian reaches it first)."""
    build, shape = LAST_LAYER[case]
    model = randomize_layers(build())
    X = torch.randn(3, *shape, dtype=DT)
    with torch.no_grad():
        y = torch.randn_like(model(X))
    check_against_reference(model, X, mse(y))


def run(model, X, y, *exts):
    with extend(model, *exts):
        nn.CrossEntropyLoss()(model(X), y).backward()


@pytest.mark.parametrize(
    "pool, dims, saved",
    [(nn.MaxPool2d(3, 2, 1), 2, True), (nn.AdaptiveMaxPool2d(3), 2, True), (nn.MaxPool3d(2), 3, True), (nn.MaxPool1d(3, 2, 1), 1, False)],
)
def test_max_pooling_reads_the_indices_of_its_forward_pass(monkeypatch, pool, dims, saved):
    """2d and 3d pooling take the indices their autograd node saved; 1d computes them again."""
    recomputed = []

    def counting(compute):
        def count(call):
            recomputed.append(call.name)
            return compute(call)

        return staticmethod(count)

    for rule in (pooling.MaxPoolRule, pooling.AdaptiveMaxPoolRule):
        monkeypatch.setattr(rule, "_compute_indices", counting(rule._compute_indices))
    torch.manual_seed(0)
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](2, 3, 3)
    model = nn.Sequential(conv, nn.ReLU(), pool, nn.Flatten(), nn.LazyLinear(3)).to(DT)
    X, y = torch.randn(4, 2, *([8] * dims), dtype=DT), torch.randint(0, 3, (4,))
    model(X)
    run(model, X, y, BatchJacobian(), DiagGGN())
    assert bool(recomputed) is not saved
    ref = reference(model, X, lambda o: nn.CrossEntropyLoss()(o, y), approx=False)
    compare(collect(model, 4, ("BatchJacobian", "DiagGGN")), ref)
