"""``curvhook/rules/functional.py``: functional layers called in a container's ``forward``.

Real models override ``forward`` and call ``F.batch_norm`` (timm's ``BatchNormAct2d``),
``F.layer_norm`` on a permuted tensor (timm's ``LayerNorm2d``), ``torch.addmm``
(GPT-2's ``Conv1D``), ``F.linear``, ``F.embedding``, ``F.group_norm``, ``F.rms_norm``,
``F.conv{1,2}d`` (after ``F.pad``: timm's ``Conv2dSame``) and
``F.scaled_dot_product_attention``. Every model of the table runs all four
extensions in one ``extend`` block against the torch.func references
(``helpers.check_graph_against_reference``), for one sample and for a batch of
three, in float64. Further tests: the closed forms are used (no ``torch.func``),
training-mode ``F.batch_norm`` is refused, and an in-place activation after
``F.batch_norm`` is no false "mixes samples".
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvhook import extend
from curvhook.errors import UnsupportedModelError
from curvhook.extensions import DiagGGNApprox
from curvhook.rules import tensor_ops
from curvhook.rules.functional import FUNCTIONAL_RULES
from helpers import check_graph_against_reference, run_curvhook
from reference import compare, reference

DT = torch.float64


class BatchNormAct(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d``: ``F.batch_norm`` with the module's statistics, then children."""

    def __init__(self, channels: int, inplace: bool = False) -> None:
        super().__init__(channels)
        self.drop, self.act = nn.Identity(), nn.SiLU(inplace=inplace)
        with torch.no_grad():
            self.running_mean.normal_()
            self.running_var.uniform_(0.5, 2.0)
            self.weight.uniform_(0.5, 2.0)
            self.bias.normal_()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, 0.0, self.eps)
        return self.act(self.drop(x))


class ConvThen(nn.Module):
    """A convolution, a functional layer with the container's parameters, a Linear head."""

    def __init__(self, fn, channels=4, size=3, params=("weight", "bias"), **shapes) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, channels, 1)
        self.fn = fn
        for name in params:
            setattr(self, name, nn.Parameter(torch.randn(*shapes.get(name, (channels,))) * 0.5 + 1.0))
        h, w = (size, size) if isinstance(size, int) else size
        self.head = nn.Linear(channels * h * w, 3)

    def forward(self, x):
        return self.head(self.fn(self, self.conv(x)).flatten(1))


class LinearThen(nn.Module):
    """A Linear layer on ``[N, T, 4]``, a functional layer, a Linear head."""

    def __init__(self, fn, d=5, t=3, params=("weight", "bias"), **shapes) -> None:
        super().__init__()
        self.a = nn.Linear(4, d)
        self.fn = fn
        for name in params:
            setattr(self, name, nn.Parameter(torch.randn(*shapes.get(name, (d,))) * 0.5 + 1.0))
        out = shapes.get("out", d)
        self.head = nn.Linear(out * t, 3)

    def forward(self, x):
        return self.head(self.fn(self, self.a(x)).flatten(1))


class EmbeddingThen(nn.Module):
    def __init__(self, padding_idx=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 4))
        self.padding_idx = padding_idx
        self.head = nn.Linear(3 * 4, 3)

    def forward(self, idx):
        return self.head(torch.tanh(F.embedding(idx, self.weight, self.padding_idx)).flatten(1))


