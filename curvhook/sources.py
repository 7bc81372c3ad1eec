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

The loss-based sources start at the tensor the losses were called on: the model
output, or a function of it computed after the model (those operations are then
part of the network).
"""

from __future__ import annotations

import math
from typing import Hashable, Optional

import torch
from torch import Tensor, nn

from curvhook.loss_terms import LossTerms
from curvhook.losses import identity_factor
from curvhook.records import Operation, TensorKey
from curvhook.rules.base import LayerRule
from curvhook.trace import Trace


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

    def initial(self, trace: Trace, grad_root: Tensor, terms: Optional[LossTerms]) -> tuple[TensorKey, Tensor]:
        """Where the quantity starts and its value there.

        Args:
            trace: The forward pass.
            grad_root: ``∂ℓ/∂f`` at the model output, ``[N, *out]``.
            terms: The loss terms of the backpropagated scalar (``None`` for a
                source that needs no loss).
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

    def initial(self, trace: Trace, grad_root: Tensor, terms: Optional[LossTerms]) -> tuple[TensorKey, Tensor]:
        return trace.root_key, identity_factor(trace.root_value)


class LossHessianSqrt(Source):
    """``S`` with ``Σ_v s_vn s_vnᵀ = Σ_i c_i H_i,n``: the losses' factors, scaled and stacked."""

    def initial(self, trace: Trace, grad_root: Tensor, terms: Optional[LossTerms]) -> tuple[TensorKey, Tensor]:
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

    def initial(self, trace: Trace, grad_root: Tensor, terms: Optional[LossTerms]) -> tuple[TensorKey, Tensor]:
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

    def initial(self, trace: Trace, grad_root: Tensor, terms: Optional[LossTerms]) -> tuple[TensorKey, Tensor]:
        # contiguous: a backward from model(X).sum() delivers an expanded (stride-0) gradient
        return trace.root_key, grad_root.detach().contiguous().unsqueeze(0)
