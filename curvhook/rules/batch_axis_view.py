"""Modules called with the batch axis elsewhere than first, presented to their rules batch-first.

PyTorch's default layout for sequences is ``[L, N, E]``: ``nn.MultiheadAttention``,
``nn.TransformerEncoderLayer``, ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` take the
batch axis second unless ``batch_first=True``. A model that transposes its
embeddings ``[N, L, E]`` to ``[L, N, E]`` therefore calls its modules on tensors
whose batch axis ``b`` is ``1`` (see :mod:`curvhook.batch_axis`).

Such a call is the same function of each sample as the module applied to the
batch-first view of its inputs (``x.movedim(b, 0)``), with its output moved the
same way, when the module treats its axes accordingly:

- ``nn.MultiheadAttention`` and ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` with
  ``batch_first=False`` on 3-D inputs with ``b = 1``: their documented layout.
  The view uses a copy of the module with ``batch_first=True`` (sharing its
  parameters), so their own rules serve it. Masks (``key_padding_mask`` is
  ``[N, S]`` in both layouts) and initial states (``[layers, N, H]``) are
  constants and stay as they are.
- Position-wise modules (``nn.Linear``, ``nn.LayerNorm``, ``nn.RMSNorm``,
  ``nn.Dropout``, ``nn.Identity``, the elementwise activations, and
  ``nn.Embedding`` as a lookup of each index) where the batch axis is not among
  the trailing axes they act on: they treat all leading axes alike.

A constant input counts where the tape followed its batch axis from the model
input (``lstm(x.transpose(0, 1))``, ``embedding(ids.t())``).

:class:`BatchAxisViewRule` presents the recorded call as that batch-first call
to the module's own rule. Values that travel backward already have the layout
``[V, N, *rest]`` / ``[N, *rest]`` whatever ``b`` is, which is the layout of the
batch-first call, so they pass through unchanged. The module's output keeps
the batch axis of its input.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from curvhook.errors import partial_backward_error
from curvhook.records import Operation
from curvhook.rules.base import LayerRule
from curvhook.rules.elementwise import ACTIVATIONS
from curvhook.rules.registry import rule_or_fallback

# Modules with a batch_first flag whose batch_first=False layout is [L, N, ·].
_SEQUENCE_FIRST = (nn.MultiheadAttention, nn.RNNBase)
# Position-wise modules that act on no axis of their own (an embedding looks up each index).
_ELEMENTWISE = (nn.Dropout, nn.Identity, nn.Embedding, *ACTIVATIONS)


def batch_axis_refusal(module: nn.Module, in_axes: Sequence[Optional[int]], inputs: Sequence[Tensor]) -> Optional[str]:
    """Why ``module`` cannot be called with its batched inputs' batch axes at ``in_axes``.

    Args:
        module: The module called.
        in_axes: Per input slot, the batch axis of a batched input (``None``
            for a constant or shared one).
        inputs: The inputs by slot.

    Returns:
        ``None`` where the call keeps samples apart as curvhook assumes: the batch
        axes are first, or the call is its batch-first view (see the module
        docstring). Else the reason, for an error message.
    """
    axes = {a for a in in_axes if a is not None}
    if not axes:
        return None
    if len(axes) > 1:
        return f"its inputs have their batch axes at different places (axes {sorted(axes)})"
    (axis,) = axes
    ndim = next(x.dim() for x, a in zip(inputs, in_axes) if a is not None)
    if isinstance(module, _SEQUENCE_FIRST):
        want = 0 if module.batch_first else 1
        if axis != want or ndim != 3:
            return (
                f"with batch_first={module.batch_first} it takes 3-D inputs with the batch axis at "
                f"axis {want}, and treats the other axes as positions it mixes"
            )
        if axis and isinstance(module, nn.RNNBase) and any(a is not None for a in in_axes[1:]):
            return "its initial state is computed from the model input (only the first input is followed)"
        return None
    if axis == 0:
        return None
    trailing = _trailing_axes(module)
    if trailing is None:
        return "curvhook does not know that it treats every axis but the batch axis alike"
    if axis >= ndim - trailing:
        return f"it acts on its last {trailing} axes, and the batch axis is among them"
    return None


def _trailing_axes(module: nn.Module) -> Optional[int]:
    """How many trailing axes a position-wise module acts on (``None``: not position-wise).

    A subclass that overrides ``forward`` computes something else and is not counted.
    """
    for cls in _ELEMENTWISE:
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return 0
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return 1
    for cls in (nn.LayerNorm, nn.RMSNorm):
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return len(module.normalized_shape)
    return None


def batch_first_module(module: nn.Module) -> nn.Module:
    """``module`` as the batch-first view calls it: a copy with ``batch_first=True`` where it has the flag.

    The copy shares every attribute (parameters, children, buffers) with
    ``module``; only ``batch_first`` differs. Made anew for every view, so it
    also has the module's current ``training`` and configuration.
    """
    if not isinstance(module, _SEQUENCE_FIRST) or module.batch_first:
        return module
    copy = object.__new__(type(module))
    copy.__dict__.update(module.__dict__)
    copy.__dict__["batch_first"] = True
    return copy


class _MovedNode:
    """The autograd node of a call, taking and giving values batch-first.

    Rules apply a one-operation call's node to a value shaped like the output
    (:func:`~curvhook.rules.base.apply_node`); the view's values are batch-first.
    """

    def __init__(self, node: Any, in_axis: int, out_axis: int) -> None:
        self.node, self.in_axis, self.out_axis = node, in_axis, out_axis
        self.next_functions = node.next_functions

    def __call__(self, value: Tensor) -> Tensor:
        out = self.node(value.movedim(0, self.out_axis))
        out = out[0] if isinstance(out, tuple) else out
        if out is None:  # a node this backward pass does not run gives no gradient
            raise partial_backward_error(self.node.name())
        return out.movedim(self.in_axis, 0)


def batch_first_call(call: Operation) -> Operation:
    """The recorded call as the module applied to its batch-first inputs (cached per backward pass).

    Batched inputs ``[..., N (axis b), ...]`` become ``[N, *rest]``; the output
    likewise. The view has its own scratch, so the inner rule's per-backward
    values live as long as the view.
    """
    if call.scratch.batch_first_view is not None:
        return call.scratch.batch_first_view
    in_axes, (out_axis,) = call.batch_axes
    first = next(i for i, a in enumerate(in_axes) if a is not None)
    shape = list(call.output_shape)
    shape.insert(0, shape.pop(out_axis))
    view = dataclasses.replace(
        call,
        module=batch_first_module(call.module),
        inputs=tuple(x if a is None else x.detach().movedim(a, 0) for x, a in zip(call.inputs, in_axes)),
        output=None if call.output is None else call.output.detach().movedim(out_axis, 0),
        output_shapes=(torch.Size(shape), *call.output_shapes[1:]),
        node=None if call.node is None else _MovedNode(call.node, in_axes[first], out_axis),
        batch_axes=None,
        _scratch=None,  # its own, made when first asked
    )
    call.scratch.batch_first_view = view
    return view


class BatchAxisViewRule(LayerRule):
    """A module called with the batch axis elsewhere, through its own rule on the batch-first view.

    Args:
        operations: Use the inner rule's :meth:`~LayerRule.operations_rule`
            (DiagGGNApprox with modules counted as their operations).
    """

    def __init__(self, operations: bool = False) -> None:
        self.operations = operations

    def operations_rule(self) -> LayerRule:
        return BATCH_AXIS_VIEW_OPERATIONS

    def _inner(self, call: Operation) -> tuple[LayerRule, Operation]:
        view = batch_first_call(call)
        rule = rule_or_fallback(view.module)
        return (rule.operations_rule() if self.operations else rule), view

    def input_jac_t_mat_prod(self, call: Operation, mat: Tensor, slot: int) -> Tensor:
        rule, view = self._inner(call)
        return rule.input_jac_t_mat_prod(view, mat, slot)

    def input_diag(self, call: Operation, diag: Tensor, slot: int) -> Tensor:
        rule, view = self._inner(call)
        return rule.input_diag(view, diag, slot)

    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        return self.input_jac_t_mat_prod(call, mat, 0)

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        return self.input_diag(call, diag, 0)

    def param_jac_t_mat_prod(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        rule, view = self._inner(call)
        return rule.param_jac_t_mat_prod(view, name, mat)

    def param_factors(self, call: Operation, name: str, mat: Tensor):
        rule, view = self._inner(call)
        return rule.param_factors(view, name, mat)

    def position_factors(self, call: Operation, mat: Tensor):
        rule, view = self._inner(call)
        return rule.position_factors(view, mat)

    def param_sq_sum(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        rule, view = self._inner(call)
        return rule.param_sq_sum(view, name, mat)

    def param_diag(self, call: Operation, name: str, diag: Tensor) -> Tensor:
        rule, view = self._inner(call)
        return rule.param_diag(view, name, diag)


BATCH_AXIS_VIEW = BatchAxisViewRule()
BATCH_AXIS_VIEW_OPERATIONS = BatchAxisViewRule(operations=True)
