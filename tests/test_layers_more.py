"""Fast rules for transposed convolutions, pooling, normalization, embedding,
padding, upsampling, pixel shuffle and softmax against the torch.func reference.

Every case runs BatchJacobian, DiagGGN, DiagGGNApprox and FullGGN in one
``extend`` block, compares them in float64 with the brute-force reference
(``tests/reference.py``) for one sample and for a batch with a non-contiguous
input, checks that the registered fast rule (never the torch.func fallback)
served every module, and runs a float32 smoke check against the same reference.
"""

import copy
import dataclasses
import warnings

import pytest
import torch
from torch import nn

from curvhook import extend
from curvhook.errors import UnsupportedModelError
from curvhook.extensions import BatchJacobian, DiagGGN
from curvhook.rules import fallback, registry
from helpers import check_against_reference, run_curvhook
from reference import compare, reference

DT = torch.float64
CLASSES = 3


# ------------------------------------------------------------------ helpers
def head() -> list[nn.Module]:
    """``Flatten`` and a linear classifier onto ``CLASSES`` outputs (sized by a first forward pass)."""
    return [nn.Flatten(), nn.LazyLinear(CLASSES)]


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values, with the last two dimensions stored transposed."""
    if t.dim() < 2:
        return t
    out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert torch.equal(out, t) and (t.dim() < 2 or t.shape[-1] == 1 or not out.is_contiguous())
    return out


def randomize(model: nn.Module) -> nn.Module:
    """float64, with affine parameters and running statistics away from their trivial init."""
    model.to(DT)
    with torch.no_grad():
        for m in model.modules():
            for name, p in m.named_parameters(recurse=False):
                if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
                    p.copy_((1.0 if name == "weight" else 0.0) + 0.5 * torch.randn_like(p))
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
                m.running_mean.copy_(0.3 * torch.randn_like(m.running_mean))
                m.running_var.copy_(0.5 + torch.rand_like(m.running_var))
    return model.eval()


def float_input(shape):
    return lambda n: torch.randn(n, *shape, dtype=DT)


def index_input(vocab, shape):
    return lambda n: torch.randint(0, vocab, (n, *shape))


def seq(*layers):
    return lambda: nn.Sequential(*layers)


def prefix_conv(dims, channels):
    """A 1x1 convolution, so that the layer under test has an input that needs its Jacobian."""
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](channels, channels, 1)


# name -> (model builder, input builder, [layer types whose rule must serve])
CASES = {
    # ------------------------------------------------ transposed convolutions
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
    # ------------------------------------------------------------- pooling
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
    # --------------------------------------------------------- normalization
    "batchnorm1d_features": (
        seq(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, CLASSES)),
        float_input((5,)),
    ),
    "batchnorm1d_sequence": (
        seq(prefix_conv(1, 3), nn.BatchNorm1d(3), *head()),
        float_input((3, 5)),
    ),
    "batchnorm2d_no_affine": (
        seq(prefix_conv(2, 3), nn.BatchNorm2d(3, affine=False), *head()),
        float_input((3, 3, 5)),
    ),
    "batchnorm3d_first_layer": (
        seq(nn.BatchNorm3d(2), *head()),
        float_input((2, 2, 3, 3)),
    ),
    "layernorm_last_dim": (
        seq(nn.Linear(5, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, CLASSES)),
        float_input((5,)),
    ),
    "layernorm_two_dims_on_sequence": (
        seq(prefix_conv(1, 3), nn.LayerNorm((3, 4)), *head()),
        float_input((3, 4)),
    ),
    "layernorm_positions_no_bias": (
        seq(nn.Linear(4, 5), nn.LayerNorm(5, bias=False), *head()),
        float_input((3, 4)),
    ),
    "layernorm_no_affine": (
        seq(nn.Linear(6, 7), nn.LayerNorm(7, elementwise_affine=False), nn.Linear(7, CLASSES)),
        float_input((6,)),
    ),
    "groupnorm_1d": (
        seq(prefix_conv(1, 6), nn.GroupNorm(3, 6), *head()),
        float_input((6, 5)),
    ),
    "groupnorm_2d_no_affine_one_group": (
        seq(prefix_conv(2, 4), nn.GroupNorm(1, 4, affine=False), *head()),
        float_input((4, 3, 3)),
    ),
    "groupnorm_instance_like_on_features": (
        seq(nn.Linear(5, 4), nn.GroupNorm(2, 4), nn.Linear(4, CLASSES)),
        float_input((5,)),
    ),
    "instancenorm1d_affine": (
        seq(prefix_conv(1, 3), nn.InstanceNorm1d(3, affine=True), *head()),
        float_input((3, 5)),
    ),
    "instancenorm2d_default": (
        seq(prefix_conv(2, 2), nn.InstanceNorm2d(2), *head()),
        float_input((2, 3, 3)),
    ),
    "instancenorm3d_running_stats_eval": (
        seq(prefix_conv(3, 2), nn.InstanceNorm3d(2, affine=True, track_running_stats=True), *head()),
        float_input((2, 2, 3, 2)),
    ),
    "rmsnorm_last_dim": (
        seq(nn.Linear(5, 5), nn.RMSNorm(5), nn.Tanh(), nn.Linear(5, CLASSES)),
        float_input((5,)),
    ),
    "rmsnorm_two_dims_no_weight_eps": (
        seq(prefix_conv(1, 3), nn.RMSNorm((3, 4), eps=0.1, elementwise_affine=False), *head()),
        float_input((3, 4)),
    ),
    # -------------------------------------------------------------- embedding
    "embedding_padding_idx": (
        seq(nn.Embedding(5, 3, padding_idx=2), *head()),
        index_input(5, (6,)),
    ),
    "embedding_multi_dim_indices": (
        seq(nn.Embedding(4, 2), nn.Tanh(), *head()),
        index_input(4, (2, 3)),
    ),
    # ---------------------------------------------------------------- padding
    "zeropad1d": (seq(prefix_conv(1, 2), nn.ZeroPad1d((1, 2)), *head()), float_input((2, 5))),
    "zeropad2d": (seq(prefix_conv(2, 2), nn.ZeroPad2d((1, 0, 2, 1)), *head()), float_input((2, 3, 3))),
    "zeropad3d": (seq(prefix_conv(3, 1), nn.ZeroPad3d(1), *head()), float_input((1, 2, 2, 3))),
    "constantpad1d": (seq(prefix_conv(1, 2), nn.ConstantPad1d(2, 0.7), *head()), float_input((2, 3))),
    "constantpad2d_negative": (
        seq(prefix_conv(2, 2), nn.ConstantPad2d((-1, 2, 1, -1), 0.5), *head()),
        float_input((2, 4, 5)),
    ),
    "constantpad3d": (
        seq(prefix_conv(3, 1), nn.ConstantPad3d((0, 1, 1, 0, 1, 1), -0.3), *head()),
        float_input((1, 2, 2, 2)),
    ),
    "reflectionpad1d": (seq(prefix_conv(1, 2), nn.ReflectionPad1d((2, 3)), *head()), float_input((2, 4))),
    "reflectionpad2d": (seq(prefix_conv(2, 2), nn.ReflectionPad2d((1, 2, 2, 1)), *head()), float_input((2, 3, 4))),
    "reflectionpad3d": (seq(prefix_conv(3, 1), nn.ReflectionPad3d(1), *head()), float_input((1, 2, 3, 2))),
    "replicationpad1d": (seq(prefix_conv(1, 2), nn.ReplicationPad1d((3, 1)), *head()), float_input((2, 3))),
    "replicationpad2d": (seq(prefix_conv(2, 2), nn.ReplicationPad2d((2, 0, 1, 2)), *head()), float_input((2, 3, 3))),
    "replicationpad3d": (seq(prefix_conv(3, 1), nn.ReplicationPad3d((1, 0, 0, 2, 1, 1)), *head()), float_input((1, 2, 2, 2))),
    "circularpad1d": (seq(prefix_conv(1, 2), nn.CircularPad1d((2, 1)), *head()), float_input((2, 4))),
    "circularpad2d": (seq(prefix_conv(2, 2), nn.CircularPad2d(1), *head()), float_input((2, 3, 3))),
    "circularpad3d": (seq(prefix_conv(3, 1), nn.CircularPad3d((1, 1, 0, 1, 1, 0)), *head()), float_input((1, 2, 2, 2))),
    # ------------------------------------------------------------- upsampling
    "upsample_nearest1d_size": (
        seq(prefix_conv(1, 2), nn.Upsample(size=7, mode="nearest"), *head()),
        float_input((2, 3)),
    ),
    "upsample_nearest2d_scale": (
        seq(prefix_conv(2, 2), nn.Upsample(scale_factor=(2, 1.5), mode="nearest"), *head()),
        float_input((2, 3, 4)),
    ),
    "upsample_nearest_exact3d": (
        seq(prefix_conv(3, 1), nn.Upsample(size=(3, 5, 2), mode="nearest-exact"), *head()),
        float_input((1, 2, 3, 2)),
    ),
    "upsample_linear1d_align": (
        seq(prefix_conv(1, 2), nn.Upsample(size=8, mode="linear", align_corners=True), *head()),
        float_input((2, 3)),
    ),
    "upsample_bilinear_fractional_scale": (
        seq(prefix_conv(2, 2), nn.Upsample(scale_factor=1.7, mode="bilinear"), *head()),
        float_input((2, 3, 4)),
    ),
    "upsample_bilinear_align_corners": (
        seq(prefix_conv(2, 2), nn.Upsample(size=(5, 7), mode="bilinear", align_corners=True), *head()),
        float_input((2, 3, 4)),
    ),
    "upsample_bicubic": (
        seq(prefix_conv(2, 1), nn.Upsample(scale_factor=2, mode="bicubic"), *head()),
        float_input((1, 3, 4)),
    ),
    "upsample_trilinear_recompute": (
        seq(prefix_conv(3, 1), nn.Upsample(scale_factor=1.5, mode="trilinear", recompute_scale_factor=True),
            *head()),
        float_input((1, 2, 3, 2)),
    ),
    "upsampling_bilinear2d_module": (
        seq(prefix_conv(2, 2), nn.UpsamplingBilinear2d(scale_factor=2), *head()),
        float_input((2, 3, 3)),
    ),
    "upsampling_nearest2d_module": (
        seq(prefix_conv(2, 2), nn.UpsamplingNearest2d(size=(4, 5)), *head()),
        float_input((2, 3, 3)),
    ),
    # ---------------------------------------------------------- pixel shuffle
    "pixel_shuffle": (
        seq(prefix_conv(2, 8), nn.PixelShuffle(2), prefix_conv(2, 2), *head()),
        float_input((8, 3, 2)),
    ),
    "pixel_unshuffle": (
        seq(prefix_conv(2, 2), nn.PixelUnshuffle(2), prefix_conv(2, 8), *head()),
        float_input((2, 4, 6)),
    ),
    # ---------------------------------------------------------------- softmax
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
}


@pytest.fixture
def no_fallback(monkeypatch):
    """Fail if any module goes through the torch.func fallback."""

    def refuse(*args, **kwargs):
        raise AssertionError("the torch.func fallback was used")

    for method in ("jac_t_mat_prod", "param_jac_t_mat_prod", "param_sq_sum", "diag_jac_t_diag_jac", "param_diag"):
        monkeypatch.setattr(fallback.FALLBACK, method, refuse)
    monkeypatch.setattr(fallback, "_WARNED", set())  # a fallback warning would be raised again


def ce(y):
    crit = nn.CrossEntropyLoss()
    return lambda out: crit(out, y)


def run_case(case, n, contiguous):
    torch.manual_seed(0)
    build, make_input = CASES[case]
    model = build().to(DT).eval()
    X = make_input(n)
    with torch.no_grad():
        model(X)  # materializes the LazyLinear head
    model = randomize(model)
    for m in model.modules():
        if next(m.children(), None) is None:
            assert registry.rule_for(m) is not None, f"{type(m).__name__} has no fast rule"
    if not contiguous:
        X = noncontiguous(X)
    y = torch.randint(0, CLASSES, (n,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if X.is_floating_point():
            _, ref = check_against_reference(model, X, ce(y))
        else:
            ref = check_embedding_model(model, X, ce(y))
    assert not [w for w in caught if "no rule" in str(w.message)]
    return model, X, y, ref


class OneHotEmbedding(nn.Module):
    """``onehot(x) @ W``: an embedding with a float input, for the DiagGGNApprox reference."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.weight = embedding.weight  # the same parameter

    def forward(self, x):
        return x @ self.weight


