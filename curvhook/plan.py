"""A plan: what the reverse walk does for one graph, compiled once and reused.

Everything that depends only on the structure of a forward pass is decided
when its plan is built: the checks that the graph can be followed, the rule of
every operation, which inputs receive a pullback, which parameters are used
more than once, and dense slot numbers for the tensors. A backward pass then
only walks the plan's steps.

A plan is reused while the graph is the same. Its key (see
:mod:`curvhook.plan_key`) changes whenever anything a check depended on
changes: module identity and configuration, operation arguments, shapes,
dtypes, devices, requires_grad and train/eval mode. What depends on values is
checked on every step all the same: the loss linearity and the gradient check
(:mod:`curvhook.loss_terms`), and the per-sample replay of operations whose
structure does not show that they keep samples apart (the tensor-operation rule).
"""

from __future__ import annotations

import weakref
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Hashable, Optional

from torch import nn

from curvhook.errors import UnsupportedModelError, reentrant_checkpoint_error
from curvhook.indexed_writes import may_write_twice, refuse_duplicate_writes
from curvhook.plan_key import GraphShape, graph_shape
from curvhook.records import BATCHED, CONST, SHARED, Operation
from curvhook.rules.base import LayerRule
from curvhook.rules.batch_axis_view import BATCH_AXIS_VIEW, batch_axis_refusal, batch_first_module
from curvhook.rules.fallback import FALLBACK, mixes_samples
from curvhook.rules.parameters_only import TO_BATCH, parameters_only
from curvhook.rules.registry import rule_for, rule_or_fallback
from curvhook.rules.row_groups import GATHERED_ROWS, REGROUP, REPEATED_ROWS
from curvhook.rules.functional import FUNCTIONAL_RULES
from curvhook.rules.tensor_ops import TENSOR_OPS
from curvhook.rules.weight_norm import is_weight_norm
from curvhook.trace import Trace


@dataclass(frozen=True)
class ParamUse:
    """A trainable parameter an operation uses.

    Attributes:
        name: Its name in the operation (module attribute, or ``"t<slot>"``).
        position: Its index in ``Operation.params``.
        shared: Whether other operations use it too (terms are then summed
            before any squaring).
    """

    name: str
    position: int
    shared: bool


@dataclass(frozen=True)
class Step:
    """What the reverse walk does at one operation.

    Attributes:
        index: The operation's index in ``trace.all_operations``.
        rule: The rule that differentiates it.
        outputs: Dense slots of its followed outputs (``-1`` for one without grad).
        unfollowed: Dense slots of a module's further outputs (a value there is refused).
        upstream: ``(input slot, dense slot)`` of the inputs a pullback is needed for.
        params: The trainable parameters it uses.
        known_per_sample: Its structure shows it keeps samples apart (tensor operations).
    """

    index: int
    rule: LayerRule
    outputs: tuple[int, ...]
    unfollowed: tuple[int, ...]
    upstream: tuple[tuple[int, int], ...]
    params: tuple[ParamUse, ...]
    known_per_sample: bool


@dataclass(frozen=True)
class Plan:
    """The compiled reverse walk of one graph.

    Attributes:
        steps: In reverse forward order.
        slots: The number of dense slots.
        root: Dense slot of the model output.
        shared_params: ``id`` of the parameters used by more than one operation.
        indexed_writes: Indices of the operations that write a value with gradient
            through a tensor index, whose values are checked each step
            (:mod:`curvhook.indexed_writes`).
    """

    steps: tuple[Step, ...]
    slots: int
    root: int
    shared_params: frozenset[int]
    indexed_writes: tuple[int, ...] = ()

    def bind(self, trace: Trace) -> None:
        """Hand the operations of ``trace`` what the plan knows of them, and refuse an
        index that writes one entry twice."""
        ops = trace.all_operations
        for step in self.steps:
            ops[step.index].known_per_sample = step.known_per_sample
        for index in self.indexed_writes:
            refuse_duplicate_writes(ops[index])


