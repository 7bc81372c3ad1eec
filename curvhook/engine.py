"""The reverse traversal that runs inside ``backward()``.

When the gradient reaches the model output, the engine walks the recorded
module calls in reverse order once. For every source (identity columns, a
square-root factor of the loss Hessian, or the loss-Hessian diagonal) it keeps
the quantity that has reached each tensor, applies the layer rules, and lets
each extension turn what reaches a parameter into its result. Quantities are
dropped as soon as the call that consumes them has run.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Hashable, Sequence

import torch
from torch import Tensor, nn

from curvhook.calls import LossCall, TensorKey, Trace
from curvhook.errors import UnsupportedLossError, UnsupportedModelError
from curvhook.extensions.base import MATRIX_SOURCES, Extension
from curvhook.losses import identity_factor, loss_rule_for
from curvhook.rules.fallback import FALLBACK, mixes_samples
from curvhook.rules.registry import rule_for, rule_or_fallback


def backpropagate(
    trace: Trace, grad_root: Tensor, extensions: Sequence[Extension], params: list[nn.Parameter]
) -> dict[Extension, dict]:
    """Compute every extension's results for one backward pass.

    Args:
        trace: What the forward pass recorded.
        grad_root: ``∂ℓ/∂f`` as it reached the model output, ``[N, *out]``.
        extensions: The active extensions.
        params: All trainable parameters of the model, in order.

    Returns:
        For each extension, what its ``finalize`` returned.
    """
    check_trace(trace)
    root = trace.root_value
    groups: dict[Hashable, list[Extension]] = defaultdict(list)
    for ext in extensions:
        groups[ext.source_key].append(ext)
    pending: dict[Hashable, dict[TensorKey, Tensor]] = {
        key: {trace.root_key: initial_value(trace, grad_root, exts[0])} for key, exts in groups.items()
    }

    uses = Counter(id(p) for call in trace.calls for _, p in call.trainable_parameters())
    shared = {pid for pid, count in uses.items() if count > 1}
    totals: dict[Extension, dict[int, Tensor]] = {ext: {} for ext in extensions}

    for call in reversed(trace.calls):
        rule = rule_or_fallback(call.module)
        for key, exts in groups.items():
            value = pending[key].pop(call.output_key, None)
            if value is None:
                continue
            for name, p in call.trainable_parameters():
                for ext in exts:
                    term = ext.param_term(rule, call, name, value, id(p) in shared)
                    old = totals[ext].get(id(p))
                    totals[ext][id(p)] = term if old is None else old + term
            if call.input_nodes[0] is not None:  # something upstream needs it
                if key[0] in MATRIX_SOURCES:
                    back = rule.jac_t_mat_prod(call, value)
                else:
                    back = rule.diag_jac_t_diag_jac(call, value)
                in_key = call.input_keys[0]
                old = pending[key].get(in_key)
                pending[key][in_key] = back if old is None else old + back
            del value
        call.cache.clear()

    return {ext: ext.finalize(totals[ext], shared, params, root) for ext in extensions}


def check_trace(trace: Trace) -> None:
    """Raise a clear error if the recorded graph has a part curvhook cannot follow."""
    root = trace.root_value
    n = root.shape[0] if root.dim() else None
    produced = {call.output_key: call for call in trace.calls if call.output_key is not None}
    if trace.root_key not in produced:
        node = torch._C._current_autograd_node()
        origin = type(node).__name__ if node is not None else "no operation"
        raise UnsupportedModelError(
            f"The model output was computed by a tensor operation ({origin}) after the last "
            "module call. curvhook follows the model through its leaf modules; express that "
            "operation as a module (e.g. nn.Flatten, nn.Identity) or move it into the loss."
        )
    for call in trace.calls:
        on_path = call.output_key is not None and call.output_requires_grad
        if not on_path:
            continue
        if mixes_samples(call.module):
            raise UnsupportedModelError(
                f"Module {call.name!r} ({type(call.module).__name__}) normalizes with statistics "
                "of the whole batch, so samples are mixed and per-sample Jacobians do not exist. "
                "Call model.eval() (BatchNorm then uses its running statistics)."
            )
        if rule_for(call.module) is None:
            FALLBACK.warn_once(call)
        shape = call.output_shape
        if n is not None and (len(shape) == 0 or shape[0] != n):
            raise UnsupportedModelError(
                f"Module {call.name!r} returned shape {tuple(shape)}; curvhook needs "
                f"every module to keep the batch axis first (N = {n}). Operations that move or "
                "mix samples have no per-sample Jacobian."
            )
        for i, (node, needs_grad) in enumerate(zip(call.input_nodes, call.input_requires_grad)):
            if node is None or not needs_grad:
                continue  # a leaf: the model input or a tensor that needs no gradient
            if i > 0:
                raise UnsupportedModelError(
                    f"Module {call.name!r} takes several tensor inputs that require grad; "
                    "curvhook supports a single differentiable input per module."
                )
            if call.input_keys[i] not in produced:
                raise UnsupportedModelError(
                    f"The input of module {call.name!r} was computed by a tensor operation "
                    f"({type(node).__name__}) outside any module. curvhook follows the model "
                    "through its leaf modules; express the operation as a module "
                    "(nn.Flatten, nn.ReLU, ...) so that no operation sits between modules."
                )
            if call.input.shape[0] != n:
                raise UnsupportedModelError(
                    f"Module {call.name!r} got an input of shape {tuple(call.input.shape)}; "
                    f"curvhook needs the batch axis first (N = {n})."
                )


def initial_value(trace: Trace, grad_root: Tensor, ext: Extension) -> Tensor:
    """The quantity a source starts from at the model output."""
    root = trace.root_value
    if ext.source == "jacobian":
        return identity_factor(root)
    losses = loss_calls(trace, ext)
    rules = [loss_rule_for(call.module) for call in losses]
    scales = [1.0 if call.scale is None else float(call.scale) for call in losses]
    if trace.losses and ext.loss is None:
        check_gradient(losses, rules, scales, grad_root)
    if any(s < 0 for s in scales):
        raise UnsupportedLossError(
            "The backpropagated scalar decreases with the loss (a negative multiple of it); "
            "its Hessian is negative and has no square-root factor. Backpropagate the loss itself."
        )
    if ext.source == "diag_ggn":
        return sum(s * rule.hessian_diag(call) for s, rule, call in zip(scales, rules, losses))
    factors = [math.sqrt(s) * rule.sqrt_hessian(call) for s, rule, call in zip(scales, rules, losses)]
    return factors[0] if len(factors) == 1 else torch.cat(factors)


def loss_calls(trace: Trace, ext: Extension) -> list[LossCall]:
    """The loss terms of the backpropagated scalar, or a clear error if there are none."""
    if ext.loss is not None:
        return [LossCall(module=ext.loss, input=trace.root_value, target=None)]
    if not trace.losses:
        raise UnsupportedLossError(
            f"{type(ext).__name__} needs the loss, and no loss module was called on the model "
            "output inside the block. Call a loss module (nn.CrossEntropyLoss, nn.MSELoss, "
            "nn.BCEWithLogitsLoss) on the model output inside the `with extend(...)` block, "
            f"or name it: {type(ext).__name__}(loss=nn.CrossEntropyLoss())."
        )
    reached = [call for call in trace.losses if call.scale is not None]
    if not reached:
        raise UnsupportedLossError(
            f"{type(ext).__name__} needs the loss, but the scalar being backpropagated does not "
            "depend on the loss module called on the model output. Call backward() on that loss "
            f"(or a multiple of it), or name the loss: {type(ext).__name__}(loss=...)."
        )
    return reached


def check_gradient(losses: list[LossCall], rules: list, scales: list[float], grad_root: Tensor) -> None:
    """Check that ``∂ℓ/∂f`` equals ``Σ_i c_i ∂L_i/∂f``, so that ``ℓ`` is a sum of the losses seen."""
    expected = sum(s * rule.gradient(call) for s, rule, call in zip(scales, rules, losses))
    actual = grad_root.detach()
    tol = 1e-4 if actual.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
    bound = tol * (actual.abs().max() + expected.abs().max()) + torch.finfo(actual.dtype).tiny
    if (actual - expected).abs().max() > bound:
        raise UnsupportedLossError(
            "The gradient reaching the model output is not that of the loss module(s) called on "
            "it: the scalar you backpropagate also depends on the model output in another way "
            "(an extra term, or a nonlinear function of the loss). Its Hessian is then not the "
            "loss Hessian curvhook knows. Backpropagate a sum of multiples of supported losses."
        )
