"""Sizes of the model equal to the batch size by chance (curvhook/fixed_constants.py).

A constant computed from the model's buffers and frozen parameters alone has no
batch axis, whatever its leading size: a relative-position bias ``[heads, L, L]``
with ``heads = N``, an index table ``[L, L]`` with ``L = N``, ``torch.arange(L)``
with ``L = N``. Before, a leading size equal to ``N`` read as a batch axis: the
model was refused, or served by the fallback, at that one batch size. Every
model here runs at several ``N``, those equal to its sizes among them, against
torch.func in float64 and DiagGGNApprox's definition
(``tests/graph_reference.py``).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from curvhook import extend
from curvhook.errors import UnsupportedModelError
from curvhook.extensions import DiagGGN
from helpers import CLASSES, assert_exact, check_exact_without_fallback, check_graph_against_reference, fallback_spy

HEADS, L, D = 2, 3, 4  # N = 2 equals the heads, N = 3 the length


class RelativeBias(nn.Module):
    """Attention scores ``[N, H, L, L]`` plus a bias ``[H, L, L]`` computed from a buffer."""

    def __init__(self, bias: str):
        super().__init__()
        self.bias = bias
        self.q = nn.Linear(D, HEADS * D)
        self.table = nn.Parameter(torch.randn(2 * L - 1, HEADS))
        index = torch.arange(L)[:, None] - torch.arange(L)[None, :] + L - 1  # [L, L]
        self.register_buffer("index", index)
        self.embedding = nn.Embedding(2 * L - 1, L)
        self.register_buffer("coords", torch.randn(HEADS, L, 2))
        self.mlp = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, L))
        self.frozen = nn.Parameter(torch.randn(HEADS, L, 2), requires_grad=False)
        self.head = nn.Linear(L * D, CLASSES)

    def forward(self, x: Tensor) -> Tensor:  # [N, L, D]
        n = x.shape[0]
        q = self.q(x).view(n, L, HEADS, D).transpose(1, 2)  # [N, H, L, D]
        s = q @ q.transpose(-1, -2)  # [N, H, L, L]
        if self.bias == "table[index]":  # an index buffer [L, L]: Swin, BEiT
            bias = self.table[self.index].permute(2, 0, 1)
        elif self.bias == "embedding(index)":  # an embedding of rows of the buffer, [H, L, L]
            bias = self.embedding(self.index[:HEADS])
        elif self.bias == "mlp(coords)":  # position-wise layers on a coordinate buffer: MaxViT
            bias = self.mlp(self.coords)
        elif self.bias == "mlp(frozen)":  # ... on a frozen parameter
            bias = self.mlp(self.frozen)
        else:  # T5: buckets of torch.arange(L) made in the forward
            relative = torch.arange(L)[None, :] - torch.arange(L)[:, None]
            bias = self.embedding((relative + L - 1).clamp(0, 2 * L - 2))[..., :HEADS].permute(2, 0, 1)
        return self.head((s + bias).softmax(-1).matmul(q).mean(1).flatten(1))


BIASES = ["table[index]", "embedding(index)", "mlp(coords)", "mlp(frozen)", "embedding(arange)"]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("bias", BIASES)
def test_a_bias_from_buffers_is_shared_at_every_batch_size(bias, n, monkeypatch):
    torch.manual_seed(0)
    model = RelativeBias(bias).double()
    X, y = torch.randn(n, L, D, dtype=torch.float64), torch.randint(0, CLASSES, (n,))
    check_exact_without_fallback(model, X, y, monkeypatch)


class Cube(torch.autograd.Function):
    """``x³`` as a custom autograd function: no recorded operation, so the fallback serves its module."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g

    generate_vmap_rule = True


class CubeOfSum(nn.Module):
    def forward(self, s: Tensor, bias: Tensor) -> Tensor:
        return Cube.apply(s + bias)


