"""Sources: what travels backward, where it starts, and how it is pulled back.

Every extension names a source; extensions with equal sources share one
backpropagated quantity in the reverse walk.

- :class:`JacobianColumns`: the identity columns ``e_1 … e_C`` at the model
  output, ``[C, N, *out]``; pulled back as matrices.
- :class:`LossHessianSqrt`: a square-root factor ``S`` of the loss Hessian,
  ``H_n = Σ_v s_vn s_vnᵀ``, ``[V, N, *out]``; pulled back as matrices.
- :class:`LossHessianDiag`: the loss-Hessian diagonal ``[N, *out]``, pulled back
  keeping only the diagonal between operations (DiagGGNApprox).
- :class:`LossGradient`: the gradient ``∂ℓ/∂f`` that autograd delivers at the
  model output, one column per sample, ``[1, N, *out]``; pulled back as a matrix
  (BatchGrad, BatchL2Grad, SumGradSquared).
- :class:`SampledLossHessianSqrt`: ``M`` sampled square-root columns scaled by
  ``1/√M``, ``[M, N, *out]``, with ``E[S Sᵀ] = H``; pulled back as matrices
  (DiagGGNMC, KFAC with ``mc_samples``).

The loss-based sources start at the tensor the losses were called on: the model
output, or a function of it computed after the model (those operations are then
part of the network).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Hashable, Optional

import torch
from torch import Tensor, nn

from curvhook._torch_internals import current_graph_task_id
from curvhook.errors import CurvhookError, UnsupportedModelError
from curvhook.loss_terms import LossTerms
from curvhook.losses import identity_factor
from curvhook.records import Operation, TensorKey
from curvhook.rules.base import LayerRule
from curvhook.trace import Trace

if TYPE_CHECKING:
    from curvhook.plan import Plan


class Source:
    """Base class of the backpropagated quantities (see the module docstring).

    Args:
        loss: A named loss module (``DiagGGN(loss=nn.CrossEntropyLoss())``), or
            ``None`` to use the loss modules called inside the block.

    Attributes:
        matrix: Whether columns ``[V, N, *]`` travel (else a diagonal ``[N, *]``).
        needs_loss: Whether the source starts from the loss Hessian.
    """

    matrix: bool = True
    needs_loss: bool = True

    def __init__(self, loss: Optional[nn.Module] = None) -> None:
        self.loss = loss

    @property
    def key(self) -> Hashable:
        """Sources with equal keys backpropagate the same quantity."""
        return (type(self), None if self.loss is None else id(self.loss))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Source) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def rule(self, rule: LayerRule) -> LayerRule:
        """The rule used where the registry chose ``rule`` (an option may swap it)."""
        return rule

    def initial(
        self, trace: Trace, grad_root: Tensor, terms: Optional[LossTerms], plan: Optional["Plan"] = None
    ) -> tuple[TensorKey, Optional[Tensor]]:
        """Where the quantity starts and its value there.

        Args:
            trace: The forward pass.
            grad_root: ``∂ℓ/∂f`` at the model output, ``[N, *out]``.
            terms: The loss terms of the backpropagated scalar (``None`` for a
                source that needs no loss).
            plan: The compiled walk of the trace (sources that push tangents
                forward first read the rules from it).

        Returns:
            ``(key, value)``; a value of ``None`` starts no walk.
        """
        raise NotImplementedError

    def pull_back(self, rule: LayerRule, op: Operation, value, slot: int) -> Tensor:
        """Move the quantity from the outputs of ``op`` to its input ``slot``."""
        if self.matrix:
            return rule.input_jac_t_mat_prod(op, value, slot)
        return rule.input_diag(op, value, slot)


class JacobianColumns(Source):
    """The identity columns at the model output: ``J_nᵀ e_c`` reaches each parameter."""

    needs_loss = False

    def initial(
        self, trace: Trace, grad_root: Tensor, terms: Optional[LossTerms], plan: Optional["Plan"] = None
    ) -> tuple[TensorKey, Optional[Tensor]]:
        return trace.root_key, identity_factor(trace.root_value)


class LossHessianSqrt(Source):
    """``S`` with ``Σ_v s_vn s_vnᵀ = Σ_i c_i H_i,n``: the losses' factors, scaled and stacked."""

    def initial(
        self, trace: Trace, grad_root: Tensor, terms: Optional[LossTerms], plan: Optional["Plan"] = None
    ) -> tuple[TensorKey, Optional[Tensor]]:
        factors = [
            math.sqrt(s) * rule.sqrt_hessian(call) for s, rule, call in zip(terms.scales, terms.rules, terms.calls)
        ]
        return terms.start, terms.columns_at_start(factors[0] if len(factors) == 1 else torch.cat(factors))


