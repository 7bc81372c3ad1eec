"""Tensors computed from parameters only that enter the batch (curvhook/rules/parameters_only.py).

Position embeddings looked up from ``[1, L]`` or ``[L]`` positions, class
tokens expanded to the batch and concatenated, a module applied to a
parameter table, trainable position embeddings added to frozen token
embeddings: the exact extensions against the torch.func reference in
float64 at N = 1 and N = 3, and DiagGGNApprox against its definition worked
out by hand for a position embedding.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvhook import extend
from curvhook.extensions import BatchJacobian, DiagGGN, DiagGGNApprox, FullGGN
from helpers import check_graph_against_reference
from reference import collect, compare, reference

DT = torch.float64
L, D, C, VOCAB = 4, 3, 2, 7


class PositionEmbedding(nn.Module):
    """Token embeddings plus position embeddings of ``arange(L)``, shaped ``[1, L]`` or ``[L]``."""

    def __init__(self, leading_one: bool = True, freeze_tokens: bool = False) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, D)
        self.positions = nn.Embedding(L + 2, D)
        self.head = nn.Linear(D, C)
        self.leading_one = leading_one
        self.tokens.weight.requires_grad_(not freeze_tokens)

    def forward(self, ids):
        where = torch.arange(ids.shape[1])
        where = where[None] if self.leading_one else where
        return self.head(self.tokens(ids) + self.positions(where)).flatten(1)


class ClassToken(nn.Module):
    """torchvision's ViT pattern: ``cat([cls.expand(N, -1, -1), x], 1) + pos``; the token
    copied to the batch with ``repeat`` or ``repeat_interleave`` instead of ``expand``."""

    def __init__(self, copy: str = "expand") -> None:
        super().__init__()
        self.copy = copy
        self.embed = nn.Linear(D, D)
        self.cls = nn.Parameter(torch.randn(1, 1, D))
        self.pos = nn.Parameter(torch.randn(1, L + 1, D))
        self.head = nn.Linear(D, C)

    def forward(self, x):
        h = self.embed(x)
        n = h.shape[0]
        if self.copy == "expand":
            cls = self.cls.expand(n, -1, -1)
        elif self.copy == "repeat":
            cls = self.cls.repeat(n, 1, 1)
        else:  # (before: a shared operand of the batch's size, "Mismatch in shape" from torch.func)
            cls = self.cls.repeat_interleave(n, dim=0)
        h = torch.cat([cls, h], dim=1) + self.pos
        return self.head(torch.tanh(h)[:, 0])


class TableThroughModule(nn.Module):
    """A module applied to a parameter table (a relative-position MLP): its input is shared."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(L, D))
        self.mlp = nn.Linear(D, D)
        self.head = nn.Linear(D, C)

    def forward(self, x):
        return self.head(torch.sigmoid(x + self.mlp(self.table))).flatten(1)


class ReturnsItsInput(nn.Module):
    """DeBERTa's ``StableDropout`` in eval: no rule, and it returns its input as it is."""

    def forward(self, x):
        return x


class TableThroughAnIdentity(TableThroughModule):
    """``mlp(drop(table)[:L])``, ``drop`` returning the parameter itself (DeBERTa's relative
    embeddings). (Before: the table got its terms from the call and again from the slice that
    reads it, 4× in DiagGGN; no refusal.)"""

    def __init__(self) -> None:
        super().__init__()
        self.drop = ReturnsItsInput()

    def forward(self, x):
        return self.head(torch.sigmoid(x + self.mlp(self.drop(self.table)[:L]))).flatten(1)


class RelativeBias(nn.Module):
    """BEiT's relative position bias: a module called without tensors, ``bias(window_size)``,
    returning ``[1, H, L, L]`` from its table (its squares: not a chain of monomial operations)."""

    def __init__(self, heads: int = 2) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(L * L, heads))

    def forward(self, window_size: tuple[int, int]):
        return (self.table.square() + self.table).view(*window_size, -1).permute(2, 0, 1).unsqueeze(0)


class ScoresWithRelativeBias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias, self.head = RelativeBias(), nn.Linear(L, C)

    def forward(self, x):  # [N, 2, L, L] attention scores
        s = (x + self.bias((L, L))).softmax(-1)
        return self.head(s[:, :, 0].sum(1))


