"""The interface every layer family implements.

Notation used in all rules (one call of a module ``y = m(x; θ)``):

- ``V`` backpropagated columns, ``N`` samples.
- ``mat``: a matrix backpropagated to the module output, ``[V, N, *y.shape[1:]]``.
  Column ``v`` of sample ``n`` is a vector ``m_vn`` in output space.
- ``diag``: a per-sample diagonal metric on the output, ``[N, *y.shape[1:]]``.

The products a rule provides, for the input at ``slot`` (the ``i``-th distinct
tensor argument) and for each parameter by name:

- ``input_jac_t_mat_prod``: ``J_xᵀ m_vn`` for every column, ``[V, N, *x.shape[1:]]``.
- ``param_jac_t_mat_prod``: the per-sample ``J_θᵀ m_vn``, ``[V, N, *θ.shape]``.
- ``input_diag``: ``diag(J_xᵀ diag(d_n) J_x)``, ``[N, *x.shape[1:]]``.
- ``param_diag``: ``Σ_n diag(J_θᵀ diag(d_n) J_θ)``, ``[*θ.shape]``.

A layer with one input implements ``jac_t_mat_prod`` and ``diag_jac_t_diag_jac``,
the products for slot 0; the slot methods call them and refuse other slots.
``param_sq_sum`` (``Σ_{v,n} (J_θᵀ m_vn)²``, the DiagGGN contribution) has a
default built from ``param_jac_t_mat_prod``; rules override it when the square
can be summed over ``V`` and ``N`` before a GEMM. ``param_sq_norms``
(``‖J_θᵀ m_vn‖²`` per column and sample, the BatchL2Grad term) has a default
built from ``param_jac_t_mat_prod`` too; rules override it where the norm has a
Gram-matrix form that never forms the products.

The products without Jacobians (NTK, OutputCovariance, GGNVectorProduct,
LowRankGGN) use three more contractions of the parameter products and the
forward product ``jvp``; their defaults use :meth:`position_factors` where a
layer has that structure (:mod:`curvhook.rules.shared_weight`: the products are
never formed), else they form the products of one layer:

- ``param_gram``: ``⟨J_θᵀ m_vn, J_θᵀ m_wk⟩``, ``[V·N, V·N]``;
- ``param_metric_gram``: ``(J_θᵀ m_vn)ᵀ Σ_θ (J_θᵀ m_wn)`` per sample, ``[N, V, V]``;
- ``param_summed_products``: ``Σ_n J_θᵀ m_vn``, ``[V, *θ.shape]``;
- ``jvp``: ``J_x dx + J_θ dθ`` for tangents with ``K`` columns, ``[K, *y.shape]``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from curvhook import _memory
from curvhook.records import Operation
from curvhook.rules import shared_weight
from curvhook.rules import node_kernels
from curvhook.errors import UnsupportedModelError, partial_backward_error
from curvhook.losses import identity_factor

# Per-sample products held at once by :func:`sum_of_squared_products` (16 MiB of float32).
_SQ_CHUNK_ENTRIES = 1 << 22


def sum_of_squared_products(left: Tensor, right: Tensor) -> Tensor:
    """``Σ_{v,n} (left_vn @ right_n)∘(left_vn @ right_n)``, without all products at once.

    The DiagGGN term of a layer whose per-sample parameter products are matrix
    products (a convolution against its unfolded input, a linear layer over
    positions). Per column ``v`` and chunk of samples, one batched GEMM writes
    into a scratch buffer that is squared in place and summed over the samples,
    so at most ``_SQ_CHUNK_ENTRIES`` products are alive.

    Args:
        left: ``[V, N, A, K]``.
        right: ``[N, K, B]``.

    Returns:
        ``[A, B]``.
    """
    v, n, a, _ = left.shape
    b = right.shape[-1]
    step = max(1, _SQ_CHUNK_ENTRIES // (a * b))
    buffer = _memory.scratch((min(step, n), a, b), left, "sq_products")
    total = left.new_zeros(a, b)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        right_rows, buf = right[rows], buffer[: rows.stop - start]
        for col in range(v):
            torch.bmm(left[col, rows], right_rows, out=buf)
            total += buf.square_().sum(0)
    return total


def metric_gram_of_products(products: Tensor, metric: shared_weight.Metric) -> Tensor:
    """``(J_θᵀ m_vn)ᵀ Σ_θ (J_θᵀ m_wn)`` per sample from the products ``[V, N, *θ]``: ``[N, V, V]``.

    ``metric`` is a diagonal shaped like ``θ`` or Kronecker factors ``(A, B)``,
    ``Σ_θ = B ⊗ A`` in ``θ.flatten()`` order (``B`` over ``θ``'s first axis).
    """
    v, n = products.shape[:2]
    if isinstance(metric, tuple):
        a_factor, b_factor = metric
        p = products.reshape(v, n, b_factor.shape[0], -1)
        q = torch.matmul(torch.matmul(b_factor, p), a_factor.T)
        return torch.einsum("vnoi,wnoi->nvw", p, q)
    flat = products.reshape(v, n, -1)  # [V, N, |θ|] (also for a 0-d θ)
    return torch.einsum("vnk,wnk->nvw", flat * metric.flatten(), flat)


def is_single_node(call: Operation) -> bool:
    """Whether the module's output node leads straight to its input (one autograd operation).

    Then ``call.node`` applied to a vector is ``J_xᵀ`` applied to it. Every edge of the
    node that carries a gradient must lead to the input (a constant, such as dropout's
    mask, has none): ``x * sigmoid(1.702 x)`` (Hugging Face's QuickGELU) ends in a
    product whose first edge is ``x`` and whose second is the sigmoid, and the product's
    node alone gives only ``sigmoid(1.702 x)``, not the slope.
    """
    if call.node is None:
        return False
    source, found = call.input_nodes[0], False
    for edge, _ in call.node.next_functions:
        if edge is None:
            continue
        if source is None:  # input is a leaf: its node is an AccumulateGrad
            if getattr(edge, "variable", None) is not call.inputs[0]:
                return False
        elif edge is not source:
            return False
        found = True
    return found


def apply_node(node: Any, value: Tensor) -> Tensor:
    """``J_xᵀ value`` by the autograd node of a one-operation call (see :func:`is_single_node`).

    Common nodes (ReLU, GELU, max pooling, ...) write into a recycled buffer
    (:mod:`curvhook.rules.node_kernels`); the values are the node's own.
    """
    into = node_kernels.apply_into(node, value)
    if into is not None:
        return into
    # (a custom autograd.Function's node, BLOOM's GeLUFunctionBackward, is not callable: its apply runs backward)
    out = node(value) if callable(node) else node.apply(value)
    out = out[0] if isinstance(out, tuple) else out
    if out is None:  # a node this backward pass does not run gives no gradient
        raise partial_backward_error(node.name())
    return out


def one_column_by_node(call: Operation, mat: Tensor) -> Optional[Tensor]:
    """``J_xᵀ m`` for a single column ``m`` (``[1, *out]``) by the call's own autograd node.

    The node computes exactly what autograd's backward computes for the call, in
    one pass; rules with one tensor input use it for the one backpropagated column
    of the per-sample gradients and of sampled columns.

    Returns:
        ``[1, *x.shape]``, or ``None`` where the node cannot be used (several
        columns, another dtype or shape than the output, more than one operation).
    """
    out = call.output
    if mat.shape[0] != 1 or out is None or mat.dtype != out.dtype or mat.shape[1:] != out.shape:
        return None
    if not is_single_node(call):
        return None
    return apply_node(call.node, mat[0]).unsqueeze(0)


class LayerRule:
    """Stateless derivative rules for one family of layers.

    Subclasses override what their layers need; a layer without parameters
    only needs ``jac_t_mat_prod`` and ``diag_jac_t_diag_jac``.
    """

    def accepts(self, module: nn.Module) -> bool:
        """Whether this rule serves ``module`` (a configuration it does not cover declines).

        A declined module goes to the exact ``torch.func`` fallback, as if no
        rule were registered for its type.

        Args:
            module: A module whose type (or a base of it) the rule is registered for.

        Returns:
            ``True`` by default.
        """
        return True

    def operations_rule(self) -> "LayerRule":
        """The rule that counts a module as the operations it is built from.

        DiagGGNApprox keeps only the diagonal between operations; a rule whose
        module is several operations (self-attention) returns a rule that keeps
        only the diagonal between them too. The default: the module is one operation.
        """
        return self

    def input_jac_t_mat_prod(self, call: Operation, mat: Tensor, slot: int) -> Tensor:
        """``J_xᵀ m_vn`` for the input at ``slot``, ``[V, N, *x.shape[1:]]``.

        Args:
            call: The recorded operation.
            mat: ``[V, N, *out]``.
            slot: Which tensor input.
        """
        if slot == 0:
            return self.jac_t_mat_prod(call, mat)
        raise _several_inputs(call)

    def input_diag(self, call: Operation, diag: Tensor, slot: int) -> Tensor:
        """``diag(J_xᵀ diag(d_n) J_x)`` for the input at ``slot``, ``[N, *x.shape[1:]]``.

        Args:
            call: The recorded operation.
            diag: ``[N, *out]``.
            slot: Which tensor input.
        """
        if slot == 0:
            return self.diag_jac_t_diag_jac(call, diag)
        raise _several_inputs(call)

    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        """Backpropagate columns through the Jacobian of the first input.

        Args:
            call: The recorded module call.
            mat: ``[V, N, *out]``.

        Returns:
            ``[V, N, *in]``: ``J_xᵀ`` applied to every column.
        """
        raise NotImplementedError

    def param_jac_t_mat_prod(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        """Per-sample parameter Jacobian-transposed products.

        Args:
            call: The recorded module call.
            name: Parameter name inside the module (``"weight"``).
            mat: ``[V, N, *out]``.

        Returns:
            ``[V, N, *θ.shape]``.
        """
        raise NotImplementedError

    def param_factors(
        self, call: Operation, name: str, mat: Tensor
    ) -> Optional[tuple[Tensor, Optional[Tensor]]]:
        """Optional: the per-sample products as outer products, ``J_θᵀ m_vn = a_vn ⊗ b_n``.

        Layers whose parameter Jacobian has this Kronecker structure (``nn.Linear``
        on inputs without extra positions: ``a_vn = m_vn``, ``b_n = x_n``) let
        ``FullGGN`` form its blocks with ``V``-times fewer operations.

        Args:
            call: The recorded module call.
            name: Parameter name inside the module.
            mat: ``[V, N, *out]``.

        Returns:
            ``(a, b)`` with ``a`` ``[V, N, A]`` and ``b`` ``[N, B]`` (``None`` for
            ``b ≡ 1``), such that the product reshaped to ``[V, N, A·B]`` is
            ``a ⊗ b``; or ``None`` where there is no such structure (the default).
        """
        return None

    def position_factors(self, call: Operation, mat: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        """Optional: the layer as a weight matrix shared over positions, ``y_nt = W a_nt + b``.

        ``nn.Linear`` (``a`` the input at each position) and the convolutions with
        ``groups=1`` (``a`` the unfolded patch of each output position) have this
        structure; KFAC forms its Kronecker factors from it. Per sample,
        ``J_Wᵀ m_vn = Σ_t m_vnt a_ntᵀ`` (``W`` as ``[O, I]``, reshaped to its shape
        row-major) and ``J_bᵀ m_vn = Σ_t m_vnt``.

        Args:
            call: The recorded module call.
            mat: ``[V, N, *out]``.

        Returns:
            ``(a, m)``: ``a`` ``[N, T, I]`` and ``m`` ``[V, N, T, O]`` (views where
            possible); or ``None`` where the layer has no such structure (the default).
        """
        return None

    def param_sq_sum(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        """``Σ_{v,n} (J_θᵀ m_vn)²``, shape ``[*θ.shape]``."""
        return self.param_jac_t_mat_prod(call, name, mat).square().sum((0, 1))

    def param_sq_norms(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        """``‖J_θᵀ m_vn‖²`` for every column and sample, shape ``[V, N]``.

        The default forms the products (:meth:`param_jac_t_mat_prod`) and
        square-sums them; rules override it where a Gram-matrix form is cheaper.
        """
        prod = self.param_jac_t_mat_prod(call, name, mat)  # [V, N, *θ]
        if prod.dim() == 2:  # a 0-d θ (dim=() would reduce every axis)
            return prod.square()
        # the norm reduces without an entrywise square of the whole product in memory
        return torch.linalg.vector_norm(prod, dim=tuple(range(2, prod.dim()))).square()

    def _shared_weight(self, call: Operation, name: str, mat: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        """:meth:`position_factors` for the weight and bias of a layer that has them, else ``None``."""
        if name not in ("weight", "bias"):
            return None
        return self.position_factors(call, mat)

    def param_gram(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        """``⟨J_θᵀ m_vn, J_θᵀ m_wk⟩`` for all pairs of columns and samples, ``[V·N, V·N]``.

        Rows and columns run over ``(v, n)``, ``v`` slowest. The empirical NTK is this
        Gram matrix of the identity columns, summed over the parameters.
        """
        factors = self._shared_weight(call, name, mat)
        if factors is not None:
            return shared_weight.gram(*factors, bias=name == "bias")
        prod = self.param_jac_t_mat_prod(call, name, mat)
        prod = prod.reshape(prod.shape[0] * prod.shape[1], -1)  # [V·N, |θ|] (also for a 0-d θ)
        return prod @ prod.T

    def param_metric_gram(self, call: Operation, name: str, mat: Tensor, metric: shared_weight.Metric) -> Tensor:
        """``(J_θᵀ m_vn)ᵀ Σ_θ (J_θᵀ m_wn)`` per sample, ``[N, V, V]``.

        Args:
            call: The recorded call.
            name: The parameter.
            mat: ``[V, N, *out]``.
            metric: ``Σ_θ`` as a diagonal shaped like ``θ``, or Kronecker factors
                ``(A, B)`` with ``Σ_θ = B ⊗ A`` in ``θ.flatten()`` order (``B``
                ``[θ.shape[0]]²``, ``A`` the rest; the layout of ``p.kfac``).
        """
        factors = self._shared_weight(call, name, mat)
        if factors is not None:
            return shared_weight.metric_gram(*factors, bias=name == "bias", metric=metric)
        return metric_gram_of_products(self.param_jac_t_mat_prod(call, name, mat), metric)

    def param_summed_products(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        """``Σ_n J_θᵀ m_vn``, the products summed over the samples, ``[V, *θ.shape]``.

        For one column this is the parameter's part of an ordinary vector-Jacobian
        product; GGN-vector products and eigenvectors pull their columns back with it.
        """
        factors = self._shared_weight(call, name, mat)
        if factors is not None:
            out = shared_weight.summed_products(*factors, bias=name == "bias")
            return out.reshape(mat.shape[0], *dict(call.params)[name].shape)
        return self.param_jac_t_mat_prod(call, name, mat).sum(1)

    def jvp(self, call: Operation, tangents: list[Optional[Tensor]], param_tangents: dict[str, Tensor]) -> list[Optional[Tensor]]:
        """The forward product ``J_x dx + J_θ dθ`` of the call, for ``K`` tangent columns.

        The default differentiates a replay of the call with ``torch.func.jvp``
        (:mod:`curvhook.forward_products`); rules override it with closed forms.

        Args:
            call: The recorded call.
            tangents: Per input slot, ``[K, *x.shape]`` or ``None`` (no tangent).
            param_tangents: Per parameter name, ``[K, *θ.shape]`` (absent: none).

        Returns:
            Per followed output, ``[K, *y.shape]`` or ``None`` (zero).
        """
        from curvhook.forward_products import replay_jvp  # the replay machinery imports the rules

        return replay_jvp(call, tangents, param_tangents)

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        """Pull a diagonal metric back to the input, keeping only the diagonal.

        Args:
            call: The recorded module call.
            diag: ``[N, *out]``.

        Returns:
            ``[N, *in]``: ``diag(J_xᵀ diag(d_n) J_x)`` per sample.

        The default is exact and derived from :meth:`jac_t_mat_prod`: the rows of
        ``J_x`` are ``J_xᵀ e_o`` for the identity columns ``e_o``, and
        ``diag(J_xᵀ diag(d) J_x)_i = Σ_o d_o J_oi²``. It costs one product with
        ``C_out`` columns; override it where a closed form exists.
        """
        rows = self.jac_t_mat_prod(call, identity_factor(diag))  # [O, N, *in]
        return torch.einsum("on...,no->n...", rows.square(), diag.flatten(1))

    def param_diag(self, call: Operation, name: str, diag: Tensor) -> Tensor:
        """``Σ_n diag(J_θᵀ diag(d_n) J_θ)``, shape ``[*θ.shape]``.

        The default is exact and derived from :meth:`param_jac_t_mat_prod` with
        the identity columns, like :meth:`diag_jac_t_diag_jac`.
        """
        rows = self.param_jac_t_mat_prod(call, name, identity_factor(diag))  # [O, N, *θ]
        return torch.einsum("on...,no->...", rows.square(), diag.flatten(1))


def _several_inputs(call: Operation) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"Module {call.name!r} ({type(call.module).__name__}) takes several tensor inputs that "
        "require grad, and its rule handles only the first."
    )
