"""GGNVectorProduct: ``G v`` without forming ``G`` or ``J``.

``G v = Σ_n J_nᵀ H_n J_n v``. The direction ``v`` is pushed forward through the
recorded graph (``J_n v``, :mod:`curvhook.forward_products`), the loss Hessian is
applied where the losses were called (``H_n t = Σ_v s_vn (s_vnᵀ t)``), and the
result is pulled back in the same backward pass, its parameter products summed
over the samples (:meth:`~curvhook.rules.base.LayerRule.param_summed_products`):
one forward product and one backpropagated column per direction.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from curvhook.errors import CurvhookError
from curvhook.extensions.base import Extension, zeros_for
from curvhook.records import Operation
from curvhook.rules.base import LayerRule
from curvhook.sources import GGNVectorColumns, Source

Vectors = Union[dict, list, tuple]


class SummedProducts(Extension):
    """``Σ_n J_nᵀ m_vn`` for every backpropagated column, ``[V, *p.shape]`` by ``id(p)`` (a helper of the engine's walks)."""

    attribute = "_curvhook_summed_products"

    def __init__(self, source: Source) -> None:
        super().__init__()
        self._source = source

    @property
    def source(self) -> Source:
        return self._source

    def param_term(self, rule: LayerRule, op: Operation, name: str, value: Tensor, shared: bool) -> Tensor:
        return rule.param_summed_products(op, name, value)

    def finalize(self, totals: dict, shared: frozenset[int], params: list[nn.Parameter], root: Tensor) -> dict:
        return totals


class GGNVectorProduct(Extension):
    """Writes ``p.ggn_v``: ``(G v)`` restricted to ``p``, shaped like ``v[p]``.

    ``G = Σ_n J_nᵀ H_n J_n`` is the GGN of the scalar you backpropagate (as for
    ``FullGGN``); neither ``G`` nor the Jacobian is formed.

    Args:
        v: The direction: a dict from every trainable parameter to a tensor shaped
            like it, or to ``[K, *p.shape]`` for ``K`` directions at once (block
            Krylov methods); or a list of such tensors in the order of the trainable
            parameters in ``model.parameters()``.
        loss: See :class:`~curvhook.extensions.base.Extension`.

    Example::

        ext = GGNVectorProduct({p: torch.randn_like(p) for p in model.parameters()})
        with extend(model, ext):
            criterion(model(X), y).backward()
        Gv = [p.ggn_v for p in model.parameters()]

    With ``accumulate=True`` the products of successive batches are summed
    (``G`` is a sum over the samples).
    """

    attribute = "ggn_v"
    source_type = GGNVectorColumns

    def __init__(self, v: Vectors, loss: Optional[nn.Module] = None) -> None:
        super().__init__(loss)
        if not isinstance(v, (dict, list, tuple)):
            raise TypeError(f"GGNVectorProduct(v) takes a dict {{parameter: tensor}} or a list of tensors; got {type(v).__name__}.")
        self.v = v
        self._tangents: dict[int, Tensor] = {}
        self._bound: Optional[list[int]] = None

    @property
    def source(self) -> Source:
        return GGNVectorColumns(self.loss, self._tangents)

    def bind(self, params: list[nn.Parameter]) -> None:
        """Match the directions to the trainable parameters (once per set of parameters)."""
        ids = [id(p) for p in params]
        if self._bound == ids:
            return
        self._tangents.clear()
        self._tangents.update(column_tangents(self.v, params, "GGNVectorProduct"))
        self._bound = ids

    def reset(self, params: list[nn.Parameter]) -> None:
        super().reset(params)
        self.bind([p for p in params if p.requires_grad])

    def param_term(self, rule: LayerRule, op: Operation, name: str, value: Tensor, shared: bool) -> Tensor:
        return rule.param_summed_products(op, name, value)

    def finalize(self, totals: dict, shared: frozenset[int], params: list[nn.Parameter], root: Tensor) -> dict:
        out = {}
        for p in params:
            k = self._tangents[id(p)].shape[0]
            total = totals.get(id(p))
            value = zeros_for(p, k) if total is None else total
            out[id(p)] = value if self._has_columns(p) else value[0]
        return out

    def _has_columns(self, p: nn.Parameter) -> bool:
        given = self.v[p] if isinstance(self.v, dict) else self.v[self._bound.index(id(p))]
        return given.dim() == p.dim() + 1


def column_tangents(v: Vectors, params: list[nn.Parameter], who: str) -> dict[int, Tensor]:
    """``[K, *p.shape]`` by ``id(p)`` from a dict or a list of directions; checks coverage and shapes."""
    if isinstance(v, dict):
        by_id = {id(p): t for p, t in v.items()}
        unknown = len(set(by_id) - {id(p) for p in params})
        missing = [i for i, p in enumerate(params) if id(p) not in by_id]
        if missing or unknown:
            raise CurvhookError(
                f"{who}: the dict of directions must have exactly the trainable parameters as keys; "
                f"{len(missing)} trainable parameter(s) missing (positions {missing} in model.parameters()), "
                f"{unknown} key(s) that are not trainable parameters of the model."
            )
        given = [by_id[id(p)] for p in params]
    else:
        if len(v) != len(params):
            raise CurvhookError(f"{who}: {len(v)} directions given for {len(params)} trainable parameters.")
        given = list(v)
    out, k = {}, None
    for p, t in zip(params, given):
        if not isinstance(t, Tensor):
            raise TypeError(f"{who}: a direction must be a tensor; got {type(t).__name__}.")
        if t.shape == p.shape:
            t = t.unsqueeze(0)
        elif t.shape[1:] != p.shape:
            raise CurvhookError(f"{who}: a direction for a parameter of shape {tuple(p.shape)} has shape {tuple(t.shape)}; give p.shape or [K, *p.shape].")
        if k is not None and t.shape[0] != k:
            raise CurvhookError(f"{who}: every parameter needs the same number K of directions; got {k} and {t.shape[0]}.")
        k = t.shape[0]
        out[id(p)] = t.detach().to(device=p.device, dtype=p.dtype)
    return out
