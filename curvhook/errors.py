"""Exceptions raised by curvhook.

Every error says what went wrong and what to do about it. curvhook never
returns a number it cannot vouch for: where the mathematics does not apply, it
raises one of these instead.
"""


class CurvhookError(RuntimeError):
    """Base class of all curvhook errors."""


class UnsupportedModelError(CurvhookError):
    """The model contains a module or operation curvhook cannot differentiate exactly."""


class UnsupportedLossError(CurvhookError):
    """The loss is missing, unsupported, or used in a way whose Hessian curvhook cannot form."""
