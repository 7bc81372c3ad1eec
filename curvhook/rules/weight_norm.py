"""torch's weight norm, ``w = g · v / ‖v‖`` (``torch.nn.utils.parametrizations.weight_norm``).

The parametrization is a module called on the parameters alone, ``_WeightNorm(g, v)``, whose
output, the weight, enters every sample. Its DiagGGNApprox terms have closed forms, per group
``k`` of ``v`` that shares one norm ``n_k`` (every entry with the same index along ``dim``;
the whole tensor for ``dim = -1``), with ``u = v / n`` and ``d`` the diagonal at ``w``:

- ``∂w_j/∂g_k = u_j``: ``Σ_{j∈k} d_j u_j²``;
- ``∂w_j/∂v_i = (g/n)(δ_ij − u_i u_j)``:
  ``Σ_j d_j J_ji² = (g/n)² [d_i (1 − 2u_i²) + u_i² Σ_{j∈k} d_j u_j²]``.

Before session 45 they came from one forward- or reverse-mode product per entry: torch has
no forward mode for ``_weight_norm_interface`` (wav2vec2 crashed), and one reverse product
per entry of wav2vec2's positional convolution (4.7M) ran past minutes.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from curvhook.records import Operation


def is_weight_norm(call: Operation) -> bool:
    """Whether ``call`` is torch's ``_WeightNorm`` parametrization on ``(g, v)``."""
    module = call.module
    return (
        type(module).__name__ == "_WeightNorm" and type(module).__module__ == "torch.nn.utils.parametrizations"
        and isinstance(getattr(module, "dim", None), int) and len(call.inputs) == 2
    )


def weight_norm_diag(call: Operation, diag: Tensor, slot: int) -> Optional[Tensor]:
    """``Σ_o d_no J_oi²`` for ``g`` (slot 0) or ``v`` (slot 1): ``[N, *input]``, or ``None``
    where the call has another layout (a negative ``dim`` other than -1).

    Args:
        call: The recorded ``_WeightNorm(g, v)`` call.
        diag: ``d``, ``[N, *w.shape]``.
        slot: 0 for ``g``, 1 for ``v``.
    """
    g, v = (t.detach() for t in call.inputs)
    dim = call.module.dim
    if not (dim == -1 or 0 <= dim < v.dim()) or diag.shape[1:] != v.shape:
        return None
    axes = tuple(a for a in range(v.dim()) if a != dim)  # the axes of one group
    norm = v.square().sum(axes, keepdim=True).sqrt()  # [1, …, size along dim, …, 1] or [1, …, 1]
    if g.numel() != norm.numel():
        return None
    u_sq = (v / norm).square()
    summed = tuple(a + 1 for a in axes)  # over a group, the sample axis kept
    if slot == 0:
        return (diag * u_sq).sum(summed, keepdim=True).reshape(diag.shape[0], *g.shape)
    scale = (g.reshape(norm.shape) / norm).square()
    group = (diag * u_sq).sum(summed, keepdim=True)
    return scale * (diag * (1 - 2 * u_sq) + u_sq * group)
