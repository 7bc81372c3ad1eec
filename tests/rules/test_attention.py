"""``curvhook/rules/attention.py``: nn.MultiheadAttention as self-attention, the DiagGGNApprox rules.

By default DiagGGNApprox counts self-attention as its operations; those cases
are compared with the same attention written out by hand. With
``split_attention=False`` the module is one operation, and every such case is
compared with the dense per-operation reference of tests/graph_reference.py
(float64), in which the attention module is one operation. The exact
extensions go through the generic rule and are compared with torch.func.
"""

from __future__ import annotations

import copy
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
    crit = _run(model, X, y, [DiagGGNApprox(split_attention=False)])
    got = collect(model, n, ("DiagGGNApprox",))["DiagGGNApprox"]
    check(got, _approx_reference(model, X, y, crit), "DiagGGNApprox")


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_extension_in_one_pass(case):
    """The table with all four extensions in one block: the exact ones against torch.func,
    DiagGGNApprox against its definition (a batch of two, three tokens)."""
    torch.manual_seed(0)
    model = SelfAttentionNet(**CASES[case]).to(DT).eval()
    n = 2
    X, y = torch.randn(n, 3, 3, dtype=DT), torch.randint(0, 4, (n,))
    ggn = FullGGN()
    crit = _run(model, X, y, [BatchJacobian(), DiagGGN(), DiagGGNApprox(split_attention=False), ggn])
    got = collect(model, n)
    ref = reference(model, X, lambda out: crit(out, y), approx=False)
    compare({k: v for k, v in got.items() if k != "DiagGGNApprox"}, ref, ggn.matrix)
    check(got["DiagGGNApprox"], _approx_reference(model, X, y, crit), "DiagGGNApprox")


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
    crit = _run(model, X, y, [BatchJacobian(), DiagGGN(), DiagGGNApprox(split_attention=False), ggn])
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
    crit = _run(model, X, y, [DiagGGNApprox(split_attention=False)])
    check(collect(model, 2, ("DiagGGNApprox",))["DiagGGNApprox"], _approx_reference(model, X, y, crit), "DiagGGNApprox")


def test_exact_extensions_and_approx_in_one_pass():
    torch.manual_seed(3)
    model = SelfAttentionNet(e=8, heads=4, mask="causal_bool").to(DT).eval()
    n = 3
    X, y = torch.randn(n, 4, 3, dtype=DT), torch.randint(0, 4, (n,))
    ggn = FullGGN()
    crit = _run(model, X, y, [BatchJacobian(), DiagGGN(), DiagGGNApprox(split_attention=False), ggn])
    got = collect(model, n)
    ref = reference(model, X, lambda out: crit(out, y), approx=False)
    compare({k: v for k, v in got.items() if k != "DiagGGNApprox"}, ref, ggn.matrix)
    check(got["DiagGGNApprox"], _approx_reference(model, X, y, crit), "DiagGGNApprox")


@pytest.mark.parametrize("split", [False, True], ids=["one_operation", "split"])
def test_float32_follows_float64(split):
    torch.manual_seed(4)
    model = SelfAttentionNet(e=8, heads=2, mask="padding").to(DT).eval()
    X, y = torch.randn(3, 6, 3, dtype=DT), torch.randint(0, 4, (3,))
    _run(model, X, y, [DiagGGNApprox(split_attention=split)])
    want = {name: p.diag_ggn_approx.clone() for name, p in model.named_parameters()}
    model32 = model.float()
    _run(model32, X.float(), y, [DiagGGNApprox(split_attention=split)])
    for name, p in model32.named_parameters():
        assert p.diag_ggn_approx.dtype == torch.float32
        torch.testing.assert_close(p.diag_ggn_approx.double(), want[name], rtol=1e-4, atol=1e-6 * want[name].abs().max())


def test_chunks_of_samples_agree(monkeypatch):
    """The rule works a chunk of samples at a time; one sample per chunk gives the same numbers."""
    from curvhook.rules import attention

    torch.manual_seed(5)
    model = SelfAttentionNet(e=8, heads=4, mask="padding").to(DT).eval()
    X, y = torch.randn(5, 4, 3, dtype=DT), torch.randint(0, 4, (5,))
    _run(model, X, y, [DiagGGNApprox(split_attention=False)])
    whole = {name: p.diag_ggn_approx.clone() for name, p in model.named_parameters()}
    monkeypatch.setattr(attention, "_CHUNK_ENTRIES", 1)
    _run(model, X, y, [DiagGGNApprox(split_attention=False)])
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.diag_ggn_approx, whole[name], rtol=1e-12, atol=0)


