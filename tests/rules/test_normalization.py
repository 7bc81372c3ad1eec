"""``curvhook/rules/normalization.py``: BatchNorm (eval mode), LayerNorm, GroupNorm,
InstanceNorm and RMSNorm, with and without affine parameters.

Every case of the table runs BatchJacobian, DiagGGN, DiagGGNApprox and FullGGN in
one ``extend`` block and compares them in float64 with the brute-force reference
(``tests/reference.py``), for one sample and for a batch of three with a
non-contiguous input; the registered rule (never the torch.func fallback) must
serve every module; a float32 run is compared with the same reference. Affine
parameters and running statistics are drawn away from their defaults
(``helpers.randomize_layers``).
"""

import pytest
import torch
from torch import nn

from curvhook import extend
from curvhook.errors import UnsupportedModelError
from curvhook.extensions import BatchJacobian, DiagGGN
from helpers import (
    layer_table_tests,
    CLASSES,
    assert_exact,
    DT,
    check_against_reference,
    check_graph_against_reference,
    close,
    float_input,
    ggn_reference,
    head,
    mse,
    prefix_conv,
    randomize_layers,
    run_all,
    seq,
)

class LlamaRMSNorm(nn.Module):
    """Hugging Face's ``LlamaRMSNorm``: computed in float32, cast back, scaled by ``weight``."""

    def __init__(self, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(hidden) + 0.5)
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float64)  # float32 in transformers: float64 keeps the test exact
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(dtype)


LlamaRMSNorm.__module__ = "transformers.models.llama.modeling_llama"  # matched by name, as the real one


# name -> (model builder, input builder)
CASES = {
    "hf_llama_rms_norm_positions": (seq(nn.Linear(3, 4), LlamaRMSNorm(4), nn.Tanh(), *head()), float_input((2, 3))),
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
    # first layers (the input needs no Jacobian) and 3d group normalization
    "layernorm_first_layer": (
        seq(nn.LayerNorm(4), nn.Linear(4, CLASSES)),
        float_input((4,)),
    ),
    "groupnorm_3d_first_layer": (
        seq(nn.GroupNorm(2, 4), *head()),
        float_input((4, 2, 2, 2)),
    ),
    "batchnorm2d_after_conv": (
        seq(prefix_conv(2, 2), nn.BatchNorm2d(2), nn.ReLU(), *head()),
        float_input((2, 3, 3)),
    ),
}


test_layer_one_sample, test_layer_batch_noncontiguous_and_float32, test_table_covers_every_registered_type = (
    layer_table_tests(CASES, "normalization")
)


LAST_LAYER = {
    "layernorm": (lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), (3,)),
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


def test_batchnorm_with_batch_statistics_is_still_rejected():
    for train, track in ((True, True), (False, False)):
        bn = nn.BatchNorm1d(4, track_running_stats=track).train(train)
        model = nn.Sequential(nn.Linear(3, 4), bn, nn.Linear(4, 2)).to(DT)
        with pytest.raises(UnsupportedModelError, match="statistics"):
            with extend(model, DiagGGN()):
                model(torch.randn(5, 3, dtype=DT)).sum().backward()


def test_batchnorm_in_train_mode_raises_and_eval_mode_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).double()
    X = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (5,))
    with pytest.raises(UnsupportedModelError, match="eval"):
        with extend(model, BatchJacobian()):
            model(X).sum().backward()
    model.eval()
    got = run_all(model, X, y, nn.CrossEntropyLoss())
    _, G = ggn_reference(model, X, y, nn.CrossEntropyLoss())
    close(got["diag"], G.diagonal())


class _FirstToken(nn.Module):
    """A classifier's pooling of the first token: ``x[:, 0]`` (BERT's pooler, a ViT's class token)."""

    def forward(self, x):
        return x[:, 0]