def plan_for(model: nn.Module, trace: Trace) -> tuple[Plan, GraphShape]:
    """The plan of ``trace``'s graph: a cached one if the graph is the same, else a new one.

    Args:
        model: The extended model (plans are cached per model, weakly).
        trace: A forward pass whose output is reached by the backward pass.

    Returns:
        The plan and the graph's shape (its dense slot of every tensor key).
    """
    shape = graph_shape(trace)
    cache = _PLANS.get(model)
    if cache is None:
        cache = _PLANS[model] = OrderedDict()
    plan = cache.get(shape.key) if shape.key is not None else None
    if plan is None:
        plan = build_plan(trace, shape)
        if shape.key is not None:
            cache[shape.key] = plan
            while len(cache) > _PLANS_PER_MODEL:
                cache.popitem(last=False)
    else:
        cache.move_to_end(shape.key)
    return plan, shape


# Plans per model: a few graphs alternate in practice (train and eval, two batch sizes).
_PLANS_PER_MODEL = 8
_PLANS: "weakref.WeakKeyDictionary[nn.Module, OrderedDict[Hashable, Plan]]" = weakref.WeakKeyDictionary()


def clear_plans() -> None:
    """Forget every cached plan (tests, and a user who changed a model behind curvhook's back)."""
    _PLANS.clear()


def build_plan(trace: Trace, shape: GraphShape) -> Plan:
    """Check the graph of ``trace`` and compile its reverse walk."""
    ops = trace.all_operations
    slot_of = shape.slot_of
    if trace.root_key not in shape.produced:
        raise UnsupportedModelError(
            "curvhook saw no module or tensor operation of the model's forward produce its "
            "output. Return a tensor computed inside the model's forward."
        )
    n = trace.batch_size
    if trace.root_key in trace.moved_axes:
        raise UnsupportedModelError(
            f"The model output's batch axis is axis {trace.moved_axes[trace.root_key]}; curvhook "
            "needs it first. Return the output with the batch axis first."
        )
    rows = trace.root_rows
    if rows > 1:
        raise UnsupportedModelError(
            f"The model output merges its batch axis with the axes after it ({rows} rows per "
            f"sample, shape {tuple(trace.root_value.shape)}); curvhook needs one row per sample. "
            "Reshape it back inside the model (view(N, ...)), or return it unmerged and reshape "
            "it after the model: a loss on logits.reshape(-1, V) then takes each sample's rows."
        )
    known = [check_operation(op, trace, shape, n) for op in ops]
    uses = Counter(id(p) for op in ops for _, p in op.params)
    shared = frozenset(pid for pid, count in uses.items() if count > 1)
    steps = []
    for index in reversed(range(len(ops))):
        op = ops[index]
        upstream = tuple(
            (i, slot_of[k]) for i, (kind, k) in enumerate(zip(op.input_kinds, op.input_keys))
            if kind != CONST and k in shape.produced
        )
        params = tuple(ParamUse(name, i, id(p) in shared) for i, (name, p) in enumerate(op.params))
        steps.append(Step(
            index=index,
            rule=resolve_rule(op),
            outputs=tuple(slot_of.get(k, -1) if k is not None else -1 for k in op.output_keys),
            unfollowed=tuple(slot_of[k] for k in op.unfollowed_output_keys),
            upstream=upstream,
            params=params,
            known_per_sample=known[index],
        ))
    writes = tuple(i for i, op in enumerate(ops) if may_write_twice(op) and any(k is not None for k in op.output_keys))
    return Plan(tuple(steps), len(slot_of), slot_of[trace.root_key], shared, writes)


def resolve_rule(op: Operation) -> LayerRule:
    """The rule of an operation: a functional layer's, the tensor-operation rule, a module's
    registered rule, or the fallback.

    A module called with the batch axis elsewhere than first gets its rule on the
    batch-first view of the call (:mod:`curvhook.rules.batch_axis_view`).

    Operations on tensors computed from parameters only get the rules of
    :mod:`curvhook.rules.parameters_only` (around the module's own rule).
    """
    if op.module is None:
        if op.to_batch:
            return TO_BATCH
        if op.rows != op.rows_in:  # merges or splits rows (curvhook/row_groups.py)
            if op.func_name == "__getitem__":
                return GATHERED_ROWS
            return REPEATED_ROWS if op.func_name == "repeat_interleave" else REGROUP
        return TENSOR_OPS if op.batch_axes is not None else FUNCTIONAL_RULES.get(op.func, TENSOR_OPS)
    if op.batch_axes is not None:
        return BATCH_AXIS_VIEW
    rule = rule_or_fallback(op.module)
    return parameters_only(rule) if op.from_parameters else rule


