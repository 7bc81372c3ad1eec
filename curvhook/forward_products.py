"""Forward products: tangents pushed through the recorded graph, ``J v``.

``GGNVectorProduct`` and the randomised ``LowRankGGN`` need ``J_n v`` for a
direction ``v`` in parameter space. :func:`push_forward` walks the recorded
operations in forward order and applies each one's forward product
``J_x dx + J_θ dθ`` (:meth:`~curvhook.rules.base.LayerRule.jvp`): closed forms
where a rule has one (linear layers, convolutions, elementwise layers), else
:func:`replay_jvp`, ``torch.func.jvp`` of a replay of the call on its stored
inputs. ``K`` directions travel at once as a leading axis.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor
from torch.func import jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvhook.errors import UnsupportedModelError
from curvhook.plan import Plan
from curvhook.records import CONST, Operation, TensorKey
from curvhook.rules import fallback, tensor_ops
from curvhook.rules.parameters_only import _is_input  # a parameter passed to a module call
from curvhook.trace import Trace


def push_forward(trace: Trace, plan: Plan, param_tangents: dict[int, Tensor], to: TensorKey) -> Optional[Tensor]:
    """``J v`` at the tensor ``to``: the tangents of the parameters pushed forward.

    Args:
        trace: The forward pass.
        plan: Its compiled walk (the rule of every operation).
        param_tangents: ``[K, *p.shape]`` by ``id(p)`` for the trainable parameters.
        to: The tensor whose tangent is returned (the model output, or the tensor
            the losses were called on).

    Returns:
        ``[K, *shape of to]``, or ``None`` where it does not depend on the parameters.
    """
    ops = trace.all_operations
    rules = {step.index: step.rule for step in plan.steps}
    last_use: dict[TensorKey, int] = {}
    for index, op in enumerate(ops):
        for key in op.input_keys:
            last_use[key] = index
    # parameters passed to tensor operations are inputs: their tangents are found by key
    tangents: dict[TensorKey, Tensor] = {}
    for op in ops:
        for name, p in op.params:
            if id(p) in param_tangents and (op.module is None or _is_input(op, name)):
                tangents[op.input_keys[op.slot_of(name)]] = param_tangents[id(p)]
    for index, op in enumerate(ops):
        if all(k is None for k in op.output_keys):
            continue
        ins = [None if kind == CONST else tangents.get(key) for kind, key in zip(op.input_kinds, op.input_keys)]
        own = {}
        if op.module is not None:  # (a parameter passed in, ``ln(self.table)``, is an input above)
            own = {
                name: param_tangents[id(p)] for name, p in op.params
                if id(p) in param_tangents and not _is_input(op, name)
            }
        if any(t is not None for t in ins) or own:
            outs = rules[index].jvp(op, ins, own)
            for key, t in zip(op.output_keys, outs):
                if key is not None and t is not None:
                    tangents[key] = t
        for key in op.input_keys:
            if last_use.get(key) == index and key != to:
                tangents.pop(key, None)
    return tangents.get(to)


def replay_jvp(call: Operation, tangents: list[Optional[Tensor]], param_tangents: dict[str, Tensor]) -> list[Optional[Tensor]]:
    """``J_x dx + J_θ dθ`` by ``torch.func.jvp`` of a replay of the call.

    A module is called again through ``functional_call`` (its own ``forward``,
    without hooks), a tensor operation through its recorded arguments; the
    inputs without a tangent and every other argument are held at their stored
    values. A replay that draws random numbers would differentiate another
    function than the forward pass did: it is refused.

    Args / Returns: see :meth:`~curvhook.rules.base.LayerRule.jvp`.
    """
    slots = [i for i, t in enumerate(tangents) if t is not None]
    names = list(param_tangents)
    fixed = [t.detach() for t in call.inputs]
    if call.module is not None:
        params = {n: p.detach() for n, p in call.module.named_parameters(recurse=call.recurse)}

        def run(*xs: Tensor) -> tuple[Tensor, ...]:
            inputs = list(fixed)
            for s, x in zip(slots, xs):
                inputs[s] = x
            theta = dict(params)
            theta.update(zip(names, xs[len(slots):]))
            return (fallback._replay(call, theta, inputs),)
    else:
        outputs_grad = [k is not None for k in call.output_keys]

        def run(*xs: Tensor) -> tuple[Tensor, ...]:
            inputs = list(fixed)
            for s, x in zip(slots, xs):
                inputs[s] = x
            outs = tensor_ops._outputs(call.invoke(inputs))
            return tuple(o for o, g in zip(outs, outputs_grad) if g)

    primals = tuple(fixed[s] for s in slots)
    if call.module is not None:
        primals += tuple(params[n] for n in names)
    columns = tuple(tangents[s] for s in slots) + tuple(param_tangents[n] for n in names)
    outs = _guarded(call, lambda: _columns_jvp(run, primals, columns))
    if call.module is not None:
        return list(outs)
    it = iter(outs)
    return [next(it) if k is not None else None for k in call.output_keys]


def _columns_jvp(run: Callable[..., tuple[Tensor, ...]], primals: tuple, columns: tuple) -> tuple[Tensor, ...]:
    """``jvp`` for every one of the ``K`` tangent columns (a leading axis of each tangent)."""
    k = columns[0].shape[0]

    def one(*ts: Tensor) -> tuple[Tensor, ...]:
        return jvp(run, primals, tuple(t.to(p.dtype) for t, p in zip(ts, primals)))[1]

    if k == 1:
        return tuple(o.unsqueeze(0) for o in one(*(c[0] for c in columns)))
    try:
        return vmap(one)(*columns)
    except RuntimeError:  # an operation vmap cannot batch: one column at a time
        rows = [one(*(c[i] for c in columns)) for i in range(k)]
        return tuple(torch.stack(r) for r in zip(*rows))


def _guarded(call: Operation, fn: Callable[[], tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    """Run ``fn`` and refuse a replay that advanced the random number generators."""
    device = call.input.device
    before = fallback._rng_states(device)
    fast_path = torch.backends.mha.get_fastpath_enabled()
    try:
        # nn.MultiheadAttention's fused inference kernel has no forward-mode derivative
        # and neither have the flash and memory-efficient attention kernels: the math one has
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
            out = fn()
    except UnsupportedModelError:
        raise
    except Exception as err:  # noqa: BLE001 - torch.func could not differentiate the replay
        raise UnsupportedModelError(
            f"curvhook could not push a tangent through {call.name} with torch.func.jvp ({err}). "
            "GGNVectorProduct and LowRankGGN(method='randomized') need forward products of every "
            "operation; register a rule with a jvp for it (docs/custom_layers.md)."
        ) from err
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
        after = fallback._rng_states(device)
        fallback._set_rng_states(device, before)
    if any(not torch.equal(a, b) for a, b in zip(before, after)):
        raise UnsupportedModelError(
            f"{call.name} draws random numbers in its forward pass (dropout or a random slope in "
            "train mode); a replay to push a tangent through it would draw other ones. Call "
            "model.eval(), or use nn.Dropout (its mask is recorded)."
        )
    return tuple(o.detach() for o in out)
