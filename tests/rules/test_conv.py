"""``curvhook/rules/conv.py``: convolutions and transposed convolutions, 1d/2d/3d.

Every case of the table runs BatchJacobian, DiagGGN, DiagGGNApprox and FullGGN in
one ``extend`` block and compares them in float64 with the brute-force reference
(``tests/reference.py``), for one sample and for a batch of three with a
non-contiguous input; the registered rule (never the torch.func fallback) must
serve every module; a float32 run is compared with the same reference. The
cases cover stride, padding (numbers, ``'same'``, ``'valid'``), dilation, groups,
bias on and off, and the layer as the first one (no input Jacobian needed).
"""

import pytest
import torch
from torch import nn

from curvhook import extend
from curvhook.extensions import BatchJacobian, DiagGGN
from curvhook.rules import base as rules_base
from curvhook.rules import registry
from helpers import (
    layer_table_tests,
    run_layer_case,
    CLASSES,
    DT,
    assert_exact,
    ce,
    check_against_reference,
    close,
    conv_net,
    float_input,
    ggn_reference,
    head,
    mse,
    prefix_conv,
    randomize_layers,
    run_all,
    run_curvhook,
    seq,
)
from reference import collect, compare, reference

# name -> (model builder, input builder)
CASES = {
    # ------------------------------------------------------- convolutions
    "conv1d_first_layer": (seq(nn.Conv1d(2, 3, 3), nn.Tanh(), *head()), float_input((2, 6))),
    "conv1d_stride_padding_dilation_no_bias": (
        seq(prefix_conv(1, 2), nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2, bias=False), *head()),
        float_input((2, 7)),
    ),
    "conv1d_groups_same": (
        seq(prefix_conv(1, 4), nn.Conv1d(4, 4, 3, padding="same", groups=2), *head()),
        float_input((4, 5)),
    ),
    "conv2d_first_layer_stride": (
        seq(nn.Conv2d(2, 3, (2, 3), stride=(2, 1)), nn.ReLU(), *head()),
        float_input((2, 5, 4)),
    ),
    "conv2d_padding_dilation_groups": (
        seq(prefix_conv(2, 4), nn.Conv2d(4, 6, 3, padding=(2, 1), dilation=(2, 1), groups=2), nn.Sigmoid(),
            *head()),
        float_input((4, 5, 4)),
    ),
    "conv2d_depthwise_no_bias": (
        seq(prefix_conv(2, 3), nn.Conv2d(3, 3, 2, groups=3, bias=False), *head()),
        float_input((3, 4, 4)),
    ),
    "conv2d_valid_1x1": (
        seq(prefix_conv(2, 2), nn.Conv2d(2, 3, 1, padding="valid"), *head()),
        float_input((2, 3, 3)),
    ),
    # the stride skips input entries at the end
    "conv2d_stride_skips_entries": (
        seq(prefix_conv(2, 2), nn.Conv2d(2, 2, 2, stride=3), *head()),
        float_input((2, 5, 5)),
    ),
    "conv2d_same_even_kernel": (
        seq(prefix_conv(2, 2), nn.Conv2d(2, 2, (2, 3), padding="same"), *head()),
        float_input((2, 3, 4)),
    ),
    # one position in and out: one tap reaches the input (a linear map), or none does
    "conv2d_one_position_groups": (
        seq(prefix_conv(2, 4), nn.Conv2d(4, 6, 3, padding=1, groups=2), *head()),
        float_input((4, 1, 1)),
    ),
    "conv1d_one_position_stride_dilation": (
        seq(prefix_conv(1, 2), nn.Conv1d(2, 3, 5, stride=2, padding=4, dilation=2), *head()),
        float_input((2, 1)),
    ),
    "conv3d_one_position_no_tap_reaches_the_input": (
        seq(prefix_conv(3, 2), nn.Conv3d(2, 3, 2, padding=1, dilation=2), *head()),
        float_input((2, 1, 1, 1)),
    ),
    # one output position from several input positions: the live taps as GEMMs, each
    # reading one input position (all of them, some of them, or every other one)
    "conv2d_one_output_stride2_on_2x2": (
        seq(prefix_conv(2, 4), nn.Conv2d(4, 6, 3, stride=2, padding=1), *head()),
        float_input((4, 2, 2)),
    ),
    "conv2d_one_output_leaves_inputs_unread_groups": (
        seq(prefix_conv(2, 4), nn.Conv2d(4, 4, 3, stride=3, groups=2), *head()),
        float_input((4, 4, 4)),
    ),
    "conv1d_one_output_dilated_taps_read_every_other": (
        seq(prefix_conv(1, 2), nn.Conv1d(2, 3, 3, stride=3, padding=1, dilation=2), *head()),
        float_input((2, 4)),
    ),
    # kernels wider than the input: most taps read the zero padding only (the weight
    # diagonal is computed at the live taps)
    "conv2d_depthwise_7x7_on_2x2": (
        seq(prefix_conv(2, 3), nn.Conv2d(3, 3, 7, padding=3, groups=3), *head()),
        float_input((3, 2, 2)),
    ),
    "conv1d_wide_kernel_stride_dilation_few_positions": (
        seq(prefix_conv(1, 2), nn.Conv1d(2, 3, 5, stride=2, padding=4, dilation=2), *head()),
        float_input((2, 3)),
    ),
    "conv3d_kernel_beyond_the_input": (
        seq(prefix_conv(3, 2), nn.Conv3d(2, 2, (3, 3, 5), padding=(1, 1, 2)), *head()),
        float_input((2, 2, 2, 1)),
    ),
    "conv3d_first_layer": (seq(nn.Conv3d(1, 2, 2), *head()), float_input((1, 3, 3, 3))),
    "conv3d_stride_padding_groups_no_bias": (
        seq(prefix_conv(3, 2), nn.Conv3d(2, 4, (2, 1, 2), stride=(1, 2, 1), padding=(1, 0, 1), groups=2, bias=False),
            *head()),
        float_input((2, 3, 3, 2)),
    ),
    "conv3d_dilation_same": (
        seq(prefix_conv(3, 2), nn.Conv3d(2, 2, 2, padding="same", dilation=2), *head()),
        float_input((2, 3, 3, 3)),
    ),
    # --------------------------------------------- transposed convolutions
    "convT1d_stride_pad_outpad_groups_dilation": (
        lambda: nn.Sequential(prefix_conv(1, 4), nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1,
                                                                     groups=2, dilation=2), nn.Tanh(), *head()),
        float_input((4, 7)),
    ),
    "convT2d_outpad_exceeds_stride_no_bias": (
        lambda: nn.Sequential(prefix_conv(2, 3), nn.ConvTranspose2d(3, 2, (2, 3), stride=(1, 2), padding=(0, 1),
                                                                    output_padding=(1, 1), dilation=(2, 2), bias=False),
                              nn.Sigmoid(), *head()),
        float_input((3, 5, 4)),
    ),
    "convT3d_groups_stride": (
        lambda: nn.Sequential(prefix_conv(3, 2), nn.ConvTranspose3d(2, 4, (2, 1, 2), stride=(2, 1, 1), padding=(1, 0, 0),
                                                                    output_padding=(1, 0, 0), groups=2),
                              *head()),
        float_input((2, 3, 3, 3)),
    ),
    "convT1d_first_layer_depthwise": (
        seq(nn.ConvTranspose1d(3, 3, 2, stride=3, groups=3), nn.ReLU(), *head()),
        float_input((3, 5)),
    ),
    "convT2d_plain": (
        seq(prefix_conv(2, 2), nn.ConvTranspose2d(2, 3, 2), *head()),
        float_input((2, 3, 3)),
    ),
    "convT3d_first_layer_dilation_no_bias": (
        seq(nn.ConvTranspose3d(1, 2, 2, dilation=2, bias=False), *head()),
        float_input((1, 2, 2, 2)),
    ),
}


