"""``curvhook/rules/relative_position.py``: timm's ``PosEmbedRel`` (BotNet, HaloNet).

Every extension against the torch.func references (float64): the exact ones, and
DiagGGNApprox against its definition with the module as one operation
(``graph_reference``), on the module alone and inside timm's attention blocks, where
it runs on the heads merged into the batch axis. The rule must serve the module: the
fallback is spied on and must serve nothing. A module whose ``forward`` is not the
bilinear map the rule reads goes to the exact fallback.
"""

import pytest
import torch
from torch import Tensor, nn

from curvhook import extend
from curvhook.extensions import BatchGrad, DiagGGNApprox, GGNVectorProduct
from curvhook.rules import relative_position, rule_for, tensor_ops
from helpers import (
    DT, assert_exact, check_exact_without_fallback, check_graph_against_reference, fallback_spy, float32_follows_float64,
)

bottleneck = pytest.importorskip("timm.layers.bottleneck_attn", reason="timm is in the models extra")
halo = pytest.importorskip("timm.layers.halo_attn", reason="timm is in the models extra")


class Logits(nn.Module):
    """A linear map to queries, ``PosEmbedRel`` on them, a nonlinearity and a head.

    BotNet's: queries ``[N, H·W, d]`` of a ``3 × 4`` map; HaloNet's: ``[N, blocks, 2·2, d]``
    against ``4 × 4`` windows."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(3, 4)
        if kind == "bottleneck":
            self.pos, out = bottleneck.PosEmbedRel((3, 4), 4, 0.5), 12 * 12
        else:
            self.pos, out = halo.PosEmbedRel(2, 4, 4, 0.5), 2 * 4 * 16
        self.head = nn.Linear(out, 3)

    def forward(self, x: Tensor) -> Tensor:  # [N, 12, 3] or [N, 8, 3]
        h = self.fc(x)
        if self.kind == "halo":
            h = h.reshape(h.shape[0], 2, 4, 4)
        return self.head(torch.tanh(self.pos(h)).flatten(1))


def _inputs(kind: str, n: int) -> tuple[Tensor, Tensor]:
    return torch.randn(n, 12 if kind == "bottleneck" else 8, 3, dtype=DT), torch.randint(0, 3, (n,))


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("kind", ["bottleneck", "halo"])
def test_module_alone_against_the_references(kind, n, monkeypatch):
    torch.manual_seed(0)
    model = Logits(kind).to(DT)
    check_exact_without_fallback(model, *_inputs(kind, n), monkeypatch)


class AttentionNet(nn.Module):
    """timm's ``BottleneckAttn`` (a ``3 × 4`` map) or ``HaloAttn`` (``2 × 2`` blocks, halo 1)
    between a head and the input: the relative logits run on ``[N·heads, …]``."""

    def __init__(self, kind: str):
        super().__init__()
        if kind == "bottleneck":
            self.att, self.size = bottleneck.BottleneckAttn(8, 8, feat_size=(3, 4), num_heads=2), (3, 4)
        else:
            self.att = halo.HaloAttn(8, 8, feat_size=(4, 4), num_heads=2, block_size=2, halo_size=1)
            self.size = (4, 4)
        self.head = nn.Linear(8 * self.size[0] * self.size[1], 3)
        with torch.no_grad():  # away from timm's small initial scales
            for p in self.att.parameters():
                p.normal_(0, 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.att(x)).flatten(1))


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("kind", ["bottleneck", "halo"])
def test_attention_blocks_need_no_fallback_nor_dense_jacobians(kind, n, monkeypatch):
    """Before, the module had no rule: on merged rows, the whole attention block went to
    the fallback (34 s instead of 0.14 s for a step of botnet26t at 64 × 64)."""

    def dense(call):
        raise AssertionError(f"{call.name}: dense per-sample Jacobian")

    monkeypatch.setattr(tensor_ops, "_warn_dense_once", dense)
    torch.manual_seed(0)
    model = AttentionNet(kind).to(DT).eval()
    X, y = torch.randn(n, 8, *model.size, dtype=DT), torch.randint(0, 3, (n,))
    check_exact_without_fallback(model, X, y, monkeypatch, moved_axes=True)


def _lookalike() -> type:
    """A ``PosEmbedRel`` of the ``timm`` package (as a later version might define it) that adds
    a term that is not bilinear: the rule is found by its name, then declines at the check."""

    class PosEmbedRel(bottleneck.PosEmbedRel):
        def forward(self, q: Tensor) -> Tensor:
            return super().forward(q) + q.square().sum(-1, keepdim=True)

    PosEmbedRel.__module__ = "timm.layers.lookalike"
    return PosEmbedRel


@pytest.mark.parametrize("on_instance", [False, True])
def test_a_forward_of_another_form_goes_to_the_exact_fallback(on_instance, monkeypatch):
    """The rule reads the offsets off the module's ``forward`` and checks its closed form at
    random points: a ``forward`` with a term that is not bilinear fails the check, also after
    the offsets of timm's own class were read for the same sizes."""
    torch.manual_seed(0)
    X, y = _inputs("bottleneck", 3)
    model = Logits("bottleneck").to(DT)
    with extend(model, DiagGGNApprox()):  # timm's own forward first, for the same sizes
        nn.CrossEntropyLoss()(model(X), y).backward()
    if on_instance:  # (the graph reference deep-copies the model: a forward set on the instance would
        own = model.pos.forward  # keep calling the original module, so only the exact extensions here)
        model.pos.forward = lambda q: own(q) + q.square().sum(-1, keepdim=True)
    else:
        model.pos = _lookalike()((3, 4), 4, 0.5).to(DT)
    assert isinstance(rule_for(model.pos), relative_position.RelativePositionLogitsRule)
    served = fallback_spy(monkeypatch)
    assert_exact(model, X, y, nn.CrossEntropyLoss())
    if not on_instance:
        check_graph_against_reference(model, X, y)
    assert any("pos" in name for name in served)


