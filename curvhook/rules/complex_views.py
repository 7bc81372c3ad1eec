"""Diagonals through complex tensors: the rotary embedding written with complex numbers.

DeepSeek-V2 and Llama 4 (and Meta's reference Llama code) rotate queries and keys
as complex numbers::

    z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))  # pairs (x_2k, x_2k+1)
    out = torch.view_as_real(z * freqs_cis).flatten(3)            # freqs_cis = e^{iθ}, no gradient

The products of columns go through these operations as through any other
(torch's vector-Jacobian products take complex tensors, a column at a complex
tensor holding ``∂/∂Re + i ∂/∂Im``). A diagonal (DiagGGNApprox) is a real weight
per real coordinate; at a complex tensor curvhook keeps it packed the same way,
``d_Re + i d_Im``, and this module gives the three operations above their exact
diagonals in that packing:

- ``view_as_complex`` and ``view_as_real`` only regroup coordinates (``J`` a
  permutation): the packed diagonal is the real one regrouped.
- ``z ↦ c z`` with a constant ``c = a + ib`` is the rotation-scaling
  ``[[a, −b], [b, a]]`` of each pair, so ``Σ_o d_o J_oi²`` gives
  ``d_Re' = a² d_Re + b² d_Im`` and ``d_Im' = b² d_Re + a² d_Im``; a real ``x``
  times ``c`` gives ``a² d_Re + b² d_Im``.

Any other operation on a complex tensor is refused for diagonals with a message
(the dense route, ``jacrev``, takes no complex tensors).
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvhook.errors import UnsupportedModelError
from curvhook.operations import PRODUCTS
from curvhook.records import CONST, Operation, Slot


def involves_complex(call: Operation, slot: int) -> bool:
    """Whether the input at ``slot`` or the call's first output is complex."""
    out = call.output_values[0] if call.output_values else None
    return call.inputs[slot].is_complex() or (out is not None and out.is_complex())


def complex_diag(call: Operation, value: Tensor, slot: int) -> Tensor:
    """``Σ_o d_o J_oi²`` per sample for an operation with complex tensors (see the module docstring).

    Args:
        call: ``view_as_complex``, ``view_as_real``, or a product with a constant.
        value: ``[N, *out]``, the diagonal at the output (packed ``d_Re + i d_Im`` if complex).
        slot: The input differentiated, batched.

    Returns:
        ``[N, *x[1:]]``, packed if the input is complex.
    """
    name, x = call.func_name, call.inputs[slot]
    plain = call.batch_axes is None and not isinstance(value, list) and len(call.output_values) == 1
    if plain and name == "view_as_complex":  # [N, …, 2] real → [N, …] complex
        return torch.view_as_real(value).clone()
    if plain and name == "view_as_real":  # [N, …] complex → [N, …, 2] real
        return torch.complex(value[..., 0], value[..., 1])
    c = _constant_factor(call, slot) if plain and name in PRODUCTS and value.is_complex() else None
    if c is not None:  # x and the output of one shape, c broadcast to it
        a2, b2 = c.real.square(), c.imag.square()
        re, im = value.real, value.imag
        if x.is_complex():
            return torch.complex(a2 * re + b2 * im, b2 * re + a2 * im)
        return a2 * re + b2 * im  # a real x: both parts of the output read it
    raise UnsupportedModelError(
        f"curvhook has no diagonal rule for the operation {call.name} on complex tensors (DiagGGNApprox "
        "follows complex tensors through view_as_complex, view_as_real and products with a constant, "
        "the rotary embedding e^{iθ}·z). The other extensions serve it; for DiagGGNApprox, write the "
        "operation with real tensors (a rotary embedding with cos and sin)."
    )


def _constant_factor(call: Operation, slot: int):
    """``c`` of ``x * c`` (complex output) with ``c`` without gradient, as a complex tensor
    broadcast to the output; ``None`` unless the call is a product of ``x`` (once, of the
    output's shape) and one constant."""
    if call.kwargs or len(call.args) != 2 or call.uses(slot) != 1:
        return None
    out, x = call.output_values[0], call.inputs[slot]
    if x.shape != out.shape:
        return None
    other = call.args[1] if call.args[0] == slot else call.args[0]
    if isinstance(other, Slot):
        if call.input_kinds[other] != CONST:
            return None
        c = call.inputs[other]
    elif isinstance(other, (int, float, complex)):
        c = torch.tensor(other, dtype=out.dtype, device=out.device)  # (a float32 0.7 would round)
    else:
        return None
    return c.to(out.dtype).expand(out.shape)
