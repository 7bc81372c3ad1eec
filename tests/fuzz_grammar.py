"""A grammar of supported models for the random-architecture test (``test_fuzz.py``).

A :class:`Case` is plain data (what hypothesis draws, shrinks and prints): the
input family, a list of steps, the head, the operation after the model, the
loss and the batch size, and a seed for the weights and the data. :func:`build`
turns it into a float64 model, an input and a loss; :func:`check_case` runs
every extension on it and compares with the torch.func references of
``reference.py`` and ``graph_reference.py``. Every construct the grammar draws
is one docs/supported.md lists as supported, so any :class:`FuzzFailure` is a
bug; its ``kind`` says which sort (see :data:`KINDS`).

Tensor states (the batch axis ``N`` first, left out of ``State.shape``):

- ``vec`` ``[N, F]``, ``seq`` ``[N, T, F]`` (Linear and friends act on the last axis);
- ``img1`` ``[N, C, L]``, ``img2`` ``[N, C, H, W]`` (convolutions, pooling, norms);
- ``ids`` ``[N, T]`` integer input: the first step is an ``nn.Embedding``.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import Tensor, nn

from curvhook.errors import CurvhookError
from graph_reference import diag_ggn_approx_graph
from helpers import Chain, assert_clean, randomize_layers, run_curvhook, snapshot
from reference import bce_with_logits_hessian, check, compare, cross_entropy_hessian, reference

DT = torch.float64
VOCAB = 5
FAMILIES = ("vec", "seq", "ids", "img1", "img2")
KINDS = ("refusal", "wrong number", "crash", "grad changed", "hooks left", "reference")
LOSSES = ("ce", "mse", "bce")
POSTS = ("none", "2tanh", "affine")


class FuzzFailure(AssertionError):
    """A failed example; ``kind`` is one of :data:`KINDS` (``reference``: the test's own references failed)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"[{kind}] {message}")
        self.kind = kind


@dataclass(frozen=True)
class State:
    """A tensor's family and its shape without the batch axis."""

    kind: str
    shape: tuple[int, ...]


@dataclass
class Case:
    """One drawn example (plain data, so that hypothesis prints a readable repro)."""

    family: str
    in_shape: tuple[int, ...]
    steps: list[tuple[str, dict]]
    head: str  # "linear" or "custom_leaf" (a module without children or rule)
    wrapper: str  # "sequential", "custom" (a container with its own forward) or "bare" (the head alone)
    post: str  # the operation between the model and the loss
    loss: str
    reduction: str
    n: int
    classes: int
    split_attention: bool = False  # DiagGGNApprox's option
    pre: str = "none"  # a parameter of the custom root container on the raw input: "scale" (x * s), "matmul" (x @ w)
    seed: int = 0


# ------------------------------------------------------------------ modules
class Residual(nn.Module):
    """``x + f(x)``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return x + self.inner(x)


class SplitCat(nn.Module):
    """``a, b = split(lin(x), dim)``; ``cat([act(a), b], dim)`` (``[N, *, 2k]`` → ``[N, *, 2k]``)."""

    def __init__(self, lin: nn.Module, act: nn.Module, how: str, dim: int) -> None:
        super().__init__()
        self.lin, self.act, self.how, self.dim = lin, act, how, dim

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(x)
        a, b = h.chunk(2, self.dim) if self.how == "chunk" else h.split(h.shape[self.dim] // 2, self.dim)
        return torch.cat([self.act(a), b], self.dim)


class CatChannels(nn.Module):
    """``cat([x, act(conv(x))], 1)``: the channels of ``[N, C, *]`` grow by the convolution's."""

    def __init__(self, conv: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.conv, self.act = conv, act

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.act(self.conv(x))], 1)


class ScaleParam(nn.Module):
    """A container parameter times the activation: ``inner(x * scale)`` or ``inner(x) * scale``."""

    def __init__(self, inner: nn.Module, shape: tuple[int, ...], before: bool) -> None:
        super().__init__()
        self.inner, self.before = inner, before
        self.scale = nn.Parameter(1.0 + 0.5 * torch.randn(shape, dtype=DT))

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x * self.scale) if self.before else self.inner(x) * self.scale


class MatmulParam(nn.Module):
    """``act(x @ w)`` with ``w`` ``[F, out]`` a parameter of this container."""

    def __init__(self, act: nn.Module, f_in: int, f_out: int) -> None:
        super().__init__()
        self.act = act
        self.w = nn.Parameter(torch.randn(f_in, f_out, dtype=DT) / f_in**0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x @ self.w)


