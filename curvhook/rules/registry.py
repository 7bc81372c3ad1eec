"""Map module types to their :class:`LayerRule`.

A rule registered for a type also serves subclasses that do not override
``forward`` (for example ``NonDynamicallyQuantizableLinear``). A subclass with
its own ``forward`` computes something else and gets no rule: curvhook then
reports it instead of guessing.
"""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

from torch import nn

from curvhook.rules.base import LayerRule

_RULES: dict[type, LayerRule] = {}
_NAMED_RULES: dict[tuple[str, str], LayerRule] = {}  # (top-level package, class name) -> rule
_SUFFIX_RULES: dict[tuple[str, str], LayerRule] = {}  # (top-level package, end of the class name) -> rule
_VERSION = [0]  # grows with every registration: cached plans made before it are not reused

R = TypeVar("R", bound=type)


def register_rule(*module_types: type) -> Callable[[R], R]:
    """Class decorator: register a :class:`LayerRule` subclass for module types.

    Example::

        @register_rule(MyLayer)
        class MyLayerRule(LayerRule):
            def jac_t_mat_prod(self, call, mat): ...

    Args:
        *module_types: ``nn.Module`` subclasses the rule serves.

    Returns:
        The decorator; it instantiates the rule class once and returns the class.
    """

    def decorate(rule_cls: R) -> R:
        rule = rule_cls()
        for module_type in module_types:
            if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
                raise TypeError(f"register_rule expects nn.Module subclasses, got {module_type!r}")
            _RULES[module_type] = rule
        _VERSION[0] += 1
        return rule_cls

    return decorate


def register_rule_by_name(package: str, *class_names: str) -> Callable[[R], R]:
    """Class decorator: register a rule for classes of a third-party package, matched by name.

    For layers of packages curvhook does not import (Hugging Face's ``Conv1D``,
    its activation modules, ``LlamaRMSNorm``): a class matches when its name is
    one of ``class_names`` and it was defined in ``package`` or one of its
    submodules. The rule's :meth:`~LayerRule.accepts` checks the attributes it reads.
    A rule registered for the type itself takes precedence.

    A name that starts with ``*`` matches every class whose name ends with the rest
    (``"*RMSNorm"``: the copies of one layer that a package defines once per model).
    An exact name takes precedence over such a pattern. A rule so registered must
    prove on each call that the module computes its map (on probes, as
    :class:`~curvhook.rules.normalization.ProbedNormRule` does) and hand the call
    to the fallback where it does not: a class name is no promise.

    Args:
        package: The top-level package, e.g. ``"transformers"``.
        *class_names: The class names.

    Returns:
        The decorator; it instantiates the rule class once and returns the class.
    """

    def decorate(rule_cls: R) -> R:
        rule = rule_cls()
        for name in class_names:
            if name.startswith("*"):
                _SUFFIX_RULES[(package, name[1:])] = rule
            else:
                _NAMED_RULES[(package, name)] = rule
        _VERSION[0] += 1
        return rule_cls

    return decorate


def rule_for(module: nn.Module) -> Optional[LayerRule]:
    """Return the rule for ``module``, or ``None`` if its type has none.

    ``None`` also when the registered rule declines this particular module
    (:meth:`LayerRule.accepts`, e.g. a convolution with ``padding_mode='reflect'``).
    """
    cls = type(module)
    rule = _RULES.get(cls)
    if rule is None:
        for base in cls.__mro__[1:]:
            if base in _RULES and cls.forward is base.forward:
                rule = _RULES[base]
                break
    if rule is None and (_NAMED_RULES or _SUFFIX_RULES):
        package = cls.__module__.partition(".")[0]
        rule = _NAMED_RULES.get((package, cls.__name__))
        if rule is None:
            rule = next((r for (pkg, end), r in _SUFFIX_RULES.items()
                         if pkg == package and cls.__name__.endswith(end)), None)
    if rule is None or not rule.accepts(module):
        return None
    return rule


def registry_version() -> int:
    """A number that changes whenever a rule is registered (part of every plan's key)."""
    return _VERSION[0]


def fallback_rule() -> LayerRule:
    """The exact generic fallback (per-sample Jacobians of the module's own ``forward``).

    Rules whose closed form does not apply to one call hand that call to it.
    """
    from curvhook.rules.fallback import FALLBACK  # imported late: the fallback imports this registry

    return FALLBACK


def rule_or_fallback(module: nn.Module) -> LayerRule:
    """The registered rule for ``module``, or the exact generic fallback."""
    return rule_for(module) or fallback_rule()


def supported_module_types() -> list[type]:
    """All module types with a registered rule."""
    return list(_RULES)