class Attention(nn.Module):
    """``F.scaled_dot_product_attention`` on projections of ``[N, T, 4]``, two heads."""

    def __init__(
        self, mask=None, causal=False, scale=None, gqa=False, by_hand=False, learned_bias=False, padding=False,
        frozen_keys=False, batched_bias=None,
    ) -> None:
        super().__init__()
        self.qkv, self.head = nn.Linear(4, 12), nn.Linear(3 * 4, 3)
        # cross-attention to a frozen encoder (BART's or T5's decoder with the encoder frozen): keys
        # and values are constants with one slice per sample
        self.frozen = nn.Linear(4, 8).requires_grad_(False) if frozen_keys else None
        self.mask, self.causal, self.scale, self.gqa, self.by_hand = mask, causal, scale, gqa, by_hand
        # T5's relative position bias: an added mask [1, H, L, L] computed from parameters
        self.bias = nn.Parameter(torch.randn(3, 3, 2)) if learned_bias or batched_bias else None
        self.padding, self.batched_bias = padding, batched_bias

    def forward(self, x):
        if self.bias is not None:
            self.mask = self.bias.permute(2, 0, 1).unsqueeze(0)
        if self.batched_bias is not None:
            # HF Swin's shifted windows: a constant mask copied for every sample (repeat) plus
            # the learned bias, a mask with grad and the batch axis, [N, 2, L, L] or [N, 1, L, L]
            shift = torch.tensor([[0.0, -2.0, 0.0], [0.0, 0.0, -3.0], [-1.0, 0.0, 0.0]], dtype=x.dtype)
            bias = self.mask if self.batched_bias == "heads" else self.mask[:, :1]
            self.mask = shift.repeat(x.shape[0], 1, 1, 1) + bias
        if self.padding:  # a padding mask [N, 1, 1, L] read off each sample's own input, as Hugging Face's
            keep = x.detach()[..., 0] < 0.5  # tokens whose first feature is large are padding
            keep[:, 0] = True  # never a sample without tokens
            self.mask = keep[:, None, None, :]
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 2)).permute(0, 2, 3, 1, 4).unbind(1)
        if self.frozen is not None:
            k, v = self.frozen(x.detach().flip(1)).unflatten(-1, (2, 2, 2)).permute(0, 2, 3, 1, 4).unbind(1)
        if self.gqa:  # one key and value head for both query heads (Llama's grouped-query attention)
            k, v = k[:, :1], v[:, :1]
        if self.by_hand:
            o = self._by_hand(q, k, v)
        else:
            extra = {"enable_gqa": True} if self.gqa else {}
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.causal, scale=self.scale, **extra)
        return self.head(o.transpose(1, 2).flatten(1))

    def _by_hand(self, q, k, v):
        """The same attention written out as its operations (the split form's definition)."""
        if self.gqa:
            k, v = k.repeat_interleave(2, -3), v.repeat_interleave(2, -3)
        s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if self.scale is None else self.scale)
        if self.causal:
            s = s.masked_fill(~torch.ones(3, 3, dtype=torch.bool).tril(), float("-inf"))
        if self.mask is not None:
            s = s.masked_fill(~self.mask, float("-inf")) if self.mask.dtype == torch.bool else s + self.mask
        # a query whose keys are all masked attends to nothing: zeros, as F.scaled_dot_product_attention gives
        dead = s.isneginf().all(-1, keepdim=True)
        return s.masked_fill(dead, 0.0).softmax(-1).masked_fill(dead, 0.0) @ v


def _bn(m, x):
    return F.relu(F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, 1e-5))


def _with_stats(model):
    model.register_buffer("running_mean", torch.randn(4))
    model.register_buffer("running_var", torch.rand(4) + 0.5)
    return model


def _layer_norm_2d(m, x):  # timm's LayerNorm2d
    return F.layer_norm(x.permute(0, 2, 3, 1), (4,), m.weight, m.bias, 1e-6).permute(0, 3, 1, 2)


def _rms(m, x):  # HF's LlamaRMSNorm
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * m.weight


def _addmm(m, x):  # HF GPT-2's Conv1D on one position per sample (N·T rows would merge samples)
    return torch.addmm(m.bias, x.flatten(1), m.weight)


def _chunks(m, x):
    a, b = x.chunk(2, dim=1)
    c, d = x[:, :2].unbind(1)
    return torch.cat([a * b, torch.tanh(b)], 1) + (c * d)[:, None]


