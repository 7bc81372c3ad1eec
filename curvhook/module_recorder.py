"""The module recorder: forward hooks that record the leaf-module calls of the model.

Every module of the model gets a pre-hook and a post-hook. Whether a call is a
leaf (recorded as one operation) or a container (its children and the tensor
operations between them are recorded instead) is known only when it ends:
a module whose ``forward`` called no child is a leaf, also when it has children
it only reads parameters from (``nn.MultiheadAttention`` uses its ``out_proj``
without calling it). A leaf without a rule whose tensor operations form a chain
with the same DiagGGNApprox diagonal is recorded as those operations instead
(:mod:`curvhook.leaf_operations`). The model's own hooks open a trace for each forward pass
and, when it returns, hook the backward driver onto its output.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import wraps
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor, nn

from curvhook._torch_internals import (
    ModuleHookPairs, disable_torch_function, forward_pre_hooks, in_reentrant_checkpoint, keep_forward_hook_at,
    own_parameters, pop_torch_function_mode, push_torch_function_mode, saved_tensor_hooks_active,
    torch_function_mode_on_top,
)
from curvhook.block_state import BlockState, Frame
from curvhook.copies import HookFreeCopies
from curvhook.errors import UnsupportedModelError, reentrant_checkpoint_error
from curvhook.fixed_constants import fixed_slots, note_fixed
from curvhook.guards import check_forward_start, check_module_call, check_module_output, refuse_packed_sequence
from curvhook.leaf_operations import as_operations
from curvhook.records import BATCHED, CONST, SHARED, Operation, Slot, flat_tensors, key_of, make_template
from curvhook.rules.fallback import replaying
from curvhook.rules.registry import rule_for
from curvhook.row_groups import mark_merged_constants, mark_outputs, note_rows, rows_followed, rows_of
from curvhook.selection_tail import find_selection_tail
from curvhook.tape import OperationTape, merged_constant, remember_merged_constant
from curvhook.trace import Trace

# The arguments of a module called with one tensor: the template ``(Slot(0),)``.
_ONE_SLOT = (Slot(0),)


def _without_torch_function(hook: Callable) -> Callable:
    """Run a hook with torch functions disabled: its reads of tensor metadata then skip the tape."""

    @wraps(hook)
    def run(*args: Any, **kwargs: Any) -> Any:
        with disable_torch_function():
            return hook(*args, **kwargs)

    return run


class ModuleRecorder:
    """The forward hooks of one block (see the module docstring).

    Args:
        state: The block's shared state.
        tape: The block's tape; it is taken off the mode stack inside torch layers.
        on_forward_start: Called when a forward pass of the model starts, before
            its trace opens.
        on_output: Called as ``on_output(trace, output, others)`` when a forward pass of
            the model returned a tensor that requires grad.
        output: Which tensor of a structured model output to follow (see
            :func:`~curvhook.context.extend`).
    """

    def __init__(
        self,
        state: BlockState,
        tape: OperationTape,
        on_forward_start: Callable[[], None],
        on_output: Callable[[Trace, Tensor, Optional[dict]], None],
        output: OutputChoice = None,
    ) -> None:
        self.output = output
        self.state = state
        self.tape = tape
        self.on_forward_start = on_forward_start
        self.on_output = on_output
        self.popped: list[nn.Module] = []  # torch layers running with the tape off the stack
        # curvhook's hooks, which keep_hook_order keeps in place: a pair on each module,
        # and (model, pre-hook id, forward hook id) of the model's own
        self.pairs = ModuleHookPairs([], self.on_module_pre, self.on_module_post)
        self.model_hooks: Optional[tuple[nn.Module, int, int]] = None

    def register(self, model: nn.Module, modules: Optional[Iterable[nn.Module]] = None) -> list[Any]:
        """Register the hooks on ``model`` and its modules (``model.modules()``
        unless listed already); return their handles.

        The user's own forward hooks may change what a module receives or returns
        (``lambda m, args, out: 2 * out``). Each module's pre-hook runs after the
        user's pre-hooks and its forward hook before the user's forward hooks, so
        that the module is recorded with the input its ``forward`` receives and
        the output it returns; what the user's hooks compute runs outside the
        module, and the tape records it like any operation between modules. The
        model's pre-hook runs first and its forward hook last: the user's hooks
        on the model are part of the model.
        """
        model_pre = model.register_forward_pre_hook(self.on_model_pre, prepend=True, with_kwargs=True)
        listed = model.modules() if modules is None else modules
        self.pairs = ModuleHookPairs(
            [m for m in listed if not _is_empty_container(m)], self.on_module_pre, self.on_module_post
        )
        model_post = model.register_forward_hook(self.on_model_post, with_kwargs=True, always_call=True)
        self.model_hooks = (model, model_pre.id, model_post.id)
        handles = [model_pre, self.pairs, model_post]
        hook_ids = [*self.pairs.ids, model_pre.id, model_post.id]
        handles.append(HookFreeCopies([*self.pairs.modules, model], hook_ids))
        return handles

    def keep_hook_order(self) -> None:
        """Put curvhook's hooks back where :meth:`register` placed them.

        A pre-hook the user registers inside the block would run after curvhook's
        pre-hook of the module, and a forward hook registered with
        ``prepend=True`` before curvhook's: moving curvhook's back keeps them
        outside the module. Called when a forward pass of the model starts.
        """
        self.pairs.keep_order()
        model, pre_id, post_id = self.model_hooks
        keep_forward_hook_at(model, pre_id, True, False)
        keep_forward_hook_at(model, post_id, False, True)

    def tape_on_top(self) -> bool:
        """Whether the tape is the innermost torch-function mode."""
        return torch_function_mode_on_top(self.tape)

    def restore_tape(self) -> None:
        """Put the tape back after a forward pass was interrupted inside a torch layer.

        ``KeyboardInterrupt`` skips the post hooks; what that forward left open is dropped.
        """
        if not self.popped:
            return
        self.popped.clear()
        push_torch_function_mode(self.tape)
        for trace in self.state.stack:
            trace.release()
        self.state.stack.clear()
        self.state.frames.clear()

    # ------------------------------------------------------------- the model
    @_without_torch_function
    def on_model_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """A forward pass of the model starts: open its trace.

        A rule's replay of the model (a model without children and without a
        rule goes to the fallback) is no forward pass of the model.
        """
        if replaying():
            return
        _refuse_empty_batch(next(_input_tensors((args, kwargs)), None), "input")
        self.keep_hook_order()  # for the next forward passes: this one's hooks are already under way
        self.on_forward_start()
        self.restore_tape()
        state = self.state
        state.forwards += 1
        trace = Trace(state.forwards)
        trace.grad_enabled = torch.is_grad_enabled()
        if not kwargs and len(args) == 1 and isinstance(args[0], Tensor):  # the common call: model(X)
            trace.input_keys = {key_of(args[0])}
            first = args[0]
        else:
            # tensors anywhere in the arguments: model({"x": X}), model(**batch), model((x1, x2))
            given = list(_input_tensors((args, kwargs)))
            trace.input_keys = {key_of(t) for t in given}
            first = given[0] if given else None
        trace.functorch_level = check_forward_start(first)  # autocast, torch.compile, transforms, meta
        if first is not None and first.dim():
            trace.batch_hint = first.shape[0]
        state.stack.append(trace)

    @_without_torch_function
    def on_model_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """A forward pass of the model returned: hand its output to the backward driver."""
        if replaying():
            return
        state = self.state
        if not state.stack:
            return
        trace = state.stack.pop()
        state.frames.clear()
        if output is None:  # the forward raised
            trace.release()
            return
        others = None
        if not isinstance(output, Tensor) or self.output is not None:
            try:
                whole, output = output, select_output(output, self.output)
            except UnsupportedModelError:
                trace.release()
                raise
            others = other_output_tensors(whole, output)
        if not output.requires_grad:
            trace.release()  # no backward can follow
            return
        try:
            _refuse_empty_batch(output, "output")
        except UnsupportedModelError:
            trace.release()
            raise
        if trace.row_groups:
            trace.root_rows = rows_of(trace, output, key_of(output))
        self.on_output(trace, output, others)

    # ----------------------------------------------------------- any module
    @_without_torch_function
    def on_module_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """A module of the model starts: open a frame with what it was called with."""
        state = self.state
        if not state.stack:
            return
        name, has_children, torch_leaf = state.modules[module]  # hooks are only on modules listed at entry
        trace = state.stack[-1]
        check_module_call(module, name, trace.functorch_level, state.param_ids)
        refuse_packed_sequence(module, name, args)
        if not torch.is_grad_enabled() and trace.grad_enabled and in_reentrant_checkpoint():
            raise reentrant_checkpoint_error(f"module {name!r}")
        frames = state.frames
        if frames:
            frames[-1].child_called = True
        op = _module_operation(module, name, args, kwargs, state.param_ids, trace.shared_keys)
        if CONST in op.input_kinds:
            op.fixed_slots = fixed_slots(state.fixed_ids, trace, op.inputs, op.input_kinds)
        if trace.moved_axes:
            _note_batch_axes(op, trace.moved_axes)
        if op.inputs and getattr(module, "inplace", False) and (saved_tensor_hooks_active() or op.inputs[0]._base is not None):
            # It overwrites its input, and its node may not be read (checkpointed), or is not
            # its own (in place on a view, ``Linear`` on ``[N, T, F]``: autograd wraps it in
            # ``CopySlices``). Keep a copy: the rule replays the module on it.
            op.inputs = (op.inputs[0].detach().clone(), *op.inputs[1:])
            op.input_versions = (0, *op.input_versions[1:])
        records_inside = has_children or (not torch_leaf and rule_for(module) is None)
        frames.append(Frame(op, len(trace.operations), has_children, len(trace.shared_log), records_inside=records_inside))
        if torch_leaf and self.tape_on_top() and not self.tape.linearity.marked(op.inputs):
            # The tape records nothing inside a leaf: a torch layer's forward calls no
            # module, and its inputs carry no loss value. Off the stack, its functions
            # skip the tape's Python dispatch; on_module_post puts it back.
            pop_torch_function_mode()
            self.popped.append(module)

    @_without_torch_function
    def on_module_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """A module of the model returned: record it if it was a leaf."""
        if self.popped and self.popped[-1] is module:  # also when its forward raised
            self.popped.pop()
            push_torch_function_mode(self.tape)
        state = self.state
        if not state.stack or not state.frames or state.frames[-1].op.module is not module:
            return
        frame = state.frames.pop()
        check_module_output(frame.op.name, output)
        trace, op = state.stack[-1], frame.op
        if (not frame.child_called and frame.has_children and rule_for(module) is None
                and _ran_as_operations(trace.operations[frame.start :], op, output)):
            # children it did not call, whose parameters its operations read (torchvision's
            # ShiftedWindowAttention: F.linear(x, self.qkv.weight, …)): a container all the same
            frame.child_called = True
        if frame.child_called and state.frames and trace.row_groups and not rows_followed(
            trace.operations[frame.start :], trace.batch_hint
        ):  # merged rows it cannot follow row by row: the container becomes one module
            frame.merged_keys.extend(
                k for o in trace.operations[frame.start :] if o.rows != 1 or o.rows_in != 1
                for k in o.output_keys if k is not None
            )
        if frame.child_called and not (
            frame.merged_keys and _depends_on_merged_batch(trace.operations[frame.start :], frame.merged_keys, output)
        ) and not _served_whole(module):
            return  # a container: its children and operations are recorded
        if not frame.has_children and frame.records_inside:
            kept = as_operations(op, module, trace.operations[frame.start :], output, trace.shared_keys)
            if kept is not None:  # the module counts as the operations it ran (curvhook/leaf_operations.py)
                return
        if trace.moved_axes:  # operations inside a leaf are part of it, also where they moved the batch axis
            for inner in trace.operations[frame.start :]:
                for key in inner.output_keys:
                    trace.moved_axes.pop(key, None)
        inner_ops = trace.operations[frame.start :]
        hidden = _hidden_batch_read(inner_ops, op, trace, frame.start)
        if hidden is not None:
            raise UnsupportedModelError(
                f"Module {op.name!r} ({type(module).__name__}) reads a tensor computed from the batch "
                f"that it was not passed ({hidden}: an attribute, a global, or a tensor inside a plain "
                "object). curvhook serves this module as one operation of its tensor arguments and "
                "cannot differentiate through what it reads otherwise. Pass the tensor as an argument "
                "(module(x, h)), or inside a tuple, list or dict."
            )
        reads_batch = any(BATCHED in inner.input_kinds for inner in inner_ops)
        del trace.operations[frame.start :]
        if len(trace.shared_log) > frame.shared_start:
            # Operations inside a leaf are part of it. Computed from its parameters
            # alone (its input needs no grad), their outputs are still not shared
            # tensors of the model: the module output carries the batch axis.
            trace.shared_keys.difference_update(trace.shared_log[frame.shared_start :])
            del trace.shared_log[frame.shared_start :]
        _finish_leaf(op, module, frame.has_children, output)
        _refuse_own_parameter_as_argument(op, module)
        if op.batch_axes is not None and op.output_key is not None:  # its output keeps the input's batch axis
            trace.moved_axes[op.output_key] = op.batch_axes[1][0]
        if BATCHED not in op.input_kinds and op.params and trace.row_groups:
            # on frozen features with merged rows (LeViT's LinearNorm, Swin's windows after a
            # frozen stem): its output has their rows per sample, followed row by row
            kinds = list(op.input_kinds)
            if mark_merged_constants(trace, kinds, op.inputs, op.input_keys):
                op.input_kinds = tuple(kinds)
        if _from_parameters(op, trace.batch_hint, reads_batch):
            if len(state.frames) <= 1 and any(k in trace.merged_inputs for k in op.input_keys):
                raise _merged_input_error(op, trace.batch_hint)
            op.from_parameters = True
            if isinstance(output, Tensor) and inner_ops:
                op.selection_tail = find_selection_tail(inner_ops, output, set(op.input_keys))
            # parameters of the model passed as inputs (``mlp(self.table)``) get their terms by slot
            op.params += tuple(
                (f"t{i}", x) for i, (x, k) in enumerate(zip(op.inputs, op.input_kinds))
                if k == SHARED and id(x) in state.param_ids and all(x is not p for _, p in op.params)
            )
            trace.shared_keys.add(op.output_key)
            trace.shared_log.append(op.output_key)
        if (not op.unfollowed_output_keys and op.output_keys and op.output_keys[0] is not None
                and op.output_keys[0] in op.input_keys):
            # It returned its input as it was (Hugging Face's LinearActivation, DeBERTa's
            # StableDropout in eval on the relative embeddings): no operation, whatever parameters
            # it holds or was given. (Recorded, a parameter passed through it got its terms
            # twice: from the call and from the operation that reads the parameter itself.)
            return
        if op.output_key is None and op.inputs and len(op.fixed_slots) == len(op.inputs):
            note_fixed(trace, None, output, trace.batch_hint)  # from buffers alone, without grad
        elif (op.output_key is None and isinstance(output, Tensor) and output.dim()
              and merged_constant(trace, op.inputs, op.input_kinds)
              and any(k in trace.merged_inputs and x.shape[:1] == output.shape[:1] for x, k in zip(op.inputs, op.input_keys))):
            # a frozen layer on merged constant rows (x.repeat_interleave(k, dim=0) of the model
            # input): its output has their rows, where trainable layers meet it
            remember_merged_constant(trace, output)
        if op.inputs or op.output_keys:
            trace.operations.append(op)
            if BATCHED in op.input_kinds:  # on merged rows: followed as pseudo-samples
                outputs = [output] if isinstance(output, Tensor) else list(flat_tensors(output))
                note_rows(trace, op, outputs, False)
                mark_outputs(trace, op, outputs[:1])
            if (len(state.frames) > 1 and op.params and BATCHED not in op.input_kinds
                    and merged_constant(trace, op.inputs, op.input_kinds)):
                # a layer on frozen features whose batch axis its container merged (LeViT's
                # BatchNorm1d on x.flatten(0, 1)): the container becomes one module
                state.frames[-1].merged_keys.extend(k for k in op.output_keys if k is not None)


OutputChoice = Union[str, int, Callable[[Any], Tensor], None]


def in_active_block(module: nn.Module) -> bool:
    """Whether ``module`` carries the hooks of an active ``extend`` block."""
    return any(isinstance(getattr(h, "__self__", None), ModuleRecorder) for h in forward_pre_hooks(module))


def _input_tensors(obj: Any):
    """The tensors in a model call's arguments: nested tuples, lists and mappings (dicts, ``UserDict``)."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _input_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _input_tensors(value)
    else:
        data = getattr(obj, "data", None)  # collections.UserDict and UserList keep theirs here
        if isinstance(data, (Mapping, list)):
            yield from _input_tensors(data)


