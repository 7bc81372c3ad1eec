"""nn.MultiheadAttention as self-attention: the closed-form DiagGGNApprox rule.

Every case is compared with the dense per-operation reference of
tests/graph_reference.py (float64), in which the attention module is one
operation, as the definition of DiagGGNApprox says. The exact extensions go
through the generic rule and are compared with torch.func.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from curvhook import extend
from curvhook.extensions import BatchJacobian, DiagGGN, DiagGGNApprox, FullGGN
from curvhook.rules import fallback
from curvhook.rules.attention import SelfAttentionRule
from curvhook.rules.registry import rule_for
from graph_reference import diag_ggn_approx_graph
from reference import check, collect, compare, reference

DT = torch.float64


class SelfAttentionNet(nn.Module):
    """Embedding by a linear layer, self-attention with a residual, a head on the mean token."""

    def __init__(self, e=6, heads=2, mask=None, bias=True, **mha_kwargs):
        super().__init__()
        self.emb = nn.Linear(3, e)
        self.mha = nn.MultiheadAttention(e, heads, batch_first=True, bias=bias, **mha_kwargs)
        self.out = nn.Linear(e, 4)
        self.mask = mask

    def forward(self, x):
        h = torch.tanh(self.emb(x))
        length = x.shape[1]
        kwargs = {}
        if self.mask == "causal_bool":
            kwargs["attn_mask"] = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)
        elif self.mask == "causal_flag":
            kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(length, dtype=x.dtype)
            kwargs["is_causal"] = True
        elif self.mask == "float":
            kwargs["attn_mask"] = torch.linspace(-1, 1, length * length, dtype=x.dtype).view(length, length)
        elif self.mask == "padding":
            pad = torch.zeros(x.shape[0], length, dtype=torch.bool)
            pad[:, -1] = True  # the last token is padding for every sample
            kwargs["key_padding_mask"] = pad
        a, _ = self.mha(h, h, h, need_weights=False, **kwargs)
        return self.out((a + h).mean(1))


def _run(model, X, y, extensions):
    crit = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with extend(model, *extensions):
            crit(model(X), y).backward()
    return crit


def _approx_reference(model, X, y, crit):
    ref = reference(model, X, lambda out: crit(out, y), approx=False)
    d = torch.func.hessian(lambda o: crit(o, y))(ref.out).reshape(ref.out.numel(), -1).diagonal()
    return diag_ggn_approx_graph(model, X, d)


def _no_fallback_diagonals(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the closed-form attention rule fell back to one-hot rows")

    monkeypatch.setattr(fallback, "_weighted_row_squares", refuse)


CASES = {
    "plain": dict(),
    "four_heads": dict(e=8, heads=4),
    "one_head": dict(e=4, heads=1),
    "no_bias": dict(bias=False),
    "causal_bool": dict(mask="causal_bool"),
    "causal_flag": dict(mask="causal_flag"),
    "float_mask": dict(mask="float"),
    "key_padding": dict(mask="padding"),
    "dropout_eval": dict(dropout=0.3),
}


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_closed_form_matches_the_definition(case, n, monkeypatch):
    torch.manual_seed(0)
    model = SelfAttentionNet(**CASES[case]).to(DT).eval()
    assert isinstance(rule_for(model.mha), SelfAttentionRule)
    X, y = torch.randn(n, 5, 3, dtype=DT), torch.randint(0, 4, (n,))
    _no_fallback_diagonals(monkeypatch)
    crit = _run(model, X, y, [DiagGGNApprox()])
    got = collect(model, n, ("DiagGGNApprox",))["DiagGGNApprox"]
    check(got, _approx_reference(model, X, y, crit), "DiagGGNApprox")


def test_input_straight_from_data():
    """Attention on the raw input: no gradient wanted there, only parameter diagonals.

    Every operation inside the module then reads parameters and constants only;
    its output must still count as a per-sample tensor (this once raised).
    """
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(4, 2, batch_first=True).to(DT)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha, self.out = mha, nn.Linear(4, 3)

        def forward(self, x):
            return self.out(self.mha(x, x, x, need_weights=False)[0][:, 0])

    model = Net().to(DT)
    X, y = torch.randn(2, 3, 4, dtype=DT), torch.randint(0, 3, (2,))
    ggn = FullGGN()
    crit = _run(model, X, y, [BatchJacobian(), DiagGGN(), DiagGGNApprox(), ggn])
    got = collect(model, 2)
    compare({k: v for k, v in got.items() if k != "DiagGGNApprox"}, reference(model, X, lambda o: crit(o, y), approx=False), ggn.matrix)
    check(got["DiagGGNApprox"], _approx_reference(model, X, y, crit), "DiagGGNApprox")


class KeyValueWidth(nn.Module):
    """Keys and values of another width (``kdim``/``vdim``): not self-attention."""

    def __init__(self):
        super().__init__()
        self.emb, self.kv = nn.Linear(3, 6), nn.Linear(3, 5)
        self.mha = nn.MultiheadAttention(6, 2, batch_first=True, kdim=5, vdim=5)
        self.out = nn.Linear(6, 4)

    def forward(self, x):
        h, kv = torch.tanh(self.emb(x)), torch.tanh(self.kv(x))
        return self.out((self.mha(h, kv, kv, need_weights=False)[0] + h).mean(1))


@pytest.mark.parametrize(
    "make",
    [
        KeyValueWidth,
        lambda: SelfAttentionNet(add_bias_kv=True),
        lambda: SelfAttentionNet(add_zero_attn=True),
    ],
    ids=["kdim_vdim", "add_bias_kv", "add_zero_attn"],
)
def test_other_configurations_use_the_exact_generic_rule(make):
    torch.manual_seed(2)
    model = make().to(DT).eval()
    X, y = torch.randn(2, 4, 3, dtype=DT), torch.randint(0, 4, (2,))
    crit = _run(model, X, y, [DiagGGNApprox()])
    check(collect(model, 2, ("DiagGGNApprox",))["DiagGGNApprox"], _approx_reference(model, X, y, crit), "DiagGGNApprox")


def test_exact_extensions_and_approx_in_one_pass():
    torch.manual_seed(3)
    model = SelfAttentionNet(e=8, heads=4, mask="causal_bool").to(DT).eval()
    n = 3
    X, y = torch.randn(n, 4, 3, dtype=DT), torch.randint(0, 4, (n,))
    ggn = FullGGN()
    crit = _run(model, X, y, [BatchJacobian(), DiagGGN(), DiagGGNApprox(), ggn])
    got = collect(model, n)
    ref = reference(model, X, lambda out: crit(out, y), approx=False)
    compare({k: v for k, v in got.items() if k != "DiagGGNApprox"}, ref, ggn.matrix)
    check(got["DiagGGNApprox"], _approx_reference(model, X, y, crit), "DiagGGNApprox")


def test_float32_follows_float64():
    torch.manual_seed(4)
    model = SelfAttentionNet(e=8, heads=2).to(DT).eval()
    X, y = torch.randn(3, 6, 3, dtype=DT), torch.randint(0, 4, (3,))
    _run(model, X, y, [DiagGGNApprox()])
    want = {name: p.diag_ggn_approx.clone() for name, p in model.named_parameters()}
    model32 = model.float()
    _run(model32, X.float(), y, [DiagGGNApprox()])
    for name, p in model32.named_parameters():
        assert p.diag_ggn_approx.dtype == torch.float32
        torch.testing.assert_close(p.diag_ggn_approx.double(), want[name], rtol=1e-4, atol=1e-6 * want[name].abs().max())


def test_chunks_of_samples_agree(monkeypatch):
    """The rule works a chunk of samples at a time; one sample per chunk gives the same numbers."""
    from curvhook.rules import attention

    torch.manual_seed(5)
    model = SelfAttentionNet(e=8, heads=4, mask="padding").to(DT).eval()
    X, y = torch.randn(5, 4, 3, dtype=DT), torch.randint(0, 4, (5,))
    _run(model, X, y, [DiagGGNApprox()])
    whole = {name: p.diag_ggn_approx.clone() for name, p in model.named_parameters()}
    monkeypatch.setattr(attention, "_CHUNK_ENTRIES", 1)
    _run(model, X, y, [DiagGGNApprox()])
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.diag_ggn_approx, whole[name], rtol=1e-12, atol=0)
