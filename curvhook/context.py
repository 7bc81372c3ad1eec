"""``extend``: the context manager that owns every hook and stored tensor.

Inside the block, forward hooks record what each leaf module saw, a global
module hook notices loss modules called on the model output, and a tensor hook
on the model output runs the engine when the gradient reaches it. On exit, every
hook is removed and every stored tensor released, whether the block ended
normally or with an exception.
"""

from __future__ import annotations

import weakref
from functools import partial, wraps
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.loss import _Loss
from torch.nn.modules.module import (
    _global_forward_hooks_with_kwargs,
    register_module_forward_hook,
    register_module_forward_pre_hook,
)

from curvhook import _memory
from curvhook.calls import (
    FunctionCall,
    LossCall,
    ModuleCall,
    Slot,
    TensorKey,
    Trace,
    key_of,
    make_template,
    tensor_arguments,
)
from curvhook.engine import backpropagate
from curvhook.errors import CurvhookError, UnsupportedLossError, UnsupportedModelError
from curvhook.extensions.base import Extension
from curvhook.loss_uses import LossUseMonitor


def _without_torch_function(hook: Any) -> Any:
    """Run a hook with torch functions disabled: its reads of tensor metadata then skip the mode."""

    @wraps(hook)
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch._C.DisableTorchFunction():
            return hook(*args, **kwargs)

    return run


