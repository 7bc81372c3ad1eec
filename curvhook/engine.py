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
from typing import Hashable, Optional, Sequence

import torch
from torch import Tensor, nn

from curvhook.calls import FunctionCall, LossCall, TensorKey, Trace
from curvhook.errors import UnsupportedLossError, UnsupportedModelError
from curvhook.extensions.base import MATRIX_SOURCES, Extension
from curvhook.losses import identity_factor, loss_rule_for
from curvhook.rules.fallback import FALLBACK, mixes_samples
from curvhook.rules.registry import rule_for, rule_or_fallback
from curvhook.rules.tensor_ops import TENSOR_OPS, batch_safe


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
    pending: dict[Hashable, dict[TensorKey, Tensor]] = {}
    checked = False  # the loss check runs once per backward pass, whatever the number of sources
    for key, exts in groups.items():
        pending[key] = dict([initial_value(trace, grad_root, exts[0], checked)])
        checked = checked or (exts[0].source != "jacobian" and bool(trace.losses) and exts[0].loss is None)

    calls = trace.all_calls
    uses = Counter(id(p) for call in calls for _, p in call.trainable_parameters())
    shared = {pid for pid, count in uses.items() if count > 1}
    totals: dict[Extension, dict[int, Tensor]] = {ext: {} for ext in extensions}

    for call in reversed(calls):
        default_rule = rule_of(call)
        for key, exts in groups.items():
            value = take_value(pending[key], call)
            if value is None:
                continue
            rule = exts[0].adapt_rule(default_rule)  # the same for every extension of the key
            for name, p in call.trainable_parameters():
                for ext in exts:
                    term = ext.param_term(rule, call, name, value, id(p) in shared)
                    old = totals[ext].get(id(p))
                    totals[ext][id(p)] = term if old is None else old + term
            matrix = key[0] in MATRIX_SOURCES
            for slot in upstream_slots(call, trace):
                back = pull_back(rule, call, value, slot, matrix)
                in_key = call.input_keys[slot]
                old = pending[key].get(in_key)
                pending[key][in_key] = back if old is None else old + back
            del value
        call.cache.clear()

    return {ext: ext.finalize(totals[ext], shared, params, root) for ext in extensions}


def rule_of(call):
    """The rule that serves a recorded call."""
    if isinstance(call, FunctionCall):
        return TENSOR_OPS
    return rule_or_fallback(call.module)


def take_value(pending: dict[TensorKey, Tensor], call):
    """Pop what reached the outputs of ``call``: a tensor, a list (several outputs) or ``None``."""
    if isinstance(call, FunctionCall):
        values = [pending.pop(k, None) if k is not None else None for k in call.output_keys]
        if all(v is None for v in values):
            return None
        return values[0] if len(values) == 1 else values
    for k in call.other_output_keys:
        if k in pending:
            raise UnsupportedModelError(
                f"The model uses a second output of module {call.name!r} "
                f"({type(call.module).__name__}); curvhook follows only the first tensor output "
                "of a module. Use only the first output, or wrap the module so that it returns "
                "the output you need first."
            )
    return pending.pop(call.output_key, None)


def upstream_slots(call, trace: Trace) -> list[int]:
    """Inputs of ``call`` through which something upstream needs the backpropagated quantity."""
    produced = trace.produced
    if isinstance(call, FunctionCall):
        return [
            i for i, (kind, k) in enumerate(zip(call.kinds, call.input_keys))
            if kind != "const" and k in produced
        ]
    return [
        i for i, (k, needs) in enumerate(zip(call.input_keys, call.input_requires_grad))
        if needs and k in produced
    ]


def pull_back(rule, call, value, slot: int, matrix: bool) -> Tensor:
    """Move a matrix (or a diagonal) from the outputs of ``call`` to its input ``slot``."""
    if isinstance(call, FunctionCall):
        return rule.input_jac_t_mat_prod(call, value, slot) if matrix else rule.input_diag(call, value, slot)
    if slot == 0:
        return rule.jac_t_mat_prod(call, value) if matrix else rule.diag_jac_t_diag_jac(call, value)
    if hasattr(rule, "input_jac_t_mat_prod_at"):
        return rule.input_jac_t_mat_prod_at(call, value, slot) if matrix else rule.input_diag_at(call, value, slot)
    raise UnsupportedModelError(
        f"Module {call.name!r} ({type(call.module).__name__}) takes several tensor inputs that "
        "require grad, and its rule handles only the first."
    )


