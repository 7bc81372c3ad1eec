"""``ProbedNormRule`` (``curvhook/rules/normalization.py``): transformers' ``…RMSNorm`` and
``…LayerNorm`` classes matched by the end of their name
(``register_rule_by_name("transformers", "*RMSNorm", "*LayerNorm")``).

transformers defines one RMSNorm class per model, about 150 copies of ``LlamaRMSNorm``
and a few of Gemma's ``(1 + w)`` form, and Cohere a LayerNorm without bias. Before,
curvhook knew seven by name, and every other one (Mixtral's, Phi-3's, OLMo's,
Cohere's, …) went to the fallback: dense per-sample Jacobians of ``[T·E]`` entries,
over 150 s for a DiagGGNApprox step of a two-layer Phi-3 of width 1024 against 0.8 s
plain. A class name is no promise, so the rule proves the form on probes of the
module's ``forward`` at every call; these tests build lookalikes of the three forms
(float64 inside, so the comparisons are exact), and lookalikes of other maps that
must go to the fallback.
"""

import pytest
import torch
from torch import nn

from curvhook import extend
from curvhook.extensions import DiagGGNApprox
from curvhook.rules import registry
from curvhook.rules.normalization import HFRMSNormRule, OffsetRMSNormRule, ProbedNormRule
from helpers import (
    CLASSES,
    DT,
    check_exact_without_fallback,
    check_graph_against_reference,
    fallback_spy,
    float32_follows_float64,
    randomize_layers,
)


class _Norm(nn.Module):
    """An RMSNorm of transformers' layout: ``weight [E]`` and ``variance_epsilon`` (or ``eps``)."""

    offset = False  # Gemma's form: (1 + w) ∘ x̂
    centered = False  # a LayerNorm without bias (Cohere's)
    forward_eps = None  # an epsilon other than the attribute's
    shift = 0.0  # a constant added after the scaling (a bias that is no parameter)
    factor = 1.0  # a map a hair away from the form (an unbiased variance at large widths)

    def __init__(self, hidden: int, eps: float = 1e-6, eps_name: str = "variance_epsilon") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(hidden) + 0.5)
        setattr(self, eps_name, eps)
        self._eps_name = eps_name

    def forward(self, x):
        eps = self.forward_eps if self.forward_eps is not None else getattr(self, self._eps_name)
        if self.centered:
            x = x - x.mean(-1, keepdim=True)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return (1 + self.weight if self.offset else self.weight) * x * self.factor + self.shift


def _named(name: str, package: str = "transformers", **attrs) -> type:
    """A :class:`_Norm` subclass called ``name`` in ``package`` (the registry matches both)."""
    cls = type(name, (_Norm,), dict(attrs))
    cls.__module__ = f"{package}.models.x.modeling_x"
    cls.__qualname__ = name
    return cls


MixtralRMSNorm = _named("MixtralRMSNorm")
VaultGemmaRMSNorm = _named("VaultGemmaRMSNorm", offset=True)
CohereLayerNorm = _named("CohereLayerNorm", centered=True)
OtherEpsRMSNorm = _named("OtherEpsRMSNorm", forward_eps=0.5)
ShiftedRMSNorm = _named("ShiftedRMSNorm", shift=0.25)
NearlyRMSNorm = _named("NearlyRMSNorm", factor=1 + 1e-7)


def _model(norm: nn.Module, tokens: bool = True) -> nn.Module:
    layers = [nn.Linear(3, 6), norm, nn.Tanh(), nn.Flatten() if tokens else nn.Identity(),
              nn.Linear(6 * 4 if tokens else 6, CLASSES)]
    torch.manual_seed(0)
    return randomize_layers(nn.Sequential(*layers)).to(DT)


def _data(n: int, tokens: bool = True):
    X = torch.randn(n, 4, 3, dtype=DT) if tokens else torch.randn(n, 3, dtype=DT)
    return X, torch.randint(0, CLASSES, (n,))


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("norm", [
    lambda: MixtralRMSNorm(6),
    lambda: MixtralRMSNorm(6, eps=0.3),  # an epsilon the probe at scale √ε must see
    lambda: VaultGemmaRMSNorm(6, eps_name="eps"),
    lambda: VaultGemmaRMSNorm(6, eps=0.3, eps_name="eps"),
    lambda: CohereLayerNorm(6),
    lambda: CohereLayerNorm(6, eps=0.3),
], ids=["llama-form", "llama-form-large-eps", "gemma-form", "gemma-form-large-eps", "cohere-form",
        "cohere-form-large-eps"])