class PickedBias(nn.Module):
    """BEiT's relative position bias in small: a table transformed (``g``: a slice through a
    nonlinear map, concatenated with the rest), then looked up by an index with repeats, a
    constant mask and shift, viewed, permuted, a leading axis added: 10 entries spread over
    32 (:mod:`curvhook.selection_tail`). ``direct``: looked up from the table itself."""

    def __init__(self, heads: int = 2, direct: bool = False) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(5, heads))
        self.register_buffer("index", torch.tensor([0, 4, 4, 1, 2, 3, 0, 0, 1, 1, 4, 2, 3, 3, 0, 2]))
        self.register_buffer("mask", torch.arange(L * L * heads).reshape(L * L, heads) % 7 == 0)
        self.direct = direct

    def forward(self, window_size: tuple[int, int]):
        t = self.table
        u = t if self.direct else torch.cat([torch.sin(t[:4]) * t[:4], t[4:]])
        picked = (u[self.index] + 0.5).masked_fill(self.mask, 0.0)
        return picked.view(*window_size, -1).permute(2, 0, 1).unsqueeze(0)


class ScoresWithPickedBias(ScoresWithRelativeBias):
    def __init__(self, direct: bool = False) -> None:
        super().__init__()
        self.bias = PickedBias(direct=direct)


