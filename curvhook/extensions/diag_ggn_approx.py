"""DiagGGNApprox: the diagonal-backpropagation approximation of diag(G).

Start from ``d = diag(H_n)``; between adjacent operations keep only the
diagonal of the metric, ``d_in = diag(J_opᵀ diag(d_out) J_op)``; a parameter
gets ``Σ_n diag(J_θᵀ diag(d) J_θ)``. Diagonals reaching one tensor along
several paths are summed. The cost is of the order of one backward pass.

An operation is a leaf module or a tensor operation between modules, so
``nn.MultiheadAttention`` (which uses its ``out_proj`` without calling it) is
one operation, whose diagonal needs its whole per-sample Jacobian: many times
a backward pass. ``split_attention=True`` counts self-attention as the
operations it is built from instead, as if it were written out by hand: a
different approximation, at the cost of a backward pass.
"""

from __future__ import annotations

from typing import Hashable, Optional

from torch import Tensor, nn

from curvhook.calls import ModuleCall
from curvhook.extensions.base import Extension, zeros_for
from curvhook.rules.attention import SPLIT_ATTENTION, SelfAttentionRule
from curvhook.rules.base import LayerRule


class DiagGGNApprox(Extension):
    """Writes ``p.diag_ggn_approx``, shaped like ``p``.

    Args:
        loss: See :class:`~curvhook.extensions.base.Extension`.
        split_attention: Count ``nn.MultiheadAttention`` used as self-attention
            (``batch_first=True``) as its operations (in-projection, scores,
            softmax, ``A v``, out-projection) instead of one operation, keeping
            only the diagonal between them. Far cheaper on transformers, but a
            different approximation than the definition's (it equals that of
            the same attention written out by hand). Other configurations stay
            one operation, with a warning.
    """

    attribute = "diag_ggn_approx"
    source = "diag_ggn"

    def __init__(self, loss: Optional[nn.Module] = None, split_attention: bool = False) -> None:
        super().__init__(loss)
        self.split_attention = bool(split_attention)

    @property
    def source_key(self) -> Hashable:
        return (*super().source_key, self.split_attention)

    def adapt_rule(self, rule: LayerRule) -> LayerRule:
        if self.split_attention and type(rule) is SelfAttentionRule:
            return SPLIT_ATTENTION
        return rule

    def param_term(
        self, rule: LayerRule, call: ModuleCall, name: str, value: Tensor, shared: bool
    ) -> Tensor:
        return rule.param_diag(call, name, value)

    def finalize(
        self, totals: dict[int, Tensor], shared: set[int], params: list[nn.Parameter], root: Tensor
    ) -> dict[int, Tensor]:
        return {id(p): totals[id(p)] if id(p) in totals else zeros_for(p) for p in params}

    def _options(self) -> list[str]:
        return super()._options() + (["split_attention=True"] if self.split_attention else [])
