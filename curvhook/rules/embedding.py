"""``nn.Embedding``: ``y[n, t] = W[x[n, t]]`` for integer indices ``x`` of shape ``[N, *]``.

The input is integer and never requires grad, so only the weight rules are
needed. Per sample, ``J_Wᵀ m`` adds every output row ``m[t]`` to row ``x[t]``
of a zero weight-shaped matrix (positions with the same index add up). Each
entry of ``J_W`` is 0 or 1 with one 1 per output entry, so
``Σ_n diag(J_Wᵀ diag(d_n) J_W)`` is the same scatter-add applied to ``d``.
The row ``padding_idx`` receives no gradient, as in PyTorch.

``DiagGGN`` needs ``Σ_{v,n} (J_Wᵀ m_vn)²`` without a ``[V, N, num_embeddings, dim]``
buffer: the columns are summed per distinct ``(sample, index)`` pair first
(at most ``N·T`` of them), squared, and scattered onto the rows. The NTK's Gram
matrix and the output covariance with a diagonal use the same sums: the
products are nonzero only on the rows a sample reads. The forward product is
``dW[x]``, with the ``padding_idx`` row of ``dW`` held at zero (it is a constant
for autograd).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvhook._torch_internals import tensor_version
from curvhook.errors import UnsupportedModelError
from curvhook.records import Operation
from curvhook.rules import shared_weight
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

    def _pair_sums(self, call: Operation, mat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The columns summed per distinct ``(sample, index)`` pair: ``J_Wᵀ m_vn`` on the rows it touches.

        Returns:
            ``(sums [V, U, D], sample [U], row [U])`` for the ``U ≤ N·T`` pairs (padding rows dropped).
        """
        weight = call.module.weight
        v, n = mat.shape[:2]
        m = mat.reshape(v, n, -1, weight.shape[1]).flatten(1, 2)  # [V, N·T, D]
        idx = self._indices(call)
        sample = torch.arange(n, device=idx.device)[:, None]
        keys, inverse = torch.unique((sample * weight.shape[0] + idx).flatten(), return_inverse=True)
        sums = m.new_zeros(v, keys.numel(), weight.shape[1]).index_add_(1, inverse, m)
        rows = keys % weight.shape[0]
        if call.module.padding_idx is not None:
            keep = rows != call.module.padding_idx % weight.shape[0]
            sums, keys, rows = sums[:, keep], keys[keep], rows[keep]
        return sums, keys // weight.shape[0], rows

    def param_gram(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        # ⟨J_Wᵀ m_vn, J_Wᵀ m_wk⟩ = Σ_rows (sums of sample n on the row)·(sums of sample k on the row):
        # the products restricted to the rows the batch reads, a chunk of rows at a time
        sums, sample, rows = self._pair_sums(call, mat)
        v, n, d = mat.shape[0], mat.shape[1], sums.shape[-1]
        distinct, row_of = torch.unique(rows, return_inverse=True)
        out = mat.new_zeros(v * n, v * n)
        step = max(1, shared_weight.CHUNK_ENTRIES // max(1, v * n * d))
        for start in range(0, distinct.numel(), step):
            stop = min(start + step, distinct.numel())
            sel = (row_of >= start) & (row_of < stop)
            z = mat.new_zeros(v, n * (stop - start), d)
            z.index_add_(1, sample[sel] * (stop - start) + row_of[sel] - start, sums[:, sel])
            shared_weight.add_gram_(out, z.reshape(v * n, -1))
        return shared_weight.mirror_gram_(out)

    def param_metric_gram(self, call: Operation, name: str, mat: Tensor, metric) -> Tensor:
        if isinstance(metric, tuple):
            return super().param_metric_gram(call, name, mat, metric)
        sums, sample, rows = self._pair_sums(call, mat)
        v, n = mat.shape[:2]
        per_pair = torch.einsum("vud,wud->uvw", sums * metric[rows], sums)  # [U, V, V]
        return mat.new_zeros(n, v, v).index_add_(0, sample, per_pair)

    def param_summed_products(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        weight = call.module.weight
        v = mat.shape[0]
        m = mat.reshape(v, -1, weight.shape[1])  # [V, N·T, D]
        out = m.new_zeros(v, *weight.shape).index_add_(1, self._indices(call).flatten(), m)
        return self._drop_padding(call, out)

    def jvp(self, call: Operation, tangents: list, param_tangents: dict) -> list:
        d_w = param_tangents.get("weight")
        if d_w is None:
            return [None]
        if call.module.padding_idx is not None:
            d_w = d_w.clone()
            d_w[:, call.module.padding_idx] = 0
        idx = call.input
        return [d_w[:, idx]]

    def param_sq_sum(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        # Σ_v (J_Wᵀ m_vn)² on the rows each sample reads, scattered onto the rows
        sums, _, rows = self._pair_sums(call, mat)
        return mat.new_zeros(call.module.weight.shape).index_add_(0, rows, sums.square().sum(0))

    def param_diag(self, call: Operation, name: str, diag: Tensor) -> Tensor:
        weight = call.module.weight
        d = diag.reshape(-1, weight.shape[1])  # [N·T, D]
        out = d.new_zeros(weight.shape).index_add_(0, self._indices(call).flatten(), d)
        return self._drop_padding(call, out)