# name -> (model builder, input builder); float64
CASES = {
    "batch_norm_eval": (lambda: _with_stats(ConvThen(_bn)), (2, 3, 3)),
    "batch_norm_act_module": (lambda: nn.Sequential(nn.Conv2d(2, 4, 1), BatchNormAct(4), nn.Flatten(), nn.Linear(36, 3)), (2, 3, 3)),
    "batch_norm_no_affine": (lambda: _with_stats(ConvThen(
        lambda m, x: F.batch_norm(x, m.running_mean, m.running_var), params=())), (2, 3, 3)),
    "layer_norm_last": (lambda: LinearThen(lambda m, x: F.layer_norm(x, (5,), m.weight, m.bias)), (3, 4)),
    "layer_norm_two_axes": (lambda: LinearThen(
        lambda m, x: F.layer_norm(x, (3, 5), m.weight, m.bias), weight=(3, 5), bias=(3, 5)), (3, 4)),
    "layer_norm_no_affine": (lambda: LinearThen(lambda m, x: F.layer_norm(x, (5,)), params=()), (3, 4)),
    "layer_norm_2d_permuted": (lambda: ConvThen(_layer_norm_2d), (2, 3, 3)),
    "group_norm": (lambda: ConvThen(lambda m, x: F.group_norm(x, 2, m.weight, m.bias)), (2, 3, 3)),
    "group_norm_weight_only": (lambda: ConvThen(
        lambda m, x: F.group_norm(x, 1, m.weight), params=("weight",)), (2, 3, 3)),
    "rms_norm": (lambda: LinearThen(lambda m, x: F.rms_norm(x, (5,), m.weight, 1e-6), params=("weight",)), (3, 4)),
    "rms_norm_no_weight": (lambda: LinearThen(lambda m, x: F.rms_norm(x, (3, 5)), params=()), (3, 4)),
    "rms_norm_by_hand": (lambda: LinearThen(_rms, params=("weight",)), (3, 4)),
    "linear": (lambda: LinearThen(lambda m, x: F.linear(x, m.weight, m.bias), weight=(6, 5), bias=(6,), out=6), (3, 4)),
    "linear_no_bias": (lambda: LinearThen(lambda m, x: F.linear(x, m.weight), params=("weight",),
                                          weight=(2, 5), out=2), (3, 4)),
    "addmm": (lambda: LinearThen(_addmm, t=1, weight=(15, 6), bias=(6,), out=6), (3, 4)),
    "chunk_unbind": (lambda: ConvThen(_chunks, params=()), (2, 3, 3)),
    "sdpa": (lambda: Attention(), (3, 4)),
    "sdpa_causal": (lambda: Attention(causal=True), (3, 4)),
    "sdpa_mask": (lambda: Attention(mask=torch.randn(3, 3, dtype=DT)), (3, 4)),
    "sdpa_bool_mask": (lambda: Attention(mask=torch.tensor([[1, 0, 1], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)), (3, 4)),
    "sdpa_padding_mask": (lambda: Attention(padding=True), (3, 4)),
    "sdpa_learned_bias": (lambda: Attention(learned_bias=True), (3, 4)),
    "sdpa_batched_bias": (lambda: Attention(batched_bias="heads"), (3, 4)),
    "sdpa_batched_bias_broadcast": (lambda: Attention(batched_bias="broadcast"), (3, 4)),
    "sdpa_frozen_keys": (lambda: Attention(frozen_keys=True), (3, 4)),
    "sdpa_frozen_keys_padding": (lambda: Attention(frozen_keys=True, padding=True), (3, 4)),
    "avg_pool2d": (lambda: ConvThen(lambda m, x: F.avg_pool2d(x, 2, stride=1), params=(), size=2), (2, 3, 3)),
    "avg_pool2d_padded": (lambda: ConvThen(
        lambda m, x: F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False), params=()), (2, 3, 3)),
    "avg_pool2d_ceil_divisor": (lambda: ConvThen(
        lambda m, x: F.avg_pool2d(x, 2, 2, 0, True, True, 3), params=(), size=2), (2, 3, 3)),
    "avg_pool1d": (lambda: ConvThen(lambda m, x: F.avg_pool1d(x.flatten(2), 6, 1), params=(), size=2), (2, 3, 3)),
    "adaptive_avg_pool2d": (lambda: ConvThen(lambda m, x: F.adaptive_avg_pool2d(x, 2), params=(), size=2), (2, 3, 3)),
    "adaptive_avg_pool1d": (lambda: ConvThen(
        lambda m, x: F.adaptive_avg_pool1d(x.flatten(2), 4), params=(), size=2), (2, 3, 3)),
    "max_pool2d": (lambda: ConvThen(lambda m, x: F.max_pool2d(x, 2, 1), params=(), size=2), (2, 3, 3)),
    "max_pool2d_padded_dilated_ceil": (lambda: ConvThen(  # torchvision's Inception: F.max_pool2d(x, 3, 2)
        lambda m, x: F.max_pool2d(x, 2, stride=2, padding=1, dilation=2, ceil_mode=True), params=(), size=2),
        (2, 3, 3)),
    "max_pool1d": (lambda: ConvThen(lambda m, x: F.max_pool1d(x.flatten(2), 3, 2), params=(), size=2), (2, 3, 3)),
    "max_pool3d": (lambda: ConvThen(lambda m, x: F.max_pool3d(x.unsqueeze(2), (1, 2, 2), 1), params=(), size=2),
                   (2, 3, 3)),
    "conv2d": (lambda: ConvThen(lambda m, x: F.conv2d(x, m.weight, m.bias, padding=1), weight=(4, 4, 3, 3)), (2, 3, 3)),
    "conv2d_dilated_groups_no_bias": (lambda: ConvThen(
        lambda m, x: F.conv2d(x, m.weight, None, 1, 2, 2, 2), params=("weight",), weight=(4, 2, 3, 3)), (2, 3, 3)),
    "conv2d_strided_tuple": (lambda: ConvThen(
        lambda m, x: F.conv2d(x, m.weight, m.bias, stride=(2, 1), padding=(1, 0)), weight=(4, 4, 3, 1), size=(2, 3)),
        (2, 3, 3)),
    "conv2d_same_asymmetric": (lambda: ConvThen(
        lambda m, x: F.conv2d(x, m.weight, m.bias, padding="same"), weight=(4, 4, 2, 2)), (2, 3, 3)),
    "conv2d_tf_same": (lambda: ConvThen(  # timm's Conv2dSame: F.pad, then a valid convolution
        lambda m, x: F.conv2d(F.pad(x, (0, 1, 0, 1)), m.weight, m.bias), weight=(4, 4, 2, 2)), (2, 3, 3)),
    "conv2d_one_element_tuples": (lambda: ConvThen(  # torch repeats them for every axis
        lambda m, x: F.conv2d(x, m.weight, m.bias, stride=(1,), padding=[2], dilation=(2,)), weight=(4, 4, 3, 3)),
        (2, 3, 3)),
    "conv1d": (lambda: ConvThen(
        lambda m, x: F.conv1d(x.flatten(2), m.weight, m.bias, padding=1), weight=(4, 4, 3)), (2, 3, 3)),
    # a weight and bias computed from parameters (Mamba's causal depthwise convolution:
    # F.conv1d(x, conv.weight.squeeze(1).unsqueeze(1), conv.bias, padding=k - 1, groups=C))
    "conv1d_derived_depthwise": (lambda: ConvThen(
        lambda m, x: F.conv1d(x.flatten(2), m.weight.squeeze(1).unsqueeze(1), m.bias * 2, padding=2, groups=4)[..., :9],
        weight=(4, 1, 3)), (2, 3, 3)),
    "conv2d_derived_strided_groups": (lambda: ConvThen(
        lambda m, x: F.conv2d(x, m.weight.tanh(), m.bias.exp(), stride=(2, 1), padding=(1, 0), groups=2),
        weight=(4, 2, 3, 1), size=(2, 3)), (2, 3, 3)),
    "conv2d_derived_same_asymmetric": (lambda: ConvThen(
        lambda m, x: F.conv2d(x, 0.5 * m.weight, None, padding="same", dilation=(1, 2)), params=("weight",),
        weight=(4, 4, 2, 2)), (2, 3, 3)),
    "pad_reflect": (lambda: ConvThen(lambda m, x: F.pad(x, (1, 1, 0, 2), mode="reflect"), params=(), size=(5, 5)),
                    (2, 3, 3)),
    # GhostNetV2's attention: F.interpolate(gate, size=x.shape[-2:], mode="nearest")
    "interpolate_nearest": (lambda: ConvThen(lambda m, x: F.interpolate(x, scale_factor=2), params=(), size=6), (2, 3, 3)),
    "interpolate_nearest_exact_size": (lambda: ConvThen(
        lambda m, x: F.interpolate(x, size=(2, 5), mode="nearest-exact"), params=(), size=(2, 5)), (2, 3, 3)),
    "interpolate_bilinear": (lambda: ConvThen(
        lambda m, x: F.interpolate(x, size=(5, 4), mode="bilinear"), params=(), size=(5, 4)), (2, 3, 3)),
    "interpolate_bicubic_align_corners": (lambda: ConvThen(
        lambda m, x: F.interpolate(x, scale_factor=1.5, mode="bicubic", align_corners=True), params=(), size=4), (2, 3, 3)),
    "interpolate_linear_recompute": (lambda: ConvThen(
        lambda m, x: F.interpolate(x.flatten(2), scale_factor=1.4, mode="linear", recompute_scale_factor=True),
        params=(), size=(3, 4)), (2, 3, 3)),
    # a table computed from parameters only, resized and added to every sample (PVT's position
    # embeddings, resized to their own size; BEiT's relative-position table)
    "interpolate_shared_bilinear": (lambda: ConvThen(
        lambda m, x: torch.tanh(x + F.interpolate(m.weight, size=(3, 3), mode="bilinear")), params=("weight",),
        weight=(1, 4, 2, 2)), (2, 3, 3)),
    "interpolate_shared_same_size": (lambda: ConvThen(
        lambda m, x: torch.tanh(x + F.interpolate(m.weight * 2, size=(3, 3), mode="bilinear")), params=("weight",),
        weight=(1, 4, 3, 3)), (2, 3, 3)),
    "interpolate_shared_bicubic_align_corners": (lambda: ConvThen(
        lambda m, x: torch.tanh(x + F.interpolate(m.weight, size=(3, 3), mode="bicubic", align_corners=True)),
        params=("weight",), weight=(1, 4, 2, 2)), (2, 3, 3)),
    "interpolate_shared_nearest_no_leading_one": (lambda: ConvThen(
        lambda m, x: torch.tanh(x * F.interpolate(m.weight, size=(3, 3)).squeeze(1)), params=("weight",),
        weight=(4, 1, 2, 2)), (2, 3, 3)),
    "embedding": (lambda: EmbeddingThen(), None),
    "embedding_padding_idx": (lambda: EmbeddingThen(padding_idx=2), None),
}


