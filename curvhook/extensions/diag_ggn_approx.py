"""DiagGGNApprox: the diagonal-backpropagation approximation of diag(G).

Start from ``d = diag(H_n)``; between adjacent operations keep only the
diagonal of the metric, ``d_in = diag(J_opᵀ diag(d_out) J_op)``; a parameter
gets ``Σ_n diag(J_θᵀ diag(d) J_θ)``. Diagonals reaching one tensor along
several paths are summed. The cost is of the order of one backward pass.

An operation is a leaf module or a tensor operation between modules.
``nn.MultiheadAttention`` used as self-attention counts as the operations it
is built from (the in-projection, the scores, the softmax, ``A v`` and the
out-projection), as if it were written out by hand, at the cost of a backward
pass. ``split_attention=False`` counts it as one operation instead, whose
diagonal needs its whole per-sample Jacobian: many times a backward pass.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from curvhook.extensions.base import Extension, zeros_for
from curvhook.records import Operation
from curvhook.rules.base import LayerRule
from curvhook.sources import LossHessianDiag, Source


class DiagGGNApprox(Extension):
    """Writes ``p.diag_ggn_approx``, shaped like ``p``.

    Args:
        loss: See :class:`~curvhook.extensions.base.Extension`.
        split_attention: Count ``nn.MultiheadAttention`` used as self-attention
            (``batch_first=True``) as its operations (in-projection, scores,
            softmax, ``A v``, out-projection), keeping only the diagonal between
            them (the default; other configurations stay one operation, with a
            warning). ``False`` counts the module as one operation: its whole
            per-sample Jacobian enters the diagonal, at many times the cost.
    """

    attribute = "diag_ggn_approx"
    source_type = LossHessianDiag

    def __init__(self, loss: Optional[nn.Module] = None, split_attention: bool = True) -> None:
        super().__init__(loss)
        self.split_attention = bool(split_attention)

    @property
    def source(self) -> Source:
        return LossHessianDiag(self.loss, attention_as_one=not self.split_attention)

    def param_term(
        self, rule: LayerRule, op: Operation, name: str, value: Tensor, shared: bool
    ) -> Tensor:
        return rule.param_diag(op, name, value)

    def finalize(
        self, totals: dict[int, Tensor], shared: frozenset[int], params: list[nn.Parameter], root: Tensor
    ) -> dict[int, Tensor]:
        return {id(p): totals[id(p)] if id(p) in totals else zeros_for(p) for p in params}

    def _options(self) -> list[str]:
        return super()._options() + ([] if self.split_attention else ["split_attention=False"])
