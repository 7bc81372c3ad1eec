"""``curvhook/rules/fallback.py``: the exact torch.func fallback for modules without a rule
(or whose rule declines their configuration).

The table's cases have one module that no rule serves; each runs BatchJacobian,
DiagGGN, DiagGGNApprox and FullGGN in one ``extend`` block and compares them in
float64 with the brute-force reference (``tests/reference.py``), for one sample
and for a batch of three with a non-contiguous input, then a float32 run with
the same reference. Then the fallback's warnings, refusals and chunks.
"""

import warnings
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvhook import extend
from curvhook.errors import UnsupportedModelError
from curvhook.extensions import BatchJacobian, DiagGGN, DiagGGNApprox, FullGGN
from curvhook.rules import fallback as fallback_module
from curvhook.rules import registry
from helpers import (
    CLASSES,
    DT,
    assert_exact,
    check_exact_without_fallback,
    check_graph_against_reference,
    check_layer_batch_noncontiguous_and_float32,
    close,
    fallback_spy,
    float_input,
    ggn_reference,
    head,
    prefix_conv,
    run_all,
    run_layer_case,
    seq,
)
from reference import collect, compare, reference


class SquaredWeight(nn.Module):
    """Not linear in its parameter: ``y = x (W∘W)ᵀ + b``."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in))
        self.bias = nn.Parameter(torch.randn(d_out))

    def forward(self, x):
        return x @ (self.weight * self.weight).T + self.bias


class Bilinear(nn.Module):
    """No registered rule: goes through the torch.func fallback."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4, dtype=DT))

    def forward(self, x):
        return torch.tanh(x @ self.w) * x.sum(-1, keepdim=True)


class FunctionalPReLU(nn.Module):
    """``F.prelu`` in a module of its own: no rule (``nn.PReLU`` has one), the fallback serves it."""

    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), 0.2))

    def forward(self, x):
        return nn.functional.prelu(x, self.weight)