def _refuse_empty_batch(x: Any, what: str) -> None:
    """Refuse a model input or output with batch size 0 while grad mode is on.

    The loss of an empty batch is ``0`` (``sum``) or ``nan`` (``mean``) and has no
    curvature; PyTorch runs it, but the per-sample terms curvhook would write have
    no samples to come from. Raised in the forward pass, before anything is recorded.
    """
    if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] != 0 or not torch.is_grad_enabled():
        return
    raise UnsupportedModelError(
        f"The model {what} has batch size 0 (shape {tuple(x.shape)}): an empty batch has no "
        "curvature for curvhook to compute. Skip empty batches (if X.shape[0] == 0: continue), "
        "or run this forward pass outside the extend block or under torch.no_grad()."
    )


def select_output(output: Any, choice: OutputChoice) -> Tensor:
    """The tensor of a model output the curvature is of (see ``extend(..., output=)``).

    Args:
        output: What the model returned: a tensor, a mapping (``dict``, Hugging
            Face ``ModelOutput``), a tuple or list, or an object with attributes.
        choice: A key, an index, a function, or ``None`` to infer it.

    Returns:
        ``[N, *out]``.
    """
    if choice is not None:
        try:
            picked = choice(output) if callable(choice) else _item(output, choice)
        except (KeyError, IndexError, AttributeError, TypeError) as err:
            raise UnsupportedModelError(
                f"extend(..., output={choice!r}) does not name a tensor of the model output "
                f"({type(output).__name__}: {err})."
            ) from err
        if not isinstance(picked, Tensor):
            raise UnsupportedModelError(
                f"extend(..., output={choice!r}) picked a {type(picked).__name__}, not a tensor."
            )
        if callable(choice) and not _holds(output, picked):
            # (a loss cannot be computed from a tensor that only curvhook sees: the block would
            # write nothing, and its end would suggest a wrong output=)
            raise UnsupportedModelError(
                f"extend(..., output=...) is a function that computed a new tensor {tuple(picked.shape)} "
                "from the model output; the loss cannot be computed from it, since only curvhook sees "
                "it. The function must return one of the output's tensors as it is (lambda o: o.logits, "
                "lambda o: o[0]). To train on a function of them (the mean of two heads), compute it "
                "in the model's forward (a wrapper module) and return it."
            )
        return picked
    if isinstance(output, Tensor):
        return output
    items = _named_items(output)
    if "logits" in items and isinstance(items["logits"], Tensor):
        return items["logits"]
    grads = {k: v for k, v in items.items() if isinstance(v, Tensor) and v.requires_grad and v.dim()}
    if len(grads) == 1:
        return next(iter(grads.values()))
    found = ", ".join(map(repr, grads)) or "none"
    raise UnsupportedModelError(
        f"The model returned a {type(output).__name__}; curvhook needs to know which of its "
        f"tensors the loss is computed from (tensors that require grad: {found}). Name it: "
        "extend(model, ..., output='logits') (a key, an index, or a function of the output)."
    )


