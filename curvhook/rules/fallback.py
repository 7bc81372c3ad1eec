"""The exact generic rule for any leaf module without a registered rule.

It differentiates the module's own ``forward`` with ``torch.func`` on the
stored inputs: ``vjp`` batched over the backpropagated columns for the input,
per-sample ``vjp`` (``vmap`` over samples) for the parameters, and per-sample
``jacrev`` where DiagGGNApprox needs a Jacobian diagonal. It is exact but
slower than a dedicated rule, so it warns once per module type.

The module must treat samples independently; modules that mix samples
(BatchNorm using batch statistics) are rejected before this rule runs.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vjp, vmap

from curvhook.calls import ModuleCall, fill_template
from curvhook.errors import UnsupportedModelError
from curvhook.rules.base import LayerRule

_WARNED: set[type] = set()


def _params(call: ModuleCall) -> dict[str, Tensor]:
    return {n: p.detach() for n, p in call.module.named_parameters(recurse=call.recurse)}


def _forward(call: ModuleCall) -> Callable[[dict, Tensor], Tensor]:
    """``(params, x) ↦ module(...)`` with ``x`` as the first input, the others held fixed.

    The call is replayed with its recorded arguments; an input passed several
    times (``attention(x, x, x)``) is one input. A tuple output gives its first
    tensor.
    """
    module, fixed = call.module, [t.detach() for t in call.inputs]

    def run(params: dict, x: Tensor) -> Tensor:
        if call.args or call.kwargs:
            args, kwargs = fill_template(call.args, call.kwargs, [x, *fixed[1:]])
        else:  # a call recorded by hand, without its arguments' layout
            args, kwargs = (x, *fixed[1:]), {}
        out = functional_call(module, params, args, kwargs)
        return out if isinstance(out, Tensor) else next(o for o in out if isinstance(o, Tensor))

    return run


def _per_sample(call: ModuleCall) -> Callable[[dict, Tensor], Tensor]:
    """``(params, x_n) ↦ module(x_n[None])[0]`` for one sample."""
    run = _forward(call)
    return lambda params, x_n: run(params, x_n.unsqueeze(0)).squeeze(0)


def _guard(call: ModuleCall, fn: Callable[[], Tensor]) -> Tensor:
    try:
        return fn()
    except UnsupportedModelError:
        raise
    except Exception as err:  # torch.func could not transform this module
        raise UnsupportedModelError(
            f"The generic rule could not differentiate module {call.name!r} "
            f"({type(call.module).__name__}) with torch.func: {err}. Register a rule for it "
            "with curvhook.register_rule (see docs/custom_layers.md)."
        ) from err


class FallbackRule(LayerRule):
    """Exact rules for any per-sample leaf module, through ``torch.func``."""

    def warn_once(self, call: ModuleCall) -> None:
        """Warn the first time a module type goes through this rule."""
        cls = type(call.module)
        if cls not in _WARNED:
            _WARNED.add(cls)
            warnings.warn(
                f"curvhook has no rule for {cls.__name__} (module {call.name!r}); it uses the "
                "exact but slower torch.func fallback. Register a fast rule with "
                "curvhook.register_rule (see docs/custom_layers.md).",
                stacklevel=2,
            )

    def jac_t_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        def compute() -> Tensor:
            params = _params(call)
            _, pullback = vjp(lambda x: _forward(call)(params, x), call.input.detach())
            return vmap(lambda m: pullback(m)[0])(mat)

        return _guard(call, compute)

    def param_jac_t_mat_prod(self, call: ModuleCall, name: str, mat: Tensor) -> Tensor:
        def compute() -> Tensor:
            params, sample = _params(call), _per_sample(call)
            other = {k: v for k, v in params.items() if k != name}

            def one_sample(x_n: Tensor, m_n: Tensor) -> Tensor:  # m_n: [V, *out]
                _, pullback = vjp(lambda p: sample({**other, name: p}, x_n), params[name])
                return vmap(lambda m: pullback(m)[0])(m_n)

            return vmap(one_sample, in_dims=(0, 1), out_dims=1)(call.input.detach(), mat)

        return _guard(call, compute)

    def diag_jac_t_diag_jac(self, call: ModuleCall, diag: Tensor) -> Tensor:
        def compute() -> Tensor:
            params, sample = _params(call), _per_sample(call)
            x = call.input.detach()
            jac = vmap(jacrev(lambda x_n: sample(params, x_n)))(x)  # [N, *out, *in]
            jac = jac.reshape(x.shape[0], diag[0].numel(), x[0].numel())
            return torch.einsum("no,noi->ni", diag.flatten(1), jac.square()).reshape(x.shape)

        return _guard(call, compute)

    def param_diag(self, call: ModuleCall, name: str, diag: Tensor) -> Tensor:
        def compute() -> Tensor:
            params, sample = _params(call), _per_sample(call)
            other = {k: v for k, v in params.items() if k != name}
            jac_fn = jacrev(lambda p, x_n: sample({**other, name: p}, x_n))
            jac = vmap(jac_fn, in_dims=(None, 0))(params[name], call.input.detach())
            jac = jac.reshape(diag.shape[0], diag[0].numel(), -1)  # [N, O, |θ|]
            return torch.einsum("no,nop->p", diag.flatten(1), jac.square()).reshape(params[name].shape)

        return _guard(call, compute)


FALLBACK = FallbackRule()


def mixes_samples(module: nn.Module) -> bool:
    """Whether the module combines samples (BatchNorm with batch statistics)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.training or not module.track_running_stats
    return False