@pytest.mark.parametrize("norm", [nn.LayerNorm(6), LlamaRMSNorm(6)], ids=["LayerNorm", "RMSNorm"])
def test_a_diagonal_that_reaches_one_token_recomputes_nothing_at_the_others(norm, monkeypatch):
    """DiagGGNApprox through a normalization before a first-token pooler: the diagonal is
    zero at every other token, where the closed form is exactly 0 and no term can cancel.
    Those entries are not recomputed term by term (they were, one at a time: 10× the plain
    step on a BERT of hidden size 128). Exact against the definition on the graph."""
    from curvhook.rules.normalization import _GroupNormalizationRule

    recomputed = []
    exact_entries = _GroupNormalizationRule._exact_entries

    def count(self, e, x_hat, i):
        recomputed.append(i.numel())
        return exact_entries(self, e, x_hat, i)

    monkeypatch.setattr(_GroupNormalizationRule, "_exact_entries", count)
    torch.manual_seed(3)
    model = randomize_layers(nn.Sequential(nn.Linear(3, 6), norm, _FirstToken(), nn.Linear(6, CLASSES))).to(DT)
    X, y = torch.randn(4, 7, 3, dtype=DT), torch.randint(0, CLASSES, (4,))
    check_graph_against_reference(model, X, y)
    assert sum(recomputed) == 0


class _Feature(nn.Module):
    """Reads one feature of the last axis: ``x[..., :1]`` (the diagonal reaches one entry per group)."""

    def forward(self, x):
        return x[..., :1]


def _count_guards(monkeypatch) -> list[int]:
    """Counts the entrywise cancellation checks (each appends 1) of the normalization rules."""
    from curvhook.rules.normalization import _GroupNormalizationRule

    calls: list[int] = []
    guard = _GroupNormalizationRule._recompute_cancelled

    def count(self, *args):
        calls.append(1)
        return guard(self, *args)

    monkeypatch.setattr(_GroupNormalizationRule, "_recompute_cancelled", count)
    return calls


WIDE = {
    "LayerNorm": lambda: nn.LayerNorm(64),
    "RMSNorm": lambda: LlamaRMSNorm(64),
    "GroupNorm": lambda: nn.GroupNorm(2, 64),  # on [N, 64, 1] below: groups of 32 entries
}


@pytest.mark.parametrize("norm", sorted(WIDE))
def test_wide_groups_skip_the_entrywise_guard_and_stay_exact(norm, monkeypatch):
    """Groups of 32 or 64 entries with ``x̂² ≤ G/4 - 1`` and spread diagonals pass the
    group-level test (``_unstable_groups``): no entrywise bound, exact against the definition."""
    calls = _count_guards(monkeypatch)
    torch.manual_seed(0)
    layers = [nn.Linear(5, 64), WIDE[norm](), nn.Tanh(), nn.Linear(64, CLASSES)]
    if norm == "GroupNorm":
        layers = [nn.Linear(5, 64), nn.Unflatten(1, (64, 1)), WIDE[norm](), nn.Flatten(), nn.Tanh(), nn.Linear(64, CLASSES)]
    model = randomize_layers(nn.Sequential(*layers)).to(DT)
    X, y = torch.randn(3, 5, dtype=DT), torch.randint(0, CLASSES, (3,))
    check_graph_against_reference(model, X, y)
    assert calls == []


@pytest.mark.parametrize("case", ["one-feature-read", "outlier"])
@pytest.mark.parametrize("norm", ["LayerNorm", "RMSNorm"])
def test_wide_groups_that_may_cancel_still_take_the_entrywise_guard(norm, case, monkeypatch):
    """The group-level test fails, and the entrywise bound runs, where the closed form may cancel:
    a diagonal on one feature (``S_1² = S_0 S_2``: ``Σ_o e_o (1 + x̂_o x)²`` vanishes at
    ``x = -1/x̂_0``; LayerNorm only, RMSNorm has no such term), or an input entry 40
    standard deviations out (``x̂² > G/4``). Exact against the definition either way."""
    if norm == "RMSNorm" and case == "one-feature-read":
        pytest.skip("without centering the closed form has no S_1 term")
    calls = _count_guards(monkeypatch)
    torch.manual_seed(1)
    first = nn.Linear(5, 64)
    tail = [_Feature(), nn.Linear(1, CLASSES)] if case == "one-feature-read" else [nn.Tanh(), nn.Linear(64, CLASSES)]
    model = randomize_layers(nn.Sequential(first, WIDE[norm](), *tail)).to(DT)
    if case == "outlier":
        with torch.no_grad():
            model[0].weight[7].mul_(40.0)
            model[0].bias[7] = 40.0
    X, y = torch.randn(3, 5, dtype=DT), torch.randint(0, CLASSES, (3,))
    check_graph_against_reference(model, X, y)
    assert calls