class PickedFromATable(nn.Module):
    """The same picked bias applied to a table the model owns, passed as the argument
    (``bias(self.table)``): a shared input, whose diagonal is kept per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(5, 2))
        self.bias, self.head = _PickFrom(), nn.Linear(L, C)

    def forward(self, x):  # [N, 2, L, L]
        s = (x + self.bias(self.table)).softmax(-1)
        return self.head(s[:, :, 0].sum(1))


class _PickFrom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.register_buffer("index", torch.tensor([0, 4, 4, 1, 2, 3, 0, 0, 1, 1, 4, 2, 3, 3, 0, 2]))

    def forward(self, table):
        u = torch.tanh(table * self.scale)
        return u[self.index].view(L, L, -1).permute(2, 0, 1).unsqueeze(0)


MODELS = {
    "position_embedding_1L": (lambda: PositionEmbedding(True), "ids"),
    "position_embedding_L": (lambda: PositionEmbedding(False), "ids"),
    "frozen_tokens_trainable_positions": (lambda: PositionEmbedding(True, freeze_tokens=True), "ids"),
    "class_token": (ClassToken, "float"),
    "class_token_repeated": (lambda: ClassToken("repeat"), "float"),
    "class_token_repeat_interleaved": (lambda: ClassToken("repeat_interleave"), "float"),
    "table_through_module": (TableThroughModule, "float"),
    "table_through_an_identity": (TableThroughAnIdentity, "float"),
    "module_called_without_tensors": (ScoresWithRelativeBias, "scores"),
    "picked_bias": (ScoresWithPickedBias, "scores"),
    "picked_bias_direct": (lambda: ScoresWithPickedBias(direct=True), "scores"),
    "picked_from_a_table": (PickedFromATable, "scores"),
}


def _data(kind: str, n: int):
    if kind == "ids":
        return torch.randint(0, VOCAB, (n, L))
    if kind == "scores":
        return torch.randn(n, 2, L, L, dtype=DT)
    return torch.randn(n, L, D, dtype=DT)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("name", list(MODELS))
def test_exact_extensions(name, n):
    build, kind = MODELS[name]
    model = build().to(DT)
    X = _data(kind, n)
    with torch.no_grad():
        classes = model(X).shape[1]
    y = torch.randint(0, classes, (n,))
    crit = nn.CrossEntropyLoss()
    ggn = FullGGN()
    with extend(model, DiagGGN(), BatchJacobian(), ggn):
        crit(model(X), y).backward()
    got = collect(model, n, ("BatchJacobian", "DiagGGN", "FullGGN"))
    ref = reference(model, X, lambda out: crit(out, y), approx=False)
    compare(got, ref, ggn.matrix)


@pytest.mark.parametrize("leading_one", [True, False])
def test_diag_ggn_approx_of_a_position_embedding_by_hand(leading_one):
    """``h = tokens(ids) + positions(where)``, ``f = W h`` per position, ``ℓ = Σ (f − y)²``.

    With ``H = 2 I``: ``d_h[n, l] = 2 Σ_c W_c·²`` at every position, so the
    position table's row ``l`` gets ``N · 2 Σ_c W_c·²``, each token row
    ``2 Σ_c W_c·²`` times its count, and the head weight ``2 Σ_{n,l} h_{nl}²``.
    """
    torch.manual_seed(1)
    model = PositionEmbedding(leading_one).to(DT)
    n = 3
    X = _data("ids", n)
    with extend(model, DiagGGNApprox()):
        out = model(X)
        nn.MSELoss(reduction="sum")(out, torch.ones_like(out)).backward()
    w_sq = 2 * model.head.weight.detach().square().sum(0)  # [D]
    positions = torch.zeros_like(model.positions.weight)
    positions[:L] = n * w_sq
    torch.testing.assert_close(model.positions.weight.diag_ggn_approx, positions, rtol=1e-12, atol=0)
    counts = torch.bincount(X.flatten(), minlength=VOCAB).to(DT)
    torch.testing.assert_close(model.tokens.weight.diag_ggn_approx, counts[:, None] * w_sq, rtol=1e-12, atol=0)
    with torch.no_grad():
        h = model.tokens(X) + model.positions(torch.arange(L))
    head = 2 * h.square().sum((0, 1)).expand(C, D)
    torch.testing.assert_close(model.head.weight.diag_ggn_approx, head, rtol=1e-12, atol=0)


class RelativePositionMLP(nn.Module):
    """MaxViT's ``rmlp`` bias: a small MLP on a constant coordinate table ``[L·L, 2]`` (no leading
    axis of size one), its output ``[L·L, H]`` permuted to a bias ``[H, L, L]`` of the scores."""

    def __init__(self, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        coords = torch.stack(torch.meshgrid(torch.arange(L), torch.arange(L), indexing="ij"), -1).reshape(-1, 2)
        self.register_buffer("coords", coords.to(DT) / L)
        self.fc1, self.act, self.fc2 = nn.Linear(2, 5), nn.ReLU(), nn.Linear(5, heads)
        self.norm = nn.LayerNorm(5)
        self.q = nn.Linear(D, D)
        self.head = nn.Linear(heads * L * D, C)

    def forward(self, x):  # [N, L, D]
        bias = self.fc2(self.act(self.norm(self.fc1(self.coords)))).transpose(0, 1).reshape(self.heads, L, L)
        scores = (self.q(x) @ x.transpose(1, 2) / D ** 0.5).unsqueeze(1)  # [N, 1, L, L]
        attn = torch.softmax(scores + bias, dim=-1)  # [N, H, L, L]
        return self.head((attn @ x.unsqueeze(1)).flatten(1))


@pytest.mark.parametrize("n", [1, 3])
def test_position_wise_modules_on_a_table_take_their_own_rules(monkeypatch, n):
    """The MLP's layers are applied to the table repeated for every sample, so their own rules
    serve them (before: dense per-sample Jacobians of each, 8.7 s of a 12.5 s DiagGGNApprox
    step on timm's maxvit_rmlp_pico at 64×64). Exact, DiagGGNApprox by its definition."""
    from curvhook.rules import parameters_only as module
    from helpers import assert_exact, check_graph_against_reference

    def dense(*args):
        raise AssertionError("a dense Jacobian of a position-wise module on a table")

    monkeypatch.setattr(module, "_diagonal", dense)
    monkeypatch.setattr(module, "_columns", dense)
    torch.manual_seed(0)
    model = RelativePositionMLP().to(DT)
    X, y = torch.randn(n, L, D, dtype=DT), torch.randint(0, C, (n,))
    assert_exact(model, X, y, nn.CrossEntropyLoss())
    check_graph_against_reference(model, X, y, moved_axes=True)


class DroppedTable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.table, self.lin = nn.Linear(D, D), nn.Parameter(torch.randn(L, D)), nn.Linear(D, D)
        self.drop, self.head = nn.Dropout(0.4), nn.Linear(L * D, C)

    def forward(self, x):  # [N, L, D]
        return self.head(torch.tanh(torch.tanh(self.stem(x)) * self.drop(self.lin(self.table))).flatten(1))


def test_dropout_in_training_mode_on_a_table_is_refused_by_name():
    """Its mask is not recorded, and a replay would draw another: refused with the remedies (the
    review found wrong BatchJacobian entries, then a message about an in-place module)."""
    from curvhook.errors import UnsupportedModelError

    torch.manual_seed(0)
    model = DroppedTable().to(DT).eval()
    model.drop.train()
    X, y = torch.randn(3, L, D, dtype=DT), torch.arange(3) % C
    with pytest.raises(UnsupportedModelError, match=r"'drop' \(Dropout\).*training mode.*model\.eval\(\)"):
        with extend(model, BatchJacobian()):
            nn.CrossEntropyLoss()(model(X), y).backward()


@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("wide", [False, True], ids=["more_outputs", "more_entries"])
@pytest.mark.parametrize("chunk", [1 << 24, 7], ids=["one_chunk", "many_chunks"])
def test_diagonal_without_the_dense_jacobian_matches_it(per_sample, wide, chunk, monkeypatch):
    """``Σ_o d_no J_oi²`` of a parameters-only map from its Jacobian's columns (forward mode,
    fewer inputs than outputs) or rows (reverse mode), a chunk at a time, against the dense
    Jacobian; summed over the samples for a parameter."""
    from curvhook.rules import parameters_only

    monkeypatch.setattr(parameters_only, "_CHUNK_ENTRIES", chunk)
    torch.manual_seed(0)
    table = torch.randn(5, 3, dtype=DT)
    idx = torch.tensor([[0, 4, 4, 1], [2, 3, 0, 0]])
    if wide:  # 15 entries to 6 outputs
        fn = lambda t: torch.tanh(t.T @ t[:, :2]).flatten()[:6] * 2  # noqa: E731
        out = 6
    else:  # 15 entries to 2·4·3 + 9 outputs, a bias table looked up, and a general map
        fn = lambda t: torch.cat([t[idx].flatten(), torch.sin(t.T @ t).flatten()])  # noqa: E731
        out = 2 * 4 * 3 + 9
    d = torch.rand(3, out, dtype=DT)
    jac = torch.func.jacrev(fn)(table).reshape(out, -1)
    expected = (d @ jac.square()).reshape(3, *table.shape)
    got = parameters_only._diagonal(fn, table, d, per_sample=per_sample)
    torch.testing.assert_close(got, expected if per_sample else expected.sum(0), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("name", ["picked_bias", "picked_bias_direct", "picked_from_a_table"])
def test_entries_picked_at_the_end_are_pulled_back_before_the_jacobian(name, n, monkeypatch):
    """BEiT's bias spreads 8.8k table entries over 466k; its diagonal formed the Jacobian of the
    whole module (31 s of a 0.26 s step at beit-base widths). Now ``d`` is pulled back through
    the lookup, views and masks first, and only the Jacobian of what comes before them is
    formed (none where they read the table itself). DiagGGNApprox by its definition, the exact
    extensions against torch.func, and no Jacobian with the module's output size."""
    from curvhook.rules import parameters_only
    from helpers import check_graph_against_reference

    original = parameters_only._diagonal
    sizes = []

    def spy(fn, at, diag, per_sample=True):
        sizes.append(diag[0].numel())
        return original(fn, at, diag, per_sample)

    monkeypatch.setattr(parameters_only, "_diagonal", spy)
    torch.manual_seed(0)
    build, kind = MODELS[name]
    model = build().to(DT)
    X = _data(kind, n)
    y = torch.randint(0, C, (n,))
    check_graph_against_reference(model, X, y)
    heads = 2
    assert all(size == 5 * heads for size in sizes) and (sizes != []) == (name != "picked_bias_direct"), sizes


def test_a_tail_whose_replay_differs_takes_the_module_replay(monkeypatch):
    """Where the recorded operations do not give the recorded values again (an index changed
    in place after the call), the split is not used: the module's own replay serves."""
    from curvhook import selection_tail

    calls = []
    original = selection_tail.SelectionTail.replays

    def replays(self, source_id, at):
        calls.append(original(self, source_id, at))
        return False

    monkeypatch.setattr(selection_tail.SelectionTail, "replays", replays)
    torch.manual_seed(0)
    model = ScoresWithPickedBias().to(DT)
    X, y = _data("scores", 3), torch.randint(0, C, (3,))
    from helpers import check_graph_against_reference

    check_graph_against_reference(model, X, y)
    assert calls == [True]


class _Variant(nn.Module):
    """A picked bias in one of the forms the review found (session 41)."""

    def __init__(self, variant: str) -> None:
        super().__init__()
        self.variant = variant
        self.table = nn.Parameter(torch.randn(5, 2))
        self.scale = nn.Parameter(torch.tensor(0.7))
        self.register_buffer("index", torch.tensor([0, 4, 4, 1, 2, 3, 0, 0, 1, 1, 4, 2, 3, 3, 0, 2]))

    def forward(self, window_size: tuple[int, int]):
        t, v = self.table, self.variant
        if v == "unused_parameter":  # the copies read the table itself; `scale` reaches nothing
            picked = t[self.index]
        elif v == "detached_parameter":
            picked = t[self.index] + self.scale.detach()
        elif v == "half_cast":  # Sᵀ d in float16 would round small d to zero
            u = t * t
            picked = u.to(torch.float16)[self.index].to(u.dtype)
        elif v == "sparse_embedding":
            picked = nn.functional.embedding(self.index, t * self.scale, sparse=True)
        elif v == "sparse_gather":
            picked = torch.gather(t * self.scale, 0, self.index[:, None].expand(-1, 2), sparse_grad=True)
        else:  # "scale_grad_by_freq": its backward divides by the counts, no copy
            picked = nn.functional.embedding(self.index, t * self.scale, scale_grad_by_freq=True)
        return picked.view(*window_size, -1).permute(2, 0, 1).unsqueeze(0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", [
    "unused_parameter", "detached_parameter", "half_cast", "sparse_embedding", "sparse_gather", "scale_grad_by_freq",
])
def test_forms_outside_the_copies_match_the_module_jacobian(variant, dtype, monkeypatch):
    """A parameter the copies do not read gets zeros (it raised a KeyError); a cast to fewer
    digits, a sparse gradient, or gradients divided by the counts end the copies (wrong
    zeros in float16, a crash, another backward than ``Sᵀ``): the result equals the
    module's own Jacobian, the path before the split, up to the dtype's rounding."""
    from curvhook import module_recorder

    def run():
        torch.manual_seed(0)
        model = ScoresWithRelativeBias().to(dtype)
        model.bias = _Variant(variant).to(dtype)
        X, y = torch.randn(3, 2, L, L, dtype=dtype), torch.tensor([0, 1, 1])
        with torch.no_grad():  # small d: float16 would round it to zero
            model.head.weight.mul_(1e-3)
        with extend(model, DiagGGNApprox()):
            nn.CrossEntropyLoss()(model(X), y).backward()
        return [p.diag_ggn_approx for p in model.bias.parameters()]

    got = run()
    monkeypatch.setattr(module_recorder, "find_selection_tail", lambda *args: None)
    expected = run()
    assert any(e.abs().max() > 0 for e in expected)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=rtol, atol=rtol * e.abs().max().item())


