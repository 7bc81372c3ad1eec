"""Refusals of forward passes whose curvature curvhook cannot vouch for.

The rules differentiate what the forward pass recorded: each module's input,
output and parameters, each tensor operation's arguments. Some ways of running
a forward pass make that record describe another function than the one
computed, or no function at all:

- ``torch.autocast``: every operation runs in a dtype autocast picks (a Linear
  in bfloat16 with weights cast on the fly, a LayerNorm in float32); the rules
  would combine the recorded bfloat16 tensors with the float32 parameters.
- The meta device: tensors with shapes but no values.
- ``torch.compile``'d code: its modules run inside compiled graphs whose
  backward is one node for many operations.
- ``torch.func`` transforms inside the forward (``vmap(self.lin)(x)``): the
  tensors a module sees there are wrapped by the transform, not tensors of the
  model's graph.
- Parameters swapped in for one call (``torch.func.functional_call(model,
  params, x)``): the results would belong to tensors that are not the model's.

Each is refused with an :class:`~curvhook.errors.UnsupportedModelError` when
the forward pass (or the block, for the meta device) starts, saying what to do.
``extend(torch.compile(model))`` and models with ``module.compile()``'d parts
are run eagerly inside the block instead (:class:`EagerWhileExtended`).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from curvhook._torch_internals import (
    any_autocast_enabled, autocast_device_types, compiled_forward, compiled_original,
    current_autograd_node, functorch_level, in_compiled_region, is_compiled_node, own_parameters,
    set_compiled_forward,
)
from curvhook.errors import UnsupportedModelError

# ------------------------------------------------------------------- the block


def refuse_meta(found: Optional[tuple[str, str]]) -> None:
    """Refuse a model with a parameter or buffer on the meta device (at ``extend`` entry).

    Args:
        found: ``(kind, qualified name)`` of the first such tensor (parameters
            before buffers), as ``extend``'s walk over the modules found it, or ``None``.

    Raises:
        UnsupportedModelError: naming it.
    """
    if found is None:
        return
    kind, name = found
    raise UnsupportedModelError(
        f"{kind} {name!r} of the model is on the meta device: it has a shape but no "
        "values, so its curvature has none either. Move the model to a real device "
        "before extend(): model.to_empty(device='cpu') (or 'cuda') and initialize its "
        "parameters (reset_parameters(), or load_state_dict(...))."
    )


class EagerWhileExtended:
    """Runs compiled modules of the model eagerly while a block is active.

    ``torch.compile(model)`` returns a wrapper whose ``forward`` runs compiled
    code; ``module.compile()`` makes a module call compiled code. Compiled code
    runs the modules inside graphs that curvhook cannot record, so inside the
    block each such module runs its original ``forward`` (with curvhook's
    hooks); :meth:`restore` puts the compiled code back.

    Args:
        model: The model as passed to ``extend`` (a ``torch.compile`` wrapper or not).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._saved: list[tuple[nn.Module, str, Any]] = []

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The module ``torch.compile(module)`` wrapped (also through several wrappers), else ``model``."""
        inner = compiled_original(model)
        while inner is not None:
            model, inner = inner, compiled_original(inner)
        return model

    def run_eagerly(self, modules: Optional[Iterable[nn.Module]] = None) -> None:
        """Replace the compiled code of the model and its modules by their own ``forward``.

        Args:
            modules: The modules of the model passed to ``extend`` (a wrapper's
                include the module it wraps), if already listed.
        """
        for module in self.model.modules() if modules is None else modules:
            attribute, value = compiled_forward(module)
            if attribute:
                self._saved.append((module, attribute, value))
                set_compiled_forward(module, attribute, None)

    def restore(self) -> None:
        """Put every compiled code back (in reverse order: a wrapper of a wrapper last)."""
        while self._saved:
            module, attribute, value = self._saved.pop()
            set_compiled_forward(module, attribute, value)


# -------------------------------------------------------------- forward passes


def check_forward_start(first_input: Optional[Tensor]) -> Optional[int]:
    """Refuse a forward pass of the model that curvhook could not record; return its transform level.

    Args:
        first_input: The first tensor passed to the model, if any.

    Returns:
        The ``torch.func`` transform level the forward starts at (``None`` outside
        any): a module that runs at another level runs inside a transform.

    Raises:
        UnsupportedModelError: under autocast, ``torch.compile``, a ``torch.func``
            transform, or for an input on the meta device.
    """
    _refuse_autocast("the model")
    _refuse_compiling("the model's forward")
    level = functorch_level()
    if level is not None and current_autograd_node() is None:  # not a replay by a rule in backward
        raise UnsupportedModelError(
            "The model was called inside a torch.func transform (vmap, grad, jacrev, vjp, ...) "
            "inside an extend() block: curvhook records the forward pass for loss.backward() "
            "and cannot record it inside a transform. Call the model directly inside the "
            "block, and run torch.func code on it outside the block."
        )
    if first_input is not None and first_input.is_meta:
        raise UnsupportedModelError(
            "The model input is on the meta device: it has a shape but no values, so the "
            "curvature has none either. Pass a tensor on a real device (and a model on it)."
        )
    return level


def check_module_call(module: nn.Module, name: str, level: Optional[int], param_ids: set[int]) -> None:
    """Refuse a call of a module of the model that curvhook could not record.

    Args:
        module: The module starting.
        name: Its name in the model.
        level: The transform level its forward pass started at.
        param_ids: ``id`` of the model's parameters that require grad, at entry.

    Raises:
        UnsupportedModelError: see :func:`check_forward_start`; also for a
            parameter that is not the one the module held at entry.
    """
    if current_autograd_node() is not None:  # a rule replaying the module in backward (the fallback)
        return
    if any_autocast_enabled() and torch.is_grad_enabled():  # also where the forward turned it on itself
        _refuse_autocast(_module_words(module, name))
    if in_compiled_region():
        raise _compiled_error(_module_words(module, name))
    if functorch_level() != level:
        refuse_transform(level, _module_words(module, name))
    for pname, p in own_parameters(module).items():
        if p is not None and p.requires_grad and id(p) not in param_ids:
            where = _module_words(module, name)
            raise UnsupportedModelError(
                f"Parameter {pname!r} of {where} is not the parameter the model held when the "
                "extend() block was entered (torch.func.functional_call(model, params, ...), "
                "a parameter replaced inside the block, or one made trainable there): curvhook "
                "writes its results on the trainable parameters the model held at entry. Call "
                "the model itself inside the block (load other values with "
                "model.load_state_dict(...)), or enter extend() after changing the parameters."
            )


def _module_words(module: nn.Module, name: str) -> str:
    return f"module {name!r} ({type(module).__name__})"


def refuse_transform(level: Optional[int], where: str) -> None:
    """Refuse a module or operation running inside a ``torch.func`` transform the forward called.

    Args:
        level: The transform level the model's forward pass started at.
        where: What runs (``"module 'lin' (Linear)"``).
    """
    if functorch_level() != level and current_autograd_node() is None:
        raise UnsupportedModelError(
            f"{where[0].upper()}{where[1:]} runs inside a torch.func transform (vmap, grad, "
            "jacrev, vjp, functional transforms) that the model's forward calls: curvhook "
            "records the modules and tensor operations of the forward pass, and cannot record "
            "what runs inside a transform (its tensors are wrapped by it). Write the batched "
            "operation directly (modules such as nn.Linear take any leading dimensions), or "
            "register a rule for the module whose forward calls the transform (docs/custom_layers.md)."
        )


def check_module_output(name: str, output: Any) -> None:
    """Refuse a module output computed by ``torch.compile``'d code (see :func:`_compiled_error`)."""
    if isinstance(output, Tensor) and is_compiled_node(output.grad_fn):
        raise _compiled_error(f"module {name!r}")