def _count_suspect_passes(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes at which the normalization rules compute the size of the closed form's terms."""
    from curvhook.rules.normalization import _GroupNormalizationRule

    shapes: list[tuple[int, ...]] = []
    suspects = _GroupNormalizationRule._suspects

    def record(self, back, *args):
        shapes.append(tuple(back.shape))
        return suspects(self, back, *args)

    monkeypatch.setattr(_GroupNormalizationRule, "_suspects", record)
    return shapes


class _MeanTokens(nn.Module):
    """Mean pooling over the tokens, ``x.mean(1)``."""

    def forward(self, x):
        return x.mean(1)


@pytest.mark.parametrize("norm", ["LayerNorm", "RMSNorm"])
def test_a_few_outliers_bound_only_their_own_groups(norm, monkeypatch):
    """One token with a feature far out (``x̂² > G/4 - 1``) among 3 × 8 groups of 64: the
    entrywise bound runs on that group's row alone (``[1, G]``), not in passes over ``[N, T, G]``
    (1.26 ms a LayerNorm of the benchmarks' transformer, where 16 of 262,144 entries, in as
    many of its 4,096 groups, failed the group-level test). Exact against the definition."""
    shapes = _count_suspect_passes(monkeypatch)
    torch.manual_seed(1)
    layers = [nn.Linear(5, 64), WIDE[norm](), nn.Tanh(), _MeanTokens(), nn.Linear(64, CLASSES)]
    model = randomize_layers(nn.Sequential(*layers)).to(DT)
    X, y = torch.randn(3, 8, 5, dtype=DT), torch.randint(0, CLASSES, (3,))
    X[..., 0] = 0.0
    X[1, 2, 0] = 1.0  # feature 7 six standard deviations out at this token alone: x̂² ≈ 22
    with torch.no_grad():
        model[0].weight[7] = 0.0
        model[0].weight[7, 0] = 6 * model[0](X).std()
        model[0].bias[7] = 0.0
    check_graph_against_reference(model, X, y)
    assert shapes == [(1, 64)], shapes


KINDS = ["outliers", "one-entry", "silent-groups", "plain", "cancel"]


def _closed_form_case(kind: str, centered: bool, size: int = 64):
    """``x̂``, ``e`` ``[4, 8, G]`` of one kind, with ``back``, the group sums and the exact entries."""
    gen = torch.Generator().manual_seed(17 * KINDS.index(kind) + 2 * size + centered)
    x = torch.randn(4, 8, size, generator=gen, dtype=DT)
    e = torch.rand(4, 8, size, generator=gen, dtype=DT)
    if kind == "outliers":  # a few entries far out, some just past the threshold
        x[0, :3, 5] += 30.0
        x[1, 2, 9] += 6.0
        x[2, 4, :2] += 12.0
    elif kind == "one-entry":  # e on one entry per group: S_1² = S_0 S_2 everywhere
        e[..., 1:] = 0
        x[:, :, 0] += 5.0
    elif kind == "silent-groups":  # groups nothing reaches, with outliers
        e[:, 1::2] = 0
        x[:, :, 3] += 20.0
    if centered:
        x = x - x.mean(-1, keepdim=True)
    x_hat = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-5)
    if kind == "cancel":  # two groups where q(x̂_3) = e_0 (1 + x̂_0 x̂_3)² ≈ 4e-14 cancels
        for n, t in ((0, 1), (2, 5)):
            e[n, t] = 0.0
            e[n, t, 0] = 1.0
            x_hat[n, t, 0], x_hat[n, t, 3] = 2.0, -0.5 + 1e-7
    x_sq = x_hat.square()
    s0, s1, s2 = (torch.einsum("ntg,ntg->nt", e, x_hat**k).unsqueeze(-1) for k in range(3))
    if centered:
        back = e * (1 - 2 * (1 + x_sq) / size) + (s0 + 2 * x_hat * s1 + x_sq * s2) / size**2
    else:
        back = e * (1 - 2 * x_sq / size) + x_sq * s2 / size**2
    # the definition, term by term: Σ_o e_o (δ_oi - c_o)², c_o = (1 + x̂_o x̂_i)/G (x̂_o x̂_i/G)
    c = x_hat.unsqueeze(-1) * x_hat.unsqueeze(-2)  # [N, T, o, i]
    if centered:
        c = c + 1
    jac = torch.eye(size, dtype=DT) - c / size
    exact = torch.einsum("nto,ntoi->nti", e, jac.square())
    return back, e, x_hat, x_sq, s0 if centered else None, s1 if centered else None, s2, exact


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("centered", [True, False], ids=["centered", "rms"])
def test_the_gathered_bound_recomputes_what_the_whole_tensor_bound_does(kind, centered):
    """``_recompute_cancelled`` bounds only the groups that fail the group-level test
    (``_unstable_groups``). It must recompute exactly the entries that the bound over every
    entry picks (the proof: every other entry keeps ``mag / 8``), and give the definition's values."""
    from curvhook.rules.normalization import LayerNormRule, RMSNormRule

    rule = LayerNormRule() if centered else RMSNormRule()
    back, e, x_hat, x_sq, s0, s1, s2, exact = _closed_form_case(kind, centered)
    narrowed = back.clone()
    unstable = rule._unstable_groups(x_sq, s0, s1, s2)
    if unstable is not None:
        rule._recompute_cancelled(narrowed, e, x_hat, x_sq, s2, s0, unstable)
    everywhere = back.clone()
    suspect = rule._suspects(back, e, x_sq, s2, s0, back.shape[-1])
    n, t, i = suspect.nonzero(as_tuple=True)
    everywhere[n, t, i] = rule._exact_entries(e[n, t], x_hat[n, t], i)
    assert torch.equal(narrowed != back, everywhere != back)
    torch.testing.assert_close(narrowed, everywhere, rtol=0, atol=0)
    torch.testing.assert_close(narrowed, exact, rtol=1e-11, atol=1e-14 * float(exact.abs().max()))