def check_operation(op: Operation, trace: Trace, shape: GraphShape, n: Optional[int]) -> bool:
    """Raise a clear error if curvhook cannot follow ``op``.

    Returns:
        For a tensor operation, whether its structure shows that it keeps samples apart.
    """
    if op.rows != 1 or op.rows_in != 1:  # on merged rows: each row is a pseudo-sample
        if op.rows == 0:
            raise UnsupportedModelError(
                f"The operation {op.name} combines tensors whose batch axis a reshape merged with "
                "the axes after it with tensors where it was not (or merged differently). Reshape "
                "them alike (view(N, ...) or view(N * k, ...)) before combining them."
            )
        if op.rows != op.rows_in:
            _check_sources(op, trace, shape)
            return True
        n = None if n is None else n * op.rows
    if op.module is None:
        if all(k is None for k in op.output_keys):
            return False
        if op.batch_axes is not None:
            _check_moved_axes(op)
        elif op.to_batch and (n is None or op.output_shapes[0][0] != n):
            raise UnsupportedModelError(
                f"The operation {op.name} copies a tensor computed from parameters only to "
                f"leading size {op.output_shapes[0][0]}, the leading size of the model input, but "
                f"the model output has batch size {n}. Keep the batch axis first."
            )
        _check_sources(op, trace, shape)
        if op.batch_axes is not None or n is None or BATCHED not in op.input_kinds:
            return False
        return resolve_rule(op).keeps_samples_apart(op, n)
    if op.output_key is not None:
        _check_module(op, trace, shape, n)
    return False


def _check_moved_axes(op: Operation) -> None:
    """A tensor operation on a tensor whose batch axis is not first: curvhook must know where it goes."""
    in_axes, out_axes = op.batch_axes
    if out_axes is None:
        where = ", ".join(f"axis {a}" for a in in_axes if a is not None)
        raise UnsupportedModelError(
            f"The operation {op.name} gets a tensor whose batch axis is not first ({where}), and "
            "curvhook cannot follow the batch axis through it: it mixes samples (it acts along "
            "the batch axis), or curvhook does not know where it puts the axis. Move the batch "
            "axis back to the front (permute / transpose) before this operation."
        )


def _check_module(op: Operation, trace: Trace, shape: GraphShape, n: Optional[int]) -> None:
    module = op.module
    if mixes_samples(module, op.training):
        remedy = (
            "Call model.eval() (BatchNorm then uses its running statistics)."
            if (module.training if op.training is None else op.training) else
            "It keeps no running statistics (track_running_stats=False), so it uses the batch's "
            "in eval mode too: construct it with track_running_stats=True and train it, or use a "
            "normalization per sample (nn.GroupNorm, nn.LayerNorm)."
        )
        raise UnsupportedModelError(
            f"Module {op.name!r} ({type(module).__name__}) normalizes with statistics "
            f"of the whole batch, so samples are mixed and per-sample Jacobians do not exist. {remedy}"
        )
    if rule_for(module if op.batch_axes is None else batch_first_module(module)) is None:
        if not (op.from_parameters and is_weight_norm(op)):  # (its diagonal has a closed form)
            FALLBACK.warn_once(op)
    if op.from_parameters:  # no batch axis: every sample reads the whole output
        _check_sources(op, trace, shape)
        return
    in_axes, out_axis = _module_batch_axes(op)
    out = op.output_shape
    if n is not None and (len(out) <= out_axis or out[out_axis] != n):
        where = "first" if out_axis == 0 else f"where its input has it (axis {out_axis})"
        raise UnsupportedModelError(
            f"Module {op.name!r} returned shape {tuple(out)}; curvhook needs every module to "
            f"keep the batch axis {where} (N = {n}). Operations that move or mix samples "
            "have no per-sample Jacobian."
        )
    for x, kind, key, node, axis in zip(op.inputs, op.input_kinds, op.input_keys, op.input_nodes, in_axes):
        if kind == CONST:
            continue
        if kind == SHARED or key in trace.shared_keys:
            raise UnsupportedModelError(
                f"Module {op.name!r} gets an input computed from parameters only (no batch "
                "axis). curvhook supports that for tensor operations, not for module inputs; "
                "make the module own the parameter."
            )
        _check_source(op.name, key, node, trace, shape)
        if x.dim() <= axis or x.shape[axis] != n:
            raise UnsupportedModelError(
                f"Module {op.name!r} got an input of shape {tuple(x.shape)}; "
                f"curvhook needs its batch axis (axis {axis}) to have the batch size N = {n}."
            )