def test_both_forms_are_exact_without_the_fallback(norm, n, monkeypatch):
    """On tokens ``[N, T, E]``: all four extensions against torch.func and DiagGGNApprox
    against its definition, N = 1 and 3, nothing served by the fallback."""
    module = norm()
    assert isinstance(registry.rule_for(module), ProbedNormRule)
    check_exact_without_fallback(_model(module), *_data(n), monkeypatch)


def test_a_norm_on_features_without_tokens_is_exact(monkeypatch):
    check_exact_without_fallback(_model(MixtralRMSNorm(6), tokens=False), *_data(3, tokens=False), monkeypatch)


class _HeadNorm(nn.Module):
    """A norm over each head's features, ``[N, T, H, d]`` with a weight ``[d]`` (Qwen3's
    ``q_norm`` on ``q.view(N, T, H, d)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.norm, self.out = nn.Linear(3, 8), MixtralRMSNorm(4), nn.Linear(4 * 8, CLASSES)

    def forward(self, x):
        h = self.norm(self.proj(x).view(*x.shape[:2], 2, 4))
        return self.out(torch.tanh(h).flatten(1))


def test_a_norm_over_head_features_is_exact(monkeypatch):
    torch.manual_seed(1)
    model = randomize_layers(_HeadNorm()).to(DT)
    check_exact_without_fallback(model, *_data(3), monkeypatch)


@pytest.mark.parametrize("cls", [OtherEpsRMSNorm, ShiftedRMSNorm, NearlyRMSNorm], ids=["other-eps", "shifted", "1e-7-off"])
def test_a_module_of_another_map_goes_to_the_fallback_and_stays_exact(cls, monkeypatch):
    """A class that ends with ``RMSNorm`` and has the attributes, but computes another map
    (another epsilon than its attribute; a constant added; a factor 1 + 1e-7, which float32's
    tolerance let through before the review: a module in float64 throughout must agree to
    float64 rounding): the probes refuse every form and the fallback serves the call,
    exactly. Trusting the name would be wrong here."""
    served = fallback_spy(monkeypatch)
    model = _model(cls(6))
    check_graph_against_reference(model, *_data(3))
    assert served and set(served) == {"1"}  # the norm, the second layer of the Sequential


def test_the_form_is_proven_at_every_call(monkeypatch):
    """A module whose ``forward`` switches form between steps (an attribute changed in place):
    each step is exact, as the probe runs again for every call."""
    module = MixtralRMSNorm(6)
    model = _model(module)
    X, y = _data(3)
    check_exact_without_fallback(model, X, y, monkeypatch)
    module.offset = True  # now (1 + w) ∘ x̂
    check_exact_without_fallback(model, X, y, monkeypatch)
    module.centered = True  # now (1 + w) ∘ (x − μ)/σ: no form fits, the fallback
    served = fallback_spy(monkeypatch)
    check_graph_against_reference(model, X, y)
    assert served

def test_float32_follows_float64():
    model = _model(MixtralRMSNorm(6))
    float32_follows_float64(model, *_data(3))


class _Weightless(nn.Module):
    """Llama 4's ``Llama4TextWeightlessRMSNorm`` (also its queries' and keys' L2 norm):
    ``x / √(mean(x²) + ε)`` without a weight, or centred; ``scale`` a map that is neither."""

    centered = False
    scale = 1.0

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.variance_epsilon = eps

    def forward(self, x):
        if self.centered:
            x = x - x.mean(-1, keepdim=True)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * self.scale


def _weightless(name: str, **attrs) -> type:
    cls = type(name, (_Weightless,), dict(attrs))
    cls.__module__ = "transformers.models.x.modeling_x"
    cls.__qualname__ = name
    return cls


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("norm", [
    lambda: _weightless("Llama4TextWeightlessRMSNorm")(),
    lambda: _weightless("Llama4TextWeightlessRMSNorm")(eps=0.3),
    lambda: _weightless("PlainLayerNorm", centered=True)(),
], ids=["rms", "rms-large-eps", "centred"])
def test_a_norm_without_weight_is_exact_without_the_fallback(norm, n, monkeypatch):
    """Before session 47 a norm without parameters went to the fallback (its many operations
    are no chain that keeps DiagGGNApprox's definition, curvhook/leaf_operations.py)."""
    module = norm()
    assert isinstance(registry.rule_for(module), ProbedNormRule)
    check_exact_without_fallback(_model(module), *_data(n), monkeypatch)


def test_a_norm_without_weight_of_another_map_goes_to_the_fallback(monkeypatch):
    """Twice x̂ is no weightless form (Gemma's ``(1 + w)`` form needs a weight): the fallback."""
    served = fallback_spy(monkeypatch)
    check_graph_against_reference(_model(_weightless("TwiceRMSNorm", scale=2.0)()), *_data(3))
    assert served and set(served) == {"1"}


def test_the_installed_llama4_weightless_norm_takes_the_rule(monkeypatch):
    """transformers' class computes in float32: no fallback, and the diagonal of the lookalike
    (float64 inside) within float32's rounding."""
    pytest.importorskip("transformers")
    llama4 = pytest.importorskip("transformers.models.llama4.modeling_llama4")
    module = llama4.Llama4TextWeightlessRMSNorm(eps=1e-5)
    assert isinstance(registry.rule_for(module), ProbedNormRule)
    served = fallback_spy(monkeypatch)
    X, y = torch.randn(3, 5, 4, dtype=DT), torch.randint(0, CLASSES, (3, 5))
    got = _diag_approx(module, X, y)
    assert served == []
    want = _diag_approx(_weightless("Llama4TextWeightlessRMSNorm")(eps=1e-5), X, y)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6 * float(w.abs().max()))