def _served_whole(module: nn.Module) -> bool:
    """Whether a rule serves ``module`` as one call, children and all (a mixture-of-experts
    block: its router and experts are part of its map, :mod:`curvhook.rules.mixture_of_experts`)."""
    rule = rule_for(module)
    return rule is not None and getattr(rule, "serves_whole_module", False)


def _merged_input_error(op: Operation, n: int) -> UnsupportedModelError:
    """A module of the model's own ``forward`` called on its input with the batch axis merged
    (``self.lin(x.reshape(-1, F))``): not shared by the samples, and no container to serve."""
    shape = next(tuple(x.shape) for x, k in zip(op.inputs, op.input_kinds) if k == CONST and x.dim() >= 2 and x.shape[0] > n)
    return UnsupportedModelError(
        f"Module {op.name!r} gets an input of shape {shape} whose leading axis merges the batch "
        f"(N = {n}) with other axes (x.reshape(-1, F)), in the model's own forward. curvhook needs "
        "one row per sample: pass the unmerged tensor (nn.Linear and the norms take any leading "
        "axes), or move the reshape and the module into a submodule, which the exact torch.func "
        "fallback then serves as one module."
    )


def _depends_on_merged_batch(operations: list, merged: list, output: Any) -> bool:
    """Whether a module's output was computed from a tensor whose batch axis an operation
    of its ``forward`` merged with other axes (``merged``: those operations' output keys).

    Such a module is recorded as one call for the fallback; a merge whose result does
    not reach the output (a loss computed inside the model) changes nothing.
    """
    first = output if isinstance(output, Tensor) else next(flat_tensors(output), None)
    if not merged or first is None:
        return False
    reached = set(merged)
    for op in operations:
        if any(k in reached for k in op.input_keys):
            reached.update(k for k in op.output_keys if k is not None)
    return key_of(first) in reached


