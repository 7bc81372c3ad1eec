"""``nn.Embedding``: ``y[n, t] = W[x[n, t]]`` for integer indices ``x`` of shape ``[N, *]``.

The input is integer and never requires grad, so only the weight rules are
needed. Per sample, ``J_Wᵀ m`` adds every output row ``m[t]`` to row ``x[t]``
of a zero weight-shaped matrix (positions with the same index add up). Each
entry of ``J_W`` is 0 or 1 with one 1 per output entry, so
``Σ_n diag(J_Wᵀ diag(d_n) J_W)`` is the same scatter-add applied to ``d``.
The row ``padding_idx`` receives no gradient, as in PyTorch.

``DiagGGN`` needs ``Σ_{v,n} (J_Wᵀ m_vn)²`` without a ``[V, N, num_embeddings, dim]``
buffer: the columns are summed per distinct ``(sample, index)`` pair first
(at most ``N·T`` of them), squared, and scattered onto the rows.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvhook._torch_internals import tensor_version
from curvhook.errors import UnsupportedModelError
from curvhook.records import Operation
from curvhook.rules.base import LayerRule
from curvhook.rules.registry import register_rule


@register_rule(nn.Embedding)
class EmbeddingRule(LayerRule):
    """Rules for ``nn.Embedding`` (``padding_idx`` included).

    ``max_norm`` (renormalizes the weight in the forward pass) and
    ``scale_grad_by_freq`` (a gradient that is not the Jacobian's transpose)
    are left to the fallback.
    """

    def accepts(self, module: nn.Module) -> bool:
        return module.max_norm is None and not module.scale_grad_by_freq

    @staticmethod
    def _indices(call: Operation) -> Tensor:
        """The indices, ``[N, T]``, as the forward pass used them (torch checked their range there)."""
        versions = getattr(call, "input_versions", None)  # None: F.embedding, seen as a module call
        if versions is not None and tensor_version(call.input) != versions[0]:
            raise UnsupportedModelError(
                f"The indices given to {call.name!r} (Embedding) were changed in place after the "
                "call, so curvhook no longer knows which rows the forward pass read. Change a "
                "copy of them instead (ids.clone())."
            )
        return call.input.reshape(call.input.shape[0], -1)

    @staticmethod
    def _drop_padding(call: Operation, result: Tensor) -> Tensor:
        """Zero the ``padding_idx`` row of ``[..., num_embeddings, dim]``."""
        if call.module.padding_idx is not None:
            result[..., call.module.padding_idx, :] = 0
        return result

    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        raise RuntimeError("nn.Embedding takes integer indices: there is no input Jacobian.")

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        raise RuntimeError("nn.Embedding takes integer indices: there is no input Jacobian.")

    def param_jac_t_mat_prod(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        weight = call.module.weight
        v, n = mat.shape[:2]
        m = mat.reshape(v, n, -1, weight.shape[1])  # [V, N, T, D]
        idx = self._indices(call)[None, :, :, None].expand(v, -1, -1, weight.shape[1])
        out = m.new_zeros(v, n, *weight.shape)
        return self._drop_padding(call, out.scatter_add_(2, idx, m))

    def param_sq_sum(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        weight = call.module.weight
        v, n = mat.shape[:2]
        m = mat.reshape(v, n, -1, weight.shape[1]).flatten(1, 2)  # [V, N·T, D]
        idx = self._indices(call)
        # one key per (sample, index) pair: columns of one sample that hit the same row add up
        sample = torch.arange(n, device=idx.device)[:, None]
        keys, inverse = torch.unique((sample * weight.shape[0] + idx).flatten(), return_inverse=True)
        sums = m.new_zeros(v, keys.numel(), weight.shape[1]).index_add_(1, inverse, m)
        squares = sums.square().sum(0)  # [K, D]: Σ_v (J_Wᵀ m_vn)² restricted to row key % E
        out = squares.new_zeros(weight.shape).index_add_(0, keys % weight.shape[0], squares)
        return self._drop_padding(call, out)

    def param_diag(self, call: Operation, name: str, diag: Tensor) -> Tensor:
        weight = call.module.weight
        d = diag.reshape(-1, weight.shape[1])  # [N·T, D]
        out = d.new_zeros(weight.shape).index_add_(0, self._indices(call).flatten(), d)
        return self._drop_padding(call, out)
