"""``torch.baddbmm`` (curvhook/rules/batched_products.py): ``β c + α a @ b``.

BLOOM's attention scores are ``alibi.baddbmm(q, k)`` on the batch merged with the
heads, with an ALiBi bias ``[N·H, 1, L]`` made from each sample's padding mask.
Before, the call was unknown: its container became one module for the fallback,
which cut the bias wrongly and refused (*cannot run … on one sample at a time*).
Each form below: the exact extensions against torch.func in float64,
DiagGGNApprox against its definition applied operation by operation
(``tests/graph_reference.py``), and nothing served by the fallback or by dense
per-sample Jacobians.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from curvhook.rules import tensor_ops
from helpers import CLASSES, DT, check_exact_without_fallback

L, E, HEADS = 4, 6, 2


class AlibiAttention(nn.Module):
    """BLOOM's attention written out: query, key and value ``[N·H, L, d]``, scores
    ``alibi.baddbmm(q, kᵀ, beta=1, alpha=1/√d)`` with ``alibi`` ``[N·H, 1, L]`` from the
    padding mask (a constant with one slice per merged row), a padding mask added,
    softmax, ``bmm`` with the values, heads merged back."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.dense = nn.Linear(E, 3 * E), nn.Linear(E, E)
        self.head = nn.Linear(L * E, CLASSES)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # [N, L, E], [N, L] of 0/1
        n, d = x.shape[0], E // HEADS
        q, k, v = self.qkv(x).view(n, L, HEADS, 3, d).unbind(3)  # [N, L, H, d] each
        q, k, v = (t.transpose(1, 2).reshape(n * HEADS, L, d) for t in (q, k, v))
        slopes = torch.tensor([0.5, 0.25], dtype=x.dtype)
        positions = ((mask.cumsum(-1) - 1) * mask)[:, None, :].to(x.dtype)  # [N, 1, L]
        alibi = (slopes[:, None] * positions).reshape(n * HEADS, 1, L)
        scores = alibi.baddbmm(batch1=q, batch2=k.transpose(-1, -2), beta=1.0, alpha=d ** -0.5)
        scores = scores.view(n, HEADS, L, L) + (1.0 - mask[:, None, None, :].to(x.dtype)) * -1e4
        probs = torch.softmax(scores, dim=-1).view(n * HEADS, L, L)
        out = torch.bmm(probs, v).view(n, HEADS, L, d).permute(0, 2, 1, 3).reshape(n, L, E)
        return self.head(torch.tanh(self.dense(out)).flatten(1))


