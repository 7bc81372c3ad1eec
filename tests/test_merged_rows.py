"""Merged rows followed as pseudo-samples (curvhook/row_groups.py).

A reshape that merges the batch axis with the axes after it (``[N, L, H] →
[N·L, H]``: OPT's MLP, Swin's windows, DeBERTa's heads) is followed with each
row as a pseudo-sample between the merge and the split. The references:

- the same network written without the merge (``nn.Linear`` and ``nn.LayerNorm``
  take ``[N, L, H]`` as they are) gives every extension the same result, the
  random ones with the same seed;
- torch.func in float64 for the exact extensions, and DiagGGNApprox's
  definition applied operation by operation (``tests/graph_reference.py``);
- no module is served by the fallback where a sample's rows are merged.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from curvhook import extend
from curvhook.errors import UnsupportedModelError
from curvhook.extensions import (
    KFAC, NTK, BatchGrad, BatchJacobian, BatchL2Grad, DiagGGN, DiagGGNApprox, DiagGGNMC, FullGGN, GGNVectorProduct,
    OutputCovariance, SumGradSquared,
)
from helpers import CLASSES, DT, assert_exact, check_exact_without_fallback, check_graph_against_reference, fallback_spy


class MLPOnRows(nn.Module):
    """OPT's decoder MLP: LayerNorm, Linear, ReLU, Linear and the residual on ``h.reshape(-1, H)``
    (``merged``), or on ``h`` as it is."""

    def __init__(self, merged: bool, h: int = 6):
        super().__init__()
        self.merged = merged
        self.ln, self.fc1, self.act, self.fc2 = nn.LayerNorm(h), nn.Linear(h, 8), nn.ReLU(), nn.Linear(8, h)

    def forward(self, h: Tensor) -> Tensor:  # [N, L, H]
        shape = h.shape
        if self.merged:
            h = h.reshape(-1, shape[-1])  # [N·L, H]
        out = h + self.fc2(self.act(self.fc1(self.ln(h))))
        return out.view(shape) if self.merged else out


class RowsNet(nn.Module):
    def __init__(self, merged: bool):
        super().__init__()
        self.embed, self.block, self.head = nn.Linear(4, 6), MLPOnRows(merged), nn.Linear(18, CLASSES)

    def forward(self, x: Tensor) -> Tensor:  # [N, 3, 4]
        return self.head(torch.tanh(self.block(self.embed(x))).flatten(1))


def _extensions(params: list[nn.Parameter], n: int) -> list:
    torch.manual_seed(1)
    v = [torch.randn_like(p) for p in params]
    cov = {p: torch.rand_like(p) + 0.5 for p in params}  # a diagonal Σ per parameter
    return [
        BatchGrad(), BatchJacobian(), BatchL2Grad(), DiagGGN(), DiagGGNApprox(), DiagGGNMC(mc_samples=3),
        FullGGN(), GGNVectorProduct(v), KFAC(), NTK(per_parameter=True), OutputCovariance(cov), SumGradSquared(),
    ]


def _run_every_extension(model: nn.Module, X: Tensor, y: Tensor) -> dict:
    """Every extension in one pass (the random ones seeded alike), and what each wrote."""
    params = list(model.parameters())
    exts = _extensions(params, X.shape[0])
    found = {}
    with extend(model, KFAC(approx="reduce")):  # one extension of a type per block
        nn.CrossEntropyLoss()(model(X), y).backward()
    found.update({f"p{i}.kfac_reduce": getattr(p, "kfac", None) for i, p in enumerate(params)})
    with extend(model, *exts):
        torch.manual_seed(2)
        nn.CrossEntropyLoss()(model(X), y).backward()
    for i, p in enumerate(params):
        for name in ("grad_batch", "batch_jacobian", "batch_l2", "diag_ggn", "diag_ggn_approx", "diag_ggn_mc",
                     "ggn_v", "sum_grad_squared", "ntk"):
            found[f"p{i}.{name}"] = getattr(p, name)
        found[f"p{i}.kfac"] = getattr(p, "kfac", None)  # layers shared over positions only
    found["FullGGN"], found["NTK"], found["OutputCovariance"] = exts[6].matrix, exts[9].matrix, exts[10].covariance
    return found


def _assert_same_results(got: dict, want: dict) -> None:
    """What every extension wrote on two forms of one network, equal to 1e-12 (where one wrote nothing, both)."""
    assert got.keys() == want.keys()
    for key in want:
        if want[key] is None:
            assert got[key] is None, key
            continue
        for a, b in zip(*(v if isinstance(v, tuple) else (v,) for v in (got[key], want[key]))):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13, msg=key)


@pytest.mark.parametrize("n", [1, 3])
def test_every_extension_is_the_same_with_the_rows_merged(n, monkeypatch):
    """Every extension (KFAC in both approximations, the sampled ones seeded alike) writes the
    same on the network with OPT's merged rows as on the same network without the merge."""
    torch.manual_seed(0)
    merged, plain = RowsNet(merged=True).to(DT), RowsNet(merged=False).to(DT)
    plain.load_state_dict(merged.state_dict())
    X, y = torch.randn(n, 3, 4, dtype=DT), torch.randint(0, CLASSES, (n,))
    served = fallback_spy(monkeypatch)
    got, want = _run_every_extension(merged, X, y), _run_every_extension(plain, X, y)
    assert served == []
    assert sum(v is not None for k, v in want.items() if "kfac" in k) == 2 * 8  # four Linear layers, two approximations
    _assert_same_results(got, want)