test_layer_one_sample, test_layer_batch_noncontiguous_and_float32, test_table_covers_every_registered_type = (
    layer_table_tests(CASES, "conv")
)


LAST_LAYER = {
    "convT2d": (lambda: nn.Sequential(nn.Conv2d(2, 2, 1), nn.ConvTranspose2d(2, 1, 2, stride=2)), (2, 2, 3)),
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


class OutputSize(nn.Module):
    """Calls a transposed convolution with ``output_size``, which overrides ``output_padding``."""

    def __init__(self, conv, size):
        super().__init__()
        self.pre, self.conv, self.flat, self.lin = nn.Conv1d(2, 2, 1), conv, nn.Flatten(), nn.Linear(3 * size, CLASSES)
        self.size = size

    def forward(self, x):
        return self.lin(self.flat(self.conv(self.pre(x), output_size=[self.size])))


@pytest.mark.usefixtures("no_fallback")
def test_conv_transpose_called_with_output_size():
    """``output_size`` picks the output padding at call time; the rule reads it off the output."""
    conv = nn.ConvTranspose1d(2, 3, 3, stride=3, padding=1)  # output_padding attribute stays 0
    model = OutputSize(conv, 15).to(DT)
    same = nn.Sequential(model.pre, nn.ConvTranspose1d(2, 3, 3, stride=3, padding=1, output_padding=2),
                         model.flat, model.lin).to(DT)
    with torch.no_grad():
        same[1].weight.copy_(conv.weight)
        same[1].bias.copy_(conv.bias)
    X = torch.randn(3, 2, 5, dtype=DT)
    y = torch.randint(0, CLASSES, (3,))
    torch.testing.assert_close(model(X), same(X), rtol=0, atol=0)
    got, matrix, _ = run_curvhook(model, X, ce(y))
    _, ref = check_against_reference(same, X, ce(y))  # the same function, with a fixed output padding
    compare(got, ref, matrix)


# ------------------------------------- weight diagonal: GEMM or weight gradient
CONV_CASES = sorted(c for c in CASES if c.startswith("conv") and not c.startswith("convT"))


@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize("positions", [0, 10**9])
@pytest.mark.parametrize("case", CONV_CASES)
def test_weight_diagonal_by_gemm_and_by_weight_gradient(monkeypatch, case, positions):
    """DiagGGNApprox of a conv weight, both ways: one GEMM over the squared patches (taken up to
    ``_GEMM_POSITIONS`` output positions per sample) and the weight gradient against ``x∘x``."""
    from curvhook.rules import conv

    monkeypatch.setattr(conv, "_GEMM_POSITIONS", positions)
    model, X, y, ref = run_layer_case(CASES[case], 3, contiguous=False)
    assert ref.approx is not None


def test_live_taps_hold_every_tap_that_reads_the_input():
    """``live_taps``: a slice per dimension that holds every tap reading the input at some output
    position; with stride 1, exactly those."""
    from curvhook.rules.conv import live_taps

    for size in range(1, 5):
        for k in range(1, 8):
            for p in range(0, 4):
                for stride in (1, 2, 3):
                    for dil in (1, 2):
                        positions = (size + 2 * p - dil * (k - 1) - 1) // stride + 1
                        if positions < 1:
                            continue
                        conv = nn.Conv1d(1, 1, k, stride=stride, padding=p, dilation=dil)
                        (taps,) = live_taps((size,), conv, (p,))
                        live = {t for t in range(k) for j in range(positions) if p <= t * dil + j * stride < p + size}
                        assert live <= set(range(taps.start, taps.stop)), (size, k, p, stride, dil, taps)
                        if stride == 1:
                            assert live == set(range(taps.start, taps.stop)), (size, k, p, dil, taps)


# -------------------------------------------- convolutions with max pooling
CONV_MODELS = {
    "conv1d_stride_dilation": (lambda: nn.Sequential(
        nn.Conv1d(2, 4, 3, stride=2, padding=1, dilation=2), nn.ReLU(), nn.MaxPool1d(3, 2, 1),
        nn.Flatten(), nn.Linear(12, 3)), (2, 11)),
    "conv2d_same_groups_depthwise": (lambda: nn.Sequential(
        nn.Conv2d(4, 6, 3, padding="same", groups=2), nn.Tanh(), nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(6, 6, 2, padding="same", groups=6, bias=False), nn.Flatten(), nn.Linear(54, 3)), (4, 5, 5)),
    # the stride skips input entries at the end (the input pullback needs output padding)
    "conv2d_stride_remainder_dilation_groups": (lambda: nn.Sequential(
        nn.Conv2d(4, 4, 1), nn.Tanh(), nn.Conv2d(4, 6, 3, stride=(2, 3), padding=(1, 0), dilation=(1, 2), groups=2), nn.Tanh(),
        nn.Flatten(), nn.Linear(48, 3)), (4, 8, 9)),
    "conv3d_valid_pool_padding": (lambda: nn.Sequential(
        nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding="valid"), nn.ReLU(),
        nn.MaxPool3d(2, padding=1), nn.Flatten(), nn.Linear(24, 3)), (2, 4, 5, 4)),
}


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("case", sorted(CONV_MODELS))
def test_conv_and_maxpool_match_reference(case, n):
    torch.manual_seed(0)
    build, shape = CONV_MODELS[case]
    model = build().double()
    X = torch.randn(n, *shape, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    criterion = nn.CrossEntropyLoss()
    assert_exact(model, X, y, criterion)


@pytest.mark.parametrize("case", sorted(CONV_MODELS))
def test_fast_rules_agree_with_fallback_for_approx(case):
    """DiagGGNApprox of the fast conv/pool rules equals the dense per-sample fallback."""
    torch.manual_seed(0)
    build, shape = CONV_MODELS[case]
    model = build().double()
    X = torch.randn(2, *shape, dtype=torch.float64)
    y = torch.randint(0, 3, (2,))
    fast = run_all(model, X, y, nn.CrossEntropyLoss())
    saved = dict(registry._RULES)
    try:
        for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d):
            registry._RULES.pop(t)
        slow = run_all(model, X, y, nn.CrossEntropyLoss())
    finally:
        registry._RULES.clear()
        registry._RULES.update(saved)
    for key in fast:
        close(fast[key], slow[key], rtol=1e-10)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_conv_with_nonzero_padding_mode_goes_to_the_exact_fallback(mode):
    """The fast conv rule covers zero padding only; other padding modes must not use it."""
    from curvhook.rules import fallback

    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode)
    assert registry.rule_for(conv) is None
    assert registry.rule_for(nn.Conv2d(2, 3, 3, padding=1)) is not None
    model = nn.Sequential(nn.Conv2d(2, 2, 1), conv, nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 5, 3)).double()
    X = torch.randn(2, 2, 4, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (2,))
    fallback._WARNED.discard(nn.Conv2d)
    with pytest.warns(UserWarning, match="no rule for Conv2d"):
        with extend(model, DiagGGN()):
            nn.CrossEntropyLoss()(model(X), y).backward()
    got = run_all(model, X, y, nn.CrossEntropyLoss())
    J, G = ggn_reference(model, X, y, nn.CrossEntropyLoss())
    close(got["full"], G)
    close(got["diag"], G.diagonal())
    close(got["jac"].reshape(-1, J.shape[1]), J)