class LossHessianDiag(Source):
    """``diag(Σ_i c_i H_i,n)``, pulled back keeping only the diagonal between operations.

    Args:
        loss: See :class:`Source`.
        attention_as_one: Count ``nn.MultiheadAttention`` as one operation (its
            whole per-sample Jacobian) instead of the operations it is built from.
    """

    matrix = False

    def __init__(self, loss: Optional[nn.Module] = None, attention_as_one: bool = False) -> None:
        super().__init__(loss)
        self.attention_as_one = attention_as_one

    @property
    def key(self) -> Hashable:
        return (*super().key, self.attention_as_one)

    def rule(self, rule: LayerRule) -> LayerRule:
        return rule if self.attention_as_one else rule.operations_rule()

    def initial(
        self, trace: Trace, grad_root: Tensor, terms: Optional[LossTerms], plan: Optional["Plan"] = None
    ) -> tuple[TensorKey, Optional[Tensor]]:
        diag = terms.weighted_sum([rule.hessian_diag(call) for rule, call in zip(terms.rules, terms.calls)])
        return terms.start, terms.per_sample_at_start(diag)


class LossGradient(Source):
    """The gradient ``∂ℓ/∂f_n`` at the model output as one column, ``[1, N, *out]``.

    It is read from the gradient autograd delivers at the model output, which is
    exactly the one whose sum over samples gives ``p.grad``: the reduction's
    ``1/N``, scalings of the loss, sums of several losses and operations applied
    to the output after the model are all already in it. So no loss is needed,
    and ``J_nᵀ (∂ℓ/∂f_n)`` reaching a parameter is sample ``n``'s gradient ``g_n``.
    """

    needs_loss = False

    def initial(
        self, trace: Trace, grad_root: Tensor, terms: Optional[LossTerms], plan: Optional["Plan"] = None
    ) -> tuple[TensorKey, Optional[Tensor]]:
        _refuse_parameters_after_the_model(trace)
        # contiguous: a backward from model(X).sum() delivers an expanded (stride-0) gradient
        return trace.root_key, grad_root.detach().contiguous().unsqueeze(0)


def _refuse_parameters_after_the_model(trace: Trace) -> None:
    """Refuse a backward pass through an operation after the model that uses a model parameter.

    ``crit(model(X) / model.T, y)``: ``T``'s per-sample gradients do not pass through the
    model output, where this source starts, so they would be zero.
    """
    used = next((op for op in trace.after_operations if op.params), None)
    if used is not None and current_graph_task_id() in trace.after_tasks:
        raise UnsupportedModelError(
            f"A parameter of the model is used after the model returned (in {used.name!r}), and "
            "this backward pass goes through that operation. BatchGrad, BatchL2Grad and "
            "SumGradSquared start from the gradient at the model output, which that parameter's "
            "per-sample gradients do not pass through. Move the operation into the model's forward."
        )
class SampledLossHessianSqrt(Source):
    """``M`` sampled columns ``s_m / √M``, ``[M, N, *out]``: ``E[Σ_m s_m s_mᵀ / M] = Σ_i c_i H_i``.

    Each loss draws its own columns (:meth:`~curvhook.losses.LossRule.sample_sqrt_hessian`,
    zero mean and second moment ``H_i``); the columns of several losses are
    summed, ``s = Σ_i √c_i s_i``, which keeps ``E[s sᵀ] = Σ_i c_i H_i`` with ``M``
    columns (the draws are independent and have zero mean). The ``1/√M`` makes every
    sum of squares over the columns an average over the samples.

    Args:
        loss: See :class:`Source`.
        mc_samples: ``M ≥ 1``.
        generator: The random number generator the draws use (``None``: torch's
            default one). Sources with different generators or ``M`` draw apart.
    """

    def __init__(self, loss: Optional[nn.Module] = None, mc_samples: int = 1, generator: Optional[torch.Generator] = None) -> None:
        super().__init__(loss)
        self.mc_samples = mc_samples
        self.generator = generator

    @property
    def key(self) -> Hashable:
        return (*super().key, self.mc_samples, None if self.generator is None else id(self.generator))

    def initial(
        self, trace: Trace, grad_root: Tensor, terms: Optional[LossTerms], plan: Optional["Plan"] = None
    ) -> tuple[TensorKey, Optional[Tensor]]:
        m = self.mc_samples
        device = terms.calls[0].input.device
        if self.generator is not None and self.generator.device.type != device.type:
            raise CurvhookError(
                f"The generator passed to the extension is on {self.generator.device}, the loss input "
                f"on {device}: pass torch.Generator(device={str(device)!r})."
            )
        columns = None
        for scale, rule, call in zip(terms.scales, terms.rules, terms.calls):
            s = rule.sample_sqrt_hessian(call, m, self.generator).mul_(math.sqrt(scale / m))
            columns = s if columns is None else columns.add_(s)
        if terms.merge is not None:  # rows [N·k, *t] of one sample: one joint draw per sample
            columns = columns.reshape(m, *terms.merge.inputs[0].shape)
        return terms.start, columns


