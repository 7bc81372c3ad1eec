"""The loss finder: notices loss modules called on the model output inside the block.

A global module hook sees every module call of the process; it keeps those of
torch's loss modules whose input is a watched tensor (the model output, or a
function of it computed after the model). A hook on the loss value captures
``dℓ/dL`` during backward: the multiple of this loss in the backpropagated scalar.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import Tensor, nn

from curvhook._torch_internals import LOSS_MODULE_TYPES, disable_torch_function
from curvhook.block_state import BlockState
from curvhook.loss_linearity import LossLinearity
from curvhook.records import LossCall, key_of


class LossFinder:
    """The global hooks that find loss calls (see the module docstring)."""

    def __init__(self, state: BlockState, linearity: LossLinearity) -> None:
        self.state = state
        self.linearity = linearity

    def before_any_module(self, module: nn.Module, args: tuple) -> None:
        """Global pre-hook: a loss module starts (its inner operations are not recorded)."""
        if isinstance(module, LOSS_MODULE_TYPES):
            self.state.loss_started()

    def after_any_module(self, module: nn.Module, args: tuple, kwargs: Any, output: Any = None) -> None:
        """Global post-hook, also called when a module raised.

        On its exception path torch calls it as ``hook(module, args, result)``:
        ``kwargs`` is then the (missing) result, and ``output`` is absent.
        """
        if not isinstance(module, LOSS_MODULE_TYPES):  # every module of the process comes here: return at once
            return
        self.state.loss_ended()
        if isinstance(kwargs, dict) and isinstance(output, Tensor):
            with disable_torch_function():
                self._found(module, args, kwargs, output)

    def _found(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
        input_ = args[0] if args else kwargs.get("input")
        target = args[1] if len(args) > 1 else kwargs.get("target")
        if not isinstance(input_, Tensor):
            return
        trace, batch_part = self.state.watched(input_), None
        if trace is None:
            found = self.state.batch_part_of(input_)
            if found is None:
                return
            trace, batch_part = found  # out[:4]: recorded so that a backward through it is refused
        call = LossCall(module=module, input=input_.detach(), target=target, key=key_of(input_), batch_part=batch_part)
        if output.requires_grad:
            trace.handles.append(output.register_hook(partial(_record_scale, call)))
            if batch_part is None:
                self.linearity.watch(output)
        trace.losses.append(call)


def _record_scale(call: LossCall, grad: Tensor) -> None:
    """Tensor hook on a loss value: remember ``dℓ/dL``."""
    call.scale = grad.detach()