def _holds(output: Any, tensor: Tensor) -> bool:
    """Whether ``tensor`` is ``output`` or one of the tensors it holds, at any depth: through
    mappings, tuples, lists and the attributes of objects (``__dict__``, ``__slots__``)."""
    stack, seen = [output], set()
    while stack:
        obj = stack.pop()
        if obj is tensor:
            return True
        if isinstance(obj, (Tensor, str, bytes, int, float, bool)) or obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, Mapping):
            stack.extend(obj.values())
        elif isinstance(obj, (tuple, list, set, frozenset)):
            stack.extend(obj)
        else:
            stack.extend(getattr(obj, "__dict__", {}).values())
            for cls in type(obj).__mro__:
                names = getattr(cls, "__slots__", ())
                names = (names,) if isinstance(names, str) else names
                stack.extend(getattr(obj, name) for name in names if hasattr(obj, name))
    return False


def other_output_tensors(output: Any, chosen: Tensor) -> dict[tuple, Tensor]:
    """The tensors of a model output, besides ``chosen``, that require grad, by their path.

    Top-level entries (path ``(key,)``) and the tensors of top-level tuples and
    lists (``("hidden_states", 2)``); ``chosen`` itself and scalars (a loss the
    model computed) are left out.
    """
    found: dict[tuple, Tensor] = {}
    for key, value in _named_items(output).items():
        items = [((key, i), v) for i, v in enumerate(value)] if isinstance(value, (tuple, list)) else [((key,), value)]
        for path, t in items:
            if isinstance(t, Tensor) and t.requires_grad and t.dim() and t is not chosen:
                found[path] = t
    return found