@pytest.mark.parametrize("n", [1, 3])
def test_merged_rows_exact_against_torch_func(n, monkeypatch):
    torch.manual_seed(0)
    model = RowsNet(merged=True).to(DT)
    X, y = torch.randn(n, 3, 4, dtype=DT), torch.randint(0, CLASSES, (n,))
    check_exact_without_fallback(model, X, y, monkeypatch, moved_axes=True)


class RelativeKeys(nn.Module):
    """DeBERTa's content-to-position scores: queries with the heads merged into the batch,
    ``[N·H, L, d]``, against relative-position keys computed from parameters only,
    ``[H, 2S, d]``, repeated to ``[N·H, 2S, d]`` (``w.repeat(N, 1, 1)``)."""

    def __init__(self, e: int = 4, heads: int = 2, span: int = 3):
        super().__init__()
        self.q, self.heads = nn.Linear(e, e), heads
        self.rel = nn.Parameter(torch.randn(2 * span, e))
        self.key = nn.Linear(e, e)

    def forward(self, x: Tensor) -> Tensor:  # [N, L, E]
        n, l, e = x.shape
        d = e // self.heads
        q = self.q(x).view(n, l, self.heads, d).permute(0, 2, 1, 3).reshape(n * self.heads, l, d)
        pos = self.key(self.rel).view(-1, self.heads, d).permute(1, 0, 2)  # [H, 2S, d]
        scores = torch.bmm(q, pos.repeat(n, 1, 1).transpose(-1, -2))  # [N·H, L, 2S]
        return scores.view(n, self.heads, l, -1)


class WindowBias(nn.Module):
    """Swin's windows: ``[N, 4, C]`` cut into 2 windows of 2 tokens, ``[N·2, 2, C]``; attention
    scores plus a learned relative bias ``[H, 2, 2]`` shared by every window of every sample."""

    def __init__(self, c: int = 4, heads: int = 2):
        super().__init__()
        self.qk, self.heads = nn.Linear(c, 2 * c), heads
        self.bias = nn.Parameter(torch.randn(heads, 2, 2))

    def forward(self, x: Tensor) -> Tensor:  # [N, 4, C]
        n, l, c = x.shape
        windows = x.view(n, 2, 2, c).reshape(n * 2, 2, c)  # [N·nW, ws, C]
        q, k = self.qk(windows).view(n * 2, 2, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) + self.bias, dim=-1)  # [N·nW, H, ws, ws]
        return attn.reshape(n, 2, self.heads, 2, 2)


class Head(nn.Module):
    def __init__(self, block: nn.Module, features: int):
        super().__init__()
        self.embed, self.block, self.out = nn.Linear(3, 4), block, nn.Linear(features, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.block(self.embed(x))).flatten(1))