def check_embedding_model(model, X, loss_fn):
    """Integer input: the reference's per-op Jacobians cannot differentiate it, so DiagGGNApprox
    is checked on the equivalent model with one-hot float input (same parameters, same chain)."""
    got, matrix, _ = run_curvhook(model, X, loss_fn)
    approx = got.pop("DiagGGNApprox")
    ref = reference(model, X, loss_fn, approx=False)
    compare(got, ref, matrix)
    embedding = model[0]
    one_hot = nn.Sequential(OneHotEmbedding(embedding), *model[1:])
    X_hot = nn.functional.one_hot(X, embedding.num_embeddings).to(DT)
    ref_hot = reference(one_hot, X_hot, loss_fn)
    keep = torch.ones(ref.G.shape[0], dtype=torch.bool)
    if embedding.padding_idx is not None:  # PyTorch gives the padding row no gradient
        keep[: embedding.weight.numel()].view_as(embedding.weight)[embedding.padding_idx] = False
    # the two chains agree wherever the padding row plays no part
    torch.testing.assert_close(ref_hot.G[keep][:, keep], ref.G[keep][:, keep], rtol=1e-12, atol=1e-14)
    ref = dataclasses.replace(ref, approx=torch.where(keep, ref_hot.approx, 0.0))
    compare({"DiagGGNApprox": approx}, ref)
    return ref