def _item(output: Any, choice: Union[str, int]) -> Any:
    if isinstance(choice, str) and not isinstance(output, Mapping):
        return getattr(output, choice)
    return output[choice]


def _named_items(output: Any) -> dict:
    """The top-level entries of a structured output, by key or index."""
    if isinstance(output, Mapping):
        return dict(output.items())
    if isinstance(output, (tuple, list)):
        return dict(enumerate(output))
    return {}


def _module_operation(
    module: nn.Module, name: str, args: tuple, kwargs: dict, param_ids: set[int], shared: set
) -> Operation:
    """The record of a module call as it starts (its outputs are filled in when it ends).

    An input is :data:`SHARED` if it is a parameter of the model or was computed
    from parameters only (its key is in ``shared``), :data:`BATCHED` if it
    otherwise requires grad, :data:`CONST` if not.
    """
    if not kwargs and len(args) == 1 and isinstance(args[0], Tensor):  # the common call: f(x)
        x = args[0]
        key = key_of(x)
        inputs, t_args, t_kwargs = args, _ONE_SLOT, {}
        keys, nodes, kinds = (key,), (x.grad_fn,), (_kind(x, key, param_ids, shared),)
    else:
        t_args, t_kwargs, found = make_template(args, kwargs)
        inputs = tuple(found)
        keys = tuple(key_of(x) for x in inputs)
        nodes = tuple(x.grad_fn for x in inputs)
        kinds = tuple(_kind(x, k, param_ids, shared) for x, k in zip(inputs, keys))
    return Operation(
        name=name,
        module=module,
        args=t_args,
        kwargs=t_kwargs,
        inputs=inputs,
        input_kinds=kinds,
        input_keys=keys,
        input_versions=tuple(k[1] for k in keys),
        input_nodes=nodes,
    )