def _input(shape, n):
    return torch.randint(0, 6, (n, 3)) if shape is None else torch.randn(n, *shape, dtype=DT)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("case", CASES)
def test_functional_against_reference(case, n):
    torch.manual_seed(0)
    build, shape = CASES[case]
    model = build().to(DT).eval()
    X = _input(shape, n)
    check_graph_against_reference(model, X, torch.randint(0, 3, (n,)))


FAST = [c for c in CASES if not c.startswith(("sdpa", "chunk", "rms_norm_by_hand"))]


@pytest.mark.parametrize("case", FAST)
def test_closed_forms_are_used(case, monkeypatch):
    """The functional layers never take the generic torch.func paths: the module rules' closed forms serve them."""
    for method in ("input_jac_t_mat_prod", "shared_jac_t_mat_prod", "_exact_diag", "check"):
        generic = getattr(tensor_ops.TensorOpRule, method)

        def guarded(self, call, *args, generic=generic, method=method):
            assert call.func not in FUNCTIONAL_RULES, f"{call.name}: generic {method}"
            return generic(self, call, *args)

        monkeypatch.setattr(tensor_ops.TensorOpRule, method, guarded)
    torch.manual_seed(0)
    build, shape = CASES[case]
    model = build().to(DT).eval()
    X = _input(shape, 3)
    run_curvhook(model, X, lambda out: nn.CrossEntropyLoss()(out, torch.randint(0, 3, (3,))))


