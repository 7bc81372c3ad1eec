"""The batch axis elsewhere than first: ``curvhook/batch_axis.py`` and ``curvhook/rules/batch_axis_view.py``.

PyTorch's default sequence layout is ``[L, N, E]``: models transpose their
embeddings and call ``nn.MultiheadAttention``, ``nn.TransformerEncoder`` and
``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` with ``batch_first=False``. Every model here
does, and all four extensions are checked against the torch.func reference
(DiagGGNApprox against ``graph_reference`` with the batch axes it finds itself).
Also: where :func:`output_batch_axes` puts the batch axis for every operation it
knows (checked by perturbing one sample at a time), the same results as the
``batch_first=True`` model, the rules that serve the batch-first views, and the
refusals.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from curvhook import UnsupportedModelError, extend
from curvhook.extensions import BatchJacobian, DiagGGN, DiagGGNApprox
from curvhook.batch_axis import output_batch_axes
from curvhook.rules import fallback
from helpers import DT, check_graph_against_reference, close, run_curvhook

E, L, C = 4, 5, 3


class Sequence(nn.Module):
    """Features ``[N, L, F]`` (or ids ``[N, L]``) → ``[L, N, E]`` → a sequence module → a head.

    Args:
        body: ``"mha"``, ``"mha_mask"``, ``"encoder1"``, ``"encoder2"``, ``"lstm"``,
            ``"gru"``, ``"rnn"``, ``"positionwise"``, ``"embedding_lstm"`` (ids transposed
            before the lookup), ``"lstm_on_input"`` (the model input transposed),
            ``"decoder"`` (``nn.TransformerDecoder``, memory from the first three positions).
        head: ``"last"`` (``h[-1]``), ``"mean"`` (``h.mean(0)``) or ``"back"``
            (``h.transpose(0, 1)`` flattened).
    """

    def __init__(self, body: str, head: str):
        super().__init__()
        self.body, self.head_kind = body, head
        self.inp = nn.Embedding(7, E) if body == "embedding_lstm" else nn.Linear(3, E)
        if body.startswith("mha"):
            self.seq = nn.MultiheadAttention(E, 2)
        elif body.startswith("encoder"):
            layer = nn.TransformerEncoderLayer(E, 2, dim_feedforward=6, dropout=0.0, norm_first=body == "encoder1")
            self.seq = nn.TransformerEncoder(layer, int(body[-1]), enable_nested_tensor=False)
        elif body in ("lstm", "embedding_lstm"):
            self.seq = nn.LSTM(E, 4)
        elif body == "decoder":
            layer = nn.TransformerDecoderLayer(E, 2, dim_feedforward=6, dropout=0.0)
            self.seq = nn.TransformerDecoder(layer, 1)
        elif body == "lstm_on_input":
            self.seq = nn.LSTM(3, 4, num_layers=2)
        elif body == "gru":
            self.seq = nn.GRU(E, 3, num_layers=2, bidirectional=True)
        elif body == "rnn":
            self.seq = nn.RNN(E, 4)
        else:  # positionwise
            self.seq = nn.Sequential(nn.LayerNorm(E), nn.Linear(E, 4), nn.GELU(), nn.Dropout(0.0), nn.ReLU(), nn.RMSNorm(4))
        self.head = nn.LazyLinear(C)

    def forward(self, x):
        if self.body == "lstm_on_input":  # a constant [L, N, F]: the tape follows its batch axis
            h = self.seq(x.transpose(0, 1))[0]
        elif self.body == "embedding_lstm":
            h = self.seq(self.inp(x.t()))[0]  # ids [L, N]
        else:
            h = self.inp(x).transpose(0, 1)  # [L, N, E]: the batch axis second
        if self.body in ("lstm_on_input", "embedding_lstm"):
            pass
        elif self.body == "mha":
            h = self.seq(h, h, h)[0]
        elif self.body == "mha_mask":
            causal = torch.triu(torch.full((L, L), float("-inf"), dtype=h.dtype), 1)
            h = self.seq(h, h, h, attn_mask=causal, need_weights=False)[0]
        elif self.body == "decoder":  # cross-attention: query [L, N, E], memory [3, N, E]
            h = self.seq(h, self.inp(x[:, :3]).transpose(0, 1))
        elif self.body in ("lstm", "gru", "rnn"):
            h = self.seq(h)[0]
        else:
            h = self.seq(h)
        if self.head_kind == "last":
            return self.head(h[-1])
        if self.head_kind == "mean":
            return self.head(h.mean(0))
        return self.head(h.transpose(0, 1).flatten(1))


CASES = {
    "mha_mean": ("mha", "mean"),
    "mha_causal_back": ("mha_mask", "back"),
    "encoder_one_layer_norm_first_mean": ("encoder1", "mean"),
    "encoder_two_layers_back": ("encoder2", "back"),
    "lstm_last": ("lstm", "last"),
    "gru_two_layers_bidirectional_mean": ("gru", "mean"),
    "rnn_back": ("rnn", "back"),
    "positionwise_modules_last": ("positionwise", "last"),
    "embedding_lstm_last": ("embedding_lstm", "last"),
    "lstm_two_layers_on_the_transposed_input_mean": ("lstm_on_input", "mean"),
    "decoder_back": ("decoder", "back"),
}


def _data(body: str, n: int):
    X = torch.randint(0, 7, (n, L)) if body == "embedding_lstm" else torch.randn(n, L, 3, dtype=DT)
    return X, torch.randint(0, C, (n,))


def _model(body: str, head: str, n: int) -> nn.Module:
    model = Sequence(body, head).to(DT).eval()
    model(_data(body, n)[0])  # materialize the LazyLinear head
    return model


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_batch_axis_second_inside_the_model(case, n):
    """All four extensions exact where the model runs ``[L, N, E]`` between transposes."""
    body, head = CASES[case]
    model = _model(body, head, n)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule")  # torch.func on attention
        check_graph_against_reference(model, *_data(body, n), moved_axes=True)


class TimmAttention(nn.Module):
    """timm's ViT attention: ``qkv.reshape(B, L, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)``."""

    def __init__(self, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj, self.head = nn.Linear(E, 3 * E), nn.Linear(E, E), nn.Linear(L * E, C)

    def forward(self, x):
        b, length, e = x.shape
        qkv = self.qkv(x).reshape(b, length, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, H, L, d] each: the batch axis first again
        attn = ((q @ k.transpose(-2, -1)) * (e // self.heads) ** -0.5).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(b, length, e)
        return self.head(self.proj(out).flatten(1))


@pytest.mark.parametrize("n", [1, 3])
def test_timm_attention_moves_the_batch_axis_and_back(n):
    model = TimmAttention().to(DT)
    X, y = torch.randn(n, L, E, dtype=DT), torch.randint(0, C, (n,))
    check_graph_against_reference(model, X, y, moved_axes=True)


class TimmFusedAttention(TimmAttention):
    """timm's ViT attention with ``fused_attn`` (the default): ``F.scaled_dot_product_attention``."""

    def forward(self, x):
        b, length, e = x.shape
        qkv = self.qkv(x).reshape(b, length, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, length, e)
        return self.head(self.proj(out).flatten(1))


@pytest.mark.parametrize("n", [1, 3])
def test_timm_attention_diagonal_takes_no_torch_func(n, monkeypatch):
    """DiagGGNApprox through ``permute`` and ``unbind`` with the batch axis moved: one column,
    pulled back by autograd on a replay of the operation (torch.func's ``vjp`` and ``vmap``
    took 0.3 and 0.75 ms of each block of a timm ViT); exact on the graph."""
    from curvhook.rules import tensor_ops

    def refuse(*args, **kwargs):
        raise AssertionError("torch.func used")

    torch.manual_seed(0)
    model = TimmFusedAttention().to(DT)
    X, y = torch.randn(n, L, E, dtype=DT), torch.randint(0, C, (n,))
    for name in ("vjp", "vmap", "jacrev"):
        monkeypatch.setattr(tensor_ops, name, refuse)
    with extend(model, DiagGGNApprox()):
        nn.CrossEntropyLoss()(model(X), y).backward()
    got = torch.cat([p.diag_ggn_approx.flatten() for p in model.parameters()])
    monkeypatch.undo()
    check_graph_against_reference(model, X, y, moved_axes=True)
    with extend(model, DiagGGNApprox()):
        nn.CrossEntropyLoss()(model(X), y).backward()
    torch.testing.assert_close(got, torch.cat([p.diag_ggn_approx.flatten() for p in model.parameters()]), rtol=1e-13, atol=0)


def _batch_first_twin(model: Sequence) -> nn.Module:
    """The same weights with ``batch_first=True`` and no transposes."""

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = model.inp  # parameters in the order of ``model``'s
            self.seq = nn.MultiheadAttention(E, 2, batch_first=True) if model.body == "mha" else nn.LSTM(E, 4, batch_first=True)
            self.seq.load_state_dict(model.seq.state_dict())
            self.head = model.head

        def forward(self, x):
            h = self.inp(x)
            h = self.seq(h, h, h)[0] if model.body == "mha" else self.seq(h)[0]
            return self.head(h.mean(1) if model.body == "mha" else h[:, -1])

    return Twin().to(DT).eval()


@pytest.mark.parametrize("body, head", [("mha", "mean"), ("lstm", "last")])
def test_same_results_as_batch_first(body, head):
    """Every extension (DiagGGNApprox with attention split, the default) as with ``batch_first=True``."""
    model = _model(body, head, 3)
    X, y = _data(body, 3)
    loss = lambda out: nn.CrossEntropyLoss()(out, y)  # noqa: E731
    got, matrix, _ = run_curvhook(model, X, loss)
    twin = _batch_first_twin(model)
    want, twin_matrix, _ = run_curvhook(twin, X, loss)
    for key in want:
        close(got[key], want[key])
    close(matrix, twin_matrix)


@pytest.mark.parametrize("body", ["lstm", "gru", "positionwise"])
def test_their_own_rules_serve_the_batch_first_views(monkeypatch, body):
    """The recurrent, linear and normalization rules run on the views: no torch.func fallback."""

    def refuse(*args, **kwargs):
        raise AssertionError("the torch.func fallback was used")

    for method in ("jac_t_mat_prod", "param_jac_t_mat_prod", "param_sq_sum", "diag_jac_t_diag_jac", "param_diag"):
        monkeypatch.setattr(fallback.FALLBACK, method, refuse)
    monkeypatch.setattr(fallback, "_WARNED", set())
    model = _model(body, "last", 2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no rule")
        X, y = _data(body, 2)
        run_curvhook(model, X, lambda out: nn.CrossEntropyLoss()(out, y))


def test_train_mode_dropout_with_the_batch_axis_second():
    """``nn.Dropout`` on ``[L, N, E]`` in train mode: the mask of this forward pass, moved.

    The reference is autograd on the same forward pass (``torch.func`` would draw
    another mask for a transposed input).
    """

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.drop, self.head = nn.Linear(3, E), nn.Dropout(0.5), nn.Linear(E, C)

        def forward(self, x):
            return self.head(self.drop(self.inp(x).transpose(0, 1)).mean(0))

    model = Net().to(DT).train()
    X, y = torch.randn(3, L, 3, dtype=DT), torch.randint(0, C, (3,))
    with extend(model, BatchJacobian()):
        out = model(X)
        nn.CrossEntropyLoss(reduction="sum")(out, y).backward(retain_graph=True)
    for p in model.parameters():
        rows = [torch.autograd.grad(out[n, c], p, retain_graph=True)[0] for n in range(3) for c in range(C)]
        close(p.batch_jacobian, torch.stack(rows).view(3, C, *p.shape))


# ------------------------------------------------------ output_batch_axes
def _x(axis: int, n: int = 3) -> torch.Tensor:
    """``[2, 4, 5, 6]`` with ``n`` samples inserted at ``axis`` (sizes that tell the axes apart)."""
    shape = [2, 4, 5, 6]
    shape.insert(axis, n)
    return torch.randn(shape, dtype=DT)


# (name, function of x, arguments after x, kwargs, batch axis of x)
OPS = [
    ("permute", lambda x: x.permute(2, 0, 4, 1, 3), (2, 0, 4, 1, 3), {}, 1),
    ("permute", lambda x: x.permute(2, 0, 4, 1, 3), ((2, 0, 4, 1, 3),), {}, 3),
    ("transpose", lambda x: x.transpose(0, 1), (0, 1), {}, 1),
    ("transpose", lambda x: x.transpose(-1, 2), (-1, 2), {}, 4),
    ("swapaxes", lambda x: x.swapaxes(0, 3), (0, 3), {}, 2),
    ("movedim", lambda x: x.movedim(1, 4), (1, 4), {}, 1),
    ("movedim", lambda x: x.movedim((0, 2), (3, 0)), ((0, 2), (3, 0)), {}, 1),
    ("unsqueeze", lambda x: x.unsqueeze(0), (0,), {}, 1),
    ("unsqueeze", lambda x: x.unsqueeze(-1), (-1,), {}, 4),
    ("squeeze", lambda x: x.unsqueeze(0).squeeze(0), (0,), {}, 2),
    ("select", lambda x: x.select(0, 1), (0, 1), {}, 1),
    ("select", lambda x: x.select(3, 0), (3, 0), {}, 1),
    ("reshape", lambda x: x.reshape(2, 3, 20, 6), (2, 3, 20, 6), {}, 1),
    ("view", lambda x: x.view(8, 3, 5, 6), (8, 3, 5, 6), {}, 2),
    ("flatten", lambda x: x.flatten(2), (2,), {}, 1),
    ("unflatten", lambda x: x.unflatten(0, (1, 2)), (0, (1, 2)), {}, 1),
    ("sum", lambda x: x.sum(0), (0,), {}, 1),
    ("sum", lambda x: x.sum((0, 3), keepdim=True), ((0, 3),), {"keepdim": True}, 1),
    ("mean", lambda x: x.mean(-1), (-1,), {}, 2),
    ("split", lambda x: x.split(2, 2), (2, 2), {}, 1),
    ("chunk", lambda x: x.chunk(2, 0), (2, 0), {}, 1),
    ("tensor_split", lambda x: x.tensor_split(3, 4), (3, 4), {}, 1),
    ("unbind", lambda x: x.unbind(0), (), {}, 1),
    ("unbind", lambda x: x.unbind(3), (3,), {}, 1),
    ("relu", torch.relu, (), {}, 2),
    ("softmax", lambda x: x.softmax(-1), (-1,), {}, 1),
    ("__getitem__", lambda x: x[-1], (-1,), {}, 1),
    ("__getitem__", lambda x: x[:, :, 0], ((slice(None), slice(None), 0),), {}, 1),
    ("__getitem__", lambda x: x[..., None, 1:3], ((Ellipsis, None, slice(1, 3)),), {}, 1),
    ("__getitem__", lambda x: x[None, 0], ((None, 0),), {}, 2),
]


def _moved_by_sample(fn, x: torch.Tensor, axis: int) -> list[int]:
    """Per output, the axis along which changing one sample of ``x`` changes one slice only."""
    outs = fn(x)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    found = []
    for j, out in enumerate(outs):
        candidates = [a for a, s in enumerate(out.shape) if s == x.shape[axis]]
        for a in candidates:
            ok = True
            for i in range(x.shape[axis]):
                x2 = x.clone()
                x2.select(axis, i).add_(1.0)
                out2 = fn(x2)
                changed = ((out2[j] if isinstance(out2, (tuple, list)) else out2) != out).movedim(a, 0)
                ok &= not changed[torch.arange(changed.shape[0]) != i].any().item()
            if ok:
                found.append(a)
                break
    return found


@pytest.mark.parametrize("index", range(len(OPS)))
def test_output_batch_axes(index):
    """Where :func:`output_batch_axes` says the batch axis goes: where one sample's changes go."""
    name, fn, rest, kwargs, axis = OPS[index]
    x = _x(axis)
    outs = fn(x)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    got = output_batch_axes(name, (x, *rest), kwargs, axis, x.dim(), [o.shape for o in outs], x.shape)
    assert got is not None
    assert list(got) == _moved_by_sample(fn, x, axis)


@pytest.mark.parametrize(
    "name, rest, kwargs",
    [
        ("sum", (1,), {}),  # a sum over the samples
        ("mean", ((0, 1),), {}),
        ("select", (1, 0), {}),  # one sample
        ("split", (1, 1), {}),
        ("unbind", (1,), {}),
        ("__getitem__", ((slice(None), 0),), {}),
        ("__getitem__", ((slice(None), slice(0, 2)),), {}),
        ("__getitem__", ((slice(None), torch.tensor([0, 1])),), {}),  # tensor indices: not followed
        ("cumsum", (0,), {}),  # not known
    ],
)
def test_output_batch_axes_refuses_operations_along_the_batch_axis(name, rest, kwargs):
    x = _x(1)
    assert output_batch_axes(name, (x, *rest), kwargs, 1, x.dim(), [x.shape], x.shape) is None


# ------------------------------------------------------------ refusals
class Refused(nn.Module):
    """Inputs ``[3, 3, 3]`` (``N = L = 3``), so that wrong axes still give shapes a loss takes."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.inp = nn.Linear(3, E)
        self.conv = nn.Conv1d(3, 3, 1)  # [L, N, E] read as [batch L, channels N, length E]
        self.mha_first = nn.MultiheadAttention(E, 2, batch_first=True)
        self.lstm = nn.LSTM(E, 4)
        self.head = nn.LazyLinear(C)

    def forward(self, x):
        h = self.inp(x)
        if self.kind == "lstm_batch_first_input":  # batch_first=False given [N, L, E]
            return self.head(self.lstm(h)[0][:, -1])
        h = h.transpose(0, 1)  # [L, N, E]
        if self.kind == "sum_over_samples":
            return self.head(h.sum(1))
        if self.kind == "conv":
            return self.head(self.conv(h).transpose(0, 1).flatten(1))
        if self.kind == "mha_batch_first":
            return self.head(self.mha_first(h, h, h)[0].mean(0))
        return self.head(h)  # the output keeps the batch axis second


@pytest.mark.parametrize(
    "kind, message",
    [
        ("sum_over_samples", "sum .*batch axis is not first \\(axis 1\\)"),
        ("conv", "'conv' \\(Conv1d\\) gets an input whose batch axis is axis 1"),
        ("mha_batch_first", "'mha_first' \\(MultiheadAttention\\) .*batch_first=True"),
        ("lstm_batch_first_input", "'lstm' \\(LSTM\\) gets an input whose batch axis is axis 0.*batch_first=False"),
        ("output_axis_second", "model output's batch axis is axis 1"),
    ],
)
def test_refused_with_a_clear_error(kind, message):
    model = Refused(kind).to(DT)
    X, y = torch.randn(3, 3, 3, dtype=DT), torch.randint(0, C, (3,))
    model(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UnsupportedModelError, match=message):
            with extend(model, DiagGGN()):
                out = model(X)
                nn.CrossEntropyLoss()(out.reshape(-1, C), y.repeat(out.numel() // (3 * C))).backward()


def test_linear_acting_on_the_batch_axis_is_refused():
    """A position-wise module whose trailing axes include the batch axis mixes samples."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.mix, self.head = nn.Linear(3, E), nn.Linear(3, 3), nn.Linear(E, C)

        def forward(self, x):
            h = self.inp(x).permute(1, 2, 0)  # [L, E, N]: the batch axis last
            return self.head(self.mix(h).permute(2, 0, 1).mean(1))

    model = Net().to(DT)
    X, y = torch.randn(3, L, 3, dtype=DT), torch.randint(0, C, (3,))
    with pytest.raises(UnsupportedModelError, match="'mix' \\(Linear\\).*acts on its last 1 axes"):
        with extend(model, DiagGGN()):
            nn.CrossEntropyLoss()(model(X), y).backward()


class StackedHeads(nn.Module):
    """timm's CrossViT: one head per branch, ``mean(stack(heads, dim=0), dim=0)`` (the batch axis
    second in between); ``cat`` along the features of tensors whose batch axis is second."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.a, self.b = nn.Linear(E, 6), nn.Linear(E, 6)
        self.heads = nn.ModuleList([nn.Linear(6, C), nn.Linear(6, C)])
        self.joint = nn.Linear(12, C)

    def forward(self, x):  # [N, E]
        xs = [torch.tanh(self.a(x)), torch.tanh(self.b(x))]
        if self.form == "stack_then_mean":
            return torch.mean(torch.stack([h(xs[i]) for i, h in enumerate(self.heads)], dim=0), dim=0)
        moved = [t.unsqueeze(0) for t in xs]  # [1, N, 6]: the batch axis second
        return self.joint(torch.cat(moved, dim=-1)[0])


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("form", ["stack_then_mean", "cat_along_features"])
def test_stack_and_cat_follow_the_batch_axis(form, n, monkeypatch):
    """Before: *the operation mean mixes samples* (timm's crossvit_tiny_240 refused)."""
    from curvhook.rules import tensor_ops

    def dense(call):
        raise AssertionError(f"{call.name}: dense per-sample Jacobian")

    monkeypatch.setattr(tensor_ops, "_warn_dense_once", dense)
    torch.manual_seed(0)
    model = StackedHeads(form).to(DT)
    X, y = torch.randn(n, E, dtype=DT), torch.arange(n) % C
    check_graph_against_reference(model, X, y, moved_axes=True)


def test_stack_along_the_batch_axis_and_a_mean_over_it_is_refused():
    """``stack(dim=1)`` of ``[N, F]`` tensors keeps the batch axis first; ``mean(dim=0)`` then
    averages the samples: refused, not followed."""
    class MeanOverSamples(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(E, C)

        def forward(self, x):
            h = self.a(x)
            return torch.stack([h, h * 2], dim=1).mean(0).expand(x.shape[0], -1, -1)[:, 0]

    model = MeanOverSamples().to(DT)
    with pytest.raises(UnsupportedModelError, match="mixes samples"):
        with extend(model, DiagGGN()):
            nn.CrossEntropyLoss()(model(torch.randn(3, E, dtype=DT)), torch.arange(3) % C).backward()
