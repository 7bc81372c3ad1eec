"""Weights computed by ``torch.nn.utils.parametrize`` (``weight_norm``): wav2vec2, HuBERT, SEW
and UniSpeech build their positional convolution as
``weight_norm(nn.Conv1d(H, H, k, padding=k // 2, groups=16), dim=2)``.

The parametrization is a module called without the batch (``_WeightNorm(g, v)``), whose
output, the weight, enters every sample. Its diagonal for DiagGGNApprox was formed with
forward-mode products, which torch's ``_weight_norm_interface`` does not implement: every
one of those models crashed with a bare ``NotImplementedError`` from torch. Since session 45
the diagonal has a closed form (``curvhook/rules/weight_norm.py``), and reverse mode serves
any other map of parameters without forward mode. Every extension is checked against torch.func.
"""

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from helpers import CLASSES, DT, check_exact_without_fallback, check_graph_against_reference


class PositionalConv(nn.Module):
    """wav2vec2's positional convolution on ``[N, T, H]``: a grouped, weight-normed Conv1d over
    time, GELU, added back to the input; a linear head."""

    def __init__(self, hidden: int = 4, kernel: int = 3, dim: int = 2):
        super().__init__()
        self.conv = weight_norm(nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2, groups=2), name="weight", dim=dim)
        self.head = nn.Linear(hidden * 5, CLASSES)

    def forward(self, x):  # [N, 5, H]
        h = nn.functional.gelu(self.conv(x.transpose(1, 2))).transpose(1, 2)
        return self.head((x + h).flatten(1))


@pytest.mark.parametrize("dim", [2, 0, None])
@pytest.mark.parametrize("n", [1, 3])
def test_a_weight_normed_convolution_is_exact(n, dim):
    torch.manual_seed(0)
    model = PositionalConv(dim=dim).to(DT)
    X, y = torch.randn(n, 5, 4, dtype=DT), torch.randint(0, CLASSES, (n,))
    check_graph_against_reference(model, X, y)


def test_a_weight_normed_linear_is_exact(monkeypatch):
    torch.manual_seed(1)
    model = nn.Sequential(weight_norm(nn.Linear(3, 6)), nn.Tanh(), nn.Linear(6, CLASSES)).to(DT)
    X, y = torch.randn(3, 3, dtype=DT), torch.randint(0, CLASSES, (3,))
    check_exact_without_fallback(model, X, y, monkeypatch)


def test_the_closed_form_serves_the_weight_norm(monkeypatch):
    """No product per entry of the weight (at wav2vec2's width, 4.7M reverse products)."""
    from curvhook import extend
    from curvhook.extensions import DiagGGNApprox
    from curvhook.rules import parameters_only

    def refuse(*args, **kwargs):
        raise AssertionError("a product per entry")

    monkeypatch.setattr(parameters_only, "_diagonal", refuse)
    torch.manual_seed(2)
    model = PositionalConv().to(DT)
    X, y = torch.randn(3, 5, 4, dtype=DT), torch.randint(0, CLASSES, (3,))
    from curvhook.rules import fallback

    monkeypatch.setattr(fallback, "_WARNED", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "curvhook has no rule for _WeightNorm … fallback"
        with extend(model, DiagGGNApprox()):
            nn.CrossEntropyLoss()(model(X), y).backward()
    assert all(p.diag_ggn_approx.abs().sum() > 0 for p in model.parameters())


def test_reverse_mode_serves_a_map_without_forward_mode(monkeypatch):
    """With the closed form off, the per-entry path takes reverse mode where forward mode is
    not implemented (it raised torch's NotImplementedError before session 45)."""
    from curvhook.rules import parameters_only

    monkeypatch.setattr(parameters_only, "is_weight_norm", lambda call: False)
    torch.manual_seed(3)
    model = PositionalConv().to(DT)
    X, y = torch.randn(2, 5, 4, dtype=DT), torch.randint(0, CLASSES, (2,))
    check_graph_against_reference(model, X, y)