# ------------------------------------------------ DiagGGNApprox(split_attention=True)
class HandWrittenAttention(nn.Module):
    """The self-attention of an ``nn.MultiheadAttention``, written out with its weights.

    Its children are called, so both curvhook and the graph reference see the
    projections as modules and everything between them as tensor operations:
    the split approximation by its definition.
    """

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        e, bias = mha.embed_dim, mha.in_proj_bias is not None
        self.heads = mha.num_heads
        like = dict(dtype=mha.in_proj_weight.dtype)
        self.in_proj = nn.Linear(e, 3 * e, bias=bias, **like)
        self.out_proj = nn.Linear(e, e, bias=bias, **like)
        with torch.no_grad():
            self.in_proj.weight.copy_(mha.in_proj_weight)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if bias:
                self.in_proj.bias.copy_(mha.in_proj_bias)
                self.out_proj.bias.copy_(mha.out_proj.bias)

    def forward(self, h, h2, h3, need_weights=False, attn_mask=None, key_padding_mask=None, is_causal=False):
        n, length, e = h.shape
        q, k, v = (
            t.reshape(n, length, self.heads, e // self.heads).transpose(1, 2) for t in self.in_proj(h).chunk(3, -1)
        )
        s = (q * (e // self.heads) ** -0.5) @ k.transpose(-2, -1)
        if attn_mask is not None:
            s = s.masked_fill(attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
        if key_padding_mask is not None:
            s = s.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        o = (s.softmax(-1) @ v).transpose(1, 2).reshape(n, length, e)
        return self.out_proj(o), None


def _hand_written_twin(model):
    twin = copy.deepcopy(model)
    twin.mha = HandWrittenAttention(model.mha)
    return twin


SPLIT_CASES = ["plain", "four_heads", "one_head", "no_bias", "causal_bool", "float_mask", "key_padding"]


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("case", SPLIT_CASES)
def test_split_attention_matches_attention_written_out(case, n, monkeypatch):
    """Split mode on nn.MultiheadAttention = the graph reference on the same attention by hand."""
    torch.manual_seed(6)
    model = SelfAttentionNet(**CASES[case]).to(DT).eval()
    X, y = torch.randn(n, 5, 3, dtype=DT), torch.randint(0, 4, (n,))
    _no_fallback_diagonals(monkeypatch)
    crit = _run(model, X, y, [DiagGGNApprox()])  # the default splits
    got = collect(model, n, ("DiagGGNApprox",))["DiagGGNApprox"]
    twin = _hand_written_twin(model)
    want = _approx_reference(twin, X, y, crit)
    check(got, want, "DiagGGNApprox")
    # curvhook on the hand-written twin (modules and tensor operations) gives the same numbers
    _run(twin, X, y, [DiagGGNApprox()])
    check(got, collect(twin, n, ("DiagGGNApprox",))["DiagGGNApprox"], "DiagGGNApprox")
    # and it is another approximation than the definition's single operation
    assert not torch.allclose(got, _approx_reference(model, X, y, crit), rtol=1e-3)


def test_split_and_single_operation_in_turn():
    """The two variants one after the other on one model (with DiagGGN beside the first): each matches its reference."""
    torch.manual_seed(7)
    model = SelfAttentionNet(e=8, heads=4, mask="causal_bool").to(DT).eval()
    X, y = torch.randn(3, 4, 3, dtype=DT), torch.randint(0, 4, (3,))
    split, whole = DiagGGNApprox(split_attention=True), DiagGGNApprox(split_attention=False)
    crit = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with extend(model, whole, DiagGGN()):
            crit(model(X), y).backward()
        one = collect(model, 3, ("DiagGGNApprox",))["DiagGGNApprox"]
        exact = [p.diag_ggn.clone() for p in model.parameters()]
        with extend(model, split, DiagGGN()):
            crit(model(X), y).backward()
        two = collect(model, 3, ("DiagGGNApprox",))["DiagGGNApprox"]
    check(one, _approx_reference(model, X, y, crit), "DiagGGNApprox")
    check(two, _approx_reference(_hand_written_twin(model), X, y, crit), "DiagGGNApprox")
    for p, want in zip(model.parameters(), exact):  # the option leaves the other extensions alone
        torch.testing.assert_close(p.diag_ggn, want, rtol=1e-12, atol=0)
    assert repr(split) == "DiagGGNApprox()"
    assert repr(DiagGGNApprox(loss=nn.MSELoss(), split_attention=False)) == (
        "DiagGGNApprox(loss=MSELoss(), split_attention=False)"
    )
    assert repr(whole) == "DiagGGNApprox(split_attention=False)"


def test_split_attention_in_a_transformer_encoder_layer():
    """nn.TransformerEncoderLayer calls its attention with keyword masks: split there too."""
    torch.manual_seed(8)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 8)
            self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, tokens):
            pad = tokens == 0
            return self.head(self.layer(self.emb(tokens), src_key_padding_mask=pad).mean(1))

    model = Encoder().to(DT).eval()
    X = torch.randint(1, 11, (3, 5))
    X[:, -1] = 0
    y = torch.randint(0, 3, (3,))
    crit = _run(model, X, y, [DiagGGNApprox(split_attention=True)])
    got = collect(model, 3, ("DiagGGNApprox",))["DiagGGNApprox"]

    class PostNormLayer(nn.Module):  # the encoder layer's forward in eval mode, attention by hand
        def __init__(self, layer):
            super().__init__()
            self.attn = HandWrittenAttention(layer.self_attn)  # parameters in the encoder's order
            self.linear1, self.linear2 = copy.deepcopy(layer.linear1), copy.deepcopy(layer.linear2)
            self.norm1, self.norm2 = copy.deepcopy(layer.norm1), copy.deepcopy(layer.norm2)

        def forward(self, x, src_key_padding_mask):
            x = self.norm1(x + self.attn(x, x, x, key_padding_mask=src_key_padding_mask)[0])
            return self.norm2(x + self.linear2(torch.relu(self.linear1(x))))

    twin = copy.deepcopy(model)
    twin.layer = PostNormLayer(model.layer)
    check(got, _approx_reference(twin, X, y, crit), "DiagGGNApprox")


def test_split_attention_warns_and_keeps_other_configurations_whole():
    torch.manual_seed(9)
    model = KeyValueWidth().to(DT).eval()
    X, y = torch.randn(2, 4, 3, dtype=DT), torch.randint(0, 4, (2,))
    crit = nn.CrossEntropyLoss()
    with pytest.warns(UserWarning, match="split_attention=True"):
        with extend(model, DiagGGNApprox(split_attention=True)):
            crit(model(X), y).backward()
    check(collect(model, 2, ("DiagGGNApprox",))["DiagGGNApprox"], _approx_reference(model, X, y, crit), "DiagGGNApprox")