class WithMask(nn.Module):
    """Passes a fixed padding mask (right padding for the first sample) with the batch."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        mask = torch.ones(x.shape[0], L, dtype=torch.long)
        mask[0, -1] = 0
        return self.block(x, mask)


class Products(nn.Module):
    """``torch.baddbmm(c, a, b)`` on the batch axis: ``c`` a parameter ``[L, L]`` (shared by the
    samples), batched (``[N, L, L]``), or a constant with one slice per sample; ``b`` batched
    or a frozen constant per sample; ``beta``, ``alpha`` not one."""

    def __init__(self, c: str, b: str) -> None:
        super().__init__()
        self.c_kind, self.b_kind = c, b
        self.a, self.b, self.head = nn.Linear(E, E), nn.Linear(E, E), nn.Linear(L * L, CLASSES)
        self.c = nn.Parameter(torch.randn(L, L))

    def forward(self, x: Tensor) -> Tensor:  # [N, L, E]
        a = torch.tanh(self.a(x))
        b = (self.b(x) if self.b_kind == "batched" else x.detach().square()).transpose(1, 2)  # [N, E, L]
        if self.c_kind == "shared":
            c = self.c
        elif self.c_kind == "batched":
            c = torch.sigmoid(self.b(x) @ x.transpose(1, 2))
        else:  # a constant per sample
            c = x.detach().sum(-1, keepdim=True).expand(-1, L, L).contiguous()
        s = torch.baddbmm(c, a, b, beta=0.5, alpha=2.0)
        return self.head(torch.tanh(s).flatten(1))


def _no_dense_jacobians(monkeypatch) -> None:
    def dense(call):
        raise AssertionError(f"{call.name}: dense per-sample Jacobian")

    monkeypatch.setattr(tensor_ops, "_warn_dense_once", dense)


@pytest.mark.parametrize("n", [1, 3])
def test_alibi_scores_on_merged_heads(n, monkeypatch):
    _no_dense_jacobians(monkeypatch)
    torch.manual_seed(0)
    model = WithMask(AlibiAttention()).to(DT)
    X, y = torch.randn(n, L, E, dtype=DT), torch.arange(n) % CLASSES
    check_exact_without_fallback(model, X, y, monkeypatch, moved_axes=True)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("c, b", [("shared", "batched"), ("batched", "batched"), ("constant", "constant")])
def test_added_matrix_products_on_the_batch_axis(c, b, n, monkeypatch):
    _no_dense_jacobians(monkeypatch)
    torch.manual_seed(0)
    model = Products(c, b).to(DT)
    X, y = torch.randn(n, L, E, dtype=DT), torch.arange(n) % CLASSES
    check_exact_without_fallback(model, X, y, monkeypatch)


class Unusual(nn.Module):
    """Forms the rule must not claim (review, session 41): a batched ``c`` ``[N, S]`` that torch
    broadcasts along the rows when ``L = N`` (sample ``j`` then reads every sample's ``c``), and
    ``alpha``, ``beta`` given as tensors (recorded as slots, not values)."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.a, self.b, self.c, self.head = nn.Linear(E, E), nn.Linear(E, E), nn.Linear(E, L), nn.Linear(L * L, CLASSES)

    def forward(self, x: Tensor) -> Tensor:  # [N, L, E]
        a, b = torch.tanh(self.a(x)), self.b(x).transpose(1, 2)
        if self.form == "batched_c_of_rank_2":
            s = torch.baddbmm(self.c(x[:, 0]), a, b)  # c [N, S], broadcast as [L, S]
        else:
            s = torch.baddbmm(self.c(x), a, b, beta=torch.tensor(0.5, dtype=x.dtype), alpha=torch.tensor(2.0, dtype=x.dtype))
        return self.head(torch.tanh(s).flatten(1))


def test_a_batched_added_tensor_that_mixes_samples_is_refused():
    from curvhook import extend
    from curvhook.errors import UnsupportedModelError
    from curvhook.extensions import BatchJacobian

    torch.manual_seed(0)
    model = Unusual("batched_c_of_rank_2").to(DT)
    X, y = torch.randn(L, L, E, dtype=DT), torch.arange(L) % CLASSES  # N = L
    with pytest.raises(UnsupportedModelError, match="mixes samples"):
        with extend(model, BatchJacobian()):
            nn.CrossEntropyLoss()(model(X), y).backward()


@pytest.mark.parametrize("n", [1, 3])
def test_alpha_and_beta_given_as_tensors(n, monkeypatch):
    torch.manual_seed(0)
    model = Unusual("tensor_scalars").to(DT)
    X, y = torch.randn(n, L, E, dtype=DT), torch.arange(n) % CLASSES
    check_exact_without_fallback(model, X, y, monkeypatch)


class Affine(nn.Module):
    """timm's ResMLP ``Affine``: ``torch.addcmul(β, α, x) = β + α ∘ x``, ``α``, ``β`` ``[1, 1, D]``."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha, self.beta = nn.Parameter(torch.rand(1, 1, E) + 0.5), nn.Parameter(torch.randn(1, 1, E))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.beta, self.alpha, x)


class EntrywiseProducts(nn.Module):
    """``addcmul`` and ``addcdiv`` in the forms the rule claims: ResMLP's affine (shared operands),
    two batched operands with ``value``, a shared divisor, a constant with one slice per sample,
    an operand broadcast within the sample (``[N, 1, E]``), and the method form."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.lin, self.affine, self.head = nn.Linear(E, E), Affine(), nn.Linear(L * E, CLASSES)
        self.w = nn.Parameter(torch.rand(E) + 1.0)

    def forward(self, x: Tensor) -> Tensor:  # [N, L, E]
        h = self.lin(x)
        if self.form == "resmlp_affine":
            h = self.affine(torch.tanh(h))
        elif self.form == "both_batched":
            h = torch.addcmul(x, torch.tanh(h), h.mean(1, keepdim=True), value=0.5)
        elif self.form == "shared_divisor":
            h = torch.addcdiv(h, torch.tanh(h), self.w, value=-2.0)
        elif self.form == "batched_divisor":
            h = torch.tanh(h).addcdiv(x, torch.sigmoid(h) + 0.5)
        else:  # "constant_per_sample": a frozen feature with one slice per sample
            h = torch.addcmul(h, x.detach().square(), torch.tanh(h) * self.w)
        return self.head(torch.tanh(h).flatten(1))


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("form", ["resmlp_affine", "both_batched", "shared_divisor", "batched_divisor", "constant_per_sample"])
def test_addcmul_and_addcdiv(form, n, monkeypatch):
    """Before: no closed form, dense per-sample Jacobians (timm's resmlp_12 at 64×64: 16.2 s a
    DiagGGNApprox step against 0.08 s plain)."""
    _no_dense_jacobians(monkeypatch)
    torch.manual_seed(0)
    model = EntrywiseProducts(form).to(DT)
    X, y = torch.randn(n, L, E, dtype=DT), torch.arange(n) % CLASSES
    check_exact_without_fallback(model, X, y, monkeypatch)