class BiasIntoFallback(nn.Module):
    """A module without a rule gets the scores and a second argument: a buffer ``[H, L, L]``
    (``bias="buffer"``: passed whole to each sample), or a mask the forward makes with one
    row per sample (``"ones(N, L)"``, a default attention mask: cut per sample)."""

    def __init__(self, bias: str):
        super().__init__()
        self.bias = bias
        self.q = nn.Linear(D, HEADS * L)
        self.register_buffer("table", torch.randn(HEADS, L, L) / 2)
        self.cube = CubeOfSum()
        self.head = nn.Linear(HEADS * L * L, CLASSES)

    def forward(self, x: Tensor) -> Tensor:  # [N, L, D]
        n = x.shape[0]
        s = self.q(x).view(n, L, HEADS, L).transpose(1, 2) / 2  # [N, H, L, L]
        if self.bias == "buffer":
            bias = self.table
        else:
            bias = torch.ones(n, L)[:, None, None, :] * torch.arange(1, n + 1.0)[:, None, None, None] / 4
        return self.head(self.cube(s, bias).reshape(n, -1))


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("bias", ["buffer", "ones(N, L)"])
def test_the_fallback_cuts_only_arguments_with_the_batch(bias, n, monkeypatch):
    torch.manual_seed(0)
    model = BiasIntoFallback(bias).double()
    X, y = torch.randn(n, L, D, dtype=torch.float64), torch.randint(0, CLASSES, (n,))
    served = fallback_spy(monkeypatch)
    assert_exact(model, X, y, nn.CrossEntropyLoss())
    check_graph_against_reference(model, X, y)
    assert "cube" in served


class BiasWithoutTensors(nn.Module):
    """A module called without tensors returns ``[1, H, L, L]`` (the Swin of the real-model tests)."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(HEADS, L, L))

    def forward(self) -> Tensor:
        return self.table.tanh().unsqueeze(0)


class WindowsWithBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.bias, self.head = nn.Linear(D, HEADS * D), BiasWithoutTensors(), nn.Linear(L * D, CLASSES)

    def forward(self, x: Tensor) -> Tensor:  # [N, L, D]
        n = x.shape[0]
        q = self.q(x).view(n, L, HEADS, D).transpose(1, 2)
        s = q @ q.transpose(-1, -2) + self.bias()
        return self.head(s.softmax(-1).matmul(q).mean(1).flatten(1))


@pytest.mark.parametrize("n", [1, 2])
def test_a_module_without_tensors_is_shared_also_for_one_sample(n, monkeypatch):
    torch.manual_seed(0)
    X, y = torch.randn(n, L, D, dtype=torch.float64), torch.randint(0, CLASSES, (n,))
    check_exact_without_fallback(WindowsWithBias().double(), X, y, monkeypatch)


class TokenTypes(nn.Module):
    """Token-type ids the forward makes for the batch (``torch.zeros(N, L)``) and position ids
    ``arange(L)`` expanded to it: one row per sample, embedded like the tokens."""

    def __init__(self):
        super().__init__()
        self.tokens, self.types, self.positions = nn.Embedding(7, D), nn.Embedding(2, D), nn.Embedding(L, D)
        self.head = nn.Linear(L * D, CLASSES)

    def forward(self, ids: Tensor) -> Tensor:  # [N, L]
        n = ids.shape[0]
        types = torch.zeros(n, L, dtype=torch.long)
        positions = torch.arange(L).unsqueeze(0).expand(n, L)
        h = self.tokens(ids) + self.types(types) + self.positions(positions)
        return self.head(torch.tanh(h).flatten(1))


@pytest.mark.parametrize("n", [1, 3])
def test_new_tensors_of_the_batch_size_keep_one_row_per_sample(n):
    torch.manual_seed(0)
    ids, y = torch.randint(0, 7, (n, L)), torch.randint(0, CLASSES, (n,))
    assert_exact(TokenTypes().double(), ids, y, nn.CrossEntropyLoss())


# ------------------------------------------------ found by a review of the change above
class StackedCells(nn.Module):
    """Two ``nn.GRUCell`` layers from ``torch.zeros(layers, N, H)``: ``h[0]`` is a state per
    sample although the tensor's leading size is the number of layers."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.head = nn.GRUCell(D, 5), nn.GRUCell(5, 5), nn.Linear(5, CLASSES)

    def forward(self, x: Tensor) -> Tensor:  # [N, T, D]
        h = torch.zeros(2, x.shape[0], 5, dtype=x.dtype)
        h1, h2 = h[0], h[1]
        for t in range(x.shape[1]):
            h1 = self.c1(x[:, t], h1)
            h2 = self.c2(h1, h2)
        return self.head(h2)