TRAINING_BATCH_NORMS = {
    "running_statistics": CASES["batch_norm_act_module"][0],
    "no_running_statistics": lambda: ConvThen(lambda m, x: F.batch_norm(x, None, None, m.weight, m.bias, True)),
}


@pytest.mark.parametrize("case", TRAINING_BATCH_NORMS)
def test_batch_norm_with_batch_statistics_is_refused(case):
    model = TRAINING_BATCH_NORMS[case]().to(DT).train()
    with pytest.raises(UnsupportedModelError, match=r"statistics of the whole batch.*model\.eval\(\)"):
        run_curvhook(model, torch.randn(3, 2, 3, 3, dtype=DT), lambda out: nn.CrossEntropyLoss()(out, torch.randint(0, 3, (3,))))


@pytest.mark.parametrize("n", [1, 3])
def test_in_place_activation_after_batch_norm(n):
    """timm's BatchNormAct2d: SiLU(inplace=True) overwrites F.batch_norm's output (no false refusal).

    The exact extensions against the reference; DiagGGNApprox against the same model with
    ``inplace=False`` (``graph_reference`` replays modules on their overwritten inputs).
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), BatchNormAct(3, inplace=True), nn.Flatten(), nn.Linear(27, 3))
    model = model.to(DT).eval()
    X, y = torch.randn(n, 2, 3, 3, dtype=DT), torch.randint(0, 3, (n,))
    loss = lambda out: nn.CrossEntropyLoss()(out, y)  # noqa: E731
    from helpers import check_against_reference

    got, _ = check_against_reference(model, X, loss, which=("BatchJacobian", "DiagGGN", "FullGGN"))
    plain = copy.deepcopy(model)
    plain[1].act.inplace = False
    approx = run_curvhook(model, X, loss, which=("DiagGGNApprox",))[0]["DiagGGNApprox"]
    torch.testing.assert_close(approx, run_curvhook(plain, X, loss, which=("DiagGGNApprox",))[0]["DiagGGNApprox"])


def test_in_place_output_check_still_catches_mixing():
    """A replayed operation whose output was overwritten is compared with a batched replay."""

    class Mixing(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.act, self.b = nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 3)

        def forward(self, x):
            return self.b(self.act(torch.cumsum(self.a(x), 0)))

    model = Mixing().to(DT)
    with pytest.raises(UnsupportedModelError, match="mixes samples"):
        run_curvhook(model, torch.randn(3, 4, dtype=DT), lambda out: nn.CrossEntropyLoss()(out, torch.randint(0, 3, (3,))))


BOOL_MASK = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)
SPLIT_SDPA_CASES = {
    "plain": {}, "causal": dict(causal=True), "float_mask": dict(mask=torch.randn(3, 3, dtype=DT)),
    "bool_mask": dict(mask=BOOL_MASK), "scale": dict(scale=0.3), "gqa": dict(gqa=True),
    "gqa_causal": dict(gqa=True, causal=True), "learned_bias": dict(learned_bias=True),
    "batched_bias": dict(batched_bias="heads"), "batched_bias_broadcast": dict(batched_bias="broadcast"),
    "padding_mask": dict(padding=True),
    "frozen_keys": dict(frozen_keys=True), "frozen_keys_padding": dict(frozen_keys=True, padding=True),
    "frozen_keys_gqa": dict(frozen_keys=True, gqa=True),
    # the first query sees no key (left padding in a causal model): a row of zeros, not NaN
    "all_keys_masked": dict(mask=torch.tensor([[0, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)),
    "all_keys_masked_float": dict(mask=torch.zeros(3, 3, dtype=DT).masked_fill(
        torch.tensor([[1, 1, 1], [0, 0, 1], [0, 0, 0]], dtype=torch.bool), float("-inf"))),
}


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("case", SPLIT_SDPA_CASES)
def test_sdpa_split_matches_attention_written_out(case, n, monkeypatch):
    """DiagGGNApprox (split_attention=True) on F.scaled_dot_product_attention = the graph reference on the same
    attention written out by hand, without dense Jacobians for the attention."""
    from graph_reference import diag_ggn_approx_graph
    from reference import check

    if SPLIT_SDPA_CASES[case].get("gqa") and "enable_gqa" not in str(F.scaled_dot_product_attention.__doc__):
        pytest.skip("torch without enable_gqa")
    generic = tensor_ops.TensorOpRule._exact_diag

    def guarded(self, call, *args):
        assert call.func is not F.scaled_dot_product_attention, "dense diagonal for attention"
        return generic(self, call, *args)

    monkeypatch.setattr(tensor_ops.TensorOpRule, "_exact_diag", guarded)
    torch.manual_seed(1)
    model = Attention(**SPLIT_SDPA_CASES[case]).to(DT).eval()
    twin = copy.deepcopy(model)
    twin.by_hand = True
    X, y = torch.randn(n, 3, 4, dtype=DT), torch.randint(0, 3, (n,))
    crit = nn.CrossEntropyLoss()
    got = run_curvhook(model, X, lambda out: crit(out, y), which=("DiagGGNApprox",))[0]["DiagGGNApprox"]
    with torch.no_grad():
        out = twin(X)
    torch.testing.assert_close(out, model(X).detach())
    d = torch.func.hessian(lambda o: crit(o, y))(out).reshape(out.numel(), -1).diagonal()
    check(got, diag_ggn_approx_graph(twin, X, d), "DiagGGNApprox")


@pytest.mark.parametrize("case", [c for c in CASES if "pool" in c or ("interpolate" in c and "shared" not in c)])
def test_pools_take_no_dense_jacobians(case, monkeypatch):
    """``F.avg_pool2d`` and ``F.max_pool2d`` in a ``forward`` (torchvision's Inception blocks) get
    the closed forms of ``nn.AvgPool2d`` and ``nn.MaxPool2d``: before, DiagGGNApprox built dense
    per-sample Jacobians (5.4 GB for one 32-channel 24×24 map; ``max_pool2d`` since session 42).
    ``F.interpolate`` gets those of ``nn.Upsample`` (since session 44: GhostNetV2's gate)."""

    def dense(self, call, *args):
        raise AssertionError(f"{call.name}: dense per-sample Jacobian")

    monkeypatch.setattr(tensor_ops.TensorOpRule, "_exact_diag", dense)
    torch.manual_seed(0)
    build, shape = CASES[case]
    model = build().to(DT).eval()
    with extend(model, DiagGGNApprox()):
        nn.CrossEntropyLoss()(model(_input(shape, 3)), torch.randint(0, 3, (3,))).backward()


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("interpolate_shared")])
def test_interpolated_tables_take_no_dense_jacobians(case, monkeypatch):
    """A table computed from parameters only and resized by ``F.interpolate`` (PVT's position
    embeddings, BEiT's relative-position table): the separable closed form of ``nn.Upsample``
    for every sample. Before session 46, dense Jacobians of the whole map (15.7 GB for PVT's
    56×56×64 table: out of memory)."""

    def dense(call):
        raise AssertionError(f"{call.name}: dense per-sample Jacobian")

    monkeypatch.setattr(tensor_ops, "_warn_dense_once", dense)
    torch.manual_seed(0)
    build, shape = CASES[case]
    model = build().to(DT).eval()
    with extend(model, DiagGGNApprox()):
        nn.CrossEntropyLoss()(model(_input(shape, 3)), torch.randint(0, 3, (3,))).backward()


