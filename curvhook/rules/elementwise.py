"""Elementwise layers: activations and dropout.

For ``y = σ(x)`` applied entry by entry, ``J_x = diag(σ'(x))``, so
``J_xᵀ m = σ'(x) ⊙ m`` and ``diag(J_xᵀ diag(d) J_x) = σ'(x)² ⊙ d``.

The derivative ``σ'(x)`` is read from the autograd node the module created:
for a diagonal Jacobian, ``J_xᵀ 1 = diag(J_x)``. The node is the same one the
ordinary backward uses, so the derivative agrees with autograd everywhere,
kinks included (``ReLU'(0) = 0``), and in-place activations work because the
node keeps what it needs even after the input was overwritten. An in-place
activation on a view (after ``Linear`` on ``[N, T, F]``) gets autograd's
``CopySlices`` as its node instead of its own: the recorder keeps a copy of its
input, and ``σ'(x)`` comes from a replay of the module on that copy.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvhook import _memory
from curvhook._torch_internals import tensor_version
from curvhook.records import Operation
from curvhook.errors import UnsupportedModelError
from curvhook.rules.base import LayerRule, apply_node, is_single_node, one_column_by_node
from curvhook.rules.registry import register_rule, register_rule_by_name

ACTIVATIONS = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.LogSigmoid,
    nn.Hardtanh,
    nn.ReLU6,
    nn.Hardsigmoid,
    nn.Hardswish,
)


def jacobian_diagonal(call: Operation) -> Tensor:
    """``σ'(x)`` of an elementwise call, ``[N, *x.shape[1:]]`` (cached per backward)."""
    if call.scratch.jac_diag is not None:
        return call.scratch.jac_diag
    node, out = call.node, call.output
    ones = _memory.ones(out.shape, like=out)  # recycled: a fresh one faults its pages in
    if is_single_node(call):
        diag = apply_node(node, ones)
    elif isinstance(call.module, nn.Dropout) and call.inputs[0] is not out and call.inputs[0].requires_grad:
        # A checkpointed dropout: a nested backward, for which the checkpoint
        # recomputes its block with the same random numbers.
        with torch.enable_grad():
            (diag,) = torch.autograd.grad(out, call.inputs[0], ones, retain_graph=True)
    elif not isinstance(call.module, nn.Dropout) and (call.node_saves_hooked or _input_kept(call)):
        # Checkpointed, or in place on a view (the recorder kept a copy of the input):
        # a replay on the input gives σ'(x); a replay of dropout would draw another mask.
        diag = _replayed_slope(call)
    else:
        raise UnsupportedModelError(
            f"curvhook cannot read the derivative of the in-place module {call.name!r} "
            f"({type(call.module).__name__}): it is not a single autograd operation. "
            "Construct it with inplace=False."
        )
    call.scratch.jac_diag = diag
    return diag


def _input_kept(call: Operation) -> bool:
    """Whether the stored input still holds the value the module was called on.

    True for an in-place module on a view, whose input the recorder copied
    (:meth:`~curvhook.module_recorder.ModuleRecorder.on_module_pre`), and for an
    out-of-place module whose input nothing overwrote since.
    """
    x = call.inputs[0]
    return x is not call.output and tensor_version(x) == call.input_versions[0]


def _replayed_slope(call: Operation) -> Tensor:
    """``σ'(x)`` from a second run of the module on its stored input.

    For a checkpointed call: reading its autograd node would consume the tensors
    that autograd recomputes for its own backward (see ``Operation.node_saves_hooked``).
    For an in-place call on a view: its node is autograd's ``CopySlices`` around it.
    """
    x = call.inputs[0]
    if x is call.output or tensor_version(x) != call.input_versions[0]:
        raise UnsupportedModelError(
            f"The input of {call.name!r} ({type(call.module).__name__}) inside an activation "
            "checkpoint was overwritten in place after the call. Call the block without "
            "checkpointing inside extend, or avoid the in-place operation."
        )
    with torch.enable_grad():
        leaf = x.detach().requires_grad_()
        out = call.module.forward(leaf.clone())  # clone: an in-place module must not write into the leaf
        (diag,) = torch.autograd.grad(out, leaf, torch.ones_like(out))
    return diag


class ElementwiseRule(LayerRule):
    """Rules for any layer whose Jacobian is diagonal."""

    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        if call.scratch.jac_diag is None:  # one column: one pass instead of forming σ'(x) first
            pulled = one_column_by_node(call, mat)
            if pulled is not None:
                return pulled
        return _memory.mul(mat, jacobian_diagonal(call))

    def jvp(self, call: Operation, tangents: list, param_tangents: dict) -> list:
        # a diagonal Jacobian is symmetric: J dx = Jᵀ dx
        return [None if tangents[0] is None else self.jac_t_mat_prod(call, tangents[0])]

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        if type(call.module) in _SLOPES_ZERO_OR_ONE and is_single_node(call):
            # σ' ∈ {0, 1}, so σ'² ⊙ d = σ' ⊙ d: the module's own backward applied to d
            return apply_node(call.node, diag)
        slope = jacobian_diagonal(call)
        return _memory.mul(diag, slope).mul_(slope)  # d σ'²: one buffer, no σ'² temporary


# Piecewise-linear activations whose slopes are 0 and 1 only.
_SLOPES_ZERO_OR_ONE = (nn.ReLU, nn.ReLU6)


register_rule(*ACTIVATIONS)(ElementwiseRule)