# name -> (model builder, input builder); one module of each model has no rule
CASES = {
    "squared_weight": (seq(nn.Linear(3, 4), nn.Tanh(), SquaredWeight(4, CLASSES)), float_input((3,))),
    "bilinear_in_its_input": (seq(nn.Linear(2, 3), Bilinear(), nn.Linear(4, CLASSES)), float_input((2,))),
    "functional_prelu_per_channel_conv_maps": (
        seq(prefix_conv(2, 2), FunctionalPReLU(2), *head()), float_input((2, 3, 3))
    ),
    "softsign": (seq(nn.Linear(3, 4), nn.Softsign(), nn.Linear(4, CLASSES)), float_input((3,))),
    "tanhshrink_positions": (seq(nn.Linear(3, 3), nn.Tanhshrink(), *head()), float_input((2, 3))),
    "rrelu_eval": (seq(nn.Linear(3, 4), nn.RReLU(0.1, 0.3), nn.Linear(4, CLASSES)), float_input((3,))),
    "lppool1d": (seq(prefix_conv(1, 2), nn.LPPool1d(2, 2), *head()), float_input((2, 6))),
    "channel_shuffle": (seq(prefix_conv(2, 4), nn.ChannelShuffle(2), *head()), float_input((4, 2, 2))),
    # configurations a registered rule declines
    "upsample_area_declined": (
        seq(prefix_conv(2, 2), nn.Upsample(scale_factor=2, mode="area"), *head()),
        float_input((2, 2, 3)),
    ),
    "conv1d_circular_padding_declined": (
        seq(prefix_conv(1, 2), nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular"), *head()),
        float_input((2, 5)),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_one_sample(case):
    run_layer_case(CASES[case], 1, contiguous=True, fast=False)


# Refused, never wrong: torch.func cannot batch prelu's parameter vjp over
# (column, sample) pairs for this batch (it raises inside vmap). Nested vmaps
# (columns inside samples) gave wrong numbers without raising for 1 column and for
# as many columns as samples; the rules now use one vmap over the pairs.
KNOWN_REFUSED = {
    "functional_prelu_per_channel_conv_maps": "could not differentiate the operation prelu",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_batch_noncontiguous_and_float32(case):
    if case in KNOWN_REFUSED:
        with pytest.raises(UnsupportedModelError, match=KNOWN_REFUSED[case]):
            check_layer_batch_noncontiguous_and_float32(CASES[case], fast=False)
        return
    check_layer_batch_noncontiguous_and_float32(CASES[case], fast=False)


@pytest.mark.parametrize("n", [1, 4])
def test_fallback_is_exact_for_nonlinear_parameters_layernorm_and_embedding(n):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 5), nn.Flatten(), nn.Linear(15, 6), nn.LayerNorm(6),
                          nn.Tanh(), SquaredWeight(6, 3)).double()
    X = torch.randint(0, 7, (n, 3))
    y = torch.randn(n, 3, dtype=torch.float64)
    criterion = nn.MSELoss(reduction="sum")
    assert_exact(model, X, y, criterion)


def test_fallback_approx_is_exact_for_single_nonlinear_layer_with_mse():
    """A single layer with MSE: the approximation only drops off-diagonals of a diagonal H."""
    torch.manual_seed(0)
    model = nn.Sequential(SquaredWeight(4, 1)).double()
    X = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randn(5, 1, dtype=torch.float64)
    got = run_all(model, X, y, nn.MSELoss())
    _, G = ggn_reference(model, X, y, nn.MSELoss())
    close(got["approx"], G.diagonal())


def test_fallback_warns_once_per_type():
    from curvhook.rules import fallback

    class Cube(nn.Module):
        def forward(self, x):  # x used twice: no chain of operations, so the fallback serves it
            return x * x * x

    fallback._WARNED.discard(Cube)
    model = nn.Sequential(nn.Linear(3, 3), Cube(), Cube(), nn.Linear(3, 2))
    X = torch.randn(4, 3)
    with pytest.warns(UserWarning, match="Cube.*register_rule") as record:
        with extend(model, DiagGGN()):
            nn.CrossEntropyLoss()(model(X), torch.randint(0, 2, (4,))).backward()
    assert sum("Cube" in str(w.message) for w in record) == 1


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


@pytest.mark.parametrize("ext", [BatchJacobian, DiagGGN, DiagGGNApprox, FullGGN])
@pytest.mark.parametrize(
    "random_layer",
    [lambda: nn.RReLU(0.1, 0.9), lambda: nn.MultiheadAttention(4, 2, dropout=0.5, batch_first=True)],
    ids=["RReLU", "attention_dropout"],
)
def test_fallback_refuses_a_module_that_draws_random_numbers(random_layer, ext):
    """The fallback replays the forward pass: a train-mode random module would get other numbers."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.layer, self.b = nn.Linear(4, 4), random_layer(), nn.Linear(4, 2)

        def forward(self, x):  # x: [N, T, 4]
            h = self.a(x)
            h = self.layer(h, h, h, need_weights=False)[0] if isinstance(self.layer, nn.MultiheadAttention) else self.layer(h)
            return self.b(h.mean(1))

    torch.manual_seed(0)
    model = Model().double().train()
    X, y = torch.randn(3, 5, 4, dtype=torch.float64), torch.randint(0, 2, (3,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UnsupportedModelError, match="random numbers.*model.eval"):
            with extend(model, ext()):
                nn.CrossEntropyLoss()(model(X), y).backward()
        model.eval()  # deterministic: exact
        got = run_all(model, X, y, nn.CrossEntropyLoss())
    _, G = ggn_reference(model, X, y, nn.CrossEntropyLoss())
    close(got["full"], G)


def test_fallback_leaves_the_random_number_stream_alone():
    class Cube(nn.Module):
        def forward(self, x):
            return x * x * x

    model = nn.Sequential(nn.Linear(3, 3), Cube(), nn.Linear(3, 2))
    X, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    torch.manual_seed(1)
    nn.CrossEntropyLoss()(model(X), y).backward()
    expected = torch.rand(3)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with extend(model, DiagGGN(), DiagGGNApprox(), BatchJacobian()):
            nn.CrossEntropyLoss()(model(X), y).backward()
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


class _Pair(NamedTuple):
    a: torch.Tensor
    b: torch.Tensor


class PairGate(nn.Module):
    """A leaf without a rule that takes a namedtuple of tensors and reads it by field name."""

    def __init__(self, width):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, pair):
        return pair.a * self.w + torch.tanh(pair.b)


class PairNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.gate = PairGate(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.lin(x)
        return self.head(self.gate(_Pair(h, h * h)))


@pytest.mark.parametrize("n", [1, 3])
def test_fallback_replays_a_namedtuple_argument_as_that_namedtuple(n):
    """The exact fallback calls the module again; a namedtuple argument must reach it as one."""
    torch.manual_seed(0)
    model = PairNet().double()
    X = torch.randn(n, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (n,))
    criterion = nn.CrossEntropyLoss()
    assert_exact(model, X, y, criterion)


class ToyCache:
    """A key-value cache as Hugging Face's ``DynamicCache``: each call of the layer appends to it."""

    def __init__(self):
        self.keys = None

    def update(self, k):
        self.keys = k if self.keys is None else torch.cat([self.keys, k], 1)
        return self.keys

    def get_seq_length(self):
        return 0 if self.keys is None else self.keys.shape[1]


class CachedLayer(nn.Module):
    """OPT's decoder layer in small: attention to cached keys, then an MLP on the merged rows
    ``[N·T, F]``. Its operations are recorded one by one (the merged rows as pseudo-samples,
    curvhook/row_groups.py); the cache's ``update`` is a recorded ``cat``."""

    def __init__(self):
        super().__init__()
        self.k, self.fc = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, h, cache=None):
        k = self.k(h)
        if cache is not None:
            k = cache.update(k)
        n, t, f = h.shape
        mixed = torch.softmax(h @ k.transpose(1, 2), -1) @ k
        return self.fc(mixed.reshape(-1, f)).view(n, t, f)


class CachedLeaf(nn.Module):
    """The same layer as a leaf that owns its weights: no rule, and its operations are not a
    chain (``h @ kᵀ`` reads two batched tensors), so the fallback replays it."""

    def __init__(self):
        super().__init__()
        self.wk, self.wf = nn.Parameter(torch.randn(4, 4) / 2), nn.Parameter(torch.randn(4, 4) / 2)

    def forward(self, h, cache=None):
        k = F.linear(h, self.wk)
        if cache is not None:
            k = cache.update(k)
        n, t, f = h.shape
        mixed = torch.softmax(h @ k.transpose(1, 2), -1) @ k
        return F.linear(mixed.reshape(-1, f), self.wf).view(n, t, f)


class CachedNet(nn.Module):
    def __init__(self, use_cache, leaf=True):
        super().__init__()
        self.lin, self.layer, self.head = nn.Linear(4, 4), CachedLeaf() if leaf else CachedLayer(), nn.Linear(4, 2)
        self.use_cache = use_cache

    def forward(self, x):
        h = self.layer(self.lin(x), cache=ToyCache() if self.use_cache else None)
        return self.head(h.mean(1))


@pytest.mark.parametrize("n", [1, 3])
def test_fallback_without_a_cache_is_exact(n):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the layer has no rule: the fallback warns
        assert_exact(CachedNet(use_cache=False).double(), torch.randn(n, 3, 4, dtype=torch.float64),
                     torch.randint(0, 2, (n,)), nn.CrossEntropyLoss())


@pytest.mark.parametrize("ext", [DiagGGN, DiagGGNApprox])
def test_fallback_refuses_a_module_called_with_a_key_value_cache(ext):
    """A replay would append to the cache and attend to the forward pass's keys: refused with
    the remedy (before: a shape error from inside the replay)."""
    torch.manual_seed(0)
    model = CachedNet(use_cache=True).double()
    X, y = torch.randn(3, 3, 4, dtype=torch.float64), torch.randint(0, 2, (3,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UnsupportedModelError, match=r"key-value cache \(ToyCache\).*use_cache=False"):
            with extend(model, ext()):
                nn.CrossEntropyLoss()(model(X), y).backward()


@pytest.mark.parametrize("n", [1, 3])
def test_a_layer_with_a_cache_recorded_by_its_operations_is_exact(n, monkeypatch):
    """The container form (OPT's decoder layer): no replay, so the cache is only a recorded
    ``cat``; the merged rows of its MLP are pseudo-samples (before: one module for the
    fallback, whose replay the cache broke). Nothing is served by the fallback."""
    torch.manual_seed(0)
    model = CachedNet(use_cache=True, leaf=False).double()
    X, y = torch.randn(n, 3, 4, dtype=torch.float64), torch.randint(0, 2, (n,))
    check_exact_without_fallback(model, X, y, monkeypatch, moved_axes=True)


@pytest.mark.parametrize("chunk", [1, 7, 10**9])
def test_fallback_diagonals_in_chunks_of_rows(monkeypatch, chunk):
    monkeypatch.setattr(fallback_module, "_ROW_CHUNK_ENTRIES", chunk)
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(2, 3), Bilinear(), nn.Linear(4, 3)).to(DT)
    X, y = torch.randn(5, 2, dtype=DT), torch.randint(0, 3, (5,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback warns once per module type
        with extend(model, DiagGGNApprox()):
            nn.CrossEntropyLoss()(model(X), y).backward()
    ref = reference(model, X, lambda o: nn.CrossEntropyLoss()(o, y))
    compare(collect(model, 5, ("DiagGGNApprox",)), ref)


def test_fallback_diagonal_chunks_count_the_modules_intermediate_values(monkeypatch):
    """Each one-hot column also carries the module's intermediate values through its vjp: a chunk
    holds at most ``entries // (N (row + 8 outputs))`` columns. Counting the rows alone, a window
    attention of torchvision's swin_t (6,144 outputs a sample) went past 20 GB."""
    monkeypatch.setattr(fallback_module, "_ROW_CHUNK_ENTRIES", 10_000)
    n, outs, row = 2, 50, 40
    sizes = []

    def pull(cols):  # J_nᵀ applied to columns [c, N, outs]: a fixed [row, outs] map
        sizes.append(cols.shape[0])
        return torch.einsum("cno,ro->cnr", cols, weight)

    weight = torch.randn(row, outs, dtype=DT)
    d = torch.rand(n, outs, dtype=DT)
    got = fallback_module._weighted_row_squares(pull, d, row, per_sample=True)
    torch.testing.assert_close(got, torch.einsum("no,ro->nr", d, weight.square()))
    assert max(sizes) <= 10_000 // (n * (row + 8 * outs)) and sum(sizes) == outs


# ------------------------------------------- leaves recorded as their operations
class FunctionalGELU(nn.Module):
    """Like timm's ``GELU``: a leaf without a rule that calls one torch function."""

    def forward(self, x):
        return F.gelu(x)


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """Like timm's and torchvision's ``LayerNorm2d``: ``nn.LayerNorm`` over the channels of ``[N, C, H, W]``."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    """Like ``torchvision.ops.Permute``."""

    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return torch.permute(x, self.dims)


class LayerScale(nn.Module):
    """Like timm's ``LayerScale2d``: ``x ⊙ γ`` through a reshape of the parameter."""

    def __init__(self, c):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return x.mul(self.gamma.reshape(1, -1, 1, 1))


class EvalIdentity(nn.Module):
    """Like ``StochasticDepth`` in eval mode: returns its input."""

    def forward(self, x):
        return x


class SoftmaxOfScaled(nn.Module):
    """A parameter before the general operation: the chain would change the diagonal, so a leaf."""

    def __init__(self, c):
        super().__init__()
        self.w = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return torch.softmax(x * self.w, -1)


class Swish(nn.Module):
    """``x`` used twice (``x ⊙ σ(x)``): no chain, a leaf."""

    def forward(self, x):
        return x * torch.sigmoid(x)


class Block(nn.Module):
    """A ConvNeXt-like block built from leaves without rules."""

    def __init__(self, c=3):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = ChannelsFirstLayerNorm(c)
        self.to_last = Permute([0, 2, 3, 1])
        self.fc1, self.act, self.fc2 = nn.Linear(c, 4), FunctionalGELU(), nn.Linear(4, c)
        self.to_first = Permute([0, 3, 1, 2])
        self.scale, self.drop = LayerScale(c), EvalIdentity()
        self.soft, self.swish = SoftmaxOfScaled(2), Swish()
        self.head = nn.Linear(3 * 2 * 2, 3)

    def forward(self, x):  # x: [N, 3, 2, 2]
        h = self.to_last(self.norm(self.dw(x)))
        h = self.to_first(self.fc2(self.act(self.fc1(h))))
        h = self.drop(self.scale(h)) + x
        return self.head(self.swish(self.soft(h)).flatten(1))


@pytest.mark.parametrize("n", [1, 3])
def test_leaves_without_rules_recorded_as_their_operations(monkeypatch, n):
    """The chains of operations give DiagGGNApprox of the leaves (graph_reference counts each leaf as one
    operation); only the leaves whose chain would change it reach the fallback."""
    from helpers import check_graph_against_reference

    reached = set()
    original = fallback_module.FallbackRule.input_diag

    def spy(self, call, diag, slot):
        reached.add(type(call.module).__name__)
        return original(self, call, diag, slot)

    monkeypatch.setattr(fallback_module.FallbackRule, "input_diag", spy)
    torch.manual_seed(0)
    model = Block().to(DT)
    X, y = torch.randn(n, 3, 2, 2, dtype=DT), torch.randint(0, 3, (n,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_graph_against_reference(model, X, y)
    assert reached == {"SoftmaxOfScaled", "Swish"}


class UnrollTokens(nn.Module):
    """Hiera's ``Unroll`` (timm): a leaf without a rule that reorders each sample's ``H × W``
    tokens by moving 2 × 2 strided patches into the batch axis twice (``[N, 16, C] →
    [N·4, 2, 2, C] → [N·16, 1, 1, C]``) and merging the rows back into ``[N, 16, C]``. With
    ``inside``: a layer scale on the merged rows (monomial), a product with a weight (the
    one general operation), or a cumulative sum over the merged rows (it mixes samples)."""

    def __init__(self, inside: str = "", size: int = 4, c: int = 2):
        super().__init__()
        self.size, self.inside = size, inside
        if inside in ("scale", "matmul"):
            self.w = nn.Parameter(torch.rand(c) + 0.5 if inside == "scale" else torch.randn(c, c))

    def forward(self, x):  # [N, size², C]
        b, _, c = x.shape
        cur = self.size
        x = x.view(b, cur, cur, c)
        for step in range(2):
            cur //= 2
            x = x.view(b, cur, 2, cur, 2, c).permute(0, 2, 4, 1, 3, 5).flatten(0, 2)  # [b·4, cur, cur, C]
            b *= 4
            if step == 0 and self.inside == "scale":
                x = x * self.w
            elif step == 0 and self.inside == "matmul":
                x = x @ self.w
            elif step == 0 and self.inside == "mix":
                x = x.cumsum(0)
        return x.reshape(-1, self.size * self.size, c)


class WithUnrolledTokens(nn.Module):
    def __init__(self, inside: str = ""):
        super().__init__()
        self.embed, self.unroll, self.head = nn.Linear(3, 2), UnrollTokens(inside), nn.Linear(32, CLASSES)

    def forward(self, x):  # [N, 16, 3]
        return self.head(torch.tanh(self.unroll(self.embed(x))).flatten(1))


@pytest.mark.parametrize("inside", ["", "scale", "matmul"])
@pytest.mark.parametrize("n", [1, 3])
def test_a_leaf_that_moves_tokens_into_the_batch_axis_and_back_is_recorded_as_its_operations(monkeypatch, n, inside):
    """(Before: the fallback's per-sample Jacobians served Hiera's ``Unroll``, a permutation of
    each sample's tokens: 5.9 s against 0.13 s for a plain step at 64×64, over five minutes at
    224×224.) Its operations on merged rows are followed row by row; DiagGGNApprox as for the
    leaf as one operation, and the exact extensions."""
    torch.manual_seed(0)
    model = WithUnrolledTokens(inside).to(DT)
    X, y = torch.randn(n, 16, 3, dtype=DT), torch.randint(0, CLASSES, (n,))
    check_exact_without_fallback(model, X, y, monkeypatch, moved_axes=True)


def test_a_leaf_that_mixes_samples_on_merged_rows_stays_one_module():
    """A cumulative sum over the merged rows mixes the samples: no chain of operations, and
    the leaf is refused as one module."""
    torch.manual_seed(0)
    model = WithUnrolledTokens("mix").to(DT)
    X, y = torch.randn(3, 16, 3, dtype=DT), torch.randint(0, CLASSES, (3,))
    with pytest.raises(UnsupportedModelError, match="unroll"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with extend(model, DiagGGNApprox()):
                nn.CrossEntropyLoss()(model(X), y).backward()


class TableBias(nn.Module):
    """timm's ``RelPosBias`` (GCViT): a leaf without a rule that adds ``table[index]``, viewed and
    permuted to ``[1, H, L, L]``, to the attention scores it is passed. The lookup is a general
    operation on the parameter alone; every operation after it reads one entry of it per output
    entry, so the chain keeps the leaf's diagonal. With ``softmax``: a second general operation,
    on the scores, after the parameter entered (the leaf is kept, for the fallback)."""

    def __init__(self, softmax: bool, heads: int = 2, length: int = 2):
        super().__init__()
        self.softmax, self.shape = softmax, (length, length, heads)
        self.table = nn.Parameter(torch.randn(3, heads))
        self.register_buffer("index", torch.tensor([0, 1, 2, 0])[: length * length])

    def forward(self, attn):  # [B, H, L, L]
        bias = self.table[self.index].view(self.shape).permute(2, 0, 1).unsqueeze(0).contiguous()
        out = attn + bias
        return out.softmax(-1) if self.softmax else out


class WindowsWithTableBias(nn.Module):
    """Attention within windows of 2 tokens merged with the batch (``[N·2, H, 2, 2]``, GCViT and
    Swin), or the same on unmerged windows (``[N, 2, H, 2, 2]``), scores passed to ``TableBias``."""

    def __init__(self, merged: bool, softmax: bool, c: int = 4, heads: int = 2):
        super().__init__()
        self.merged, self.softmax, self.heads = merged, softmax, heads
        self.qkv, self.bias, self.head = nn.Linear(3, 3 * c), TableBias(softmax, heads), nn.Linear(4 * c, CLASSES)

    def forward(self, x):  # [N, 4, 3]
        n = x.shape[0]
        lead = (n * 2,) if self.merged else (n, 2)
        q, k, v = self.qkv(x).view(*lead, 2, 3, self.heads, -1).movedim(-3, 0).transpose(-3, -2)  # [*lead, H, 2, d]
        scores = self.bias(q @ k.transpose(-1, -2))
        attn = scores if self.softmax else torch.softmax(scores, -1)
        return self.head((attn @ v).reshape(n, -1))


@pytest.mark.parametrize("merged", [True, False], ids=["merged_windows", "windows"])
@pytest.mark.parametrize("n", [1, 3])
def test_a_bias_looked_up_from_a_parameter_inside_a_leaf_is_recorded_as_its_operations(monkeypatch, n, merged):
    """(Before: the fallback's per-sample Jacobians served GCViT's ``RelPosBias``, and on merged
    windows its container too: out of memory at timm's gcvit_xxtiny at 224×224.)"""
    torch.manual_seed(0)
    model = WindowsWithTableBias(merged, softmax=False).to(DT)
    X, y = torch.randn(n, 4, 3, dtype=DT), torch.randint(0, CLASSES, (n,))
    check_exact_without_fallback(model, X, y, monkeypatch, moved_axes=True)


@pytest.mark.parametrize("merged", [True, False], ids=["merged_windows", "windows"])
def test_a_bias_lookup_before_a_second_general_operation_keeps_the_leaf(monkeypatch, merged):
    """The lookup and a softmax after the parameter entered: the chain would change the leaf's
    diagonal, so the fallback serves the leaf (or, on merged rows, its container): exact."""
    torch.manual_seed(0)
    model = WindowsWithTableBias(merged, softmax=True).to(DT)
    X, y = torch.randn(3, 4, 3, dtype=DT), torch.randint(0, CLASSES, (3,))
    served = fallback_spy(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_graph_against_reference(model, X, y, moved_axes=True)
    assert served, "the leaf's operations were followed"


class SlicePerRow(nn.Module):
    """A leaf without a rule whose parameter-derived operand spans the leading axis: a scale per
    merged row (``[N·4, 4, C] * w[4, 1, 1]``, a shape that broadcasts at N = 1 only), or a lookup
    ``table[idx]`` with one row per sample (``idx`` a buffer of length N)."""

    def __init__(self, form: str, n: int):
        super().__init__()
        self.form = form
        self.w = nn.Parameter(torch.rand(4, 1, 1) + 0.5) if form == "per_row" else nn.Parameter(torch.randn(3, 16, 2))
        self.register_buffer("idx", torch.arange(n) % 3)

    def forward(self, x):  # [N, 16, C]
        if self.form == "per_row":
            return (x.reshape(-1, 4, x.shape[-1]) * self.w).reshape(x.shape)
        return x + self.w[self.idx]


class WithSlicePerRow(nn.Module):
    def __init__(self, form: str, n: int):
        super().__init__()
        self.embed, self.leaf, self.head = nn.Linear(3, 2), SlicePerRow(form, n), nn.Linear(32, CLASSES)

    def forward(self, x):  # [N, 16, 3]
        return self.head(torch.tanh(self.leaf(self.embed(x))).flatten(1))


def test_a_leaf_whose_parameter_spans_the_rows_stays_one_module(monkeypatch):
    """Its operations would give each merged row (or sample) its own slice of the parameter,
    which the operations' rules, applied row by row, do not read so: the leaf stays one module
    (the review of session 42 found a torch shape error in the first version). Exact at N = 1,
    where the per-row scale broadcasts; the per-sample lookup mixes samples at N = 3: refused."""
    served = fallback_spy(monkeypatch)
    torch.manual_seed(0)
    model = WithSlicePerRow("per_row", 1).to(DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_exact(model, torch.randn(1, 16, 3, dtype=DT), torch.tensor([1]), nn.CrossEntropyLoss())
    assert "leaf" in served
    model = WithSlicePerRow("lookup", 3).to(DT)
    X, y = torch.randn(3, 16, 3, dtype=DT), torch.arange(3)
    with pytest.raises(UnsupportedModelError, match="Module 'leaf' .*mixes samples"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with extend(model, DiagGGN()):
                nn.CrossEntropyLoss()(model(X), y).backward()


class NormOnFrozenFeatures(nn.Module):
    """ConvNeXt's stem with the convolution frozen: the leaf ``LayerNorm2d`` (no rule) reads a
    constant, so its chain starts at ``F.layer_norm`` (its first ``permute`` is of the
    constant and not recorded)."""

    def __init__(self, c=3):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1).requires_grad_(False)
        self.norm, self.head = ChannelsFirstLayerNorm(c), nn.Linear(c * 2 * 2, 3)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):  # x: [N, 3, 2, 2]
        return self.head(torch.tanh(self.norm(self.stem(x))).flatten(1))


@pytest.mark.parametrize("n", [1, 3])
def test_a_leaf_without_a_rule_on_frozen_features_is_recorded_as_its_operations(monkeypatch, n):
    """(Before: the fallback's per-sample Jacobians served it, 1.8 s of a 3 s DiagGGNApprox step on
    torchvision's convnext_tiny with its stem frozen.) DiagGGNApprox as for the leaf as one
    operation, and the exact extensions."""
    torch.manual_seed(0)
    model = NormOnFrozenFeatures().to(DT)
    X, y = torch.randn(n, 3, 2, 2, dtype=DT), torch.randint(0, 3, (n,))
    check_exact_without_fallback(model, X, y, monkeypatch)


class LearnedPositions(nn.Embedding):
    """BART's and OPT's learned position embeddings: an ``nn.Embedding`` whose own ``forward``
    makes the positions ``[N, L]`` from what it is given (only its shape: BART's encoder
    passes the embeddings; a mask: OPT) and looks them up with an offset."""

    def __init__(self, from_mask: bool):
        super().__init__(5 + 2, 4)
        self.from_mask = from_mask

    def forward(self, x):  # x: [N, L, 4] (only its shape is read) or a mask [N, L]
        if self.from_mask:
            positions = (torch.cumsum(x, dim=1) * x - 1).long()
        else:
            n, length = x.shape[:2]
            positions = torch.arange(length).expand(n, -1)
        return super().forward(positions + 2)


class WithLearnedPositions(nn.Module):
    def __init__(self, from_mask: bool):
        super().__init__()
        self.proj, self.pos, self.head = nn.Linear(4, 4), LearnedPositions(from_mask), nn.Linear(3 * 4, 3)

    def forward(self, x):  # x: [N, 3, 4]
        h = self.proj(x)
        mask = (x.detach()[..., 0] > -1.5).long()  # one row per sample, from the input
        h = h + self.pos(mask if self.pos.from_mask else h)
        return self.head(torch.tanh(h).flatten(1))


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("from_mask", [False, True], ids=["shape_of_the_input", "from_a_mask"])
def test_learned_positions_count_as_their_embedding(n, from_mask, monkeypatch):
    """A leaf without a rule whose one operation with grad is ``F.embedding`` of positions it
    made (its batched input read only for its shape) counts as that call: DiagGGNApprox as for
    the leaf as one operation, no fallback (BART's position embedding in the fallback took
    288 s of a 289 s DiagGGNApprox step at bart-base)."""
    torch.manual_seed(0)
    model = WithLearnedPositions(from_mask).to(DT)
    X, y = torch.randn(n, 3, 4, dtype=DT), torch.randint(0, 3, (n,))
    check_exact_without_fallback(model, X, y, monkeypatch)


class Conv2dSame(nn.Conv2d):
    """timm's ``Conv2dSame`` (TensorFlow's 'same'): zeros on the right and bottom, then a valid
    convolution, ``F.conv2d(F.pad(x, …))``. A leaf without a rule."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class AvgPool2dSame(nn.AvgPool2d):
    """timm's ``AvgPool2dSame``: zeros around, then ``F.avg_pool2d`` counting them."""

    def forward(self, x):
        return F.avg_pool2d(F.pad(x, (0, 1, 0, 1)), self.kernel_size, self.stride, 0, False, True)


class SameConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.pool = Conv2dSame(2, 4, 2, groups=2), AvgPool2dSame(2, 1)
        self.head = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):  # [N, 2, 3, 3]
        return self.head(torch.tanh(self.pool(torch.tanh(self.conv(x)))).flatten(1))


@pytest.mark.parametrize("n", [1, 3])
def test_tf_same_padding_leaves_are_recorded_as_their_operations(monkeypatch, n):
    """``F.pad`` with zeros keeps each entry at most once, so the chain pad → convolution (or
    average pooling) keeps the leaf's diagonal; ``F.conv2d`` takes the convolution rule. (Before:
    the fallback's per-sample Jacobians served both leaves: timm's maxvit_tiny_tf DiagGGN step
    at 64×64 took 6.2 s, now 0.8 s.)"""
    torch.manual_seed(0)
    model = SameConvNet().to(DT)
    X, y = torch.randn(n, 2, 3, 3, dtype=DT), torch.randint(0, 3, (n,))
    check_exact_without_fallback(model, X, y, monkeypatch)


# --------------------------------- containers that merge the batch axis with another
class HeadsMerged(nn.Module):
    """Attention written with the batch and the heads as one axis (DeBERTa, Swin's windows):
    ``[N, H, L, d]`` viewed as ``[N·H, L, d]``, a child ``Linear`` on the merged rows."""

    def __init__(self, e: int = 4, heads: int = 2):
        super().__init__()
        self.qkv, self.mix, self.heads = nn.Linear(e, 3 * e), nn.Linear(e // heads, e // heads), heads

    def forward(self, x):  # [N, L, E]
        n, l, e = x.shape
        q, k, v = self.qkv(x).view(n, l, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = (t.reshape(n * self.heads, l, e // self.heads) for t in (q, k, v))
        attn = torch.softmax(q @ k.transpose(1, 2), dim=-1)
        out = self.mix(attn @ v)  # a child called on the merged axis
        return out.view(n, self.heads, l, e // self.heads).transpose(1, 2).reshape(n, l, e)


class WithMergedAttention(nn.Module):
    def __init__(self, frozen_stem: bool = False):
        super().__init__()
        self.stem, self.attn, self.out = nn.Linear(3, 4), HeadsMerged(), nn.Linear(12, CLASSES)
        self.stem.requires_grad_(not frozen_stem)

    def forward(self, x):  # [N, 3, 3]
        return self.out(torch.tanh(self.attn(self.stem(x))).flatten(1))


class NormOnMergedRows(nn.Module):
    """timm's LeViT ``LinearNorm``: ``BatchNorm1d`` (eval) on ``x.flatten(0, 1)``."""

    def __init__(self, d: int = 4):
        super().__init__()
        self.linear, self.bn = nn.Linear(d, d), nn.BatchNorm1d(d).eval()
        self.bn.running_mean.uniform_(-0.5, 0.5)
        self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.bn(self.linear(x).flatten(0, 1)).reshape_as(x)


class WithMergedNorm(WithMergedAttention):
    def __init__(self, frozen_stem: bool = False):
        super().__init__(frozen_stem)
        self.attn = NormOnMergedRows()
        if frozen_stem:  # the norm's input is a constant the tape does not record
            self.attn.linear.requires_grad_(False)


class MixesEachSamplesRows(nn.Module):
    """A leaf without a rule (it owns a parameter) that mixes the rows of each sample:
    a cumulative sum over a sample's ``L`` merged rows."""

    def __init__(self, length: int = 3, c: int = 4):
        super().__init__()
        self.w, self.length = nn.Parameter(torch.randn(c)), length

    def forward(self, x):  # [N·L, C]
        return (x * self.w).view(-1, self.length, x.shape[-1]).cumsum(1).view(-1, x.shape[-1])


class RowsRegathered(nn.Module):
    """Merged rows gathered back by an operation that is not a reshape: ``unfold`` of the
    ``[N·L, F]`` rows into ``[N, F, L]`` keeps samples apart as a whole, but no row is a
    sample of it; or rows of another grouping; or a leaf without a rule that mixes each
    sample's rows."""

    def __init__(self, mode: str):
        super().__init__()
        self.a, self.b, self.mode = nn.Linear(3, 4), nn.Linear(3, 4), mode
        self.leaf = MixesEachSamplesRows()

    def forward(self, x):  # [N, L, F]
        n, l, f = x.shape
        h = torch.tanh(self.a(x.reshape(-1, f)))  # [N·L, 4]: L rows per sample
        if self.mode == "unfold":
            return h.unfold(0, l, l).transpose(1, 2)  # [N, L, 4]
        if self.mode == "leaf":
            return self.leaf(h).view(n, l, 4)
        # rows grouped by an operation not followed: each sample's b(x[n]) copied L times, [N·L, 4],
        # by per-sample repeats given as a tensor (an int is followed: tests/test_merged_rows.py)
        g = self.b(x[:, 0]).repeat_interleave(torch.full((n,), l), dim=0)
        return (h * g).view(n, l, 4)


class WithRowsRegathered(nn.Module):
    def __init__(self, mode: str, in_a_submodule: bool = True):
        super().__init__()
        self.block, self.head, self.in_a_submodule = RowsRegathered(mode), nn.Linear(12, CLASSES), in_a_submodule

    def forward(self, x):
        h = self.block(x) if self.in_a_submodule else RowsRegathered.forward(self.block, x)
        return self.head(h.flatten(1))


@pytest.mark.parametrize("mode", ["unfold", "other_rows", "leaf"])
@pytest.mark.parametrize("n", [1, 3])
def test_a_container_whose_merged_rows_cannot_be_followed_is_one_module_for_the_fallback(n, mode, monkeypatch):
    """Merged rows that meet an operation which does not keep rows apart, or tensors grouped
    otherwise: the container is recorded as one module, which the fallback serves exactly (it
    warns, naming it). In the model's own forward (no container to fall back to): refused."""
    monkeypatch.setattr(fallback_module, "_WARNED", set())  # it warns once per type and process
    torch.manual_seed(0)
    model = WithRowsRegathered(mode).to(DT)
    X, y = torch.randn(n, 3, 3, dtype=DT), torch.randint(0, CLASSES, (n,))
    crit = nn.CrossEntropyLoss()
    ggn = FullGGN()
    with pytest.warns(UserWarning, match="no rule for RowsRegathered"):
        with extend(model, BatchJacobian(), DiagGGN(), DiagGGNApprox(), ggn):
            crit(model(X), y).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    ref = reference(model, X, lambda out: crit(out, y), approx=False)
    compare(collect(model, n, ("BatchJacobian", "DiagGGN")), ref, ggn.matrix)
    assert all(torch.isfinite(p.diag_ggn_approx).all() and (p.diag_ggn_approx >= 0).all() for p in params)
    model.in_a_submodule = False
    match = {
        "unfold": "mixes samples|cannot split", "other_rows": "combines tensors whose batch axis a reshape merged",
        "leaf": "one sample at a time",
    }[mode]
    with pytest.raises(UnsupportedModelError, match=match):
        with extend(model, DiagGGN()):
            crit(model(X), y).backward()


@pytest.mark.parametrize("model_type, frozen_stem", [
    (WithMergedAttention, False), (WithMergedAttention, True), (WithMergedNorm, False), (WithMergedNorm, True),
], ids=["heads", "heads_frozen_stem", "norm", "norm_on_frozen_features"])
@pytest.mark.parametrize("n", [1, 3])
def test_merged_rows_are_followed_as_pseudo_samples(n, frozen_stem, model_type, monkeypatch):
    """DeBERTa's heads merged with the batch (``[N·H, L, d]``, a child Linear and batched ``@``
    on them) and LeViT's BatchNorm1d on ``x.flatten(0, 1)`` (also of frozen features, a
    constant with merged rows that a trainable layer meets): every operation on the merged
    rows is followed with each row as a pseudo-sample, the parameters' per-sample products
    summed over each sample's rows (curvhook/row_groups.py). Exact against torch.func, and
    DiagGGNApprox against its definition on the graph (before: the container was one module
    for the fallback, whose per-sample Jacobians made OPT's step 800× the plain one)."""
    torch.manual_seed(0)
    model = model_type(frozen_stem).to(DT)
    X, y = torch.randn(n, 3, 3, dtype=DT), torch.randint(0, CLASSES, (n,))
    check_exact_without_fallback(model, X, y, monkeypatch, moved_axes=True)


class PerTokenLinear(nn.Module):
    """A Linear on the rows of ``x.reshape(-1, F)``, reshaped back: the batch merged with the tokens."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)

    def forward(self, x):  # [N, L, F]
        n, l, f = x.shape
        return self.a(x.reshape(-1, f)).reshape(n, l, -1)


class MergesTheInput(nn.Module):
    def __init__(self, in_a_submodule: bool):
        super().__init__()
        self.tokens, self.head, self.in_a_submodule = PerTokenLinear(), nn.Linear(12, CLASSES), in_a_submodule

    def forward(self, x):
        if self.in_a_submodule:
            h = self.tokens(x)
        else:  # in the model's own forward
            n, l, f = x.shape
            h = self.tokens.a(x.reshape(-1, f)).reshape(n, l, -1)
        return self.head(torch.tanh(h).flatten(1))


@pytest.mark.parametrize("in_a_submodule", [False, True], ids=["own_forward", "submodule"])
@pytest.mark.parametrize("n", [1, 3])
def test_a_module_on_the_merged_model_input(n, in_a_submodule, monkeypatch):
    """``tokens.a(x.reshape(-1, F))`` of the model input, in the model's own forward or in a
    submodule: the Linear's output has L rows per sample, followed row by row; no fallback.
    (Before: refused in the model's own forward, and the submodule went to the fallback.)"""
    torch.manual_seed(0)
    model = MergesTheInput(in_a_submodule=in_a_submodule).to(DT)
    X, y = torch.randn(n, 3, 3, dtype=DT), torch.randint(0, CLASSES, (n,))
    check_exact_without_fallback(model, X, y, monkeypatch, moved_axes=True)


class RelativePositions(nn.Module):
    """Transformer-XL's relative positions: a ``[L, d]`` table computed in ``forward``, projected
    by a trainable layer. ``L`` is a multiple of ``N`` for N = 1, 2, 3, 6: no merged batch."""

    def __init__(self, length: int = 6, d: int = 4):
        super().__init__()
        self.r_net, self.length, self.d = nn.Linear(d, d), length, d
        self.q = nn.Linear(d, d)

    def forward(self, x):  # [N, L, d]
        pos = torch.arange(self.length, dtype=x.dtype)[:, None] * torch.arange(1, self.d + 1, dtype=x.dtype)
        r = self.r_net(torch.sin(pos))  # [L, d] from a constant table: shared by the samples
        return self.q(x) + r


class WithRelativePositions(nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.head = RelativePositions(), nn.Linear(24, CLASSES)

    def forward(self, x):
        return self.head(torch.tanh(self.block(x)).flatten(1))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_a_table_whose_length_is_a_multiple_of_the_batch_is_no_merged_batch(n, monkeypatch):
    """A constant whose leading size is k·N by coincidence does not send its container to the
    fallback (a guess from the shape did, 124× slower for DiagGGNApprox): only a reshape seen
    to merge a batch axis does."""
    monkeypatch.setattr(fallback_module, "_WARNED", set())
    torch.manual_seed(0)
    model = WithRelativePositions().to(DT)
    X, y = torch.randn(n, 6, 4, dtype=DT), torch.randint(0, CLASSES, (n,))
    crit = nn.CrossEntropyLoss()
    ggn = FullGGN()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback would warn
        with extend(model, BatchJacobian(), DiagGGN(), DiagGGNApprox(), ggn):
            crit(model(X), y).backward()
    compare(collect(model, n, ("BatchJacobian", "DiagGGN")), reference(model, X, lambda out: crit(out, y), approx=False), ggn.matrix)


class MatMulWrapper(nn.Module):
    """SqueezeBERT's wrapper of ``torch.matmul`` (for flop counting): a leaf without parameters
    of two batched inputs; with ``then_tanh``, two operations."""

    def __init__(self, then_tanh: bool = False):
        super().__init__()
        self.then_tanh = then_tanh

    def forward(self, a, b):
        out = torch.matmul(a, b)
        return torch.tanh(out) if self.then_tanh else out


class WrappedAttention(nn.Module):
    def __init__(self, then_tanh: bool = False):
        super().__init__()
        self.q, self.k, self.v, self.out = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4 * 5, CLASSES)
        self.scores, self.mix = MatMulWrapper(then_tanh), MatMulWrapper()

    def forward(self, x):  # [N, 5, 3]
        s = torch.softmax(self.scores(self.q(x), self.k(x).transpose(1, 2)) / 2, dim=-1)
        return self.out(self.mix(s, self.v(x)).flatten(1))


@pytest.mark.parametrize("n", [1, 3])
def test_a_leaf_that_is_one_operation_of_two_inputs_is_recorded_as_it(monkeypatch, n):
    """(Before: the fallback's per-sample Jacobians served SqueezeBERT's ``MatMulWrapper``, over
    150 s for a DiagGGNApprox step of a two-layer squeezebert-uncased; now 1.0 s, 0.4 s plain.)
    Exact, and DiagGGNApprox as for the leaf as one operation, with no fallback."""
    torch.manual_seed(0)
    model = WrappedAttention().to(DT)
    X, y = torch.randn(n, 5, 3, dtype=DT), torch.randint(0, CLASSES, (n,))
    check_exact_without_fallback(model, X, y, monkeypatch)


def test_a_leaf_of_two_inputs_and_two_operations_stays_one_module(monkeypatch):
    """``tanh(a @ b)`` is no single operation: the leaf stays one module for the fallback (exact)."""
    served = fallback_spy(monkeypatch)
    torch.manual_seed(0)
    model = WrappedAttention(then_tanh=True).to(DT)
    X, y = torch.randn(3, 5, 3, dtype=DT), torch.randint(0, CLASSES, (3,))
    check_graph_against_reference(model, X, y)
    assert served and set(served) == {"scores"}
