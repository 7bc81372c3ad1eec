"""``curvhook.clear``: remove the results the extensions left on a model's parameters.

Results stay on the parameters after an ``extend`` block, so ``torch.save(model)``
and ``pickle`` carry them into the checkpoint (a ``state_dict`` does not: its
tensors are the parameters' data, without attributes).
"""

from __future__ import annotations

from torch import nn

from curvhook.errors import CurvhookError
from curvhook.extensions.base import Extension
from curvhook.module_recorder import in_active_block


def result_attributes() -> set[str]:
    """The attribute names every extension class declares (``Extension.attribute``), user ones included."""
    names: set[str] = set()
    stack = [Extension]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        name = vars(cls).get("attribute")
        if isinstance(name, str):
            names.add(name)
    return names


def clear(model: nn.Module) -> None:
    """Remove every curvhook result from the parameters of ``model``.

    Deletes ``p.diag_ggn``, ``p.diag_ggn_approx``, ``p.ggn``, ``p.batch_jacobian``
    (and the attribute of any other :class:`~curvhook.extensions.base.Extension`
    subclass) from every parameter of ``model``, frozen ones included. Call it
    before ``torch.save(model)`` or ``pickle.dumps(model)`` to keep results out
    of the checkpoint; ``model.state_dict()`` never holds them. The model stays
    usable with :func:`~curvhook.extend`. ``FullGGN().matrix`` lives on the
    extension object, not on the model: drop that object to free it.

    Example::

        with extend(model, DiagGGN()):
            criterion(model(X), y).backward()
        diag = [p.diag_ggn for p in model.parameters()]
        curvhook.clear(model)
        torch.save(model, "model.pt")  # no results inside

    Args:
        model: Any ``nn.Module``.

    Raises:
        CurvhookError: ``model`` is inside an active ``extend`` block, whose
            next backward pass would write or add to the results again. Call it
            after the block.
    """
    for name, module in model.named_modules():
        if in_active_block(module):
            raise CurvhookError(
                f"curvhook.clear() was called on a model whose module {name or type(module).__name__!r} "
                "is inside an active extend() block, which writes results on every backward pass. "
                "Call curvhook.clear(model) after the block."
            )
    attributes = result_attributes()
    for p in model.parameters():
        for attribute in attributes:
            if attribute in vars(p):
                delattr(p, attribute)
