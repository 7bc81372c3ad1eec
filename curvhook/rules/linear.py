"""``nn.Linear``: ``y = x Wᵀ + b`` with ``x`` of shape ``[N, *, in]``.

Per sample, the ``T = prod(*)`` positions share ``W``, so
``J_Wᵀ m = Σ_t m_t x_tᵀ`` and ``J_bᵀ m = Σ_t m_t``; ``J_xᵀ m = m W`` position-wise.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Optional

import torch
from einops import rearrange
from torch import Tensor, nn

from curvhook import _memory
from curvhook._memory import empty
from curvhook.records import Operation
from curvhook.rules.base import LayerRule, sum_of_squared_products
from curvhook.rules.registry import register_rule, register_rule_by_name


def _positions(call: Operation, mat: Tensor) -> tuple[Tensor, Tensor]:
    """Flatten the shared positions: ``x → [N, T, in]`` and ``mat → [V, N, T, out]``."""
    x = call.input.detach()
    # rearrange "n ... i -> n (...) i" and "v n ... o -> v n (...) o"; reshape is a view here
    # and costs a microsecond where einops' pattern handling costs ten, on every layer and step.
    return x.reshape(x.shape[0], -1, x.shape[-1]), mat.reshape(*mat.shape[:2], -1, mat.shape[-1])


@register_rule(nn.Linear)
class LinearRule(LayerRule):
    """Rules for ``nn.Linear`` with any number of leading dimensions."""

    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        w = call.module.weight.detach()
        out = _memory.recyclable((*mat.shape[:-1], w.shape[1]), mat)
        # One GEMM on the rows. A strided mat (the loss factor [C-1, N, C] is a view of
        # [N, C, C-1]) is copied first: torch.matmul would run a batched GEMM against the
        # weight broadcast over V, 3-4x slower than the copy and one GEMM together.
        rows = mat.reshape(-1, mat.shape[-1])
        prod = torch.mm(rows, w, out=None if out is None else out.view(-1, w.shape[1]))
        return prod.view(*mat.shape[:-1], w.shape[1])

    def param_jac_t_mat_prod(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        x, m = _positions(call, mat)
        if name == "bias":
            return m[:, :, 0] if m.shape[2] == 1 else m.sum(2)
        v, n, t, o = m.shape
        # Written sample-major, [N, V, O, I], and returned as a [V, N, O, I] view:
        # the batch Jacobian is then contiguous, and large buffers get huge pages.
        out = empty((n, v, o, x.shape[-1]), like=m)
        # Σ_t m_vnt x_ntᵀ as one batched GEMM over samples; without positions (T = 1) its
        # inner dimension is 1, 3–4× faster than a broadcast outer product on CPU
        torch.bmm(rearrange(m, "v n t o -> n (v o) t"), x, out=out.view(n, v * o, -1))
        return out.transpose(0, 1)

    def param_factors(self, call: Operation, name: str, mat: Tensor) -> Optional[tuple[Tensor, Optional[Tensor]]]:
        x, m = _positions(call, mat)
        if x.shape[1] != 1:
            return None
        return m[:, :, 0], (x[:, 0] if name == "weight" else None)

    def position_factors(self, call: Operation, mat: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        return _positions(call, mat)  # a = x at each of the T positions

    def param_sq_sum(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        x, m = _positions(call, mat)
        v, n, t, o = m.shape
        if t == 1:
            # Σ_{v,n} (m_vn x_nᵀ)² = Σ_n (Σ_v m_vn²) (x_n²)ᵀ: sum over V before the GEMM;
            # the bias term Σ_{v,n} m_vn² shares the first sum.
            cached = call.scratch.linear_m_sq
            if cached is None or cached[0] is not mat:  # one backpropagated matrix per source
                cached = call.scratch.linear_m_sq = (mat, _memory.square(m[:, :, 0], "linear_m_sq").sum(0))  # [N, O]
            m_sq = cached[1]
            if name == "bias":
                return m_sq.sum(0)
            x_sq = _memory.square(x[:, 0], "linear_x_sq")
            return torch.mm(m_sq.t(), x_sq, out=_memory.recyclable(call.module.weight.shape, m_sq))
        if name == "bias":
            return m.sum(2).square().sum((0, 1))
        # Σ_{v,n} (Σ_t m_vnt x_ntᵀ)²: the positions are the inner dimension of a GEMM
        return sum_of_squared_products(m.transpose(2, 3), x)

    def param_sq_norms(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        x, m = _positions(call, mat)
        v, n, t, o = m.shape
        if t == 1:  # bias ‖m_vn‖², weight ‖m_vn x_nᵀ‖² = ‖m_vn‖² ‖x_n‖²: ‖m_vn‖² once for both
            cached = call.scratch.linear_m_norms
            if cached is None or cached[0] is not mat:
                m0 = m[:, :, 0]
                cached = call.scratch.linear_m_norms = (mat, torch.linalg.vecdot(m0, m0))  # [V, N]
            if name == "bias":
                return cached[1]
            x0 = x[:, 0]
            return cached[1] * torch.linalg.vecdot(x0, x0)
        if name == "bias":  # ‖Σ_t m_vnt‖²
            return m.sum(2).square().sum(-1)
        i = x.shape[-1]
        if t * (v * o + i) >= v * o * i:  # the Gram matrices cost more than the products
            return super().param_sq_norms(call, name, mat)
        # ‖Σ_t m_vnt x_ntᵀ‖² = Σ_{t,t'} (m_vnt·m_vnt')(x_nt·x_nt'): two [T, T] Gram matrices per sample
        gram_x = torch.bmm(x, x.transpose(1, 2))  # [N, T, T]
        gram_m = torch.matmul(m, m.transpose(2, 3))  # [V, N, T, T]
        return torch.einsum("vnst,nst->vn", gram_m, gram_x)

    def jvp(self, call: Operation, tangents: list[Optional[Tensor]], param_tangents: dict[str, Tensor]) -> list[Optional[Tensor]]:
        if len(tangents) != 1:
            return super().jvp(call, tangents, param_tangents)
        # dy = dx Wᵀ + x dWᵀ + db, K columns at once
        dx, d_w, d_b = tangents[0], param_tangents.get("weight"), param_tangents.get("bias")
        x = call.input.detach()
        out = None
        if dx is not None:
            out = torch.matmul(dx, call.module.weight.detach().T)
        if d_w is not None:
            k = d_w.shape[0]
            rows = torch.matmul(x.reshape(-1, x.shape[-1]), d_w.transpose(1, 2))  # [K, (N …), O]
            rows = rows.reshape(k, *x.shape[:-1], d_w.shape[1])
            out = rows if out is None else out.add_(rows)
        if d_b is not None:
            k, o = d_b.shape
            bias = d_b.reshape(k, *[1] * (x.dim() - 1), o)
            out = bias.expand(k, *x.shape[:-1], o).clone() if out is None else out.add_(bias)
        return [out]

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        return diag @ _memory.square(call.module.weight, "linear_w_sq")

    def param_diag(self, call: Operation, name: str, diag: Tensor) -> Tensor:
        d = _rows(diag)  # "n ... o -> (n ...) o"
        if name == "bias":
            return d.sum(0)
        x_sq = _memory.square(_rows(call.input), "linear_x_sq")  # [(N ...), I]
        return torch.mm(d.t(), x_sq, out=_memory.recyclable(call.module.weight.shape, d))


class _TransposedCall:
    """A call of GPT-2's ``Conv1D`` as :class:`LinearRule` reads an ``nn.Linear`` call: weight ``[nf, nx]``."""

    def __init__(self, call: Operation) -> None:
        self._call = call
        m = call.module
        self.module = SimpleNamespace(weight=m.weight.t(), bias=m.bias)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