def _module_batch_axes(op: Operation) -> tuple[tuple[int, ...], int]:
    """The batch axis of each input of a module call (``0`` for constants), and of its output.

    Raises where the module does not take its batched inputs with the batch axis
    where they have it (:func:`~curvhook.rules.batch_axis_view.batch_axis_refusal`).
    """
    if op.batch_axes is None:
        in_axes, out_axis = tuple(0 if k == BATCHED else None for k in op.input_kinds), 0
    else:
        in_axes, (out_axis,) = op.batch_axes
    why = batch_axis_refusal(op.module, in_axes, op.inputs)
    if why is not None:
        where = ", ".join(sorted({f"axis {a}" for a in in_axes if a is not None}))
        raise UnsupportedModelError(
            f"Module {op.name!r} ({type(op.module).__name__}) gets an input whose batch axis is "
            f"{where}, which curvhook cannot follow into it: {why}. Move the batch axis "
            "(permute / transpose) to where the module takes it. (curvhook follows a batch axis "
            "that is not first into nn.MultiheadAttention, nn.LSTM, nn.GRU and nn.RNN with "
            "batch_first=False, and into position-wise modules: Linear, LayerNorm, RMSNorm, "
            "Dropout, Identity, Embedding, activations.)"
        )
    return tuple(0 if a is None else a for a in in_axes), out_axis


def _check_sources(op: Operation, trace: Trace, shape: GraphShape) -> None:
    """:func:`_check_source` for every input of ``op`` that needs a gradient."""
    for kind, key, node in zip(op.input_kinds, op.input_keys, op.input_nodes):
        if kind != CONST:
            _check_source(op.name, key, node, trace, shape)


def _check_source(name: str, key, node, trace: Trace, shape: GraphShape) -> None:
    """An input with an autograd history must come from a recorded operation or the model input."""
    if node is None or key in shape.produced or key in trace.input_keys:
        return
    if type(node).__name__ == "CheckpointFunctionBackward":  # a block without modules inside
        raise reentrant_checkpoint_error(f"an input of {name!r}")
    if type(node).__name__ in ("CopySlices", "AsStridedBackward0"):  # in place through views
        raise UnsupportedModelError(
            f"An input of {name!r} was changed by an in-place operation on a view that curvhook "
            "cannot replay (two in-place operations on one view, a view of a constant, a view "
            "taken by an operation that reads another tensor, or a view read after an in-place "
            "operation changed its base; docs/supported.md). "
            "Write it out of place (torch.where(mask, v, h), torch.cat, h * scale), or take the "
            "view by slicing just before one in-place operation (h[:, 2:4].mul_(s))."
        )
    raise UnsupportedModelError(
        f"An input of {name!r} was computed by an operation curvhook did not see "
        f"({type(node).__name__}): outside the model's forward, or by code that bypasses "
        "torch's function dispatch. Compute it inside the model's forward with torch "
        "operations or modules. A tensor the model computed from its parameters in an "
        "earlier forward and keeps for the next ones is one such input (timm's LeViT and "
        "EfficientFormer keep their attention biases in `attention_bias_cache` in eval mode): "
        "empty that cache before each block (`m.attention_bias_cache = {}` on each module "
        "that has one), or keep those modules in train mode."
    )

