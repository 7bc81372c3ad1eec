"""Per-layer derivative rules, one file per layer family, and their registry."""

from curvhook.rules import (  # noqa: F401  (importing a family registers its rules)
    attention,
    blur_pool,
    conv,
    elementwise,
    embedding,
    linear,
    mixture_of_experts,
    normalization,
    padding,
    pooling,
    recurrent,
    relative_position,
    reshape,
    softmax,
    standardized_conv,
    upsampling,
)
from curvhook.rules.base import LayerRule
from curvhook.rules.registry import register_rule, rule_for, supported_module_types

__all__ = ["LayerRule", "register_rule", "rule_for", "supported_module_types"]