def test_exact_names_take_precedence_and_the_pattern_stays_in_its_package():
    """``LlamaRMSNorm`` and ``GemmaRMSNorm`` keep their named rules (no probes); a class of
    another package that ends with ``RMSNorm`` matches nothing; the pattern needs the
    attributes it reads."""
    assert type(registry.rule_for(_named("LlamaRMSNorm")(6))) is HFRMSNormRule
    assert type(registry.rule_for(_named("GemmaRMSNorm")(6, eps_name="eps"))) is OffsetRMSNormRule
    assert registry.rule_for(_named("MixtralRMSNorm", package="mypackage")(6)) is None
    no_eps = MixtralRMSNorm(6)
    del no_eps.variance_epsilon
    assert registry.rule_for(no_eps) is None
    with_bias = MixtralRMSNorm(6)
    with_bias.bias = nn.Parameter(torch.zeros(6))
    assert registry.rule_for(with_bias) is None


def test_real_transformers_classes_take_the_rule():
    """The classes of the installed transformers: Llama's copies and Gemma's offset form."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm as Mixtral
    from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
    from transformers.models.cohere.modeling_cohere import CohereLayerNorm as Cohere

    for cls in (Mixtral, Phi3RMSNorm, Olmo2RMSNorm, Cohere):
        assert isinstance(registry.rule_for(cls(6)), ProbedNormRule), cls
    del transformers


class _Float32Inside(nn.Module):
    """``LlamaRMSNorm`` exactly as transformers writes it: computed in float32, cast back."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(hidden) + 0.5)
        self.variance_epsilon = 1e-6

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


_Float32Inside.__module__ = "transformers.models.mamba.modeling_mamba"
_Float32Inside.__name__ = _Float32Inside.__qualname__ = "MambaRMSNorm"


def test_a_module_that_computes_in_float32_is_proven_at_real_sizes(monkeypatch):
    """At 128 tokens of width 768 a few probe entries sit near a float32 rounding midpoint, so
    the check that the module rounds its input must not demand every entry unmoved (it did for
    a moment in session 45: Mamba's norms went to the fallback, past 4 minutes per step)."""
    served = fallback_spy(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 768), _Float32Inside(768), nn.Linear(768, CLASSES)).to(DT)
    X, y = torch.randn(2, 128, 4, dtype=DT), torch.randint(0, CLASSES, (2, 128))
    with extend(model, DiagGGNApprox()):
        nn.CrossEntropyLoss()(model(X).transpose(1, 2), y).backward()
    assert served == []