class TokenPerSample(nn.Module):
    """A frozen token copied to ``[1, N, D]`` and squeezed: one copy per sample."""

    def __init__(self):
        super().__init__()
        self.lin, self.proj, self.head = nn.Linear(D, 5), nn.Linear(D, 5), nn.Linear(5, CLASSES)
        self.register_buffer("token", torch.randn(D))

    def forward(self, x: Tensor) -> Tensor:
        t = self.token.expand(1, x.shape[0], D).squeeze(0)
        return self.head(torch.tanh(self.lin(x) * self.proj(t)))


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("make,shape", [(StackedCells, (2, D)), (TokenPerSample, (D,))])
def test_a_batch_axis_made_by_the_forward_is_kept(make, shape, n):
    torch.manual_seed(0)
    X, y = torch.randn(n, *shape, dtype=torch.float64), torch.randint(0, CLASSES, (n,))
    assert_exact(make().double(), X, y, nn.CrossEntropyLoss())


class ReadsItsParentsState(nn.Module):
    """No rule, so served as one operation; it reads a batched tensor its parent set on it."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5) / 2)

    def forward(self, b: Tensor) -> Tensor:
        return Cube.apply(self.ctx * self.w + b)


class SetsState(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.block, self.head = nn.Linear(D, 5), ReadsItsParentsState(), nn.Linear(5, CLASSES)
        self.register_buffer("b", torch.randn(1, 5) / 3)

    def forward(self, x: Tensor) -> Tensor:
        self.block.ctx = self.lin(x)
        return self.head(self.block(self.b))


@pytest.mark.parametrize("n", [1, 3])
def test_a_module_that_reads_the_batch_it_was_not_passed_is_refused(n):
    """Before, with ``N = 1``, its parent's layer got no terms through it (wrong numbers); with
    ``N > 1`` a message about mixing samples."""
    torch.manual_seed(0)
    model = SetsState().double()
    X, y = torch.randn(n, D, dtype=torch.float64), torch.randint(0, CLASSES, (n,))
    with pytest.raises(UnsupportedModelError, match="reads a tensor computed from the batch that it was not passed"):
        with extend(model, DiagGGN()):
            nn.CrossEntropyLoss()(model(X), y).backward()


class ScaleThenCenter(nn.Module):
    """No rule; its first argument is a scale, its second the batch, and it mixes samples."""

    def forward(self, scale: Tensor, x: Tensor) -> Tensor:
        z = Cube.apply(x * scale)
        return z - z.mean(0, keepdim=True)


class ScaleFirst(nn.Module):
    def __init__(self, shape: tuple):
        super().__init__()
        self.lin, self.f, self.head = nn.Linear(D, 5), ScaleThenCenter(), nn.Linear(5, CLASSES)
        self.register_buffer("scale", torch.rand(shape) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.f(self.scale, self.lin(x)))


@pytest.mark.parametrize("shape", [(), (1, 5)])
def test_the_fallback_finds_the_samples_whatever_comes_first(shape):
    """The replay that checks a module keeps samples apart cut the first argument: a scalar or
    ``[1, H]`` scale first, it saw one sample and checked nothing (wrong numbers before)."""
    torch.manual_seed(0)
    model = ScaleFirst(shape).double()
    X, y = torch.randn(3, D, dtype=torch.float64), torch.randint(0, CLASSES, (3,))
    with pytest.raises(UnsupportedModelError, match="mixes samples"):
        with extend(model, DiagGGN()):
            nn.CrossEntropyLoss()(model(X), y).backward()


class ReplacesItsState(nn.Module):
    """The forward replaces a buffer (a state reset): the old buffer's id must not be taken for
    a later tensor's, which then read as fixed."""

    def __init__(self):
        super().__init__()
        self.lin, self.proj, self.head = nn.Linear(D, 5), nn.Linear(D, 5), nn.Linear(5, CLASSES)
        self.register_buffer("h", torch.zeros(3, 5))

    def forward(self, x: Tensor) -> Tensor:
        self.h = torch.zeros(x.shape[0], 5, dtype=x.dtype)
        features = (x > 0).to(x.dtype)  # a constant with one row per sample
        return self.head(torch.tanh(self.lin(x)) * self.proj(features) + self.h)


def test_a_replaced_buffer_keeps_its_id_while_the_block_runs():
    torch.manual_seed(0)
    model = ReplacesItsState().double()
    for _ in range(10):  # (before: about four blocks in ten refused, as ids were reused)
        X, y = torch.randn(3, D, dtype=torch.float64), torch.randint(0, CLASSES, (3,))
        with extend(model, DiagGGN()):
            for _ in range(3):
                nn.CrossEntropyLoss()(model(X), y).backward()
    assert_exact(model, X, y, nn.CrossEntropyLoss())