@pytest.mark.parametrize("block, features", [(RelativeKeys, 2 * 3 * 6), (WindowBias, 2 * 2 * 2 * 2)],
                         ids=["deberta_relative_keys", "swin_window_bias"])
@pytest.mark.parametrize("n", [1, 3])
def test_shared_tensors_that_merged_rows_read(n, block, features, monkeypatch):
    """A tensor computed from parameters only, repeated to the merged rows (DeBERTa) or added to
    every window by broadcasting (Swin): its per-sample value sums the sample's rows. Exact,
    DiagGGNApprox by its definition, and nothing served by the fallback (before: the
    container was one module for it)."""
    torch.manual_seed(0)
    model = Head(block(), features).to(DT)
    X = torch.randn(n, 3 if block is RelativeKeys else 4, 3, dtype=DT)
    y = torch.randint(0, CLASSES, (n,))
    check_exact_without_fallback(model, X, y, monkeypatch, moved_axes=True)


class GlobalQueryWindows(nn.Module):
    """GCViT's window attention with a global query (timm): each sample's query ``g`` ``[N, 2, C]``,
    computed from the whole sample, is repeated to that sample's windows
    (``g.repeat_interleave(nW, dim=0)``: ``[N·nW, 2, C]``) and attends to each window's keys.
    ``form``: the method, the function with ``dim`` by keyword, a query already on merged
    rows (``[N·2, 2, C]`` repeated to ``[N·4, 2, C]``, with windows of one token), or the same
    as the method without merged rows (``broadcast``)."""

    def __init__(self, form: str, c: int = 4):
        super().__init__()
        self.kv, self.g, self.form = nn.Linear(c, 2 * c), nn.Linear(c, c), form

    def forward(self, x: Tensor) -> Tensor:  # [N, 4, C]
        n, l, c = x.shape
        if self.form == "on_rows":
            q = torch.tanh(self.g(x.reshape(n * 2, 2, c))).repeat_interleave(2, dim=0)  # [N·4, 2, C]
            k, v = self.kv(x.reshape(n * 4, 1, c)).chunk(2, dim=-1)  # [N·4, 1, C]
            return (torch.sigmoid(q @ k.transpose(-1, -2)) * v).reshape(n, -1)
        g = torch.tanh(self.g(x[:, :2] + x[:, 2:]))  # [N, 2, C]: from the whole sample
        if self.form == "broadcast":  # the same without merged rows: windows [N, 2, 2, C]
            k, v = self.kv(x.reshape(n, 2, 2, c)).chunk(2, dim=-1)
            attn = torch.softmax(g.unsqueeze(1) @ k.transpose(-1, -2), dim=-1)  # [N, 2, 2, 2]
            return (attn @ v).reshape(n, l * c)
        k, v = self.kv(x.reshape(n * 2, 2, c)).chunk(2, dim=-1)  # windows [N·2, 2, C]
        q = g.repeat_interleave(2, dim=0) if self.form == "method" else torch.repeat_interleave(g, 2, dim=0)
        attn = torch.softmax(q @ k.transpose(-1, -2), dim=-1)  # [N·2, 2, 2]
        return (attn @ v).reshape(n, l * c)


@pytest.mark.parametrize("form", ["method", "function", "on_rows"])
@pytest.mark.parametrize("n", [1, 3])
def test_a_per_sample_tensor_repeated_to_its_merged_rows(n, form, monkeypatch):
    """``g.repeat_interleave(k, dim=0)`` copies each sample's ``g`` to ``k`` merged rows: its
    pullback sums the sample's rows. Exact, DiagGGNApprox by its definition, nothing served
    by the fallback (before: the container was one module for it; at GCViT's real widths the
    fallback ran out of memory)."""
    torch.manual_seed(0)
    model = Head(GlobalQueryWindows(form), 32 if form == "on_rows" else 16).to(DT)
    X, y = torch.randn(n, 4, 3, dtype=DT), torch.randint(0, CLASSES, (n,))
    check_exact_without_fallback(model, X, y, monkeypatch, moved_axes=True)


