"""Autograd nodes applied into recycled buffers.

Several rules apply the autograd node of a one-operation call to a vector: the
node computes ``J_xᵀ v`` exactly as autograd's own backward does, kinks
included (:func:`curvhook.rules.base.apply_node`). Called from Python, a node
writes its result into memory that torch allocates anew on every call; for
the large activations of a convolutional network (``[128, 64, 28, 28]``,
25 MB) that is a page fault per 4 KiB on every step, which on a VM without
transparent huge pages costs 3–15 times the arithmetic.

For the nodes listed here, :func:`apply_into` calls the same ATen backward
kernel that the node calls, with the tensors the node saved, through the
kernel's ``out=`` form into a buffer from :func:`curvhook._memory.empty`,
which a later pass reuses. The values are bitwise those of the node. Any other
node, or a case the table does not cover (a non-contiguous vector, another
dtype, grad mode on: ``backward(create_graph=True)``), returns ``None`` and the
caller applies the node itself.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from curvhook import _memory
from curvhook._torch_internals import saved_node_values

_aten = torch.ops.aten

# Node name -> (its saved values, a kernel (grad, *saved, out) -> out). Each kernel
# is the formula of torch's derivatives.yaml for the function, with grad mode off.
_KERNELS: dict[str, tuple[tuple[str, ...], Callable[..., Tensor]]] = {
    "ReluBackward0": (("result",), lambda g, y, out: _aten.threshold_backward.grad_input(g, y, 0, grad_input=out)),
    "TanhBackward0": (("result",), lambda g, y, out: _aten.tanh_backward.grad_input(g, y, grad_input=out)),
    "SigmoidBackward0": (("result",), lambda g, y, out: _aten.sigmoid_backward.grad_input(g, y, grad_input=out)),
    "GeluBackward0": (
        ("self", "approximate"),
        lambda g, x, approximate, out: _aten.gelu_backward.grad_input(g, x, approximate=approximate, grad_input=out),
    ),
    "SiluBackward0": (("self",), lambda g, x, out: _aten.silu_backward.grad_input(g, x, grad_input=out)),
    "LeakyReluBackward0": (
        ("self", "negative_slope"),
        lambda g, x, slope, out: _aten.leaky_relu_backward.grad_input(g, x, slope, False, grad_input=out),
    ),
    "MaxPool2DWithIndicesBackward0": (
        ("self", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "result1"),
        lambda g, x, k, s, p, d, c, idx, out: _aten.max_pool2d_with_indices_backward.grad_input(
            g, x, k, s, p, d, c, idx, grad_input=out
        ),
    ),
    "MaxPool3DWithIndicesBackward0": (
        ("self", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "result1"),
        lambda g, x, k, s, p, d, c, idx, out: _aten.max_pool3d_with_indices_backward.grad_input(
            g, x, k, s, p, d, c, idx, grad_input=out
        ),
    ),
}


def apply_into(node: Any, value: Tensor) -> Optional[Tensor]:
    """``node(value)`` written into a recycled buffer, or ``None`` where not covered.

    Args:
        node: The autograd node of a one-operation call (one tensor input).
        value: The vector at the call's output, shaped like it.

    Returns:
        What the node returns for its input, shaped like the input, or ``None``.
    """
    name = getattr(node, "name", None)  # absent on stand-ins (a node with its batch axis moved)
    kernel = _KERNELS.get(name()) if callable(name) else None
    if kernel is None or torch.is_grad_enabled() or not value.is_contiguous():
        return None
    names, formula = kernel
    saved = saved_node_values(node, names)
    if saved is None:
        return None
    x = saved[0]  # the tensor the result is shaped like: the node's input (or its output)
    if x.dtype != value.dtype or x.device != value.device or not x.is_contiguous():
        return None
    out = _memory.recyclable(x.shape, value)
    if out is None:  # small, or not on the CPU: torch's allocator serves it as well
        return None
    return formula(value, *saved, out)