# ----------------------------------------------- timm's GlobalResponseNorm (ConvNeXt V2)
class GRNNet(nn.Module):
    """A convolution, timm's ``GlobalResponseNorm`` (channels last or first), a head; with
    ``dead``, one channel is zero at every position (``G_c = 0``)."""

    def __init__(self, channels_last: bool, dead: bool):
        super().__init__()
        from timm.layers.grn import GlobalResponseNorm

        self.channels_last, self.dead = channels_last, dead
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.grn = GlobalResponseNorm(4, channels_last=channels_last)
        self.head = nn.Linear(4 * 3 * 3, 3)
        with torch.no_grad():  # timm starts them at zero
            self.grn.weight.normal_()
            self.grn.bias.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.dead:
            h = h * torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=h.dtype)[:, None, None]
        h = self.grn(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) if self.channels_last else self.grn(h)
        return self.head(torch.tanh(h).flatten(1))


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("dead", [False, True])
def test_global_response_norm_has_a_rule(channels_last, dead, n, monkeypatch):
    """Before, the fallback served it with dense per-sample Jacobians: one DiagGGNApprox step
    of timm's ``convnextv2_atto`` at 64×64 took 64 s (now 2.4 s)."""
    pytest.importorskip("timm")
    from helpers import check_exact_without_fallback

    torch.manual_seed(0)
    model = GRNNet(channels_last, dead).double()
    X, y = torch.randn(n, 2, 3, 3, dtype=torch.float64), torch.randint(0, 3, (n,))
    check_exact_without_fallback(model, X, y, monkeypatch, moved_axes=True)