@pytest.mark.parametrize("n", [1, 3])
def test_every_extension_is_the_same_with_the_query_repeated_or_broadcast(n, monkeypatch):
    """Every extension writes the same with the query repeated to the merged windows as with
    it broadcast against unmerged windows (the forward products too: the repeat's ``jvp``)."""
    torch.manual_seed(0)
    merged, plain = Head(GlobalQueryWindows("method"), 16).to(DT), Head(GlobalQueryWindows("broadcast"), 16).to(DT)
    plain.load_state_dict(merged.state_dict())
    X, y = torch.randn(n, 4, 3, dtype=DT), torch.randint(0, CLASSES, (n,))
    served = fallback_spy(monkeypatch)
    got, want = _run_every_extension(merged, X, y), _run_every_extension(plain, X, y)
    assert served == []
    _assert_same_results(got, want)


class FrozenFeaturesRepeated(nn.Module):
    """Frozen features ``[N, C]`` (or the model input, before a frozen or a trainable layer) with
    each sample's row copied twice along the batch axis, ``repeat_interleave(2, dim=0)``, then
    trainable layers on ``[N·2, C]``; the same copy made by ``expand`` and ``reshape`` (a merge
    curvhook knew before)."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.frozen = nn.Linear(3, 4).requires_grad_(False)
        self.b, self.out = nn.Linear(4, 4), nn.Linear(8, CLASSES)

    def forward(self, x: Tensor) -> Tensor:  # [N, 3]
        n = x.shape[0]
        if self.form == "input":
            h = torch.tanh(self.frozen(x.repeat_interleave(2, dim=0)))
        elif self.form == "input_to_trainable":
            h = torch.tanh(self.b(torch.cat([x, x[:, :1]], 1).repeat_interleave(2, dim=0)))
        else:
            h = torch.tanh(self.frozen(x))
            h = h.repeat_interleave(2, dim=0) if self.form == "features" else h.unsqueeze(1).expand(-1, 2, -1).reshape(2 * n, 4)
        return self.out(torch.tanh(self.b(h)).reshape(n, 8))


@pytest.mark.parametrize("form", ["features", "input", "input_to_trainable", "expand_reshape"])
@pytest.mark.parametrize("n", [1, 3])
def test_frozen_features_repeated_along_the_batch_axis(n, form, monkeypatch):
    """Each sample's constant rows copied to ``k`` rows of that sample: merged rows where the
    trainable layers meet them. (Before, at N = 3: the layer after the copy was taken for one
    on parameters alone, and failed with a torch shape error in ``bmm``.)"""
    torch.manual_seed(0)
    model = FrozenFeaturesRepeated(form).to(DT)
    X, y = torch.randn(n, 3, dtype=DT), torch.randint(0, CLASSES, (n,))
    check_exact_without_fallback(model, X, y, monkeypatch, moved_axes=True)


class TokenOnRepeatedInput(nn.Module):
    """``lin(x.repeat_interleave(2, dim=0)) + tok`` with a token ``[1, C]`` copied to the ``N·2`` merged
    rows by ``repeat_interleave``, ``repeat`` or ``expand``: every sample's block the same copy."""

    def __init__(self, copy: str) -> None:
        super().__init__()
        self.copy = copy
        self.lin, self.out = nn.Linear(3, 4), nn.Linear(8, CLASSES)
        self.tok = nn.Parameter(torch.randn(1, 4))

    def forward(self, x: Tensor) -> Tensor:  # [N, 3]
        n = x.shape[0]
        rows = {
            "repeat_interleave": lambda: self.tok.repeat_interleave(2 * n, dim=0),
            "repeat": lambda: self.tok.repeat(2 * n, 1),
            "expand": lambda: self.tok.expand(2 * n, -1),
        }[self.copy]()
        return self.out(torch.tanh(self.lin(x.repeat_interleave(2, dim=0)) + rows).reshape(n, 8))


