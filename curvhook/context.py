"""``extend``: the context manager that owns every hook and stored tensor.

An active block is made of parts with one job each:

- :class:`~curvhook.module_recorder.ModuleRecorder`: forward hooks that record
  the leaf-module calls of every forward pass of the model;
- :class:`~curvhook.tape.OperationTape`: a torch-function mode that records the
  tensor operations between modules and after the model;
- :class:`~curvhook.loss_finder.LossFinder`: global module hooks that notice loss
  modules called on the model output;
- :class:`~curvhook.loss_linearity.LossLinearity`: marks on the functions of
  loss values, to refuse a nonlinear one;
- :class:`~curvhook.backward_driver.BackwardDriver`: runs the extensions when
  the gradient reaches the model output, and writes their results.

This module only starts and stops them. On exit every hook is removed and
every stored tensor released, whether the block ended normally or with an
exception.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from curvhook import _memory
from curvhook._torch_internals import own_buffers, own_parameters, remove_global_forward_hook
from curvhook.backward_driver import BackwardDriver
from curvhook.block_state import BlockState, ModuleInfo
from curvhook.distributed import resolve_mode
from curvhook.errors import CurvhookError
from curvhook.extensions.base import Extension
from curvhook.guards import EagerWhileExtended, refuse_meta
from curvhook.loss_finder import LossFinder
from curvhook.loss_linearity import LossLinearity
from curvhook.module_recorder import ModuleRecorder, OutputChoice, in_active_block
from curvhook.tape import OperationTape


class Extend:
    """Context manager returned by :func:`extend`; see there."""

    def __init__(
        self, model: nn.Module, *extensions: Extension, accumulate: bool = False, output: OutputChoice = None,
        distributed: Union[None, bool, str] = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"extend() expects an nn.Module, got {type(model).__name__}.")
        for ext in extensions:
            if not isinstance(ext, Extension):
                raise TypeError(
                    f"extend() expects extension instances such as DiagGGN(), got {ext!r}."
                )
        refusing = [type(ext).__name__ for ext in extensions if not ext.accumulates]
        if accumulate and refusing:
            raise CurvhookError(
                f"{', '.join(refusing)} cannot accumulate over backward passes (a kernel over one "
                "batch's samples, or eigenpairs, which do not add up): use extend(..., "
                "accumulate=False) and one batch."
            )
        self.distributed = resolve_mode(model, distributed)
        local = [type(ext).__name__ for ext in extensions if not ext.distributes]
        if self.distributed and local:
            raise CurvhookError(
                f"{', '.join(local)} cannot be combined across processes (a kernel or eigenpairs of one "
                "batch): pass distributed=False to keep each process's own result."
            )
        attributes = [ext.attribute for ext in extensions]
        if len(set(attributes)) != len(attributes):
            raise ValueError("Each extension type may appear once per extend() block.")
        # torch.compile(model): the block extends the module it wraps, run eagerly (curvhook/guards.py)
        self._eager = EagerWhileExtended(model)
        self.model = EagerWhileExtended.unwrap(model)
        self.extensions = list(extensions)
        self.accumulate = accumulate
        self.output = output
        self._handles: list[Any] = []
        self._global_handle: Any = None
        self._active = False
        self._make_parts()

    def _make_parts(self) -> None:
        """Fresh parts for a block that starts: nothing carries over from an earlier one."""
        self._parts_used = False
        self._state = BlockState()
        self._linearity = LossLinearity()
        self._finder = LossFinder(self._state, self._linearity)
        self._tape = OperationTape(self._state, self._linearity, self._finder.after_functional_loss)
        self._driver = BackwardDriver(
            self.model, self._state, self.extensions, self._linearity, self.accumulate, self.distributed
        )
        self._recorder = ModuleRecorder(
            self._state, self._tape, self._driver.before_forward, self._driver.on_output, self.output
        )

    # ------------------------------------------------------------- lifecycle
    def __enter__(self) -> "Extend":
        if self._active:
            raise RuntimeError("This extend() block is already active.")
        modules, all_params, buffers, meta = _survey(self.model)  # refuses a module already in an active block
        refuse_meta(meta)
        if self._parts_used:  # the same Extend entered again
            self._make_parts()
        self._parts_used = True
        state = self._state
        state.params = [p for p in all_params if p.requires_grad]
        state.param_ids = {id(p) for p in state.params}
        # constants that cannot hold the batch (curvhook/fixed_constants.py)
        fixed = [*buffers, *(p for p in all_params if not p.requires_grad)]
        state.fixed_ids, state.fixed_held = {id(t) for t in fixed}, fixed  # held: no id reused in the block
        state.modules = modules
        _memory.resume(self.model)  # paired with the park of _cleanup, also when an extension refuses below
        try:
            for ext in self.extensions:  # frozen parameters keep no stale result either
                _memory.adopt(ext.results_on(all_params))  # their memory, if nobody else holds it
                ext.reset(all_params)
            self._eager.run_eagerly(modules if self._eager.model is self.model else None)
            self._handles.extend(self._recorder.register(self.model, modules))
            self._global_handle = register_module_forward_hook(
                self._finder.after_any_module, with_kwargs=True, always_call=True
            )
            self._handles.append(register_module_forward_pre_hook(self._finder.before_any_module))
            self._tape.__enter__()
        except BaseException:
            self._cleanup()
            raise
        self._active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if exc[0] is None:
                self._driver.refuse_unreached_output()
            if exc[0] is None and self.accumulate and self.distributed:
                self._driver.reduce_across_processes()  # the sums of the whole block, once
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        try:
            self._remove_hooks()
        finally:
            self._driver.active = False
            _memory.park(self.model)  # its temporaries, for the model's next block
            self._active = False

    def _remove_hooks(self) -> None:
        self._eager.restore()
        self._linearity.clear()
        self._tape.enabled = False
        try:
            if self._recorder.tape_on_top():  # not when a forward was interrupted inside a layer
                self._tape.__exit__(None, None, None)
        finally:
            self._recorder.popped.clear()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._global_handle is not None:
            remove_global_forward_hook(self._global_handle)
            self._global_handle = None
        state = self._state
        for trace in [*state.traces, *state.stack]:
            trace.remove_hooks()
        state.stack.clear()
        state.frames.clear()
        state.watch.clear()
        state.batch_parts.clear()
        state.fixed_ids, state.fixed_held = set(), []
        state.losses_running.clear()
        state.modules = {}
        self._driver.used.clear()


def _survey(
    model: nn.Module,
) -> tuple[dict[nn.Module, ModuleInfo], list[nn.Parameter], list[Tensor], Optional[tuple[str, str]]]:
    """One walk over the modules of ``model`` at block entry.

    Returns:
        What the module recorder needs of every module (in ``model.modules()``
        order); the parameters in ``model.parameters()`` order (each once); the
        buffers; and ``(kind, name)`` of the first parameter, else
        buffer, on the meta device.

    Raises:
        CurvhookError: for a module already inside an active block.
    """
    infos: dict[nn.Module, ModuleInfo] = {}
    params: list[nn.Parameter] = []
    buffers: list[Tensor] = []
    seen: set[int] = set()
    meta_param = meta_buffer = None
    for name, m in model.named_modules():
        if in_active_block(m):
            raise CurvhookError(
                f"Module {name or type(m).__name__!r} is already inside an active extend() "
                "block; a second block on it would record every call twice. Pass all "
                "extensions to one block: extend(model, DiagGGN(), DiagGGNApprox())."
            )
        has_children = next(m.children(), None) is not None
        torch_leaf = not has_children and type(m).__module__.startswith("torch.nn.")
        infos[m] = (name or type(m).__name__, has_children, torch_leaf)
        for pname, p in own_parameters(m).items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
                if meta_param is None and p.is_meta:
                    meta_param = ("Parameter", f"{name}.{pname}" if name else pname)
        for bname, b in own_buffers(m).items():
            if b is not None:
                buffers.append(b)
                if meta_buffer is None and b.is_meta:
                    meta_buffer = ("Buffer", f"{name}.{bname}" if name else bname)
    return infos, params, buffers, meta_param or meta_buffer


def extend(
    model: nn.Module, *extensions: Extension, accumulate: bool = False, output: OutputChoice = None,
    distributed: Union[None, bool, str] = None,
) -> Extend:
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
        model: Any ``nn.Module``. Its output is a tensor ``[N, *out]``, or a
            dict, Hugging Face ``ModelOutput`` or tuple holding it (see ``output``).
            A ``torch.compile(module)`` wrapper extends the module it wraps;
            inside the block, compiled modules (also ``module.compile()``'d
            parts) run their original ``forward``, which curvhook records.
        *extensions: Extension instances, e.g. ``DiagGGN()``, ``FullGGN()``.
        accumulate: If ``False`` (default) each backward replaces the results
            of the previous one, removing them from the parameters when it
            starts; tensors the caller kept are never written to. If ``True``,
            results of the backward passes in this block are summed
            (``BatchJacobian`` concatenates along the sample axis), as a loop
            over a data loader needs.
        output: Which tensor of a model output that is not one tensor the
            curvature is of: a key (``"logits"``) of a dict or ``ModelOutput``,
            an index of a tuple, or a function ``output -> Tensor``. ``None``
            (default): the tensor itself; else ``"logits"`` where there is one;
            else the only tensor of the output that requires grad.
        distributed: Combine the results over the processes of ``torch.distributed``
            (:mod:`curvhook.distributed`): ``None`` (default) averages them like DDP's
            gradients when ``model`` is a ``DistributedDataParallel`` module, else
            leaves each process its own; ``"mean"``, ``"sum"`` (or ``True``) and
            ``False`` choose. Per-sample results are concatenated in rank order. After
            each backward pass, or once when the block ends with ``accumulate=True``.

    Returns:
        The context manager.
    """
    return Extend(model, *extensions, accumulate=accumulate, output=output, distributed=distributed)