def _refuse_autocast(where: str) -> None:
    if not any_autocast_enabled() or not torch.is_grad_enabled():  # no backward follows a no-grad forward
        return
    devices = ", ".join(autocast_device_types()) or "a device"
    raise UnsupportedModelError(
        f"torch.autocast is on ({devices}) while {where} runs inside extend(): autocast computes "
        "each operation in a dtype it picks (matrix products and convolutions in bfloat16 or "
        "float16 with the weights cast on the fly, normalizations and softmax in float32), "
        "which curvhook's rules, computing with the module's parameters, do not reproduce. "
        "Run the forward pass without autocast inside the extend() block, or cast the model "
        "and its input to one dtype instead (model.to(torch.bfloat16))."
    )


def _refuse_compiling(where: str) -> None:
    if in_compiled_region():
        raise _compiled_error(where)


def _compiled_error(where: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{where[0].upper()}{where[1:]} runs torch.compile'd code inside an extend() block: "
        "torch.compile'd code cannot be recorded (its operations run inside compiled graphs). "
        "Call the original module inside extend: extend(model, ...) and model(X), not "
        "compiled_model(X). extend(torch.compile(model), ...) and modules compiled in place "
        "with module.compile() run their original forward inside the block by themselves."
    )


def refuse_packed_sequence(module: nn.Module, name: str, args: tuple) -> None:
    """Refuse a recurrent module called on a ``PackedSequence``, saying what works instead.

    The packed data holds the time steps of all samples interleaved (``[Σ lengths, F]``),
    so it has no batch axis to split the samples by.
    """
    if isinstance(module, nn.RNNBase) and args and isinstance(args[0], PackedSequence):
        words = _module_words(module, name)
        raise UnsupportedModelError(
            f"{words[:1].upper()}{words[1:]} got a PackedSequence: its data interleaves "
            "the time steps of all samples, so curvhook cannot split it by sample. Pass the padded "
            "batch instead of packing it ([N, L, features] with batch_first=True, padding after each "
            "sequence) and read each sample's last valid step with out[torch.arange(N), lengths - 1] "
            "(exact; for a unidirectional RNN the outputs at valid steps are those of the packed call)."
        )
