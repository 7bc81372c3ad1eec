"""What every extension declares: what it backpropagates and what it writes.

An extension names a *source* (the quantity that travels backward) and turns
what reaches each parameter into the attribute it writes. Several extensions
that share a source share one backward traversal.

Sources:

- ``"jacobian"``: the identity columns ``e_1 … e_C`` at the model output, ``[C, N, *out]``.
- ``"sqrt_ggn"``: a square-root factor ``S`` of the loss Hessian, ``[V, N, *out]``.
- ``"diag_ggn"``: the loss-Hessian diagonal, ``[N, *out]``, propagated by keeping
  only the diagonal between operations.
"""

from __future__ import annotations

from typing import ClassVar, Hashable, Optional

import torch
from torch import Tensor, nn

from curvhook.calls import ModuleCall
from curvhook.rules.base import LayerRule

MATRIX_SOURCES = ("jacobian", "sqrt_ggn")


class Extension:
    """Base class of the curvhook extensions.

    Args:
        loss: Optional loss module to use when the loss cannot be found
            automatically (a functional loss such as ``F.cross_entropy``). It
            must describe the scalar you backpropagate exactly, reduction
            included; its targets are not known, so losses whose Hessian depends
            on them (class weights, ``pos_weight``) are rejected.
    """

    attribute: ClassVar[str]
    source: ClassVar[str]

    def __init__(self, loss: Optional[nn.Module] = None) -> None:
        if loss is not None and not self.needs_loss:
            raise TypeError(f"{type(self).__name__} does not use a loss; do not pass loss=.")
        if loss is not None and not isinstance(loss, nn.Module):
            raise TypeError(
                f"loss= expects a loss module such as nn.CrossEntropyLoss(), got {loss!r}."
            )
        self.loss = loss

    @property
    def needs_loss(self) -> bool:
        """Whether the extension needs the loss Hessian."""
        return self.source != "jacobian"

    @property
    def source_key(self) -> Hashable:
        """Extensions with equal keys share one backpropagated quantity."""
        return (self.source, None if self.loss is None else id(self.loss))

    def adapt_rule(self, rule: LayerRule) -> LayerRule:
        """The rule this extension uses where the registry chose ``rule``.

        An option of an extension may swap the rule of a layer family; its
        ``source_key`` must then tell it apart from the same extension without
        the option, since both keys' quantities travel through different rules.
        """
        return rule

    def param_term(
        self, rule: LayerRule, call: ModuleCall, name: str, value: Tensor, shared: bool
    ) -> Tensor:
        """The contribution of one module call to one parameter's result.

        Args:
            rule: The layer rule of ``call.module``.
            call: The recorded call.
            name: The parameter's name in the module.
            value: The backpropagated quantity at the module output.
            shared: Whether the parameter is used by more than one call, in which
                case the terms of all calls are summed before any squaring.

        Returns:
            A tensor; terms of the calls that use a parameter are summed.
        """
        raise NotImplementedError

    def finalize(
        self, totals: dict[int, Tensor], shared: set[int], params: list[nn.Parameter], root: Tensor
    ) -> dict[int, Tensor]:
        """Turn the summed terms into the results, keyed by ``id(parameter)``.

        Args:
            totals: Summed terms for each parameter that received any.
            shared: ``id`` of the parameters used by more than one call.
            params: Every trainable parameter of the model, in order.
            root: The model output, ``[N, *out]``.
        """
        raise NotImplementedError

    def reset(self, params: list[nn.Parameter]) -> None:
        """Remove results of an earlier block so nothing stale is read."""
        for p in params:
            if hasattr(p, self.attribute):
                delattr(p, self.attribute)
        self._written: set[int] = set()

    def write(self, results: dict[int, Tensor], params: list[nn.Parameter], accumulate: bool) -> None:
        """Store the results on the parameters, overwriting or accumulating."""
        for p in params:
            value = results[id(p)]
            if value.dtype != p.dtype:
                value = value.to(p.dtype)
            if accumulate and id(p) in self._written:
                value = self.combine(getattr(p, self.attribute), value)
            setattr(p, self.attribute, value)
            self._written.add(id(p))

    @staticmethod
    def combine(old: Tensor, new: Tensor) -> Tensor:
        """Accumulate results of two backward passes (sum by default)."""
        return old + new

    def result_bytes(self, params: list[nn.Parameter]) -> int:
        """Memory of the results on ``params`` (views of one buffer counted once)."""
        storages = {}
        for p in params:
            value = getattr(p, self.attribute, None)
            if isinstance(value, Tensor):
                storage = value.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    def _options(self) -> list[str]:
        """The non-default constructor arguments, as ``name=value`` (for ``repr``)."""
        return [] if self.loss is None else [f"loss={self.loss!r}"]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self._options())})"


def zeros_for(p: nn.Parameter, *lead: int) -> Tensor:
    """Zeros of shape ``[*lead, *p.shape]`` in the parameter's dtype and device."""
    return torch.zeros(*lead, *p.shape, dtype=p.dtype, device=p.device)