class _MeanSquareInFloat32(_Norm):
    """mT5's ``MT5LayerNorm``: only the mean square in float32, the input scaled in its own dtype
    (the output moves with any change of the input, so only a watch on the dtypes inside the
    forward sees the rounding; in session 45 mT5's norms went to the fallback, past minutes
    per step at width 512)."""

    def forward(self, x):
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return self.weight * x * torch.rsqrt(variance + self.variance_epsilon) * self.factor


_MeanSquareInFloat32.__module__ = "transformers.models.mt5.modeling_mt5"
_MeanSquareInFloat32.__name__ = _MeanSquareInFloat32.__qualname__ = "MT5LayerNorm"


def _diag_approx(norm: nn.Module, X: torch.Tensor, y: torch.Tensor) -> list:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), norm, nn.Tanh(), nn.Linear(16, CLASSES)).to(DT)
    with extend(model, DiagGGNApprox()):
        nn.CrossEntropyLoss()(model(X).transpose(1, 2), y).backward()
    return [p.diag_ggn_approx for p in model.parameters()]


@pytest.mark.parametrize("installed", [False, True], ids=["lookalike", "installed-MT5LayerNorm"])
def test_a_norm_that_rounds_only_its_mean_square_is_proven(installed, monkeypatch):
    """No fallback, and the diagonal of ``nn.RMSNorm``'s rule within float32's rounding; a map
    a factor 1 + 1e-3 away still goes to the fallback."""
    if installed:
        mt5 = pytest.importorskip("transformers.models.mt5.modeling_mt5")
        norm = mt5.MT5LayerNorm(16, eps=1e-6)
    else:
        norm = _MeanSquareInFloat32(16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16) + 0.5)
    X, y = torch.randn(3, 5, 4, dtype=DT), torch.randint(0, CLASSES, (3, 5))
    served = fallback_spy(monkeypatch)
    got = _diag_approx(norm, X, y)
    assert served == []
    exact = nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        exact.weight.copy_(norm.weight)
    want = _diag_approx(exact, X, y)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7 * float(w.abs().max()))
    off = _MeanSquareInFloat32(16)
    off.factor = 1 + 1e-3
    _diag_approx(off, X, y)
    assert served


class _UnbiasedWithFloat32Constant(_Norm):
    """A map 1e-5 away from the RMS form at D = 2^17 (an unbiased mean square), whose forward
    also makes a float32 constant that rounds nothing (the review of session 46: the watch took
    any float32 result for a rounding and accepted the map to float32's tolerance)."""

    def forward(self, x):
        eps = torch.tensor(self.variance_epsilon)  # float32, 0-d: promotes to float64
        variance = x.pow(2).sum(-1, keepdim=True) / (x.shape[-1] - 1)
        return self.weight * x * torch.rsqrt(variance + eps)


_UnbiasedWithFloat32Constant.__module__ = "transformers.models.x.modeling_x"
_UnbiasedWithFloat32Constant.__name__ = _UnbiasedWithFloat32Constant.__qualname__ = "UnbiasedRMSNorm"


def test_a_float32_constant_is_no_rounding():
    """The probes reject the map (the fallback then serves it); a float32 rounding of the data
    inside the same map is still seen (and the map, 1e-5 away, accepted to that tolerance)."""
    from types import SimpleNamespace

    from curvhook.rules.normalization import _probe_norm_form

    width = 2**17
    norm = _UnbiasedWithFloat32Constant(width).to(DT)
    call = SimpleNamespace(module=norm, input=torch.randn(2, width, dtype=DT), args=(), kwargs={})
    assert _probe_norm_form(call) is None
    rounding = _MeanSquareInFloat32(width).to(DT)
    call = SimpleNamespace(module=rounding, input=torch.randn(2, width, dtype=DT), args=(), kwargs={})
    assert _probe_norm_form(call) == 0