class _PassedItsOwnTable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(5, 2))
        self.register_buffer("index", torch.tensor([0, 4, 4, 1, 2, 3, 0, 0, 1, 1, 4, 2, 3, 3, 0, 2]))

    def forward(self, a):
        return torch.tanh(a * self.table)[self.index].view(L, L, -1).permute(2, 0, 1).unsqueeze(0)


class _CallsItWithItsOwnTable(ScoresWithRelativeBias):
    def __init__(self) -> None:
        super().__init__()
        self.bias = _PassedItsOwnTable()

    def forward(self, x):
        s = (x + self.bias(self.bias.table)).softmax(-1)
        return self.head(s[:, :, 0].sum(1))


@pytest.mark.parametrize("extension", [DiagGGN, DiagGGNApprox, BatchJacobian])
def test_a_module_passed_its_own_parameter_is_refused_by_name(extension):
    """``bias(bias.table)``: the rules took the parameter as the attribute and the argument
    apart (the review found BatchJacobian and DiagGGN wrong, DiagGGNApprox half the
    reference); refused with the remedy."""
    from curvhook.errors import UnsupportedModelError

    model = _CallsItWithItsOwnTable().to(DT)
    X, y = _data("scores", 3), torch.tensor([0, 1, 1])
    with pytest.raises(UnsupportedModelError, match=r"'bias' \(_PassedItsOwnTable\) is passed its own parameter 'table'"):
        with extend(model, extension()):
            nn.CrossEntropyLoss()(model(X), y).backward()


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("copy", ["expand", "repeat", "repeat_interleave"])
def test_diag_ggn_approx_of_a_class_token_copied_to_the_batch(copy, n):
    """Each copy of the token is its own sample's: DiagGGNApprox against its definition on the graph."""
    torch.manual_seed(0)
    model = ClassToken(copy).to(DT)
    check_graph_against_reference(model, _data("float", n), torch.arange(n) % C)
