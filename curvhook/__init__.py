"""curvhook: exact curvature packed into PyTorch's backward pass."""

from curvhook import rules  # noqa: F401  (registers the built-in layer rules)
from curvhook._memory import release_memory
from curvhook.loader import accumulate
from curvhook.clearing import clear
from curvhook.context import Extend, extend
from curvhook.errors import CurvhookError, UnsupportedLossError, UnsupportedModelError
from curvhook.losses import LossRule, register_loss, supported_losses
from curvhook.rules import LayerRule, register_rule, supported_module_types

__version__ = "0.1.0"

__all__ = [
    "CurvhookError",
    "Extend",
    "LayerRule",
    "LossRule",
    "UnsupportedLossError",
    "UnsupportedModelError",
    "accumulate",
    "clear",
    "extend",
    "register_loss",
    "release_memory",
    "register_rule",
    "supported_losses",
    "supported_module_types",
]