@register_rule(nn.Dropout)
class DropoutRule(ElementwiseRule):
    """Dropout: the identity in eval mode, ``mask / (1 - p)`` from this forward pass in train mode."""

    @staticmethod
    def _is_identity(call: Operation) -> bool:
        return not call.training or call.module.p == 0

    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        return mat if self._is_identity(call) else super().jac_t_mat_prod(call, mat)

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        return diag if self._is_identity(call) else super().diag_jac_t_diag_jac(call, diag)


# Hugging Face's activation modules (``transformers.activations``): elementwise, without parameters.
HF_ACTIVATIONS = (
    "NewGELUActivation", "GELUActivation", "FastGELUActivation", "QuickGELUActivation",
    "ClippedGELUActivation", "AccurateGELUActivation", "GELUTanh", "PytorchGELUTanh",
    "MishActivation", "LinearActivation", "LaplaceActivation", "ReLUSquaredActivation", "SiLUActivation",
    "BloomGelu",  # a custom autograd.Function (torch.func refuses it): its one node gives σ'(x)
)


@register_rule_by_name("transformers", *HF_ACTIVATIONS)
class ReplayedElementwiseRule(ElementwiseRule):
    """An elementwise activation written as several operations (``0.5 x (1 + tanh(…))``).

    Its slope ``σ'(x)`` comes from one backward of the module replayed on its
    input (``torch.autograd.grad`` with a vector of ones: the Jacobian is diagonal).
    """

    def accepts(self, module: nn.Module) -> bool:
        return next(module.parameters(), None) is None and next(module.children(), None) is None

    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        return _memory.mul(mat, _slope(call))

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        slope = _slope(call)
        return _memory.mul(diag, slope).mul_(slope)


def _slope(call: Operation) -> Tensor:
    """``σ'(x)``, ``[N, *x.shape[1:]]``, from a replay (cached per backward)."""
    if call.scratch.jac_diag is None:
        if is_single_node(call):
            call.scratch.jac_diag = jacobian_diagonal(call)
        elif type(call.module).__name__ in _TANH_GELUS and _input_kept(call):
            call.scratch.jac_diag = _tanh_gelu_slope(call.inputs[0].detach())
        else:
            call.scratch.jac_diag = _replayed_slope(call)
    return call.scratch.jac_diag


# Written as 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³))) with these very constants: the
# function that F.gelu(x, approximate="tanh") computes in one operation, whose derivative
# aten's gelu_backward gives in closed form (a replay runs some fifteen operations).
_TANH_GELUS = frozenset({"NewGELUActivation"})


def _tanh_gelu_slope(x: Tensor) -> Tensor:
    """``σ'(x)`` of the tanh approximation of GELU, ``x``'s shape."""
    out = _memory.empty(x.shape, like=x)
    return torch.ops.aten.gelu_backward.grad_input(_memory.ones(x.shape, like=x), x, approximate="tanh", grad_input=out)


@register_rule(nn.PReLU)
class PReLURule(LayerRule):
    """``nn.PReLU``: ``y = x`` where ``x > 0``, else ``a_c x``, with one slope per channel
    (axis 1 of ``[N, C, *]``) or one for all.

    ``J_x = diag(s)`` with ``s = 1`` where ``x > 0`` and ``a_c`` elsewhere (``x = 0``
    included, as torch's own backward); ``J_a`` has one nonzero per entry,
    ``min(x, 0)``, in the column of that entry's channel, so
    ``J_aᵀ m = Σ_{entries of c} m ⊙ min(x, 0)`` and
    ``diag(J_aᵀ diag(d) J_a)_c = Σ_{entries of c} d ⊙ min(x, 0)²``.
    (A closed form: torch.func batches prelu's parameter gradient wrongly when
    its vmaps are nested, and slowly where they are not.)
    """

    @staticmethod
    def _channels(call: Operation) -> tuple[Tensor, tuple[int, ...]]:
        """The slopes broadcast against the input ``[N, *]``, and the input axes summed per slope."""
        x, a = call.input, call.module.weight.detach()
        if a.numel() == 1:
            return a.reshape((1,) * x.dim()), tuple(range(x.dim()))
        shape = [1] * x.dim()
        shape[1] = a.numel()
        return a.reshape(shape), (0, *range(2, x.dim()))

    def _slope(self, call: Operation) -> Tensor:
        if call.scratch.jac_diag is None:
            x = call.input.detach()
            a, _ = self._channels(call)
            call.scratch.jac_diag = torch.where(x > 0, torch.ones_like(x), a.to(x.dtype))
        return call.scratch.jac_diag

    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        return _memory.mul(mat, self._slope(call))

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        return diag * self._slope(call).square()

    def param_jac_t_mat_prod(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        x = call.input.detach()
        neg = x.clamp(max=0)  # ∂y/∂a at every entry
        prod = mat * neg  # [V, N, *]
        if call.module.weight.numel() == 1:
            return prod.reshape(*prod.shape[:2], -1).sum(-1, keepdim=True)  # [V, N, 1]
        return prod.flatten(3).sum(-1) if prod.dim() > 3 else prod  # [V, N, C]

    def param_diag(self, call: Operation, name: str, diag: Tensor) -> Tensor:
        x = call.input.detach()
        total = diag * x.clamp(max=0).square()  # [N, *]
        _, axes = self._channels(call)
        return total.sum(axes).reshape(call.module.weight.shape)