def check_trace(trace: Trace) -> None:
    """Raise a clear error if the recorded graph has a part curvhook cannot follow."""
    root = trace.root_value
    n = root.shape[0] if root.dim() else None
    produced: set[TensorKey] = set()
    for call in trace.all_calls:
        if isinstance(call, FunctionCall):
            produced.update(k for k in call.output_keys if k is not None)
        elif call.output_key is not None:
            produced.add(call.output_key)
            produced.update(call.other_output_keys)
    trace.produced = produced
    if trace.root_key not in produced:
        raise UnsupportedModelError(
            "curvhook saw no module or tensor operation of the model's forward produce its "
            "output. Return a tensor computed inside the model's forward."
        )
    for call in trace.all_calls:
        if isinstance(call, FunctionCall):
            check_operation(call, trace, n)
            continue
        if call.output_key is None or not call.output_requires_grad:
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
        for x, key, node, needs_grad in zip(
            call.inputs, call.input_keys, call.input_nodes, call.input_requires_grad
        ):
            if not needs_grad:
                continue
            if key in trace.shared_keys:
                raise UnsupportedModelError(
                    f"Module {call.name!r} gets an input computed from parameters only (no batch "
                    "axis). curvhook supports that for tensor operations, not for module inputs; "
                    "make the module own the parameter."
                )
            check_source(call.name, key, node, trace)
            if x.shape[0] != n:
                raise UnsupportedModelError(
                    f"Module {call.name!r} got an input of shape {tuple(x.shape)}; "
                    f"curvhook needs the batch axis first (N = {n})."
                )


def check_operation(call: FunctionCall, trace: Trace, n: Optional[int]) -> None:
    """Checks for a tensor operation between modules; marks those known to keep samples apart."""
    if all(k is None for k in call.output_keys):
        return
    for kind, key, node in zip(call.kinds, call.input_keys, call.input_nodes):
        if kind != "const" and node is not None:
            check_source(call.name, key, node, trace)
    call.cache["safe"] = n is not None and "batched" in call.kinds and batch_safe(call, n)


def check_source(name: str, key: TensorKey, node, trace: Trace) -> None:
    """An input with an autograd history must come from a recorded call or the model input."""
    if node is None or key in trace.produced or key in trace.input_keys:
        return
    raise UnsupportedModelError(
        f"An input of {name!r} was computed by an operation curvhook did not see "
        f"({type(node).__name__}): outside the model's forward, or by code that bypasses "
        "torch's function dispatch. Compute it inside the model's forward with torch "
        "operations or modules."
    )


def initial_value(
    trace: Trace, grad_root: Tensor, ext: Extension, checked: bool = False
) -> tuple[TensorKey, Tensor]:
    """Where a source starts, and the quantity it starts from there.

    The identity columns start at the model output. The loss-based sources start
    at the tensor the losses were called on: the model output, or a function of
    it computed after the model (those operations are then part of the network).
    ``checked``: the gradient was already checked against the losses in this
    backward pass (by the source of another extension).
    """
    root = trace.root_value
    if ext.source == "jacobian":
        return trace.root_key, identity_factor(root)
    losses = loss_calls(trace, ext)
    keys = {call.key for call in losses}
    if len(keys) > 1:
        raise UnsupportedLossError(
            "The backpropagated scalar sums losses called on different functions of the model "
            "output. curvhook follows one: call every loss on the same tensor, or move the "
            "operations that differ into the model."
        )
    start = keys.pop()
    rules = [loss_rule_for(call.module) for call in losses]
    scales = [1.0 if call.scale is None else float(call.scale) for call in losses]
    if trace.losses and ext.loss is None and not checked:
        check_gradient(trace, start, losses, rules, scales, grad_root)
    if any(s < 0 for s in scales):
        raise UnsupportedLossError(
            "The backpropagated scalar decreases with the loss (a negative multiple of it); "
            "its Hessian is negative and has no square-root factor. Backpropagate the loss itself."
        )
    if ext.source == "diag_ggn":
        return start, _weighted_sum([rule.hessian_diag(call) for rule, call in zip(rules, losses)], scales)
    factors = [math.sqrt(s) * rule.sqrt_hessian(call) for s, rule, call in zip(scales, rules, losses)]
    return start, factors[0] if len(factors) == 1 else torch.cat(factors)


