"""Per-layer derivative rules, one file per layer family, and their registry."""

from curvhook.rules import conv, elementwise, linear, pooling, reshape  # noqa: F401  (registers the rules)
from curvhook.rules.base import LayerRule
from curvhook.rules.registry import register_rule, rule_for, supported_module_types

__all__ = ["LayerRule", "register_rule", "rule_for", "supported_module_types"]