class GGNVectorColumns(Source):
    """``H_n J_n v`` for ``K`` directions ``v``, ``[K, N, *out]``: pulled back, ``Σ_n J_nᵀ H_n J_n v = G v``.

    The directions are pushed forward through the recorded graph
    (:func:`~curvhook.forward_products.push_forward`) to the tensor the losses
    were called on; the loss Hessian is applied there through its square-root
    factor, ``H_n t_n = Σ_v s_vn (s_vnᵀ t_n)``.

    Args:
        loss: See :class:`Source`.
        tangents: ``[K, *p.shape]`` by ``id(p)`` for every trainable parameter.
    """

    def __init__(self, loss: Optional[nn.Module], tangents: dict[int, Tensor]) -> None:
        super().__init__(loss)
        self.tangents = tangents

    @property
    def key(self) -> Hashable:
        return (*super().key, id(self.tangents))

    def initial(
        self, trace: Trace, grad_root: Tensor, terms: Optional[LossTerms], plan: Optional["Plan"] = None
    ) -> tuple[TensorKey, Optional[Tensor]]:
        from curvhook.forward_products import push_forward  # imports the rules, which import the sources

        start, s = LossHessianSqrt(self.loss).initial(trace, grad_root, terms)  # [V, N, *x]
        t = push_forward(trace, plan, self.tangents, start)  # [K, N, *x]
        if t is None:  # the loss does not depend on the parameters
            return start, None
        return start, apply_sqrt_factor(s, t.to(s.dtype))


def apply_sqrt_factor(s: Tensor, t: Tensor) -> Tensor:
    """``Σ_v s_vn (s_vnᵀ t_kn)``: ``H_n t_kn`` from a square-root factor, per sample.

    Args:
        s: ``[V, N, *x]``.
        t: ``[K, N, *x]``.

    Returns:
        ``[K, N, *x]``.
    """
    v, n, k = s.shape[0], s.shape[1], t.shape[0]
    s2, t2 = s.reshape(v, n, -1), t.reshape(k, n, -1)
    coefficients = torch.einsum("vnd,knd->nkv", s2, t2)  # [N, K, V]
    return torch.einsum("nkv,vnd->knd", coefficients, s2).reshape(t.shape)


class GivenColumns(Source):
    """Columns built from the loss Hessian's square-root factor: ``c_kn = Σ_v W[v, n, k] s_vn``, ``[K, N, *out]``.

    Pulled back and summed over the samples, ``Σ_n J_nᵀ c_kn = Bᵀ w_k`` with ``B``
    the stacked ``J_nᵀ s_vn`` (LowRankGGN's eigenvectors from those of ``B Bᵀ``).

    Args:
        loss: See :class:`Source`.
        weights: ``W``, ``[V, N, K]``.
    """

    def __init__(self, loss: Optional[nn.Module], weights: Tensor) -> None:
        super().__init__(loss)
        self.weights = weights

    @property
    def key(self) -> Hashable:
        return (*super().key, id(self.weights))

    def initial(
        self, trace: Trace, grad_root: Tensor, terms: Optional[LossTerms], plan: Optional["Plan"] = None
    ) -> tuple[TensorKey, Optional[Tensor]]:
        start, s = LossHessianSqrt(self.loss).initial(trace, grad_root, terms)  # [V, N, *x]
        v, n = s.shape[:2]
        columns = torch.einsum("vnk,vnd->knd", self.weights.to(s.dtype), s.reshape(v, n, -1))
        return start, columns.reshape(-1, *s.shape[1:])


class NoWalk(Source):
    """Backpropagates nothing: for extensions whose walks are all follow-ups (LowRankGGN)."""

    def initial(
        self, trace: Trace, grad_root: Tensor, terms: Optional[LossTerms], plan: Optional["Plan"] = None
    ) -> tuple[TensorKey, Optional[Tensor]]:
        return trace.root_key, None