class PositionsLookedUp(nn.Module):
    """``F.embedding`` of positions ``[1, L]`` in a ``forward`` (no batch axis: the lookup is a
    tensor computed from the weight alone, added to every sample), beside a lookup of
    per-sample ids. Before, the embedding rule read the positions as one row per sample:
    ``index_add_`` raised with ``N > 1`` (and BART's FullGGN was wrong where a leaf
    counted as this call)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.head = nn.Linear(4, 4), nn.Linear(3 * 4, 3)
        self.positions, self.words = nn.Parameter(torch.randn(5, 4)), nn.Parameter(torch.randn(6, 4))

    def forward(self, x):  # x: [N, 3, 4]
        ids = (x.detach()[..., 0] > 0).long() + 2  # [N, 3], one row per sample
        pos = F.embedding(torch.arange(3)[None] + 1, self.positions)  # [1, 3, 4]
        return self.head(torch.tanh(self.proj(x) + pos * 1.5 + F.embedding(ids, self.words)).flatten(1))


@pytest.mark.parametrize("n", [1, 3])
def test_embedding_of_positions_without_the_batch_axis(n, monkeypatch):
    torch.manual_seed(0)
    model = PositionsLookedUp().to(DT)
    X, y = torch.randn(n, 3, 4, dtype=DT), torch.randint(0, 3, (n,))

    def dense(call):
        raise AssertionError(f"{call.name}: dense per-sample Jacobian")

    monkeypatch.setattr(tensor_ops, "_warn_dense_once", dense)
    check_graph_against_reference(model, X, y)


def test_bloom_gelu_a_custom_autograd_function_is_an_activation():
    """BLOOM's ``BloomGelu`` calls a custom ``autograd.Function`` that torch.func refuses (the
    fallback raised); matched by name, its slope comes from its one autograd node. The
    reference is the same network with the function it computes written out."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.bloom import modeling_bloom

    class Net(nn.Module):
        def __init__(self, act):
            super().__init__()
            self.a, self.act, self.b = nn.Linear(4, 6), act, nn.Linear(6, 3)

        def forward(self, x):
            return self.b(self.act(self.a(x)))

    class WrittenOut(nn.Module):
        def forward(self, x):
            return modeling_bloom.bloom_gelu_forward(x)

    torch.manual_seed(0)
    model = Net(modeling_bloom.BloomGelu()).to(DT)
    twin = Net(WrittenOut()).to(DT)
    twin.load_state_dict(model.state_dict())
    X, y = torch.randn(3, 4, dtype=DT), torch.randint(0, 3, (3,))
    crit = nn.CrossEntropyLoss()
    got, matrix, _ = run_curvhook(model, X, lambda out: crit(out, y))
    expected, expected_matrix, _ = run_curvhook(twin, X, lambda out: crit(out, y))
    # (its backward's constants are rounded: 0.1070322243 for 3·0.044715·0.79788456, so the
    # slope autograd uses differs from the forward's derivative near 1e-11)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(matrix, expected_matrix, rtol=1e-9, atol=1e-12)
    compare({k: v for k, v in got.items() if k != "DiagGGNApprox"}, reference(twin, X, lambda out: crit(out, y), approx=False), matrix)