@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_one_sample(case):
    run_case(case, 1, contiguous=True)


@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_batch_noncontiguous_and_float32(case):
    model, X, y, ref = run_case(case, 3, contiguous=False)
    # float32 smoke: the same model and data in single precision, against the float64 reference
    model32 = copy.deepcopy(model).float()
    X32 = X.float() if X.is_floating_point() else X
    got, matrix, _ = run_curvhook(model32, X32, ce(y))
    for value in got.values():
        assert value.dtype == torch.float32
    compare(got, ref, matrix, rtol=1e-4, atol_factor=1e-4, tag=" (float32, more layers)")


def mse(y):
    crit = nn.MSELoss()
    return lambda out: crit(out, y)


LAST_LAYER = {
    "layernorm": (lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), (3,)),
    "logsoftmax": (lambda: nn.Sequential(nn.Linear(3, 4), nn.LogSoftmax(dim=1)), (3,)),
    "softmax_implicit_dim": (lambda: nn.Sequential(nn.Linear(3, 4), nn.Softmax()), (3,)),
    "convT2d": (lambda: nn.Sequential(nn.Conv2d(2, 2, 1), nn.ConvTranspose2d(2, 1, 2, stride=2)), (2, 2, 3)),
    "avgpool_after_conv": (lambda: nn.Sequential(nn.Conv1d(1, 2, 2), nn.AvgPool1d(2, ceil_mode=True)), (1, 6)),
}


