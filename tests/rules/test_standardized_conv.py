"""``curvhook/rules/standardized_conv.py``: timm's weight-standardized convolutions
(``StdConv2d`` of BiT ResNet-V2, ``ScaledStdConv2d`` of NFNets).

Every extension against the torch.func references (float64): the exact ones, and
DiagGGNApprox against its definition with the layer as one operation
(``graph_reference``). GGN-vector products exercise the rule's forward product.
The rule must serve the layers: the torch.func fallback is patched to fail.
"""

import warnings

import pytest
import torch
from torch import nn

from curvhook import extend
from curvhook.extensions import DiagGGNApprox, GGNVectorProduct
from curvhook.rules import fallback
from helpers import DT, check_graph_against_reference

layers = pytest.importorskip("timm.layers", reason="timm is in the models extra")


def _hf_conv(*args, **kwargs) -> nn.Module:
    """Hugging Face's ``WeightStandardizedConv2d`` (BiT), its weight away from the mean of zero
    and variance one that standardization removes."""
    modeling_bit = pytest.importorskip("transformers.models.bit.modeling_bit")
    conv = modeling_bit.WeightStandardizedConv2d(*args, **kwargs)
    with torch.no_grad():
        conv.weight.mul_(3.0).add_(0.5)
    return conv


def _model(kind: str, groups: int) -> nn.Module:
    """Two standardized convolutions (one grouped, one strided), a nonlinearity and a head."""
    cls = {"std": layers.StdConv2d, "scaled": layers.ScaledStdConv2d, "hf": _hf_conv}[kind]
    first = cls(3, 6, 3, padding=1, groups=groups, bias=True)
    second = cls(6, 3, 3, stride=2, padding=1)
    model = nn.Sequential(first, nn.Tanh(), second, nn.Flatten(), nn.Linear(3 * 2 * 2, 3)).to(DT)
    with torch.no_grad():
        for conv in (first, second):
            if getattr(conv, "gain", None) is not None:  # away from its initial value of one
                conv.gain.uniform_(0.5, 1.5)
            if conv.bias is not None:
                conv.bias.uniform_(-0.5, 0.5)
    return model


@pytest.fixture
def no_fallback(monkeypatch):
    def refuse(self, call, *args):
        raise AssertionError(f"{call.name} went to the torch.func fallback")

    for method in ("jac_t_mat_prod", "param_jac_t_mat_prod", "diag_jac_t_diag_jac", "param_diag"):
        monkeypatch.setattr(fallback.FallbackRule, method, refuse)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("kind", ["std", "scaled", "hf"])
def test_every_extension_against_the_references(kind, groups, n, no_fallback):
    torch.manual_seed(0)
    model = _model(kind, groups)
    X, y = torch.randn(n, 3, 4, 4, dtype=DT), torch.randint(0, 3, (n,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning of the fallback
        warnings.filterwarnings("ignore", message=".*jit.*")  # timm's own deprecation warnings
        check_graph_against_reference(model, X, y)


@pytest.mark.parametrize("kind", ["std", "scaled"])
def test_ggn_vector_product_through_the_forward_product(kind, no_fallback):
    """``G v`` with a tangent for every parameter (the weight's through ``J_o``, the gain's)."""
    from extensions.products_reference import flatten_per_parameter, ggn

    torch.manual_seed(1)
    model = _model(kind, 1)
    X, y = torch.randn(3, 3, 4, 4, dtype=DT), torch.randint(0, 3, (3,))
    loss_fn = lambda out: nn.CrossEntropyLoss()(out, y)  # noqa: E731
    params = list(model.parameters())
    v = {p: torch.randn_like(p) for p in params}
    with extend(model, GGNVectorProduct(v)):
        loss_fn(model(X)).backward()
    G = ggn(model, X, loss_fn)
    got = flatten_per_parameter({p: p.ggn_v for p in params}, params)
    torch.testing.assert_close(got, flatten_per_parameter(v, params) @ G, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("offset", [0.0, 5.0])
def test_float32_weight_diagonal_follows_float64(offset, no_fallback):
    """The weight's diagonal expands squares of ``x_p − m_p − c ŵ``; on patches that are nearly
    constant far from zero the terms cancel, so the rule centres the input first (without it,
    the review measured a normwise error of 1.1e-4 in float32 here; with it, about 1e-5).
    Entries far below the largest keep only that absolute accuracy."""
    torch.manual_seed(0)
    model = nn.Sequential(layers.StdConv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 64, 3)).to(DT)
    with torch.no_grad():
        model[0].weight.mul_(3)
    X, y = torch.randn(8, 3, 8, 8, dtype=DT) * 1e-3 + offset, torch.randint(0, 3, (8,))
    results = []
    for dtype in (torch.float64, torch.float32):
        model = model.to(dtype)
        with extend(model, DiagGGNApprox()):
            nn.CrossEntropyLoss()(model(X.to(dtype)), y).backward()
        results.append(model[0].weight.diag_ggn_approx.double())
    want, got = results
    assert (got >= 0).all()
    torch.testing.assert_close(got, want, rtol=0, atol=5e-5 * want.abs().max().item())


def test_hugging_face_dynamic_same_padding_goes_to_the_exact_fallback():
    """``padding="SAME"`` with a stride pads in a child module (``DynamicPad2d``) before the
    convolution: not the rule's map, so the fallback serves the layer, exactly."""
    conv = _hf_conv(3, 4, 3, stride=2, padding="SAME", bias=True)
    assert conv.pad is not None
    from curvhook.rules import registry

    assert registry.rule_for(conv) is None
    torch.manual_seed(0)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(4 * 3 * 3, 3)).to(DT)
    X, y = torch.randn(2, 3, 5, 5, dtype=DT), torch.randint(0, 3, (2,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_graph_against_reference(model, X, y)
