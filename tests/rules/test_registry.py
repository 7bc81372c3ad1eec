"""``curvhook/rules/registry.py`` and ``curvhook/rules/base.py``: registering custom rules,
rules that decline a module, the defaults ``LayerRule`` derives from two products,
and a guard that every rule family has its test file here.
"""

import pathlib
import warnings

import pytest
import torch
from torch import nn

from curvhook import LayerRule, register_rule
from curvhook.rules import registry, supported_module_types
from helpers import check_against_reference, ggn_reference, close, run_all


def test_every_rule_family_has_a_test_file():
    """Guard: a rule defined in ``curvhook/rules/<family>.py`` is tested in ``tests/rules/test_<family>.py``."""
    here = pathlib.Path(__file__).parent
    families = {type(registry._RULES[t]).__module__ for t in supported_module_types()}
    families = {m.rsplit(".", 1)[1] for m in families if m.startswith("curvhook.rules.")}
    assert families, "no registered rules found"
    missing = sorted(f for f in families if not (here / f"test_{f}.py").exists())
    assert not missing, f"rule families without a test file in tests/rules/: {missing}"


class Scale(nn.Module):
    def __init__(self, features):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features))

    def forward(self, x):
        return x * self.weight


def test_custom_rule_from_docs():
    @register_rule(Scale)
    class ScaleRule(LayerRule):
        def jac_t_mat_prod(self, call, mat):
            return mat * call.module.weight

        def param_jac_t_mat_prod(self, call, name, mat):
            return mat * call.input

        def diag_jac_t_diag_jac(self, call, diag):
            return diag * call.module.weight.square()

        def param_diag(self, call, name, diag):
            return (diag * call.input.square()).sum(0)

    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), Scale(4), nn.Sigmoid(), nn.Linear(4, 2)).double()
        X = torch.randn(3, 3, dtype=torch.float64)
        y = torch.randint(0, 2, (3,))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a registered rule must not fall back
            got = run_all(model, X, y, nn.CrossEntropyLoss())
        J, G = ggn_reference(model, X, y, nn.CrossEntropyLoss())
        close(got["full"], G)
        close(got["jac"].reshape(-1, J.shape[1]), J)
    finally:
        registry._RULES.pop(Scale, None)


def test_register_rule_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        register_rule(int)(LayerRule)


def test_rule_that_declines_a_module_falls_back():
    from curvhook.rules.fallback import FALLBACK

    class Picky(LayerRule):
        def accepts(self, module):
            return module.out_features != 2

    saved = dict(registry._RULES)
    try:
        register_rule(nn.Linear)(Picky)
        assert registry.rule_for(nn.Linear(3, 4)) is registry._RULES[nn.Linear]
        assert registry.rule_for(nn.Linear(3, 2)) is None
        assert registry.rule_or_fallback(nn.Linear(3, 2)) is FALLBACK
    finally:
        registry._RULES.clear()
        registry._RULES.update(saved)


class SquaredLinear(nn.Module):
    """``y = x (W∘W)ᵀ + b``: not linear in its parameter."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in))
        self.bias = nn.Parameter(torch.randn(d_out))

    def forward(self, x):
        return x @ (self.weight * self.weight).T + self.bias


@pytest.mark.parametrize("n", [1, 3])
def test_custom_rule_with_only_the_two_products_serves_all_four_extensions(n):
    """DiagGGNApprox's diagonals default to exact ones derived from the two products."""

    @register_rule(SquaredLinear)
    class SquaredLinearRule(LayerRule):
        def jac_t_mat_prod(self, call, mat):
            return mat @ call.module.weight.square()

        def param_jac_t_mat_prod(self, call, name, mat):
            if name == "bias":
                return mat
            # ∂y_o/∂W_oi = 2 W_oi x_i
            return 2 * torch.einsum("vno,ni->vnoi", mat, call.input) * call.module.weight

    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), SquaredLinear(4, 5), nn.Sigmoid(), nn.Linear(5, 2)).double()
        X = torch.randn(n, 3, dtype=torch.float64)
        y = torch.randint(0, 2, (n,))
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*fallback")  # the registered rule is used
            check_against_reference(model, X, lambda out: nn.CrossEntropyLoss()(out, y))
    finally:
        registry._RULES.pop(SquaredLinear, None)