@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize("case", sorted(LAST_LAYER))
def test_new_layer_as_the_model_output_with_mse(case):
    """The layer under test produces the model output (the loss Hessian reaches it first)."""
    build, shape = LAST_LAYER[case]
    model = randomize(build())
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


def test_batchnorm_with_batch_statistics_is_still_rejected():
    for train, track in ((True, True), (False, False)):
        bn = nn.BatchNorm1d(4, track_running_stats=track).train(train)
        model = nn.Sequential(nn.Linear(3, 4), bn, nn.Linear(4, 2)).to(DT)
        with pytest.raises(UnsupportedModelError, match="statistics"):
            with extend(model, DiagGGN()):
                model(torch.randn(5, 3, dtype=DT)).sum().backward()


def test_configurations_without_a_fast_rule_decline():
    """Options the fast rules do not cover are left to the exact fallback."""
    for module in (
        nn.Embedding(5, 2, max_norm=1.0),
        nn.Embedding(5, 2, scale_grad_by_freq=True),
        nn.Upsample(scale_factor=2, mode="area"),
        nn.Conv1d(2, 2, 3, padding=1, padding_mode="circular"),
        nn.MaxPool2d(2, return_indices=True),
    ):
        assert registry.rule_for(module) is None, module
    for module in (nn.Embedding(5, 2, padding_idx=0), nn.Upsample(scale_factor=2), nn.ConvTranspose2d(2, 2, 3)):
        assert registry.rule_for(module) is not None, module


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