def _note_batch_axes(op: Operation, moved: dict) -> None:
    """Record where the batch axes of a module call's inputs are, where one is not first.

    Sets ``op.batch_axes`` to ``(axis of each batched input or None, (output axis,))``
    (a constant taken from the model input by moving axes counts as batched here);
    the output gets the axis of the first batched input whose axis is not first
    (the plan checks that the module takes it there:
    :func:`curvhook.rules.batch_axis_view.batch_axis_refusal`).
    """
    in_axes = tuple(
        moved.get(k, 0) if kind == BATCHED else moved.get(k) if kind == CONST else None
        for k, kind in zip(op.input_keys, op.input_kinds)
    )
    if any(in_axes):
        op.batch_axes = (in_axes, (next(a for a in in_axes if a),))


def _kind(x: Tensor, key, param_ids: set[int], shared: set) -> str:
    if not x.requires_grad:
        return CONST
    return SHARED if id(x) in param_ids or key in shared else BATCHED


def _ran_as_operations(inner_ops: list, op: Operation, output: Any) -> bool:
    """Whether the operations recorded inside a module connect its tensor arguments to its
    output: the output is one of theirs, and each batched tensor they read is an argument
    or one of their outputs (nothing computed out of the tape's sight, such as a custom
    ``autograd.Function``, and nothing read from elsewhere)."""
    if not inner_ops or not isinstance(output, Tensor) or not output.requires_grad:
        return False
    inside = set(op.input_keys)
    for inner in inner_ops:
        for x, key, kind in zip(inner.inputs, inner.input_keys, inner.input_kinds):
            if kind == BATCHED and x.requires_grad and key not in inside:
                return False
        inside.update(k for k in inner.output_keys if k is not None)
    return key_of(output) in inside


