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
    group-level test (``_closed_form_is_stable``): no entrywise bound, exact against the definition."""
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