@pytest.mark.parametrize("copy", ["repeat_interleave", "repeat", "expand"])
@pytest.mark.parametrize("n", [1, 3])
def test_a_shared_token_copied_to_rows_of_a_repeated_input(n, copy, monkeypatch):
    """(Before: *Mismatch in shape* from torch.func; at N = 1 the repeat_interleave form was exact
    while the input's copy was not taken for merged rows.)"""
    torch.manual_seed(0)
    model = TokenOnRepeatedInput(copy).to(DT)
    X, y = torch.randn(n, 3, dtype=DT), torch.randint(0, CLASSES, (n,))
    check_exact_without_fallback(model, X, y, monkeypatch, moved_axes=True)


class HeadsMergedAfterPermute(nn.Module):
    """SAM's attention (timm): ``qkv.view(N, L, 3, H, d).permute(2, 0, 3, 1, 4)`` puts the batch
    axis second, ``reshape(3, N·H, L, d)`` merges it with the heads there, ``unbind(0)`` gives
    ``q, k, v`` ``[N·H, L, d]``; the output is viewed back as ``[N, H, L, d]``. ``merged=False``:
    the same attention on ``[N, H, L, d]``."""

    def __init__(self, merged: bool, c: int = 4, heads: int = 2):
        super().__init__()
        self.qkv, self.merged, self.heads = nn.Linear(c, 3 * c), merged, heads

    def forward(self, x: Tensor) -> Tensor:  # [N, L, C]
        n, l, c = x.shape
        qkv = self.qkv(x).view(n, l, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # [3, N, H, L, d]
        if self.merged:
            qkv = qkv.reshape(3, n * self.heads, l, -1)  # [3, N·H, L, d]: the batch axis second, merged
        q, k, v = qkv.unbind(0)
        out = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        return out.view(n, self.heads, l, -1).transpose(1, 2).reshape(n, -1)


@pytest.mark.parametrize("n", [1, 3])
def test_the_batch_axis_merged_where_a_permute_moved_it(n, monkeypatch):
    """(Before: SAM's attention was one module for the fallback, over 4 minutes per DiagGGNApprox
    step at samvit_base on 64×64 images.) Exact, DiagGGNApprox by its definition, no fallback,
    and every extension writes the same as on the unmerged heads."""
    torch.manual_seed(0)
    model = Head(HeadsMergedAfterPermute(merged=True), 16).to(DT)
    X, y = torch.randn(n, 4, 3, dtype=DT), torch.randint(0, CLASSES, (n,))
    check_exact_without_fallback(model, X, y, monkeypatch, moved_axes=True)
    plain = Head(HeadsMergedAfterPermute(merged=False), 16).to(DT)
    plain.load_state_dict(model.state_dict())
    _assert_same_results(_run_every_extension(model, X, y), _run_every_extension(plain, X, y))


class UnevenRepeats(nn.Module):
    def __init__(self, c: int = 4):
        super().__init__()
        self.lin, self.out = nn.Linear(c, c), nn.Linear(c, CLASSES)

    def forward(self, x: Tensor) -> Tensor:  # [N, C]
        n = x.shape[0]
        repeats = torch.arange(1, n + 1)  # sample i copied i + 1 times: no rows per sample
        h = self.lin(x).repeat_interleave(repeats, dim=0)
        return self.out(h[: n] * 2)


def test_uneven_repeats_along_the_batch_axis_are_refused_by_name():
    """Repeats that differ from sample to sample leave no fixed number of rows per sample:
    refused (the first operation the plan checks that mixes samples is the slice after it)."""
    model = UnevenRepeats().to(DT)
    X, y = torch.randn(3, 4, dtype=DT), torch.randint(0, CLASSES, (3,))
    with pytest.raises(UnsupportedModelError, match=r"operation (repeat_interleave|__getitem__).*mixes samples"):
        with extend(model, DiagGGN()):
            nn.CrossEntropyLoss()(model(X), y).backward()


class AddmmOnRows(nn.Module):
    """GPT-2's ``Conv1D`` written out in the model's own forward: ``addmm`` on ``x.view(-1, F)``."""

    def __init__(self):
        super().__init__()
        self.a, self.h = nn.Linear(3, 4), nn.Linear(15, CLASSES)
        self.w, self.b = nn.Parameter(torch.randn(4, 5)), nn.Parameter(torch.randn(5))

    def forward(self, x: Tensor) -> Tensor:  # [N, 3, 3]
        x = torch.tanh(self.a(x))
        x = torch.addmm(self.b, x.view(-1, x.size(-1)), self.w).view(*x.shape[:-1], 5)
        return self.h(torch.tanh(x).flatten(1))


@pytest.mark.parametrize("n", [1, 3])
def test_functional_addmm_on_merged_rows_in_the_models_own_forward(n, monkeypatch):
    """(Before: refused, 'the operation view mixes samples'.)"""
    torch.manual_seed(0)
    model = AddmmOnRows().to(DT)
    X, y = torch.randn(n, 3, 3, dtype=DT), torch.randint(0, CLASSES, (n,))
    check_exact_without_fallback(model, X, y, monkeypatch, moved_axes=True)


class EmbeddingOfMergedIds(nn.Module):
    """``emb(ids.reshape(-1)) + lin(x.reshape(N·L, F))``, in a submodule: integer ids merged like
    the rows they are added to (the embedding's output has their rows)."""

    def __init__(self, length: int = 3, vocab: int = 7):
        super().__init__()
        self.lin, self.emb, self.length, self.vocab = nn.Linear(3, 4), nn.Embedding(vocab, 4), length, vocab

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:  # [N, L, 3], [N, L]
        n = x.shape[0]
        return (self.emb(ids.reshape(-1)) + self.lin(x.reshape(n * self.length, 3))).view(n, self.length, 4)


class WithMergedIds(nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.out = EmbeddingOfMergedIds(), nn.Linear(12, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        ids = (x[..., 0].abs() * 3).long().clamp(max=self.block.vocab - 1)
        return self.out(torch.tanh(self.block(x, ids)).flatten(1))


@pytest.mark.parametrize("n", [1, 3])
def test_an_embedding_of_merged_ids(n, monkeypatch):
    """(The review found 'Mismatch in shape' from the add, where the container had gone to the
    fallback before: the merged ids were not seen as merged.)"""
    torch.manual_seed(0)
    model = WithMergedIds().to(DT)
    X, y = torch.randn(n, 3, 3, dtype=DT), torch.randint(0, CLASSES, (n,))
    check_exact_without_fallback(model, X, y, monkeypatch, moved_axes=True)


class OneRowOfEachSample(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(3, 4), nn.Linear(4, CLASSES)

    def forward(self, x: Tensor) -> Tensor:  # [N, L, 3]
        n, l, f = x.shape
        m = self.lin(x.reshape(n * l, f))
        return self.out(m[::l] * 2)  # [N, 4]: one row of each sample, picked from the merged rows


def test_a_selection_of_rows_that_changes_their_grouping_is_refused_by_name():
    """``m[::L]`` of ``[N·L, C]`` is ``[N, C]``: not rows of the merged grouping. Refused, naming the
    operation (the review found a torch ``unflatten`` error at N = 1 and a message about a
    merged model output)."""
    model = OneRowOfEachSample().to(DT)
    for n in (1, 3):
        X, y = torch.randn(n, 3, 3, dtype=DT), torch.randint(0, CLASSES, (n,))
        for ext in (DiagGGN(), BatchGrad(), NTK()):
            with pytest.raises(UnsupportedModelError, match=r"operation __getitem__.*mixes samples"):
                with extend(model, ext):
                    nn.CrossEntropyLoss()(model(X), y).backward()


class MergedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, CLASSES)

    def forward(self, x: Tensor) -> Tensor:  # [N, L, 4] -> [N·L, C]
        return self.lin(x.reshape(-1, 4) * 2)


def test_a_model_output_with_merged_rows_is_refused():
    """The model returns ``[N·L, C]``: refused with the two ways out, not followed into a
    loss that would read rows as samples."""
    model = MergedOutput().to(DT)
    X = torch.randn(2, 3, 4, dtype=DT, requires_grad=True)
    with pytest.raises(UnsupportedModelError, match=r"merges its batch axis.*3 rows per sample"):
        with extend(model, DiagGGN()):
            nn.CrossEntropyLoss()(model(X), torch.zeros(6, dtype=torch.long)).backward()