def loss_calls(trace: Trace, ext: Extension) -> list[LossCall]:
    """The loss terms of the backpropagated scalar, or a clear error if there are none."""
    if ext.loss is not None:
        if torch._C._current_graph_task_id() in trace.after_tasks:
            raise UnsupportedLossError(
                f"{type(ext).__name__}(loss=...) describes the loss of the model output, but this "
                "backward pass goes through operations applied to the output after the model. "
                "Call a loss module on their result inside the block instead of naming the loss "
                "(nn.CrossEntropyLoss()(g(model(X)), y)), or move them into the model."
            )
        return [LossCall(module=ext.loss, input=trace.root_value, target=None, key=trace.root_key)]
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


def check_gradient(
    trace: Trace, start: TensorKey, losses: list[LossCall], rules: list, scales: list[float], grad_root: Tensor
) -> None:
    """Check that ``∂ℓ/∂f`` equals ``Σ_i c_i ∂L_i/∂f``, so that ``ℓ`` is a sum of the losses seen.

    For losses called after operations ``g`` on the output, their gradient is
    pulled back through ``g`` to the model output first.
    """
    actual = grad_root.detach() if grad_root.requires_grad else grad_root
    if actual.numel() == 0:
        return
    if len(losses) == 1 and start == trace.root_key:  # the usual case: one loss on the output
        residual = rules[0].residual(losses[0], actual, scales[0])
    else:
        expected = _weighted_sum([rule.gradient(call) for rule, call in zip(rules, losses)], scales)
        if start != trace.root_key:
            expected = pull_to_root(trace, start, expected)
        residual = actual - expected
    tol = 1e-4 if actual.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
    # max|actual − expected| against tol · (max|actual| + max|expected|), in few operations
    # and one synchronisation: max|expected| ≤ max|actual| + max|actual − expected|.
    both = torch.stack([residual, actual])
    diff, size = torch.linalg.vector_norm(both, float("inf"), dim=tuple(range(1, both.dim()))).tolist()
    if diff > tol * (2 * size + diff) + torch.finfo(actual.dtype).tiny:
        raise UnsupportedLossError(
            "The gradient reaching the model output is not that of the loss module(s) called on "
            "it: the scalar you backpropagate also depends on the model output in another way "
            "(an extra term, or a nonlinear function of the loss). Its Hessian is then not the "
            "loss Hessian curvhook knows. Backpropagate a sum of multiples of supported losses."
        )


def _weighted_sum(terms: list[Tensor], weights: list[float]) -> Tensor:
    """``Σ_i w_i t_i``, without arithmetic where there is one term of weight one."""
    if len(terms) == 1 and weights[0] == 1.0:
        return terms[0]
    return sum(w * t for w, t in zip(weights, terms))


def pull_to_root(trace: Trace, start: TensorKey, vector: Tensor) -> Tensor:
    """Apply ``J_gᵀ`` of the operations after the model to a per-sample vector at ``start``.

    Args:
        trace: The forward pass; ``trace.after_calls`` lead from its output to ``start``.
        start: Identity of the tensor the losses were called on.
        vector: ``[N, *]`` at ``start``.

    Returns:
        ``[N, *out]`` at the model output.
    """
    pending = {start: vector.unsqueeze(0)}
    for call in reversed(trace.after_calls):
        value = take_value(pending, call)
        if value is None:
            continue
        for slot in upstream_slots(call, trace):
            back = pull_back(TENSOR_OPS, call, value, slot, True)
            in_key = call.input_keys[slot]
            pending[in_key] = back if in_key not in pending else pending[in_key] + back
    root = pending.get(trace.root_key)
    return torch.zeros_like(trace.root_value) if root is None else root[0]