class Shared(nn.Module):
    """Weight sharing: ``lin(act(lin(x)))``, the same ``Linear(F, F)`` called twice."""

    def __init__(self, lin: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.lin, self.act = lin, act

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(self.act(self.lin(x)))


class CustomLeaf(nn.Module):
    """A module without children and without a rule: ``tanh(x Wᵀ)`` (the torch.func fallback)."""

    def __init__(self, f_in: int, f_out: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(f_out, f_in, dtype=DT) / f_in**0.5)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(F.linear(x, self.w))

    def extra_repr(self) -> str:
        return f"{self.w.shape[1]} -> {self.w.shape[0]}"


class SelfAttention(nn.Module):
    """``mha(x, x, x)[0]`` with ``batch_first=True`` (``[N, T, E]`` → ``[N, T, E]``)."""

    def __init__(self, mha: nn.MultiheadAttention, causal: bool) -> None:
        super().__init__()
        self.mha, self.causal = mha, causal

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        mask = torch.ones(t, t, dtype=torch.bool).triu(1) if self.causal else None
        return self.mha(x, x, x, attn_mask=mask, need_weights=False)[0]


class SDPA(nn.Module):
    """``F.scaled_dot_product_attention`` on projections of ``[N, T, F]``, ``heads`` heads.

    ``by_hand``: the same attention written out as its operations (the twin that
    ``graph_reference`` differentiates: curvhook's DiagGGNApprox splits the call so).
    """

    def __init__(self, f: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.qkv, self.heads, self.causal, self.by_hand = nn.Linear(f, 3 * f), heads, causal, False

    def forward(self, x: Tensor) -> Tensor:
        n, t, f = x.shape
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, f // self.heads)).permute(2, 0, 3, 1, 4).unbind(0)
        if self.by_hand:
            s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # [N, h, T, T]
            if self.causal:
                s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
            o = s.softmax(-1) @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return o.transpose(1, 2).flatten(2)


class ActMatmul(nn.Module):
    """A product of two activations: ``tanh(a bᵀ) b`` with ``a, b`` projections of ``[N, T, F]``."""

    def __init__(self, f: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(f, f), nn.Linear(f, f)

    def forward(self, x: Tensor) -> Tensor:
        b = self.b(x)
        return torch.matmul(torch.tanh(self.a(x) @ b.transpose(-1, -2)), b)


TENSOR_OPS: dict[str, Callable[[Tensor], Tensor]] = {
    "mean1": lambda x: x.mean(1),  # [N, T, F] → [N, F]
    "first": lambda x: x[:, 0],  # [N, T, F] → [N, F]
    "transpose12": lambda x: x.transpose(1, 2),  # [N, T, F] ↔ [N, F, T]
    "affine": lambda x: 2 * x - 1,
}


class Lambda(nn.Module):
    """A tensor operation as a leaf module without a rule (in ``nn.Sequential``: the fallback)."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op

    def forward(self, x: Tensor) -> Tensor:
        return TENSOR_OPS[self.op](x)

    def extra_repr(self) -> str:
        return self.op


class Net(nn.Module):
    """A custom container with its own ``forward``: modules and tensor operations in turn.

    ``Lambda`` steps run as tensor operations in this ``forward`` (not as modules).
    ``pre``: first a parameter of this container of shape ``pre_shape`` meets the raw input,
    ``x * self.scale.to(x.dtype)`` (``[F]``, or ``[C, 1, ...]`` for images; the cast returns the
    parameter itself, which a record counted twice) or ``x @ self.w`` (``[F, F]``).
    """

    def __init__(self, steps: list[nn.Module], pre: str = "none", pre_shape: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.pre = pre
        if pre == "scale":
            self.scale = nn.Parameter(1.0 + 0.5 * torch.randn(pre_shape, dtype=DT))
        elif pre == "matmul":
            self.w = nn.Parameter(torch.randn(pre_shape, dtype=DT) / pre_shape[0] ** 0.5)
        self.layers = nn.ModuleList([s for s in steps if not isinstance(s, Lambda)])
        self.plan: list[tuple[str, Any]] = []
        j = 0
        for s in steps:
            if isinstance(s, Lambda):
                self.plan.append(("op", s.op))
            else:
                self.plan.append(("module", j))
                j += 1

    def forward(self, x: Tensor) -> Tensor:
        if self.pre == "scale":
            x = x * self.scale.to(x.dtype)  # returns the parameter itself: no operation
        elif self.pre == "matmul":
            x = x @ self.w
        for kind, what in self.plan:
            x = TENSOR_OPS[what](x) if kind == "op" else self.layers[what](x)
        return x


# ------------------------------------------------------------------ the grammar
ACTIVATIONS = ("Tanh", "ReLU", "GELU", "SiLU", "Sigmoid", "LeakyReLU", "ELU", "Softplus", "Hardswish", "Hardtanh", "Mish")
IN_PLACE = ("ReLU", "LeakyReLU", "ELU", "SiLU", "Hardswish", "Hardtanh", "Mish")
# Steps after which an in-place activation is valid PyTorch: their output is a new tensor (not the
# model input or a view of it) that autograd has not saved (Tanh, Sigmoid, ... save their output).
SAFE_FOR_IN_PLACE = (
    "linear", "conv", "layernorm", "rmsnorm", "groupnorm", "batchnorm", "pool", "gap", "residual", "split_cat",
    "cat_channels", "scale_param", "shared", "mha", "sdpa", "act_matmul", "to_seq", "op_mean1", "op_affine",
)


def activation(name: str, inplace: bool = False) -> nn.Module:
    return getattr(nn, name)(inplace=True) if inplace else getattr(nn, name)()


def numel(s: State) -> int:
    return math.prod(s.shape)


def last(s: State) -> int:
    """The axis Linear-like steps act on: features of ``vec``/``seq``, channels of ``img*``."""
    return s.shape[-1] if s.kind in ("vec", "seq") else s.shape[0]


@dataclass
class Block:
    """A step of the grammar.

    ``ok(state, fresh)``: whether it applies (``fresh``: the tensor is a new result, not the
    model input nor a view of one, so an in-place activation may overwrite it);
    ``draw(draw, state)``: its options; ``out(state, kw)``: the new state;
    ``make(state, kw)``: the module (``Lambda`` for a tensor operation).
    """

    ok: Callable[[State, bool], bool]
    draw: Callable[[Any, State], dict]
    out: Callable[[State, dict], State]
    make: Callable[[State, dict], nn.Module]


def _same(s: State, kw: dict) -> State:
    return s


def _none(draw, s: State) -> dict:
    return {}


def _features(s: State, f: int) -> State:
    return State(s.kind, (*s.shape[:-1], f))


def _channels(s: State, c: int) -> State:
    return State(s.kind, (c, *s.shape[1:]))


def _conv_out(s: State, kw: dict) -> State:
    spatial = tuple(d + 2 * kw["padding"] - kw["k"] + 1 for d in s.shape[1:])
    return State(s.kind, (kw["out"], *spatial))


def _draw_conv(draw, s: State) -> dict:
    k = draw(st.integers(1, min(3, min(s.shape[1:]) + 2)))
    padding = draw(st.sampled_from(sorted({0, k // 2})))
    if any(d + 2 * padding - k + 1 < 1 for d in s.shape[1:]):
        padding = k // 2 if all(d + 2 * (k // 2) - k + 1 >= 1 for d in s.shape[1:]) else 0
        k = 1 if any(d + 2 * padding - k + 1 < 1 for d in s.shape[1:]) else k
    return {"out": draw(st.integers(1, 3)), "k": k, "padding": padding}


def _conv(s: State, c_out: int, k: int = 1, padding: int = 0) -> nn.Module:
    return (nn.Conv1d if s.kind == "img1" else nn.Conv2d)(s.shape[0], c_out, k, padding=padding)


def _pool(s: State, kw: dict) -> nn.Module:
    dims = "1d" if s.kind == "img1" else "2d"
    return getattr(nn, f"{kw['how']}Pool{dims}")(2)


def _draw_act(draw, s: State) -> dict:
    return {"name": draw(st.sampled_from(ACTIVATIONS)), "inplace": draw(st.booleans())}


def _groups(s: State) -> list[int]:
    """Group counts of ``GroupNorm`` on ``[N, C, *]``: dividing ``C``, more than one value per group."""
    return [g for g in (1, 2, 3) if s.shape[0] % g == 0 and numel(s) // g > 1]


SEQLIKE = ("vec", "seq")
IMG = ("img1", "img2")

BLOCKS: dict[str, Block] = {
    "linear": Block(
        lambda s, fresh: s.kind in SEQLIKE,
        lambda draw, s: {"out": draw(st.integers(2, 4)), "bias": draw(st.booleans())},
        lambda s, kw: _features(s, kw["out"]),
        lambda s, kw: nn.Linear(s.shape[-1], kw["out"], bias=kw["bias"]),
    ),
    "act": Block(
        lambda s, fresh: True,
        _draw_act,
        _same,
        lambda s, kw: activation(kw["name"], kw["inplace"]),
    ),
    "conv": Block(
        lambda s, fresh: s.kind in IMG,
        _draw_conv,
        _conv_out,
        lambda s, kw: _conv(s, kw["out"], kw["k"], kw["padding"]),
    ),
    "layernorm": Block(
        lambda s, fresh: s.kind in SEQLIKE,
        lambda draw, s: {"affine": draw(st.booleans())},
        _same,
        lambda s, kw: nn.LayerNorm(s.shape[-1], elementwise_affine=kw["affine"]),
    ),
    "rmsnorm": Block(
        lambda s, fresh: s.kind in SEQLIKE and hasattr(nn, "RMSNorm"),
        _none,
        _same,
        lambda s, kw: nn.RMSNorm(s.shape[-1]),
    ),
    "groupnorm": Block(
        lambda s, fresh: s.kind in IMG and bool(_groups(s)),
        lambda draw, s: {"groups": draw(st.sampled_from(_groups(s)))},
        _same,
        lambda s, kw: nn.GroupNorm(kw["groups"], s.shape[0]),
    ),
    "batchnorm": Block(
        lambda s, fresh: s.kind in IMG,
        _none,
        _same,
        lambda s, kw: (nn.BatchNorm1d if s.kind == "img1" else nn.BatchNorm2d)(s.shape[0]),
    ),
    "pool": Block(
        lambda s, fresh: s.kind in IMG and min(s.shape[1:]) >= 2,
        lambda draw, s: {"how": draw(st.sampled_from(("Max", "Avg")))},
        lambda s, kw: State(s.kind, (s.shape[0], *(d // 2 for d in s.shape[1:]))),
        _pool,
    ),
    "gap": Block(
        lambda s, fresh: s.kind == "img2",
        _none,
        lambda s, kw: State("img2", (s.shape[0], 1, 1)),
        lambda s, kw: nn.AdaptiveAvgPool2d(1),
    ),
    "dropout": Block(lambda s, fresh: True, _none, _same, lambda s, kw: nn.Dropout(0.3)),
    "flatten": Block(
        lambda s, fresh: s.kind != "vec",
        _none,
        lambda s, kw: State("vec", (numel(s),)),
        lambda s, kw: nn.Flatten(),
    ),
    "residual": Block(
        lambda s, fresh: True,
        _draw_act,
        _same,
        lambda s, kw: Residual(
            nn.Sequential(
                nn.Linear(s.shape[-1], s.shape[-1]) if s.kind in SEQLIKE else _conv(s, s.shape[0], 1),
                activation(kw["name"], kw["inplace"] and kw["name"] in IN_PLACE),
            )
        ),
    ),
    "split_cat": Block(
        lambda s, fresh: s.kind in SEQLIKE,
        lambda draw, s: {"half": draw(st.integers(1, 2)), "how": draw(st.sampled_from(("split", "chunk"))), **_draw_act(draw, s)},
        lambda s, kw: _features(s, 2 * kw["half"]),
        lambda s, kw: SplitCat(nn.Linear(s.shape[-1], 2 * kw["half"]), activation(kw["name"]), kw["how"], -1),
    ),
    "cat_channels": Block(
        lambda s, fresh: s.kind in IMG and s.shape[0] <= 3,
        lambda draw, s: {"out": draw(st.integers(1, 2)), **_draw_act(draw, s)},
        lambda s, kw: _channels(s, s.shape[0] + kw["out"]),
        lambda s, kw: CatChannels(_conv(s, kw["out"]), activation(kw["name"], kw["inplace"] and kw["name"] in IN_PLACE)),
    ),
    "scale_param": Block(
        lambda s, fresh: True,
        lambda draw, s: {"before": draw(st.booleans())},
        _same,
        lambda s, kw: ScaleParam(
            nn.Linear(s.shape[-1], s.shape[-1]) if s.kind in SEQLIKE else _conv(s, s.shape[0]),
            (s.shape[-1],) if s.kind in SEQLIKE else (s.shape[0], *[1] * (len(s.shape) - 1)),
            kw["before"],
        ),
    ),
    "matmul_param": Block(
        lambda s, fresh: s.kind in SEQLIKE,
        lambda draw, s: {"out": draw(st.integers(2, 4)), "name": draw(st.sampled_from(ACTIVATIONS))},
        lambda s, kw: _features(s, kw["out"]),
        lambda s, kw: MatmulParam(activation(kw["name"]), s.shape[-1], kw["out"]),
    ),
    "shared": Block(
        lambda s, fresh: s.kind in SEQLIKE,
        lambda draw, s: {"name": draw(st.sampled_from(ACTIVATIONS))},
        _same,
        lambda s, kw: Shared(nn.Linear(s.shape[-1], s.shape[-1]), activation(kw["name"])),
    ),
    "custom_leaf": Block(
        lambda s, fresh: s.kind in SEQLIKE,
        lambda draw, s: {"out": draw(st.integers(2, 4))},
        lambda s, kw: _features(s, kw["out"]),
        lambda s, kw: CustomLeaf(s.shape[-1], kw["out"]),
    ),
    "mha": Block(
        lambda s, fresh: s.kind == "seq",
        lambda draw, s: {
            "heads": draw(st.sampled_from([h for h in (1, 2) if s.shape[-1] % h == 0])),
            "bias": draw(st.booleans()),
            "causal": draw(st.booleans()),
        },
        _same,
        lambda s, kw: SelfAttention(
            nn.MultiheadAttention(s.shape[-1], kw["heads"], bias=kw["bias"], batch_first=True), kw["causal"]
        ),
    ),
    "sdpa": Block(
        lambda s, fresh: s.kind == "seq",
        lambda draw, s: {
            "heads": draw(st.sampled_from([h for h in (1, 2) if s.shape[-1] % h == 0])),
            "causal": draw(st.booleans()),
        },
        _same,
        lambda s, kw: SDPA(s.shape[-1], kw["heads"], kw["causal"]),
    ),
    "act_matmul": Block(lambda s, fresh: s.kind == "seq", _none, _same, lambda s, kw: ActMatmul(s.shape[-1])),
    "to_seq": Block(
        lambda s, fresh: s.kind == "vec",
        lambda draw, s: {"t": draw(st.integers(1, 3)), "f": draw(st.integers(2, 3))},
        lambda s, kw: State("seq", (kw["t"], kw["f"])),
        lambda s, kw: nn.Sequential(nn.Linear(s.shape[-1], kw["t"] * kw["f"]), nn.Unflatten(1, (kw["t"], kw["f"]))),
    ),
    "op_mean1": Block(
        lambda s, fresh: s.kind == "seq", _none, lambda s, kw: State("vec", s.shape[1:]), lambda s, kw: Lambda("mean1")
    ),
    "op_first": Block(
        lambda s, fresh: s.kind == "seq", _none, lambda s, kw: State("vec", s.shape[1:]), lambda s, kw: Lambda("first")
    ),
    "op_transpose12": Block(
        lambda s, fresh: s.kind in ("seq", "img1"),
        _none,
        lambda s, kw: State("img1" if s.kind == "seq" else "seq", (s.shape[1], s.shape[0])),
        lambda s, kw: Lambda("transpose12"),
    ),
    "op_affine": Block(lambda s, fresh: True, _none, _same, lambda s, kw: Lambda("affine")),
}


COMMON = ("linear", "conv", "act")


def _in_shape(draw, family: str) -> tuple[int, ...]:
    if family == "vec":
        return (draw(st.integers(2, 4)),)
    if family in ("seq", "ids"):
        t = draw(st.integers(1, 3))
        return (t, draw(st.integers(2, 4))) if family == "seq" else (t,)
    if family == "img1":
        return (draw(st.integers(1, 3)), draw(st.integers(2, 4)))
    return (draw(st.integers(1, 2)), draw(st.integers(2, 3)), draw(st.integers(2, 3)))


MAX_NUMEL = 24  # keeps the flattened head input, and every example, tiny


@st.composite
def cases(draw, family: Optional[str] = None, max_steps: int = 4) -> Case:
    """A random supported model, input, operation after the model and loss (see the module docstring)."""
    family = family or draw(st.sampled_from(FAMILIES))
    in_shape = _in_shape(draw, family)
    steps: list[tuple[str, dict]] = []
    if family == "ids":
        steps.append(("embedding", {"f": draw(st.integers(2, 4)), "padding_idx": draw(st.sampled_from((None, 0)))}))
        state, fresh = State("seq", (in_shape[0], steps[0][1]["f"])), True
    else:
        state, fresh = State(family, in_shape), False
    states = []  # (in, out) of each step, for reusing a module ("again")
    for _ in range(draw(st.integers(0, max_steps))):
        names = [k for k, b in BLOCKS.items() if b.ok(state, fresh)]
        names += [k for k in COMMON if k in names] * 2  # the layers of most real models, three times as likely
        offset = len(steps) - len(states)  # the embedding of "ids" has no entry in states
        reusable = [
            i for i, (a, b) in enumerate(states)
            if a == b == state and steps[i + offset][0] not in ("act", "dropout", "op_affine", "again")
        ]
        if reusable:
            names.append("again")
        name = draw(st.sampled_from(names))
        if name == "again":
            kw = {"index": draw(st.sampled_from(reusable))}
            new = state
        else:
            kw = BLOCKS[name].draw(draw, state)
            if name == "act":  # in-place only where plain PyTorch allows it
                kw["inplace"] = kw["inplace"] and fresh and kw["name"] in IN_PLACE
            new = BLOCKS[name].out(state, kw)
        if numel(new) > MAX_NUMEL:
            continue
        steps.append((name, kw))
        states.append((state, new))
        fresh = name in SAFE_FOR_IN_PLACE
        state = new
    bare = not steps and family == "vec"
    wrapper = draw(st.sampled_from(("sequential", "custom", "bare") if bare else ("sequential", "custom")))
    pre = "none"
    if wrapper == "custom" and family != "ids":
        pre = draw(st.sampled_from(("none", "scale", "matmul") if family in SEQLIKE else ("none", "scale")))
    head = draw(st.sampled_from(("linear", "linear", "custom_leaf")))
    loss = draw(st.sampled_from(LOSSES))
    return Case(
        family=family,
        in_shape=in_shape,
        steps=steps,
        head=head,
        wrapper=wrapper,
        post=draw(st.sampled_from(POSTS)),
        loss=loss,
        reduction=draw(st.sampled_from(("mean", "sum"))),
        n=draw(st.sampled_from((1, 2, 3, 5))),
        classes=draw(st.integers(2, 3)),
        split_attention=draw(st.booleans()),
        pre=pre,
        seed=draw(st.integers(0, 2**16)),
    )


# ------------------------------------------------------------------ building
POST_OPS: dict[str, Callable[[Tensor], Tensor]] = {
    "none": lambda out: out,
    "2tanh": lambda out: 2 * out.tanh(),
    "affine": lambda out: 0.5 * out + 1.0,
}


def _head(case: Case, state: State) -> list[nn.Module]:
    """``Flatten`` (unless ``[N, F]``) and the layer onto ``case.classes`` outputs."""
    f = numel(state)
    layer = nn.Linear(f, case.classes) if case.head == "linear" else CustomLeaf(f, case.classes)
    return ([] if state.kind == "vec" else [nn.Flatten()]) + [layer]


def _pre_shape(case: Case) -> tuple[int, ...]:
    """The shape of the root container's parameter on the raw input (``Case.pre``)."""
    if case.pre == "matmul":
        return (case.in_shape[-1], case.in_shape[-1])
    if case.family in SEQLIKE:
        return (case.in_shape[-1],)
    return (case.in_shape[0], *[1] * (len(case.in_shape) - 1))


def build_model(case: Case) -> nn.Module:
    """The float64 eval-mode model of ``case`` (weights from ``torch.manual_seed(case.seed)``)."""
    torch.manual_seed(case.seed)
    state = State("seq" if case.family == "ids" else case.family, case.in_shape)
    modules: list[nn.Module] = []
    for name, kw in case.steps:
        if name == "embedding":
            modules.append(nn.Embedding(VOCAB, kw["f"], padding_idx=kw["padding_idx"]))
            state = State("seq", (case.in_shape[0], kw["f"]))
        elif name == "again":  # weight sharing: the same module called once more
            modules.append(modules[kw["index"] + (case.family == "ids")])
        else:
            modules.append(BLOCKS[name].make(state, kw))
            state = BLOCKS[name].out(state, kw)
    modules += _head(case, state)
    if case.wrapper == "bare":
        (model,) = modules
    elif case.wrapper == "custom":
        model = Net(modules, case.pre, _pre_shape(case))
    else:
        model = nn.Sequential(*modules)
    return randomize_layers(model)  # float64, eval mode, norms away from their trivial init


def loss_hessian(case: Case) -> Optional[Callable[[Tensor], Tensor]]:
    """The closed-form loss Hessian for ``reference`` (torch.func's loses digits where the loss saturates)."""
    if case.loss == "ce":
        return lambda out: cross_entropy_hessian(out, case.reduction)
    if case.loss == "bce":
        return lambda out: bce_with_logits_hessian(out, case.reduction)
    return None  # MSE: constant, torch.func's is exact


def build(case: Case) -> tuple[nn.Module, Tensor, Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """``(model, X, post, crit)``: the loss a user backpropagates is ``crit(post(model(X)))``."""
    model = build_model(case)
    gen = torch.Generator().manual_seed(case.seed + 1)
    n, c = case.n, case.classes
    if case.family == "ids":
        X = torch.randint(0, VOCAB, (n, *case.in_shape), generator=gen)
    else:
        X = torch.randn(n, *case.in_shape, generator=gen, dtype=DT)
    if case.loss == "ce":
        y = torch.randint(0, c, (n,), generator=gen)
        crit = nn.CrossEntropyLoss(reduction=case.reduction)
    elif case.loss == "mse":
        y, crit = torch.randn(n, c, generator=gen, dtype=DT), nn.MSELoss(reduction=case.reduction)
    else:
        y, crit = torch.rand(n, c, generator=gen, dtype=DT), nn.BCEWithLogitsLoss(reduction=case.reduction)
    return model, X, POST_OPS[case.post], lambda z: crit(z, y)


def approx_twin(model: nn.Module, split_attention: bool) -> Optional[nn.Module]:
    """The model ``graph_reference`` can differentiate with the same DiagGGNApprox, or ``None``.

    In-place activations become out-of-place (``graph_reference`` replays a module on its
    input, which an in-place module overwrote). With ``split_attention``, curvhook counts
    ``F.scaled_dot_product_attention`` as its operations: the twin writes it out so; it
    also splits ``nn.MultiheadAttention``, which ``graph_reference`` counts as one
    operation (``None``: no reference). Without, both are one operation in both.
    """
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if getattr(m, "inplace", False):
            m.inplace = False
        if isinstance(m, SDPA):
            m.by_hand = split_attention
        if split_attention and isinstance(m, nn.MultiheadAttention):
            return None
    return twin


# ------------------------------------------------------------------ checking
def _plain_grads(model: nn.Module, X: Tensor, loss_fn: Callable[[Tensor], Tensor]) -> list[Optional[Tensor]]:
    model.zero_grad(set_to_none=True)
    loss_fn(model(X)).backward()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def _stage(kind: str, fn: Callable[[], Any]) -> Any:
    """Run one stage; an assertion becomes a ``kind`` failure, a curvhook error a refusal."""
    try:
        return fn()
    except FuzzFailure:
        raise
    except CurvhookError as e:
        raise FuzzFailure("refusal" if kind == "crash" else kind, f"{type(e).__name__}: {e}") from e
    except AssertionError as e:
        raise FuzzFailure(kind, str(e)) from e
    except Exception as e:  # noqa: BLE001 (classified, then re-raised)
        raise FuzzFailure("crash" if kind != "reference" else kind, f"{type(e).__name__}: {e}") from e


def check_case(case: Case) -> None:
    """Every extension on ``case`` against the torch.func references; raises :class:`FuzzFailure`.

    Checks, in order: curvhook runs without error (else ``refusal``/``crash``); no hook or
    attribute is left (``hooks left``); ``p.grad`` equals a plain backward's to 1e-12
    (``grad changed``); DiagGGN, FullGGN, BatchJacobian equal ``J``, ``G = Jᵀ H J`` of
    ``reference.py`` (``G`` of ``post ∘ model``, ``H`` the loss Hessian at ``post(model(X))``;
    BatchJacobian: ``J`` ``[N*C, P]`` of ``model`` alone, docs/graphs.md); BatchGrad equals
    ``J_nᵀ ∂ℓ/∂f_n`` (``J`` of ``model`` alone, ``∂ℓ/∂f`` from autograd at its output);
    NTK equals ``J Jᵀ`` (``J`` of ``model`` alone) and GGNVectorProduct ``G v`` (``G`` as
    FullGGN's; :func:`directions`), both in one block, with ``p.grad`` and hooks checked again;
    DiagGGNApprox is finite, ``≥ 0``, and equals ``graph_reference``'s on :func:`approx_twin`
    where there is one (``moved_axes``: timm-style ``qkv.permute(2, 0, ...)``), and DiagGGN for
    a single ``Linear`` layer (``wrong number``).
    """
    model, X, post, crit = build(case)
    loss_fn = lambda out: crit(post(out))  # noqa: E731
    try:
        plain = _plain_grads(model, X, loss_fn)
    except RuntimeError as e:
        if "modified by an inplace operation" in str(e):
            return  # PyTorch itself cannot differentiate it (an in-place activation on an output autograd saved)
        raise FuzzFailure("reference", f"{type(e).__name__}: {e}") from e
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's "no rule" warning
        got, matrix, _ = _stage("crash", lambda: run_curvhook(model, X, loss_fn, split_attention=case.split_attention))
    _stage("hooks left", lambda: assert_clean(model, before))
    _stage("grad changed", lambda: _same_grads(model, plain))
    # G of post ∘ model (the operations after the model are part of the network, docs/graphs.md)
    ref = _stage("reference", lambda: reference(Chain(model, post), X, crit, approx=False, loss_hessian=loss_hessian(case)))
    exact = {k: got[k] for k in ("DiagGGN", "FullGGN")}
    _stage("wrong number", lambda: compare(exact, ref, matrix, rtol=1e-7))
    # BatchJacobian stays the Jacobian of the model output
    jac = ref if case.post == "none" else _stage("reference", lambda: reference(model, X, None, approx=False))
    _stage("wrong number", lambda: compare({"BatchJacobian": got["BatchJacobian"]}, jac, rtol=1e-7))
    # BatchGrad (one column through the whole graph) against J_nᵀ ∂ℓ/∂f_n: the model's own
    # Jacobian and the gradient autograd delivers at its output
    grads = _stage("crash", lambda: _batch_grads(model, X, loss_fn))
    _stage("hooks left", lambda: assert_clean(model, before))
    g_out = _stage("reference", lambda: _output_gradient(model, X, loss_fn))
    per_sample = torch.einsum("ncp,nc->np", jac.batch_jacobian, g_out.reshape(g_out.shape[0], -1).to(jac.J.dtype))
    _stage("wrong number", lambda: check(grads, per_sample, "BatchGrad (fuzz)", rtol=1e-7))
    _check_products(case, model, X, loss_fn, PRODUCTS, jac, ref, before, plain)
    approx = got["DiagGGNApprox"]
    _stage("wrong number", lambda: _approx_sane(approx))
    if isinstance(model, nn.Linear):  # one layer: the approximation is exact
        _stage("wrong number", lambda: check(approx, ref.diag_ggn, "DiagGGNApprox=DiagGGN", rtol=1e-7))
    twin = approx_twin(model, case.split_attention)
    if twin is None:
        return
    d = ref.H.diagonal()  # [N*C]: diag(H_n) at the output of post
    expected = _stage("reference", lambda: diag_ggn_approx_graph(Chain(twin, post), X, d, moved_axes=True))
    _stage("wrong number", lambda: check(approx, expected, "DiagGGNApprox", rtol=1e-7))


def _batch_grads(model: nn.Module, X: Tensor, loss_fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``p.grad_batch`` of every trainable parameter, ``[N, P]`` in ``model.parameters()`` order."""
    from curvhook import clear, extend
    from curvhook.extensions import BatchGrad

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with extend(model, BatchGrad()):
            loss_fn(model(X)).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.cat([p.grad_batch.reshape(p.grad_batch.shape[0], -1) for p in params], 1)
    clear(model)  # the results go; what else is left is checked next
    return grads


def _output_gradient(model: nn.Module, X: Tensor, loss_fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``∂ℓ/∂f`` at the model output, by autograd alone: ``[N, *out]``."""
    out = model(X).detach().requires_grad_(True)
    loss_fn(out).backward()
    return out.grad


def _same_grads(model: nn.Module, plain: list[Optional[Tensor]]) -> None:
    for (name, p), g in zip(model.named_parameters(), plain):
        if g is None:
            assert p.grad is None, f"{name}: a gradient where the plain backward gives none"
            continue
        assert p.grad is not None, f"{name}: no gradient"
        atol = 1e-12 * max(g.abs().max().item(), 1e-30)
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=atol, msg=lambda m, name=name: f"{name}.grad: {m}")


def _approx_sane(approx: Tensor) -> None:
    assert torch.isfinite(approx).all(), "DiagGGNApprox has non-finite entries"
    assert (approx >= 0).all(), f"DiagGGNApprox has negative entries (min {approx.min().item():.3e})"


# ------------------------------------------------------------------ NTK and GGNVectorProduct
PRODUCTS = ("NTK", "GGNVectorProduct")


def directions(case: Case, params: list[nn.Parameter]) -> tuple[Any, Tensor]:
    """GGNVectorProduct's ``v`` for ``case`` and the same directions flattened, ``[K, P]``.

    Drawn from ``case.seed`` (nothing more is drawn by hypothesis): ``K = 2`` directions
    ``[2, *p.shape]`` on odd seeds, else one shaped like ``p``; a list in
    ``model.parameters()`` order where ``seed % 4 >= 2``, else a dict ``{p: tensor}``.
    """
    k = 2 if case.seed % 2 else 1
    gen = torch.Generator().manual_seed(case.seed + 2)
    given = [torch.randn((k, *p.shape) if k > 1 else p.shape, generator=gen, dtype=p.dtype) for p in params]
    flat = torch.cat([t.reshape(k, -1) for t in given], 1) if given else torch.zeros(k, 0, dtype=DT)
    return (given if case.seed % 4 >= 2 else dict(zip(params, given))), flat


def _run_products(model: nn.Module, X: Tensor, loss_fn: Callable[[Tensor], Tensor], which, v, k: int) -> dict[str, Tensor]:
    """NTK's ``[N*C, N*C]`` kernel and/or GGNVectorProduct's ``[K, P]`` (``K`` directions) from one block.

    ``p.grad`` is cleared first, so that the block's gradient can be compared with a plain backward's.
    """
    from curvhook import clear, extend
    from curvhook.extensions import NTK, GGNVectorProduct

    exts = {}
    if "NTK" in which:
        exts["NTK"] = NTK()
    if "GGNVectorProduct" in which:
        exts["GGNVectorProduct"] = GGNVectorProduct(v)
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with extend(model, *exts.values()):
            loss_fn(model(X)).backward()
    out = {}
    if "NTK" in exts:
        m = exts["NTK"].matrix  # [N, C, N, C]
        out["NTK"] = m.reshape(m.shape[0] * m.shape[1], -1)
    if "GGNVectorProduct" in exts:
        rows = []
        for p in (p for p in model.parameters() if p.requires_grad):
            want = (k, *p.shape) if k > 1 else tuple(p.shape)
            assert tuple(p.ggn_v.shape) == want, f"p.ggn_v has shape {tuple(p.ggn_v.shape)}, expected {want}"
            rows.append(p.ggn_v.reshape(k, -1))
        out["GGNVectorProduct"] = torch.cat(rows, 1) if rows else torch.zeros(k, 0, dtype=DT)
    clear(model)  # the results go; what else is left is checked next
    return out


def _check_products(case, model, X, loss_fn, which, jac, ref, before, plain) -> None:
    """NTK against ``J Jᵀ`` (``J`` of ``model`` alone) and GGNVectorProduct against ``G v``.

    ``jac``, ``ref``: the references of ``model`` alone and of ``post ∘ model`` with its loss
    (``G`` as FullGGN's, ``Σ_n J_nᵀ H_n J_n``). Runs ``which`` in one ``extend`` block, then
    checks that no hook is left and that ``p.grad`` is a plain backward's.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    v, flat = directions(case, params)
    got = _stage("crash", lambda: _run_products(model, X, loss_fn, which, v, flat.shape[0]))
    _stage("hooks left", lambda: assert_clean(model, before))
    _stage("grad changed", lambda: _same_grads(model, plain))
    if "NTK" in which:
        _stage("wrong number", lambda: check(got["NTK"], jac.J @ jac.J.T, "NTK (fuzz)", rtol=1e-7))
    if "GGNVectorProduct" in which:
        expected = flat.to(ref.G.dtype) @ ref.G  # row k: (G v_k)ᵀ, G symmetric
        _stage("wrong number", lambda: check(got["GGNVectorProduct"], expected, "GGNVectorProduct (fuzz)", rtol=1e-7))


def check_products(case: Case, which: tuple[str, ...] = PRODUCTS) -> None:
    """NTK and/or GGNVectorProduct alone on ``case`` (what :func:`check_case` checks of them; for drivers)."""
    model, X, post, crit = build(case)
    loss_fn = lambda out: crit(post(out))  # noqa: E731
    try:
        plain = _plain_grads(model, X, loss_fn)
    except RuntimeError as e:
        if "modified by an inplace operation" in str(e):
            return
        raise FuzzFailure("reference", f"{type(e).__name__}: {e}") from e
    before = snapshot(model)
    jac = ref = None
    if "GGNVectorProduct" in which:
        ref = _stage("reference", lambda: reference(Chain(model, post), X, crit, approx=False, loss_hessian=loss_hessian(case)))
    if "NTK" in which:
        jac = ref if ref is not None and case.post == "none" else _stage(
            "reference", lambda: reference(model, X, None, approx=False)
        )
    _check_products(case, model, X, loss_fn, which, jac, ref, before, plain)