def _hidden_batch_read(inner_ops: list, op: Operation, trace: Trace, start: int) -> Optional[str]:
    """The first operation recorded inside a module served as one operation that reads a
    batched tensor it was not passed: one that an operation before the module computed,
    or a model input (``self.ctx`` set by its parent). ``None`` if there is none (a
    tensor an unrecorded computation made inside it, a custom ``autograd.Function``'s
    output, is no such read)."""
    if not inner_ops:
        return None
    inside = set(op.input_keys)
    candidates = []
    for inner in inner_ops:
        for x, key, kind in zip(inner.inputs, inner.input_keys, inner.input_kinds):
            if kind == BATCHED and x.requires_grad and key not in inside:
                candidates.append((key, inner.name))
        inside.update(k for k in inner.output_keys if k is not None)
    if not candidates:
        return None
    before = {k for o in trace.operations[:start] for k in o.output_keys if k is not None} | trace.input_keys
    return next((name for key, name in candidates if key in before), None)


def _from_parameters(op: Operation, batch_hint, reads_batch: bool = False) -> bool:
    """Whether a leaf call computes its output from constants and parameters only,
    without a batch axis (``position_embeddings(position_ids)`` with ids ``[1, L]``).

    An output whose leading size is that of the model input keeps the batch
    axis (``word_embeddings(input_ids)``): it is one row per sample. Unless every
    constant it reads comes from the model's buffers alone (``embedding(rel_index)``
    with ``rel_index`` ``[heads, L]`` and ``heads = N``: :mod:`curvhook.fixed_constants`),
    or it reads no constant at all (``mlp(self.table)``; called without tensors, when
    ``N = 1``: a leading axis of one then says nothing). ``reads_batch``: operations
    recorded inside it read batched tensors it was not passed (an attribute, a plain
    object holding one): only the leading size decides.
    """
    if op.output_key is None or BATCHED in op.input_kinds or op.batch_axes is not None:
        return False
    if not op.params and SHARED not in op.input_kinds:
        return False
    if (not reads_batch and (op.inputs or batch_hint == 1)
            and all(k != CONST or i in op.fixed_slots for i, k in enumerate(op.input_kinds))):
        return True  # parameters, tensors from parameters, fixed constants: none has the batch
    shape = op.output_shape
    return len(shape) == 0 or batch_hint is None or shape[0] != batch_hint