class FlaggedPosEmbedRel(bottleneck.PosEmbedRel):
    """A ``PosEmbedRel`` of the ``timm`` package whose keys come in reverse order when a flag is
    set: of the rule's form either way, with other offsets."""

    def __init__(self, *args, reverse_keys: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.reverse_keys = reverse_keys

    def forward(self, q: Tensor) -> Tensor:
        out = super().forward(q)
        return out.flip(-1) if self.reverse_keys else out


FlaggedPosEmbedRel.__module__ = "timm.layers.lookalike"
FlaggedPosEmbedRel.__name__ = FlaggedPosEmbedRel.__qualname__ = "PosEmbedRel"  # the rule is found by name


class TwoLogits(nn.Module):
    def __init__(self, reverse_a: bool, reverse_b: bool):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.a = FlaggedPosEmbedRel((2, 3), 4, 0.5, reverse_keys=reverse_a)
        self.b = FlaggedPosEmbedRel((2, 3), 4, 0.5, reverse_keys=reverse_b)
        self.head = nn.Linear(36, 3)

    def forward(self, x: Tensor) -> Tensor:  # [N, 6, 3]
        h = self.fc(x)
        return self.head(torch.tanh(self.a(h) * self.b(h)).flatten(1))


def test_offsets_are_read_for_each_module_and_step(monkeypatch):
    """(Found by review: the offsets were kept per ``forward`` function and sizes, so a module of the
    same class whose ``forward`` reads a flag got the offsets of another instance, or its own from
    an earlier step: every extension silently wrong.) Two instances that differ by the flag in one
    model, then the flag flipped between two ``extend`` blocks."""
    torch.manual_seed(0)
    model = TwoLogits(False, True).to(DT)
    X, y = torch.randn(3, 6, 3, dtype=DT), torch.randint(0, 3, (3,))
    check_exact_without_fallback(model, X, y, monkeypatch)
    model.a.reverse_keys = True
    check_exact_without_fallback(model, X, y, monkeypatch)


def test_offsets_are_botnets_relative_coordinates():
    """``ω = x_k − x_q + W − 1`` and ``η = y_k − y_q + H − 1`` on a ``3 × 4`` map, read off the module."""
    torch.manual_seed(0)
    model = Logits("bottleneck").to(DT)
    seen = {}
    own = relative_position.RelativePositionLogitsRule.param_diag

    def spy(self, call, name, diag):
        seen["offsets"] = relative_position.offsets(call)
        return own(self, call, name, diag)

    X, y = _inputs("bottleneck", 2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(relative_position.RelativePositionLogitsRule, "param_diag", spy)
        with extend(model, DiagGGNApprox()):
            nn.CrossEntropyLoss()(model(X), y).backward()
    omega, eta = seen["offsets"]
    yy, xx = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    yy, xx = yy.flatten(), xx.flatten()
    assert torch.equal(omega, xx[None, :] - xx[:, None] + 3)
    assert torch.equal(eta, yy[None, :] - yy[:, None] + 2)


@pytest.mark.parametrize("kind", ["bottleneck", "halo"])
def test_float32_follows_float64(kind):
    torch.manual_seed(1)
    model = AttentionNet(kind).to(DT).eval()
    float32_follows_float64(model, torch.randn(2, 8, *model.size, dtype=DT), torch.randint(0, 3, (2,)))


def test_per_sample_gradients_and_ggn_vector_products(monkeypatch):
    """BatchGrad against ``torch.func`` per-sample gradients; ``G v`` (the rule's products and
    the replayed forward product) against the dense GGN."""
    from extensions.products_reference import flatten_per_parameter, ggn

    torch.manual_seed(2)
    model = Logits("halo").to(DT)
    X, y = _inputs("halo", 3)
    crit = nn.CrossEntropyLoss(reduction="sum")
    loss_fn = lambda out: crit(out, y)  # noqa: E731
    params = dict(model.named_parameters())
    v = {p: torch.randn_like(p) for p in params.values()}
    served = fallback_spy(monkeypatch)
    with extend(model, BatchGrad(), GGNVectorProduct(v)):
        loss_fn(model(X)).backward()
    assert served == []

    def one(ps, x, t):
        return nn.CrossEntropyLoss(reduction="sum")(torch.func.functional_call(model, ps, (x[None],)), t[None])

    per_sample = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(
        {k: p.detach() for k, p in params.items()}, X, y
    )
    for name, p in params.items():
        torch.testing.assert_close(p.grad_batch, per_sample[name], rtol=1e-10, atol=1e-12)
    G = ggn(model, X, loss_fn)
    got = flatten_per_parameter({p: p.ggn_v for p in params.values()}, list(params.values()))
    torch.testing.assert_close(got, flatten_per_parameter(v, list(params.values())) @ G, rtol=1e-10, atol=1e-12)
