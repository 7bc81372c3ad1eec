"""The loss finder: notices losses called on the model output inside the block.

A global module hook sees every module call of the process; it keeps those of
torch's loss modules whose input is a watched tensor (the model output, or a
function of it computed after the model). The tape hands over the functional
losses with a module twin (``F.cross_entropy``, ``F.mse_loss``,
``F.binary_cross_entropy_with_logits``), turned into that module
(:func:`functional_loss_module`). A hook on the loss value captures ``dℓ/dL``
during backward: the multiple of this loss in the backpropagated scalar.
"""

from __future__ import annotations

import inspect
from functools import lru_cache, partial
from typing import Any, Callable, Optional

from torch import Tensor, nn
from torch.nn import functional as F

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


    def after_functional_loss(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """The tape's call after a functional loss ran outside the model: keep it like its module."""
        if isinstance(output, Tensor):
            self._found(module, args, kwargs, output)


# The functional losses that compute exactly what a supported loss module computes:
# their keyword arguments are the module's constructor arguments.
FUNCTIONAL_LOSSES: dict[Callable, type[nn.Module]] = {
    F.cross_entropy: nn.CrossEntropyLoss,
    F.mse_loss: nn.MSELoss,
    F.binary_cross_entropy_with_logits: nn.BCEWithLogitsLoss,
}


@lru_cache(maxsize=None)
def _signature(func: Callable) -> inspect.Signature:
    return inspect.signature(func)


def functional_loss_module(func: Callable, args: tuple, kwargs: dict) -> Optional[nn.Module]:
    """The loss module that computes ``func(*args, **kwargs)``, or ``None``.

    ``F.cross_entropy(out, y, label_smoothing=0.1)`` gives
    ``nn.CrossEntropyLoss(label_smoothing=0.1)``. ``None`` where ``func`` is no
    functional loss with a module twin, or where it was given an option that its
    module does not have (``F.mse_loss(out, y, weight=w)``): then it is not seen as a
    loss, and the extensions that need one say so.
    """
    loss_type = FUNCTIONAL_LOSSES.get(func)
    if loss_type is None:
        return None
    try:
        bound = _signature(func).bind(*args, **kwargs)
    except TypeError:
        return None
    accepted = _signature(loss_type.__init__).parameters
    options = {}
    for name, value in bound.arguments.items():
        if name in ("input", "target"):
            continue
        if name in accepted:
            options[name] = value
        elif value is not None:  # an option the module lacks, given a value
            return None
    return loss_type(**options)


def _record_scale(call: LossCall, grad: Tensor) -> None:
    """Tensor hook on a loss value: remember ``dℓ/dL``."""
    call.scale = grad.detach()