@register_rule_by_name("transformers", "FalconLinear")
class FalconLinearRule(LinearRule):
    """Falcon's ``FalconLinear``: an ``nn.Linear`` whose ``forward`` computes ``x @ W.T + b``, the
    same map as ``nn.Linear``'s (without this, a module without a rule: the fallback)."""

    def accepts(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)


@register_rule_by_name("transformers", "Conv1D")
class Conv1DRule(LinearRule):
    """Hugging Face's ``Conv1D`` (GPT-2): ``y = x W + b`` with ``W`` ``[nx, nf]``, ``x`` ``[N, *, nx]``.

    ``nn.Linear`` with the weight transposed (its forward flattens the batch
    axis into the positions for ``torch.addmm``; per sample it is the same map):
    :class:`LinearRule`'s results, the weight's transposed back.
    """

    def accepts(self, module: nn.Module) -> bool:
        w, b = getattr(module, "weight", None), getattr(module, "bias", None)
        return (
            isinstance(w, Tensor) and w.dim() == 2 and getattr(module, "nf", None) == w.shape[1]
            and (b is None or (isinstance(b, Tensor) and b.shape == (w.shape[1],)))
        )

    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        return super().jac_t_mat_prod(_TransposedCall(call), mat)

    def jvp(self, call: Operation, tangents: list[Optional[Tensor]], param_tangents: dict[str, Tensor]) -> list[Optional[Tensor]]:
        if "weight" in param_tangents:  # dW in the layout of W, [nx, nf]: the transposed call reads [nf, nx]
            param_tangents = {**param_tangents, "weight": param_tangents["weight"].transpose(1, 2)}
        return super().jvp(_TransposedCall(call), tangents, param_tangents)

    def param_jac_t_mat_prod(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        out = super().param_jac_t_mat_prod(_TransposedCall(call), name, mat)
        return out.transpose(-1, -2) if name == "weight" else out

    def param_factors(self, call: Operation, name: str, mat: Tensor) -> Optional[tuple[Tensor, Optional[Tensor]]]:
        return None  # the factors of Wᵀ, not W

    def position_factors(self, call: Operation, mat: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        return None  # the structure of Wᵀ, not W

    def param_sq_sum(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        out = super().param_sq_sum(_TransposedCall(call), name, mat)
        return out.t() if name == "weight" else out

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        return diag @ call.module.weight.detach().square().t()

    def param_diag(self, call: Operation, name: str, diag: Tensor) -> Tensor:
        out = super().param_diag(_TransposedCall(call), name, diag)
        return out.t() if name == "weight" else out


def _rows(t: Tensor) -> Tensor:
    """``[N, ..., K] → [(N ...), K]`` (no operation for the usual ``[N, K]``)."""
    return t if t.dim() == 2 else t.flatten(0, -2)