class HFGRNNet(GRNNet):
    """:class:`GRNNet` (channels last) with Hugging Face's ``ConvNextV2GRN`` (weight and bias
    ``[1, 1, 1, C]``, ε = 1e-6 inside its ``forward``)."""

    def __init__(self, dead: bool):
        super().__init__(True, dead)
        from transformers.models.convnextv2.modeling_convnextv2 import ConvNextV2GRN

        self.grn = ConvNextV2GRN(4)
        with torch.no_grad():  # it starts at zero
            self.grn.weight.normal_()
            self.grn.bias.normal_()


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("dead", [False, True])
def test_hugging_face_global_response_norm_takes_the_rule(dead, n, monkeypatch):
    """Before session 46 the fallback served it: past 150 s a DiagGGNApprox step of Hugging
    Face's ConvNeXt V2 at its default width (now 1.7 s)."""
    pytest.importorskip("transformers")
    from helpers import check_exact_without_fallback

    torch.manual_seed(0)
    model = HFGRNNet(dead).double()
    X, y = torch.randn(n, 2, 3, 3, dtype=torch.float64), torch.randint(0, 3, (n,))
    check_exact_without_fallback(model, X, y, monkeypatch, moved_axes=True)


class GRNOnFiveAxes(nn.Module):
    """timm's ``GlobalResponseNorm`` (channels last) on ``[N, 2, 3, 1, C]``: it norms over axes
    1 and 2 only. The closed form covers 4-d inputs; others take the exact generic path."""

    def __init__(self):
        super().__init__()
        from timm.layers.grn import GlobalResponseNorm

        self.fc, self.grn, self.head = nn.Linear(3, 4), GlobalResponseNorm(4), nn.Linear(2 * 3 * 4, 3)
        with torch.no_grad():
            self.grn.weight.normal_()
            self.grn.bias.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, 2, 3, 1, 3]
        return self.head(torch.tanh(self.grn(self.fc(x))).flatten(1))


def test_global_response_norm_on_other_ranks_takes_the_exact_path():
    """(Found by review: the rule read any input as 4-d; on 5-d inputs its parameters' results
    had the wrong shape and the layers before it got wrong DiagGGNApprox.)"""
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = GRNOnFiveAxes().double()
    X, y = torch.randn(3, 2, 3, 1, 3, dtype=torch.float64), torch.randint(0, 3, (3,))
    assert_exact(model, X, y, nn.CrossEntropyLoss())
    check_graph_against_reference(model, X, y)


# ------------------------------------------------- timm's RmsNorm2d (MobileNetV5, Gemma 3n)
class ChannelRMSNet(nn.Module):
    """A convolution, timm's ``RmsNorm2d`` (or ``RmsNorm2dFp32``) over the channels, a head."""

    def __init__(self, cls_name: str, affine: bool):
        super().__init__()
        from timm import layers

        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = getattr(layers, cls_name)(4, eps=1e-5, affine=affine)
        self.head = nn.Linear(4 * 3 * 2, 3)
        if affine:
            with torch.no_grad():
                self.norm.weight.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.norm(self.conv(x))).flatten(1))


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("cls_name", ["RmsNorm2d", "RmsNorm2dFp32"])
def test_timm_channel_rms_norm_has_a_rule(cls_name, affine, n, monkeypatch):
    """Before session 44 the fallback served it: a DiagGGNApprox step of mobilenetv5_base at 64×64
    ran past 4 minutes (now 1.0 s, 0.5 s plain). ``RmsNorm2dFp32`` computes in float32: its
    products are those of the float64 map, so the tolerance is float32's."""
    pytest.importorskip("timm")
    from helpers import check_exact_without_fallback

    torch.manual_seed(0)
    model = ChannelRMSNet(cls_name, affine).double()
    X, y = torch.randn(n, 2, 3, 2, dtype=torch.float64), torch.randint(0, 3, (n,))
    if cls_name == "RmsNorm2d":
        check_exact_without_fallback(model, X, y, monkeypatch)
    else:  # the model's own forward rounds to float32
        from helpers import fallback_spy

        served = fallback_spy(monkeypatch)
        got = run_all(model, X, y, nn.CrossEntropyLoss())
        J, G = ggn_reference(model, X, y, nn.CrossEntropyLoss())
        torch.testing.assert_close(got["full"], G, rtol=1e-5, atol=1e-6 * float(G.abs().max()))
        assert served == []
