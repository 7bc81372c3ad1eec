"""The backward driver: runs the engine when the gradient reaches the model output.

A hook on each model output calls :meth:`BackwardDriver.on_root_grad` inside
the backward pass. It refuses what the extensions cannot compute (a nonlinear
function of a loss, a released forward pass), finds the plan of the graph,
the loss terms and their check, runs the engine, and queues the writing of the
results for the end of the backward pass, so that several forward passes
reached by one backward pass add up in forward order.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from functools import partial
from typing import Optional

import torch
from torch import Tensor, nn

from curvhook import _memory
from curvhook._torch_internals import (
    current_autograd_node, current_graph_task_id, disable_torch_function, parameter_gets_gradient,
    queue_backward_callback,
)
from curvhook.block_state import BlockState
from curvhook.engine import backpropagate
from curvhook.errors import CurvhookError, UnsupportedLossError, UnsupportedModelError
from curvhook.extensions.base import Extension
from curvhook.loss_linearity import LossLinearity
from curvhook.loss_terms import LossTerms, check_gradient, check_named_gradient, find_loss_terms
from curvhook.plan import plan_for
from curvhook.records import key_of
from curvhook.sources import Source
from curvhook.trace import Trace


class BackwardDriver:
    """Runs the extensions in each backward pass and writes their results.

    Args:
        model: The extended model.
        state: The block's shared state.
        extensions: The active extensions.
        linearity: Marks of the functions of loss values.
        accumulate: Sum the results of successive backward passes.
    """

    def __init__(
        self, model: nn.Module, state: BlockState, extensions: list[Extension], linearity: LossLinearity,
        accumulate: bool, distributed: Optional[str] = None,
    ) -> None:
        self.model = model
        self.state = state
        self.extensions = extensions
        self.linearity = linearity
        self.accumulate = accumulate
        self.distributed = distributed
        self.active = True
        self.groups: dict[Source, list[Extension]] = defaultdict(list)
        for ext in extensions:
            self.groups[ext.source].append(ext)
        self.needs_loss = any(source.needs_loss for source in self.groups)
        self._results: list[tuple[int, dict]] = []
        self._results_task: Optional[int] = None
        # Traces a backward consumed, released when the next forward starts (weakly held:
        # a trace whose graph is gone is freed with it).
        self.used: list["weakref.ref[Trace]"] = []

    def before_forward(self) -> None:
        """A forward pass of the model starts: release what earlier ones no longer need.

        A trace that a backward already used is not needed any more once the next
        forward starts: it is released before new activations pile up.
        """
        for ref in self.used:
            trace = ref()
            if trace is not None:
                trace.release()
        self.used.clear()
        self.linearity.prune()
        self.state.prune_watch()

    def on_output(self, trace: Trace, output: Tensor, others: Optional[dict[tuple, Tensor]] = None) -> None:
        """A forward pass returned ``output`` (it requires grad): hook :meth:`on_root_grad` onto it.

        ``others`` are the model output's other tensors that require grad, by
        their paths (``("hidden_states", 2)``): a backward pass that reaches one of
        them and never ``output`` is refused (:meth:`_on_other_output`).
        """
        trace.root_key = key_of(output)
        trace.root_value = output.detach()
        trace.detach_root(output)
        trace.root_handle = output.register_hook(partial(self.on_root_grad, trace))
        self.state.traces.add(trace)
        self.state.watch_output(output, trace.root_key, trace)
        for path, t in (others or {}).items():
            trace.handles.append(t.register_hook(partial(self._on_other_output, trace, path)))

    def _on_other_output(self, trace: Trace, path: tuple, grad: Tensor) -> None:
        """Tensor hook on another tensor of the model output: remember that a backward pass
        reached it (:meth:`refuse_unreached_output` reads it when the block ends)."""
        if self.active and trace.other_output_reached is None and not _gives_no_parameter_a_gradient(trace):
            trace.other_output_reached = path

    def refuse_unreached_output(self) -> None:
        """At the end of a block that wrote nothing: refuse it if a backward pass reached another
        tensor of a model output than the one curvhook follows (a loss on ``out[1]`` with
        ``output=0``, on ``out.hidden_states[-1]`` while ``logits`` is followed).

        Checked when the block ends, not per pass: a pass through an auxiliary output
        alone, before or after the main loss's, is fine.
        """
        traces = list(self.state.traces)
        reached = next((t.other_output_reached for t in traces if t.other_output_reached is not None), None)
        if reached is None or any(t.root_reached for t in traces):
            return
        where = "output" + "".join(f"[{k!r}]" for k in reached)
        choice = repr(reached[0]) if len(reached) == 1 else f"lambda output: {where}"
        raise UnsupportedModelError(
            f"A backward pass in this block reached {where} of the model, and none reached the "
            "tensor curvhook computes curvature for (chosen by extend(..., output=...); by default "
            "'logits', or the only tensor of the output that requires grad): the block wrote no "
            f"results. Name the tensor the loss is computed from: extend(model, ..., output={choice})."
        )

    def on_root_grad(self, trace: Trace, grad: Tensor) -> None:
        """Tensor hook on a model output: compute the extensions for this backward pass."""
        params = self.state.params
        if not self.active or not params:
            return
        trace.root_reached = True
        if _gives_no_parameter_a_gradient(trace):  # torch.autograd.grad(loss, out), or (loss, X)
            for loss in trace.losses:
                loss.scale = None  # this pass's multiples, read by no walk
            return
        task = current_graph_task_id()
        self._refuse(trace, task)
        if self._results_task != task and not self.accumulate:
            # The results of the previous backward pass are replaced: remove them
            # now, so that large ones nobody kept lend their memory to this pass.
            for ext in self.extensions:
                ext.reset(params)
        results = self._run(trace, grad)
        if all(t is trace or t.used or t.released for t in self.state.traces):
            # The last walk of this backward pass (no other forward pass of the block
            # waits for it): what the walks did not reuse, autograd's gradients may take.
            _memory.forget_idle()
        if self._results_task != task:  # first forward pass reached by this backward
            self._results, self._results_task = [], task
            queue_backward_callback(self._write_results)
        self._results.append((trace.seq, results))
        if not trace.used:
            trace.used = True
            self.used.append(weakref.ref(trace))

    def _refuse(self, trace: Trace, task: int) -> None:
        if trace.released:
            raise CurvhookError(
                "curvhook already released the inputs stored for this forward pass (a new "
                "forward pass started after its first backward). Run the forward pass again "
                "before this backward."
            )
        if task in self.linearity.nonlinear_tasks and self.needs_loss:
            raise UnsupportedLossError(
                "The scalar you backpropagate is a nonlinear function of a loss value (such as "
                "loss ** 2, loss.exp(), loss.log() or a product of two losses). Its Hessian "
                "has a term that couples all samples, which the GGN extensions do not compute. "
                "Backpropagate a sum of multiples of supported losses."
            )

    def _run(self, trace: Trace, grad: Tensor) -> dict:
        """Plan, loss terms and the reverse walk, with the tape off and no graph built."""
        node = current_autograd_node()
        root_ops = [op for op in trace.operations if op.output_key == trace.root_key]
        for op in root_ops:  # hand the rules what the trace must not hold
            op.output = trace.root_value
            if not op.node_saves_hooked:
                op.node = node
        try:
            # Results are not differentiable, even under backward(create_graph=True).
            with disable_torch_function(), torch.no_grad():
                plan, shape = plan_for(self.model, trace)
                plan.bind(trace)
                terms = self._loss_terms(trace, grad)
                return backpropagate(trace, plan, shape, grad, self.groups, terms, self.state.params)
        finally:
            for op in root_ops:
                op.output = op.node = None
            for loss in trace.losses:
                loss.scale = None
                loss.scratch = type(loss.scratch)()

    def _loss_terms(self, trace: Trace, grad: Tensor) -> dict[Source, LossTerms]:
        """The loss terms of every source that needs them; the gradient is checked once."""
        terms: dict[Source, LossTerms] = {}
        checked = False
        named_checked: list[nn.Module] = []
        for source, exts in self.groups.items():
            if not source.needs_loss:
                continue
            terms[source] = found = find_loss_terms(trace, source.loss, type(exts[0]).__name__)
            if not found.named and not checked:
                check_gradient(trace, found, grad)
                checked = True
            elif found.named and source.loss not in named_checked:
                check_named_gradient(found, grad, type(exts[0]).__name__)
                named_checked.append(source.loss)
            found.require_nonnegative()
        return terms

    def reduce_across_processes(self) -> None:
        """Combine every extension's results over the processes (:mod:`curvhook.distributed`)."""
        params = self.state.params
        world = torch.distributed.get_world_size()
        with disable_torch_function(), torch.no_grad():
            for ext in self.extensions:
                ext.reduce_across_processes(params)
                if self.distributed == "mean":
                    ext.rescale(params, 1.0 / world)

    def _write_results(self) -> None:
        """End of a backward pass: write what every forward pass it reached gave.

        Separate backward passes overwrite each other unless ``accumulate=True``;
        the forward passes of one backward pass add up (their samples are all
        part of the loss), ``BatchJacobian`` concatenating them in forward order.
        """
        pending = sorted(self._results, key=lambda item: item[0])
        self._results, self._results_task = [], None
        if not self.active:
            return
        params = self.state.params
        with disable_torch_function():
            for i, (_, results) in enumerate(pending):
                for ext, result in results.items():
                    ext.write(result, params, self.accumulate or i > 0)
            if self.distributed and not self.accumulate:  # with accumulate: once, when the block ends
                self.reduce_across_processes()
            _memory.drop_unused(sum(ext.result_bytes(params) for ext in self.extensions))


def _gives_no_parameter_a_gradient(trace: Trace) -> bool:
    """Whether this backward pass gives none of the parameters the forward pass used a gradient.

    ``torch.autograd.grad(loss, logits)`` (the gradient at the output, for logging) and
    ``torch.autograd.grad(loss, X)`` (an adversarial example, a saliency map, a gradient
    penalty) reach the model output but no parameter: they are no training step, and add no
    results (with ``accumulate=True`` they would add to those of the real backward).
    Usually the first parameter asked answers.
    """
    used = False
    for op in trace.operations:
        for _, p in op.params:
            if parameter_gets_gradient(p):
                return False
            used = True
    return used