class Extend:
    """Context manager returned by :func:`extend`; see there."""

    def __init__(self, model: nn.Module, *extensions: Extension, accumulate: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"extend() expects an nn.Module, got {type(model).__name__}.")
        for ext in extensions:
            if not isinstance(ext, Extension):
                raise TypeError(
                    f"extend() expects extension instances such as DiagGGN(), got {ext!r}."
                )
        attributes = [ext.attribute for ext in extensions]
        if len(set(attributes)) != len(attributes):
            raise ValueError("Each extension type may appear once per extend() block.")
        self.model = model
        self.extensions = list(extensions)
        self.accumulate = accumulate
        self._handles: list[Any] = []
        self._stack: list[Trace] = []
        self._frames: list[Frame] = []
        self._param_ids: set[int] = set()
        self._traces: "weakref.WeakSet[Trace]" = weakref.WeakSet()
        # Model outputs and tensors computed from them after the model: where a
        # loss may be called. Weak references, so an id reused later never matches.
        self._watch: dict[TensorKey, tuple[weakref.ref, weakref.ref]] = {}
        # module -> (name, has children, a torch layer without children)
        self._modules: dict[nn.Module, tuple[str, bool, bool]] = {}
        self._popped: list[nn.Module] = []  # modules running with the mode off the stack
        self._params: list[nn.Parameter] = []
        self._monitor: Optional[LossUseMonitor] = None
        self._global_handle: Any = None
        self._results: list[tuple[int, dict]] = []
        self._results_task: Optional[int] = None
        # Traces a backward consumed, released when the next forward starts (weakly held:
        # a trace whose graph is gone is freed with it).
        self._used: list["weakref.ref[Trace]"] = []
        self._forwards = 0
        self._losses_running = 0  # loss modules in their forward (their inner ops are not recorded)
        self._active = False

    # ------------------------------------------------------------------ setup
    def __enter__(self) -> "Extend":
        if self._active:
            raise RuntimeError("This extend() block is already active.")
        for name, module in self.model.named_modules():
            if any(isinstance(getattr(h, "__self__", None), Extend) for h in module._forward_pre_hooks.values()):
                raise CurvhookError(
                    f"Module {name or type(module).__name__!r} is already inside an active extend() "
                    "block; a second block on it would record every call twice. Pass all "
                    "extensions to one block: extend(model, DiagGGN(), DiagGGNApprox())."
                )
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self._param_ids = {id(p) for p in self._params}
        self._modules = {}
        for name, m in self.model.named_modules():
            has_children = next(m.children(), None) is not None
            builtin_leaf = not has_children and type(m).__module__.startswith("torch.nn.")
            self._modules[m] = (name or type(m).__name__, has_children, builtin_leaf)
        for ext in self.extensions:  # frozen parameters keep no stale result either
            ext.reset(list(self.model.parameters()))
        try:
            self._register_hooks()
            self._monitor = LossUseMonitor(recorder=self)
            self._monitor.__enter__()
        except BaseException:
            self._cleanup()
            raise
        self._active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self._cleanup()

    def _register_hooks(self) -> None:
        model = self.model
        self._handles.append(model.register_forward_pre_hook(self._on_model_pre, prepend=True, with_kwargs=True))
        for module in model.modules():
            if not _is_empty_container(module):
                self._handles.append(module.register_forward_pre_hook(self._on_module_pre, with_kwargs=True))
                self._handles.append(
                    module.register_forward_hook(self._on_module_post, with_kwargs=True, always_call=True)
                )
        self._handles.append(
            model.register_forward_hook(self._on_model_post, with_kwargs=True, always_call=True)
        )
        handle = register_module_forward_hook(self._on_any_module, with_kwargs=True, always_call=True)
        self._global_handle = handle
        self._handles.append(handle)
        self._handles.append(register_module_forward_pre_hook(self._on_any_module_pre))

    def _cleanup(self) -> None:
        if self._monitor is not None:
            self._monitor.clear()
            try:
                if self._mode_on_top():  # not when a forward was interrupted inside a layer
                    self._monitor.__exit__(None, None, None)
            finally:
                self._monitor = None
                self._popped.clear()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._global_handle is not None:
            # handle.remove() leaves the handle's entry in this table behind.
            _global_forward_hooks_with_kwargs.pop(self._global_handle.id, None)
            self._global_handle = None
        for trace in list(self._traces):
            trace.remove_hooks()
        for trace in self._stack:
            trace.remove_hooks()
        self._stack.clear()
        self._frames.clear()
        self._used.clear()
        self._watch.clear()
        _memory.release_scratch()
        self._losses_running = 0
        self._modules = {}
        self._active = False

    # ---------------------------------------------------------- forward hooks
    @_without_torch_function
    def _on_model_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # A trace that a backward already used is not needed any more once the
        # next forward starts: release it before new activations pile up.
        for ref in self._used:
            trace = ref()
            if trace is not None:
                trace.release()
        self._used.clear()
        if self._popped:
            # A forward was interrupted inside a torch layer (KeyboardInterrupt skips
            # the post hooks): put the mode back and drop what that forward left open.
            self._popped.clear()
            torch._C._push_on_torch_function_stack(self._monitor)
            for trace in self._stack:
                trace.release()
            self._stack.clear()
            self._frames.clear()
        if self._monitor is not None:
            self._monitor.prune()
        self._watch = {k: v for k, v in self._watch.items() if v[0]() is not None and v[1]() is not None}
        self._forwards += 1
        trace = Trace(self._forwards)
        if not kwargs and len(args) == 1 and isinstance(args[0], Tensor):  # the common call: model(X)
            trace.input_keys = {key_of(args[0])}
        else:
            trace.input_keys = {key_of(t) for t in _flat_tensors((args, tuple(kwargs.values())))}
        self._stack.append(trace)

    @_without_torch_function
    def _on_model_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self._stack:
            return
        trace = self._stack.pop()
        self._frames.clear()
        if output is None:  # the forward raised
            trace.release()
            return
        if not isinstance(output, Tensor):
            trace.release()
            raise UnsupportedModelError(
                f"The model returned a {type(output).__name__}; curvhook needs the model to "
                "return one tensor of shape [N, *out]. Wrap the model so that it does."
            )
        if not output.requires_grad:
            trace.release()  # no backward can follow
            return
        trace.root_key = key_of(output)
        trace.root_value = output.detach()
        trace.detach_root(output)
        trace.root_handle = output.register_hook(partial(self._on_root_grad, trace))
        self._traces.add(trace)
        self._watch[trace.root_key] = (weakref.ref(output), weakref.ref(trace))

    @_without_torch_function
    def _on_module_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._stack:
            return
        frames = self._frames
        if frames:
            frames[-1].child_called = True
        name, has_children, builtin_leaf = self._modules[module]  # hooks are only on modules listed at entry
        if not kwargs and len(args) == 1 and isinstance(args[0], Tensor):  # the common call: f(x)
            x = args[0]
            inputs, t_args, t_kwargs, version = args, _ONE_SLOT, {}, x._version
            keys, versions, nodes, needs = ((id(x), version),), (version,), (x.grad_fn,), (x.requires_grad,)
        else:
            t_args, t_kwargs, found = make_template(args, kwargs)
            inputs = tuple(found)
            keys = tuple(key_of(x) for x in inputs)
            versions = tuple(k[1] for k in keys)
            nodes = tuple(x.grad_fn for x in inputs)
            needs = tuple(x.requires_grad for x in inputs)
        call = ModuleCall(
            module=module,
            name=name,
            inputs=inputs,
            input_keys=keys,
            input_versions=versions,
            input_nodes=nodes,
            input_requires_grad=needs,
            args=t_args,
            kwargs=t_kwargs,
        )
        trace = self._stack[-1]
        frames.append(Frame(call, len(trace.calls), has_children, len(trace.shared_log)))
        if builtin_leaf and self._mode_on_top() and not self._monitor.marked(inputs):
            # The mode records nothing inside a leaf: a torch layer's forward calls no
            # module, and its inputs carry no loss value. Off the stack, its functions
            # skip the mode's Python dispatch; _on_module_post puts it back.
            torch._C._pop_torch_function_stack()
            self._popped.append(module)

    @_without_torch_function
    def _on_module_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._popped and self._popped[-1] is module:  # also when its forward raised
            self._popped.pop()
            torch._C._push_on_torch_function_stack(self._monitor)
        if not self._stack or not self._frames or self._frames[-1].call.module is not module:
            return
        frame = self._frames.pop()
        if frame.child_called:  # a container: its children and operations are recorded
            return
        # A leaf: a module without children, or one that uses its children's
        # parameters without calling them (nn.MultiheadAttention). Operations
        # recorded inside it are part of it.
        trace, call = self._stack[-1], frame.call
        del trace.calls[frame.start :]
        if len(trace.shared_log) > frame.shared_start:
            # Operations inside a leaf are part of it. Computed from its parameters
            # alone (its input needs no grad), their outputs are still not shared
            # tensors of the model: the module output carries the batch axis.
            trace.shared_keys.difference_update(trace.shared_log[frame.shared_start :])
            del trace.shared_log[frame.shared_start :]
        call.recurse = frame.has_children
        if isinstance(output, Tensor):
            first, others = output, ()
        else:
            first, *others = list(_flat_tensors(output)) or [None]
        if first is not None:
            call.output, call.output_key, call.node = first, key_of(first), first.grad_fn
            call.output_shape, call.output_requires_grad = first.shape, first.requires_grad
            if others:
                call.other_output_keys = tuple(key_of(o) for o in others if o.requires_grad)
        call.training = module.training
        if call.inputs or call.output is not None:
            trace.calls.append(call)

    def _mode_on_top(self) -> bool:
        """Whether this block's torch-function mode is the innermost one active."""
        depth = torch._C._len_torch_function_stack()
        return depth > 0 and torch._C._get_function_stack_at(depth - 1) is self._monitor

    # ------------------------------------------------- tensor operations (glue)
    def before_function(self, func: Any, args: tuple, kwargs: dict) -> Optional[tuple]:
        """Called by the torch-function mode before an operation runs; see ``after_function``."""
        if not torch.is_grad_enabled():
            return None
        after = None
        if not self._stack:  # outside the model: only what is applied to its output
            if self._losses_running:
                return None
            traces = self._watched_traces(args, kwargs)
            if not traces:
                return None
            # Outputs of two forward passes combined are not followed; a backward
            # through the result is still marked, so that a named loss refuses it.
            after = traces[0] if len(traces) == 1 else tuple(traces)
        elif not self._frames or not self._frames[-1].has_children:
            return None  # inside a leaf module
        t_args, t_kwargs, tensors = make_template(args, kwargs)
        if not any(t.requires_grad for t in tensors):
            return None
        keys = tuple(key_of(t) for t in tensors)
        return after, func, t_args, t_kwargs, tensors, keys, tuple(t.grad_fn for t in tensors)

    def _watched_traces(self, args: tuple, kwargs: dict) -> list[Trace]:
        """The distinct traces whose outputs (or functions of them) are among the arguments."""
        if not self._watch:
            return []
        found: list[Trace] = []
        for t in tensor_arguments(args, kwargs):
            trace = self._watched(t)
            if trace is not None and all(trace is not f for f in found):
                found.append(trace)
        return found

    def _watched(self, tensor: Tensor) -> Optional[Trace]:
        """The live trace whose output ``tensor`` is, or was computed from after the model."""
        entry = self._watch.get(key_of(tensor))
        if entry is None or entry[0]() is not tensor:
            return None
        trace = entry[1]()
        return None if trace is None or trace.released else trace

    def after_function(self, state: tuple, out: Any) -> None:
        """Record a tensor operation executed by a container's ``forward``, or applied after the model."""
        after, func, t_args, t_kwargs, tensors, keys, nodes = state
        if isinstance(after, tuple):
            for o in _flat_tensors(out):
                if o.requires_grad:
                    for trace in after:
                        trace.handles.append(o.register_hook(partial(_record_after_task, trace)))
            return
        if after is not None:
            self._record_after(after, func, t_args, t_kwargs, tensors, keys, nodes, out)
            return
        if not self._stack or not self._frames:
            return
        inplace = _is_inplace(func)
        outputs = [tensors[0]] if inplace and tensors else list(_flat_tensors(out))
        if not any(o.requires_grad for o in outputs):
            return
        trace = self._stack[-1]
        kinds, params = [], []
        for i, t in enumerate(tensors):
            if not t.requires_grad:
                kinds.append("const")
            elif id(t) in self._param_ids:
                kinds.append("shared")
                params.append((f"t{i}", t))
            elif keys[i] in trace.shared_keys:
                kinds.append("shared")
            else:
                kinds.append("batched")
        frame = self._frames[-1]
        call = FunctionCall(
            func=func,
            name=f"{getattr(func, '__name__', func)} (in {frame.call.name!r})",
            args=t_args,
            kwargs=t_kwargs,
            tensors=tuple(tensors),
            kinds=tuple(kinds),
            input_keys=keys,
            input_versions=tuple(k[1] for k in keys),
            input_nodes=nodes,
            output_keys=tuple(key_of(o) if o.requires_grad else None for o in outputs),
            output_shapes=tuple(o.shape for o in outputs),
            output_values=tuple(o.detach() for o in outputs),
            node=outputs[0].grad_fn,
            inplace=inplace,
            params=tuple(params),
        )
        if "batched" not in kinds:  # computed from parameters only
            shared = [k for k in call.output_keys if k is not None]
            trace.shared_keys.update(shared)
            trace.shared_log.extend(shared)
        trace.calls.append(call)

    def _record_after(
        self,
        trace: Trace,
        func: Any,
        t_args: tuple,
        t_kwargs: dict,
        tensors: list,
        keys: tuple,
        nodes: tuple,
        out: Any,
    ) -> None:
        """Record an operation applied to the model output after the model returned.

        The record holds detached tensors and no autograd node: the hook on the
        model output holds the trace, so a reference back into the graph would
        keep the graph alive forever (see :class:`~curvhook.calls.Trace`).
        """
        if trace.released:
            return
        inplace = _is_inplace(func)
        outputs = [tensors[0]] if inplace and tensors else list(_flat_tensors(out))
        n = trace.root_value.shape[0] if trace.root_value is not None and trace.root_value.dim() else None
        if not any(o.requires_grad and o.dim() and o.shape[0] == n for o in outputs):
            return  # no batch axis left: the loss itself, or a reduction, not part of the network
        kinds, params = [], []
        for i, (t, key) in enumerate(zip(tensors, keys)):
            if id(t) in self._param_ids:
                kinds.append("shared")
                params.append((f"t{i}", t))
            elif t.grad_fn is None and self._watched(t) is None:
                kinds.append("const")  # a constant, or a leaf that is no parameter of the model
            else:  # from the model output, or with a history curvhook has to check
                kinds.append("batched")
        output_keys = tuple(key_of(o) if o.requires_grad else None for o in outputs)
        call = FunctionCall(
            func=func,
            name=f"{getattr(func, '__name__', func)} (after the model)",
            args=t_args,
            kwargs=t_kwargs,
            tensors=tuple(t.detach() if k == "batched" else t for t, k in zip(tensors, kinds)),
            kinds=tuple(kinds),
            input_keys=keys,
            input_versions=tuple(k[1] for k in keys),
            input_nodes=tuple(None if n is None else _HISTORY for n in nodes),
            output_keys=output_keys,
            output_shapes=tuple(o.shape for o in outputs),
            output_values=tuple(o.detach() for o in outputs),
            node=None,
            inplace=inplace,
            params=tuple(params),
        )
        trace.after_calls.append(call)
        for o, key in zip(outputs, output_keys):
            if key is not None:
                self._watch[key] = (weakref.ref(o), weakref.ref(trace))
                trace.handles.append(o.register_hook(partial(_record_after_task, trace)))

    def _on_any_module_pre(self, module: nn.Module, args: tuple) -> None:
        if isinstance(module, _Loss):
            self._losses_running += 1

    def _on_any_module(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not isinstance(module, _Loss):  # every module of the process comes here: return at once
            return
        self._on_loss(module, args, kwargs, output)

    @_without_torch_function
    def _on_loss(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self._losses_running = max(0, self._losses_running - 1)
        if not isinstance(output, Tensor):
            return
        input_ = args[0] if args else kwargs.get("input")
        target = args[1] if len(args) > 1 else kwargs.get("target")
        if not isinstance(input_, Tensor):
            return
        trace = self._watched(input_)
        if trace is None:
            return
        call = LossCall(module=module, input=input_.detach(), target=target, key=key_of(input_))
        if output.requires_grad:
            trace.handles.append(output.register_hook(partial(_record_scale, call)))
            if self._monitor is not None:
                self._monitor.watch(output)
        trace.losses.append(call)

    # --------------------------------------------------------------- backward
    def _on_root_grad(self, trace: Trace, grad: Tensor) -> None:
        if not self._active or not self._params:
            return
        if trace.released:
            raise CurvhookError(
                "curvhook already released the inputs stored for this forward pass (a new "
                "forward pass started after its first backward). Run the forward pass again "
                "before this backward."
            )
        task = torch._C._current_graph_task_id()
        if self._monitor is not None and task in self._monitor.nonlinear_tasks and any(
            ext.needs_loss for ext in self.extensions
        ):
            raise UnsupportedLossError(
                "The scalar you backpropagate is a nonlinear function of a loss value (such as "
                "loss ** 2, loss.exp(), loss.log() or a product of two losses). Its Hessian "
                "has a term that couples all samples, which the GGN extensions do not compute. "
                "Backpropagate a sum of multiples of supported losses."
            )
        if self._results_task != task and not self.accumulate:
            # The results of the previous backward pass are replaced: remove them
            # now, so that large ones nobody kept lend their memory to this pass.
            for ext in self.extensions:
                ext.reset(self._params)
        node = torch._C._current_autograd_node()
        root_calls = [c for c in trace.calls if c.output_key == trace.root_key]
        for call in root_calls:  # hand the rules what the trace must not hold
            call.output, call.node = trace.root_value, node
        try:
            # The tape mode has nothing to record here: skip it for every operation.
            # Results are not differentiable, even under backward(create_graph=True).
            with torch._C.DisableTorchFunction(), torch.no_grad():
                results = backpropagate(trace, grad, self.extensions, self._params)
        finally:
            for call in root_calls:
                call.output = call.node = None
            for loss in trace.losses:
                loss.scale = None
                loss.cache.clear()
        # Results are written when the backward pass ends, so that several forward
        # passes reached by one backward pass add up in forward order.
        if self._results_task != task:  # first forward pass reached by this backward
            self._results, self._results_task = [], task
            torch.autograd.Variable._execution_engine.queue_callback(self._write_results)
        self._results.append((trace.seq, results))
        if not trace.used:
            trace.used = True
            self._used.append(weakref.ref(trace))

    def _write_results(self) -> None:
        """End of a backward pass: write what every forward pass it reached gave.

        Separate backward passes overwrite each other unless ``accumulate=True``;
        the forward passes of one backward pass add up (their samples are all
        part of the loss), ``BatchJacobian`` concatenating them in forward order.
        """
        pending = sorted(self._results, key=lambda item: item[0])
        self._results, self._results_task = [], None
        if not self._active:
            return
        with torch._C.DisableTorchFunction():
            for i, (_, results) in enumerate(pending):
                for ext, result in results.items():
                    ext.write(result, self._params, self.accumulate or i > 0)
            _memory.drop_unused(sum(ext.result_bytes(self._params) for ext in self.extensions))


@dataclass(eq=False)
class Frame:
    """A module whose ``forward`` is running: leaf or container is known only at its end."""

    call: ModuleCall
    start: int  # len(trace.calls) when it started
    has_children: bool
    shared_start: int = 0  # len(trace.shared_log) when it started
    child_called: bool = False


def _flat_tensors(obj: Any) -> Iterator[Tensor]:
    """The tensors in a (nested) tuple or list output, in order."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _flat_tensors(o)


_INPLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__setitem__", "__ipow__"}


def _is_inplace(func: Any) -> bool:
    name = getattr(func, "__name__", "")
    return name in _INPLACE_DUNDERS or (name.endswith("_") and not name.startswith("_"))


def _is_empty_container(module: nn.Module) -> bool:
    """A plain container computes nothing itself (an empty ``nn.Sequential`` returns its
    input): hooks on it would record nothing, so it gets none."""
    return type(module) in (nn.Sequential, nn.ModuleList, nn.ModuleDict) and not module._parameters


# The arguments of a module called with one tensor: the template ``(Slot(0),)``.
_ONE_SLOT = (Slot(0),)

# Marks an input with an autograd history in an operation recorded after the model.
_HISTORY = object()


def _record_after_task(trace: Trace, grad: Tensor) -> None:
    """Tensor hook: this backward pass goes through an operation applied after the model."""
    trace.after_tasks.add(torch._C._current_graph_task_id())


def _record_scale(call: LossCall, grad: Tensor) -> None:
    """Tensor hook on a loss value: remember ``dℓ/dL``."""
    call.scale = grad.detach()


def extend(model: nn.Module, *extensions: Extension, accumulate: bool = False) -> Extend:
    """Compute curvature alongside the gradient, without changing the model.

    Example::

        with extend(model, DiagGGN(), BatchJacobian()):
            loss = criterion(model(X), y)
            loss.backward()          # p.grad exactly as without curvhook
        p.diag_ggn, p.batch_jacobian

    Inside the block, every forward pass of ``model`` is recorded and every
    backward pass that reaches its output writes one attribute per extension on
    each parameter that requires grad. On exit, no hook, stored tensor or
    attribute is left on any module; the results stay on the parameters.

    Args:
        model: Any ``nn.Module``; its output must be one tensor ``[N, *out]``.
        *extensions: Extension instances, e.g. ``DiagGGN()``, ``FullGGN()``.
        accumulate: If ``False`` (default) each backward replaces the results
            of the previous one, removing them from the parameters when it
            starts; tensors the caller kept are never written to. If ``True``,
            results of the backward passes in this block are summed
            (``BatchJacobian`` concatenates along the sample axis), as a loop
            over a data loader needs.

    Returns:
        The context manager.
    """
    return Extend(model, *extensions, accumulate=accumulate)