def _refuse_own_parameter_as_argument(op: Operation, module: nn.Module) -> None:
    """A leaf passed one of its own trainable parameters (``bias(bias.table)``): its rules
    differentiate the parameter where the module reads it as an attribute and the argument
    apart, and would miss the path through the other (wrong numbers in every extension)."""
    if SHARED not in op.input_kinds:  # (a parameter passed as an argument is a shared input)
        return
    own = {id(p): n for n, p in op.params}
    name = next((own[id(x)] for x in op.inputs if id(x) in own), None)
    if name is not None:
        raise UnsupportedModelError(
            f"Module {op.name!r} ({type(module).__name__}) is passed its own parameter {name!r} as an "
            "argument, and also holds it: curvhook serves such a call as one operation of its "
            "arguments and its parameters apart, and cannot follow one tensor that is both. Read the "
            "parameter inside forward (self.<name>) instead of passing it, or pass a parameter the "
            "module does not own."
        )


def _finish_leaf(op: Operation, module: nn.Module, has_children: bool, output: Any) -> None:
    """Fill in what a leaf call returned, and the parameters it uses."""
    op.recurse = has_children
    if isinstance(output, Tensor):
        first, others = output, ()
    else:
        first, *others = list(flat_tensors(output)) or [None]
    if first is not None:
        op.output, op.node = first, first.grad_fn
        if op.node is not None and saved_tensor_hooks_active():  # activation checkpointing
            op.node, op.node_saves_hooked = None, True
        op.output_keys = (key_of(first) if first.requires_grad else None,)
        op.output_shapes = (first.shape,)
        if others:
            op.unfollowed_output_keys = tuple(key_of(o) for o in others if o.requires_grad)
    op.training = module.training
    op.params = _trainable_parameters(module, has_children)


def _trainable_parameters(module: nn.Module, recurse: bool) -> tuple:
    """The parameters that require grad of a leaf (all below it when ``recurse``), named once."""
    named = module.named_parameters() if recurse else own_parameters(module).items()
    found = [(n, p) for n, p in named if p is not None and p.requires_grad]
    if len({id(p) for _, p in found}) < len(found):  # one parameter under two names
        first: dict = {}
        for n, p in found:
            first.setdefault(id(p), (n, p))
        found = list(first.values())
    return tuple(found)


def _is_empty_container(module: nn.Module) -> bool:
    """A plain container computes nothing itself (an empty ``nn.Sequential`` returns its
    input): hooks on it would record nothing, so it gets none."""
    return type(module) in (nn.Sequential, nn.ModuleList, nn.ModuleDict) and not own_parameters(module)