# ------------------------------------------------- chunked squared products
@pytest.mark.parametrize("chunk", [1, 40, 10**9])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_diag_ggn_in_chunks(monkeypatch, chunk, groups):
    """``_SQ_CHUNK_ENTRIES = 1``: one sample per chunk; 40: a few; huge: one chunk."""
    monkeypatch.setattr(rules_base, "_SQ_CHUNK_ENTRIES", chunk)
    torch.manual_seed(0)
    model, X, y = conv_net(groups), torch.randn(5, 2, 4, 4, dtype=DT), torch.randint(0, 3, (5,))
    with extend(model, DiagGGN(), BatchJacobian()):
        nn.CrossEntropyLoss()(model(X), y).backward()
    ref = reference(model, X, lambda o: nn.CrossEntropyLoss()(o, y), approx=False)
    compare(collect(model, 5, ("DiagGGN", "BatchJacobian")), ref)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_unfold_gives_the_patches_of_the_convolution(dims, seed):
    """``unfold`` (a strided view of the padded input, copied) against ``F.unfold``
    (1d, 2d) and the convolution it stands for (all dims), in both layouts, for
    drawn kernel, stride, dilation and padding, strided and channels-last inputs
    and float64, float32, float16, bfloat16: every patch entry is an input entry
    or a padding zero, so the copy is exact."""
    import random

    import torch.nn.functional as F

    from curvhook.rules.conv import unfold

    rng = random.Random(100 * dims + seed)
    k = tuple(rng.randint(1, 3) for _ in range(dims))
    stride = tuple(rng.randint(1, 3) for _ in range(dims))
    dilation = tuple(rng.randint(1, 2) for _ in range(dims))
    padding = tuple(rng.randint(0, 2) for _ in range(dims))
    size = tuple(rng.randint(max(1, dilation[d] * (k[d] - 1) + 1 - 2 * padding[d]), 7) for d in range(dims))
    module = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](2, 3, k, stride, padding, dilation)
    dtype = (torch.float64, torch.float32, torch.float16, torch.bfloat16)[seed % 4]
    x = torch.randn(3, 2, *size, dtype=torch.float64)
    if seed % 2:
        x = x.transpose(0, 1).contiguous().transpose(0, 1)  # not contiguous
    if dims == 2 and seed % 3 == 0:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(dtype)
    patches = unfold(x, module, padding)  # [N, C·K, L]
    rows = unfold(x, module, padding, positions_first=True)  # [N, L, C·K]
    assert torch.equal(rows, patches.transpose(1, 2))
    w = torch.randn(3, 2, *k, dtype=torch.float64)
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    expected = conv(x.double(), w, None, stride, padding, dilation).flatten(2)
    got = torch.einsum("oi,nil->nol", w.reshape(3, -1), patches.double())
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    if dims < 3:
        lift = (lambda t: t) if dims == 2 else (lambda t: (1, *t))
        xx = x.double() if dims == 2 else x.double().unsqueeze(2)
        pad = padding if dims == 2 else (0, *padding)
        assert torch.equal(F.unfold(xx, lift(k), lift(dilation), pad, lift(stride)), patches.double())