@pytest.mark.parametrize("form", ["lower_rank", "heads_equal_batch"])
def test_sdpa_with_a_batched_mask_that_broadcasts_its_batch_axis_elsewhere_is_refused(form):
    """A mask with grad and the batch axis must have it first, at the rank of the scores: one of
    lower rank, ``[N, S]``, or ``[N, L, S]`` with ``N = H``, broadcasts it onto another axis, so
    each sample reads every sample's mask (found by review: BatchJacobian was wrong)."""

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.m, self.head = nn.Linear(4, 12), nn.Linear(4, 3), nn.Linear(12, 3)

        def forward(self, x):  # [N, 3, 4]
            q, k, v = self.qkv(x).unflatten(-1, (3, 2, 2)).permute(0, 2, 3, 1, 4).unbind(1)  # [N, 2, 3, 2]
            mask = self.m(x)[..., 0] if form == "lower_rank" else self.m(x)  # [N, S] or [N, L, S]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return self.head(o.transpose(1, 2).flatten(1))

    n = 3 if form == "lower_rank" else 2
    model = Masked().to(DT)
    X, y = torch.randn(n, 3, 4, dtype=DT), torch.arange(n)
    with pytest.raises(UnsupportedModelError, match="mixes samples"):
        run_curvhook(model, X, lambda out: nn.CrossEntropyLoss()(out, y))


@pytest.mark.parametrize("pool", [
    lambda x: F.max_pool1d(x.flatten(1), 2),  # [N, C·H·W]: one sample of C·H·W channels to torch
    lambda x: F.max_pool2d(x.flatten(1, 2), 2),
    lambda x: F.max_pool3d(x, 2),
    lambda x: F.avg_pool2d(x.flatten(1, 2), 2),
], ids=["max_pool1d", "max_pool2d", "max_pool3d", "avg_pool2d"])
@pytest.mark.parametrize("n", [1, 3])
def test_pools_of_an_input_without_a_channel_axis(pool, n):
    """One axis fewer than ``[N, C, *spatial]``: torch pools the batch axis as channels, which the
    module rules do not read so; the generic path serves it, exact (the review of session 42 found
    a shape error in the first version of the max-pool functional)."""
    torch.manual_seed(0)
    model = ConvThen(lambda m, x: pool(x), params=(), size=1).to(DT)
    X = torch.randn(n, 2, 4, 4, dtype=DT)
    with torch.no_grad():
        features = pool(model.conv(X)).flatten(1).shape[1]
    model.head = nn.Linear(features, 3).to(DT)
    check_graph_against_reference(model, X, torch.randint(0, 3, (n,)))
