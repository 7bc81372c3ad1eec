"""Copies of the model made inside a block carry none of curvhook's hooks.

``copy.deepcopy(model)`` (an EMA or teacher copy), ``pickle.dumps(model)`` and
``torch.save(model)`` copy a module's ``__dict__``, and with it the forward
hooks of the active block, which nothing would ever remove from the copy. While
the block is active, each module of the model reduces itself (the protocol of
``copy`` and ``pickle``) to its state without those hooks: the copy, and a
checkpoint loaded later, are the model as it was before the block, loaded
without curvhook.
"""

from __future__ import annotations

import weakref
from typing import Any, Container, Iterable

from torch import nn

from curvhook._torch_internals import module_state_without_hooks

# The instance attribute that ``copy`` and ``pickle`` look up before the class's.
_REDUCE = "__reduce_ex__"


class _Reduce:
    """``module.__reduce_ex__(protocol)``: the class's reduction, without the block's hooks."""

    def __init__(self, module: nn.Module) -> None:
        self.module = weakref.ref(module)  # the module holds this object: no cycle
        self.hook_ids: Container[int] = frozenset()

    def __call__(self, protocol: int) -> Any:
        module = self.module()
        reduced = type(module).__reduce_ex__(module, protocol)  # the class's: not this instance's
        if not isinstance(reduced, tuple) or len(reduced) < 3:
            return reduced
        state = module_state_without_hooks(reduced[2], self.hook_ids, drop=(_REDUCE,))
        return (*reduced[:2], state, *reduced[3:])


# One reduction per module for all its blocks, each block setting its hook ids: two
# objects fewer per module and block for Python's cyclic garbage collector to track.
_REDUCTIONS: "weakref.WeakKeyDictionary[nn.Module, _Reduce]" = weakref.WeakKeyDictionary()


class HookFreeCopies:
    """Makes copies of ``modules`` leave the hooks ``hook_ids`` behind until :meth:`remove`.

    It goes with the hooks' handles: removing it is part of removing them.

    Args:
        modules: The modules that hold the hooks.
        hook_ids: The ids of the hooks' handles.
    """

    def __init__(self, modules: Iterable[nn.Module], hook_ids: Iterable[int]) -> None:
        ids = frozenset(hook_ids)
        self.modules = list(dict.fromkeys(modules))
        for module in self.modules:
            if _REDUCE not in vars(module):  # a module of the class's own reduction only
                reduce = _REDUCTIONS.get(module)
                if reduce is None:
                    reduce = _REDUCTIONS[module] = _Reduce(module)
                reduce.hook_ids = ids
                vars(module)[_REDUCE] = reduce

    def remove(self) -> None:
        """Give the modules back their own reduction."""
        for module in self.modules:
            if isinstance(vars(module).get(_REDUCE), _Reduce):
                del vars(module)[_REDUCE]
        self.modules.clear()
