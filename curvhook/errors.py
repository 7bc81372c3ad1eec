"""Exceptions raised by curvhook.

Every error says what went wrong and what to do about it. curvhook never
returns a number it cannot vouch for: where the mathematics does not apply, it
raises one of these instead.
"""

from __future__ import annotations

from typing import Optional


class CurvhookError(RuntimeError):
    """Base class of all curvhook errors."""


class UnsupportedModelError(CurvhookError):
    """The model contains a module or operation curvhook cannot differentiate exactly."""


class UnsupportedLossError(CurvhookError):
    """The loss is missing, unsupported, or used in a way whose Hessian curvhook cannot form."""


def reentrant_checkpoint_error(where: str = "") -> UnsupportedModelError:
    """The error for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=True)`` in the model.

    Args:
        where: What curvhook saw of it, appended in parentheses (``"module 'b.0'"``).
    """
    return UnsupportedModelError(
        "curvhook does not support torch.utils.checkpoint.checkpoint(..., use_reentrant=True) "
        f"inside the model{f' ({where})' if where else ''}: reentrant checkpointing runs the "
        "block without autograd in the forward pass and differentiates a second run inside "
        "backward, so curvhook cannot follow it. Use checkpoint(..., use_reentrant=False) "
        "(supported, exact), or call the block without checkpointing inside extend."
    )


def partial_backward_error(node_name: str) -> CurvhookError:
    """The error for a backward pass that skips an operation of the model the rules read.

    ``torch.autograd.grad(loss, [some parameters])`` and ``loss.backward(inputs=...)``
    run only the autograd nodes on the way to the tensors asked for.

    Args:
        node_name: The skipped autograd node (``"TanhBackward0"``).
    """
    return CurvhookError(
        f"This backward pass runs only part of the model: autograd skips {node_name} (the "
        "gradients asked for, by torch.autograd.grad(..., inputs) or backward(inputs=...), do "
        "not need it), and curvhook reads that operation's derivative from it. Inside an "
        "extend block, backpropagate the loss through the whole model: loss.backward(), or "
        "torch.autograd.grad with respect to every trainable parameter. Take gradients of "
        "part of the graph outside the block (the gradient at the model output alone, "
        "torch.autograd.grad(loss, out), is fine inside it)."
    )


def out_of_memory_error(err: BaseException, what: str) -> Optional[UnsupportedModelError]:
    """The error to raise where ``torch.func`` ran out of memory differentiating ``what``
    (its dense per-sample Jacobians), else ``None``: it is no failure to differentiate."""
    oom = isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err)
    )
    if not oom:
        return None
    return UnsupportedModelError(
        f"curvhook ran out of memory differentiating {what} with torch.func ({err}). The generic "
        "rule builds dense per-sample Jacobians, which grow with the square of the layer's size "
        "(DiagGGNApprox needs them for operations without a closed form). Use a smaller batch or "
        "input, a module with a rule in place of the operation (docs/supported.md), or register a "
        "rule for it (docs/custom_layers.md)."
    )
