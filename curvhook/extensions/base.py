"""What every extension declares: what it backpropagates and what it writes.

An extension names a *source* (:mod:`curvhook.sources`: the quantity that
travels backward) and turns what reaches each parameter into the attribute it
writes. Several extensions with equal sources share one backward traversal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import Tensor, nn

from curvhook.records import Operation
from curvhook.rules.base import LayerRule
from curvhook.sources import Source


class Extension:
    """Base class of the curvhook extensions.

    Args:
        loss: Optional loss module to use when the loss cannot be found
            automatically (a loss function of your own, or a loss computed
            inside the model's ``forward``). It must describe the scalar you
            backpropagate exactly, reduction and any factor included; its
            targets are not known, so losses whose Hessian depends on them
            (class weights, ``pos_weight``) are rejected. The supported loss
            modules and their functions (``F.cross_entropy``, ``F.mse_loss``,
            ``F.binary_cross_entropy_with_logits``) called in the block are
            found without it.
    """

    attribute: ClassVar[str]
    source_type: ClassVar[type]
    # Whether results of several backward passes combine (``extend(..., accumulate=True)``).
    accumulates: ClassVar[bool] = True
    # How the result scales with the backpropagated loss: ``c ℓ`` gives ``c^loss_power`` times it
    # (0: no loss involved, 1: curvature and gradients, 2: squared gradients).
    loss_power: ClassVar[int] = 1

    def __init__(self, loss: Optional[nn.Module] = None) -> None:
        if loss is not None and not self.source_type.needs_loss:
            raise TypeError(f"{type(self).__name__} does not use a loss; do not pass loss=.")
        if loss is not None and not isinstance(loss, nn.Module):
            raise TypeError(
                f"loss= expects a loss module such as nn.CrossEntropyLoss(), got {loss!r}."
            )
        self.loss = loss

    @property
    def source(self) -> Source:
        """What this extension backpropagates; equal sources share one traversal."""
        return self.source_type(self.loss)

    def param_term(
        self, rule: LayerRule, op: Operation, name: str, value: Tensor, shared: bool
    ) -> Any:
        """The contribution of one operation to one parameter's result.

        Args:
            rule: The rule of the operation.
            op: The recorded operation.
            name: The parameter's name in the module.
            value: The backpropagated quantity at the operation's output.
            shared: Whether the parameter is used by more than one operation, in
                which case the terms of all operations are summed before any squaring.

        Returns:
            A term; the terms of the operations that use a parameter are summed.
        """
        raise NotImplementedError

    def add_term(self, totals: dict, p: nn.Parameter, term: Any) -> None:
        """Add one operation's term for ``p`` to ``totals`` (by default keyed by ``id(p)``)."""
        old = totals.get(id(p))
        totals[id(p)] = term if old is None else old + term

    def finalize(
        self, totals: dict[int, Any], shared: frozenset[int], params: list[nn.Parameter], root: Tensor
    ) -> Any:
        """Turn the summed terms of one backward pass into its result.

        Args:
            totals: Summed terms for each parameter that received any, by ``id``.
            shared: ``id`` of the parameters used by more than one operation.
            params: Every trainable parameter of the model, in order.
            root: The model output, ``[N, *out]``.

        Returns:
            What :meth:`write` takes: by default a tensor per parameter, keyed by ``id``;
            or a :class:`FollowUp` that asks the engine for a further walk first.
        """
        raise NotImplementedError

    def results_on(self, params: list[nn.Parameter]) -> list[Tensor]:
        """The results an earlier backward pass left on ``params`` (to recycle their memory)."""
        return [value for p in params if isinstance(value := getattr(p, self.attribute, None), Tensor)]

    def reset(self, params: list[nn.Parameter]) -> None:
        """Remove results of an earlier block so nothing stale is read."""
        for p in params:
            if hasattr(p, self.attribute):
                delattr(p, self.attribute)
        self._written: set[int] = set()

    def write(self, results: Any, params: list[nn.Parameter], accumulate: bool) -> None:
        """Store a result of :meth:`finalize` on the parameters, overwriting or accumulating."""
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

    # Whether the result is per sample (``[N, ...]``): concatenated, not summed, across processes.
    concatenates: ClassVar[bool] = False
    # Whether results of several processes combine (curvhook/distributed.py).
    distributes: ClassVar[bool] = True

    def reduce_across_processes(self, params: list[nn.Parameter], group=None) -> None:
        """Sum (or concatenate, per sample) the results on ``params`` over the processes of ``group``.

        One collective for all parameters (see :mod:`curvhook.distributed`).
        """
        from curvhook import distributed

        named = [p for p in params if isinstance(getattr(p, self.attribute, None), Tensor)]
        values = [getattr(p, self.attribute) for p in named]
        if self.concatenates:
            for p, value in zip(named, distributed.concatenate(values, group)):
                setattr(p, self.attribute, value)
        else:
            distributed.sum_in_place(values, group)

    def rescale(self, params: list[nn.Parameter], factor: float) -> None:
        """Multiply the results on ``params`` in place as if the loss had been ``factor`` times it.

        ``curvhook.accumulate(..., reduction="mean")`` uses it: ``factor = 1 / (number of samples)``.
        """
        scale = factor**self.loss_power
        if scale == 1:
            return
        for p in params:
            value = getattr(p, self.attribute, None)
            if isinstance(value, Tensor):
                value.mul_(scale)

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


class SquaredColumnSum(Extension):
    """Writes ``Σ_{v,n} (J_nᵀ s_vn)²`` over the backpropagated columns ``s_vn``, shaped like ``p``.

    The base of the diagonal extensions whose only difference is the source:
    ``DiagGGN`` (``S`` the loss Hessian's square-root factor), ``DiagGGNMC``
    (sampled columns), ``SumGradSquared`` (the loss gradient). A parameter used
    by several operations sums its products over the uses before the square.
    """

    def param_term(
        self, rule: LayerRule, op: Operation, name: str, value: Tensor, shared: bool
    ) -> Tensor:
        if shared:  # the sum over uses comes before the square
            return rule.param_jac_t_mat_prod(op, name, value)  # [V, N, *θ]
        return rule.param_sq_sum(op, name, value)  # [*θ]

    def finalize(
        self, totals: dict[int, Tensor], shared: frozenset[int], params: list[nn.Parameter], root: Tensor
    ) -> dict[int, Tensor]:
        out = {}
        for p in params:
            total = totals.get(id(p))
            if total is None:
                out[id(p)] = zeros_for(p)
            elif id(p) in shared:
                out[id(p)] = total.square().sum((0, 1))
            else:
                out[id(p)] = total
        return out


@dataclass(eq=False)
class FollowUp:
    """What ``finalize`` returns when its result needs one more reverse walk.

    The engine walks the same forward pass with ``source`` (using the loss terms
    of the extension's own source), finalizes ``extension``, and calls ``then``
    on its result; ``then`` returns the final result or another follow-up.

    Attributes:
        source: What the walk backpropagates.
        extension: What turns the walk into a result (an internal helper).
        then: The rest of the computation.
    """

    source: Source
    extension: "Extension"
    then: Callable[[Any], Any]


def zeros_for(p: nn.Parameter, *lead: int) -> Tensor:
    """Zeros of shape ``[*lead, *p.shape]`` in the parameter's dtype and device."""
    return torch.zeros((*lead, *p.shape), dtype=p.dtype, device=p.device)
