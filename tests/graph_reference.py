"""DiagGGNApprox by its definition on arbitrary graphs, with dense per-sample Jacobians.

Written independently of curvhook's recorder: module hooks find the leaf
modules (no children, or ``nn.MultiheadAttention``), a torch-function mode
finds the tensor operations between them, and every operation is
differentiated per sample with ``jacrev``:

    d_in  += Σ_o d_o J_oi²     (for every distinct differentiable input)
    θ     += Σ_n Σ_o d_no J_oθ²

starting from ``d = diag(H_n)`` at the model output.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev
from torch.overrides import TorchFunctionMode

LEAF_CONTAINERS = (nn.MultiheadAttention,)


def _is_leaf(m: nn.Module) -> bool:
    return next(m.children(), None) is None or isinstance(m, LEAF_CONTAINERS)


class _Op:
    def __init__(self, fn: Callable, tensors: list[Tensor], output: Tensor):
        self.fn, self.tensors, self.output = fn, tensors, output


class _Recorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.ops: list[_Op] = []
        self.depth = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        outs = [out] if isinstance(out, Tensor) else [o for o in out] if isinstance(out, (tuple, list)) else []
        if self.depth or name in ("__get__", "detach") or not any(
            isinstance(o, Tensor) and o.requires_grad for o in outs
        ):
            return out
        flat, spec = torch.utils._pytree.tree_flatten((args, kwargs))
        tensors = [a for a in flat if isinstance(a, Tensor) and a.requires_grad]
        distinct = list({id(t): t for t in tensors}.values())
        positions = [next(j for j, d in enumerate(distinct) if d is a) if isinstance(a, Tensor) and a.requires_grad else None for a in flat]

        for i, o in enumerate(outs):
            if not (isinstance(o, Tensor) and o.requires_grad):
                continue

            def fn(params, *xs, flat=flat, spec=spec, positions=positions, func=func, i=i):
                filled = [xs[p] if p is not None else a for a, p in zip(flat, positions)]
                a, k = torch.utils._pytree.tree_unflatten(filled, spec)
                res = func(*a, **k)
                return res if isinstance(res, Tensor) else res[i]

            self.ops.append(_Op(fn, distinct, o))
        return out


def record(model: nn.Module, X: Tensor) -> list[_Op]:
    rec = _Recorder()
    handles = []
    for m in model.modules():
        if _is_leaf(m) and m is not model:
            def pre(mod, args, kwargs):
                rec.depth += 1

            def post(mod, args, kwargs, out):
                rec.depth -= 1
                # integer inputs (nn.Embedding's indices) have no Jacobian: held fixed
                tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor) and a.is_floating_point()]
                distinct = list({id(t): t for t in tensors}.values())

                def fn(params, *xs, mod=mod, args=args, kwargs=kwargs, distinct=distinct):
                    sub = {id(d): x for d, x in zip(distinct, xs)}
                    a = tuple(sub.get(id(t), t) if isinstance(t, Tensor) else t for t in args)
                    k = {n: sub.get(id(t), t) if isinstance(t, Tensor) else t for n, t in kwargs.items()}
                    res = functional_call(mod, params, a, k)
                    return res[0] if isinstance(res, tuple) else res

                first = out[0] if isinstance(out, tuple) else out
                rec.ops.append(_Op(fn, distinct, first))
                rec.ops[-1].module = mod

            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        with rec:
            out = model(X)
    finally:
        for h in handles:
            h.remove()
    return rec.ops, out


def diag_ggn_approx_graph(model: nn.Module, X: Tensor, hessian_diag: Tensor) -> Tensor:
    """``[P]``: the DiagGGNApprox reference of ``model`` at ``X`` (float64 model)."""
    ops, out = record(model, X)
    params = [p for p in model.parameters() if p.requires_grad]
    pid = {id(p): i for i, p in enumerate(params)}
    result = [torch.zeros_like(p) for p in params]
    n = X.shape[0]
    diag = {id(out): hessian_diag.reshape(out.shape).detach()}
    for op in reversed(ops):
        d = diag.pop(id(op.output), None)
        if d is None:
            continue
        mod = getattr(op, "module", None)
        named = dict(mod.named_parameters()) if mod is not None else {}
        pvals = {k: v.detach() for k, v in named.items()}
        batched = [t for t in op.tensors if id(t) not in pid]
        shared = [t for t in op.tensors if id(t) in pid]
        for i in range(n):
            xs = [t.detach()[i : i + 1] if id(t) not in pid else t.detach() for t in op.tensors]
            d_i = d[i].reshape(-1)

            full = [t.detach() for t in op.tensors]

            def embed(zs, full=full, i=i):  # sample i replaced by the variables, the others fixed
                return [
                    z if id(t) in pid else torch.cat([f[:i], z, f[i + 1 :]])
                    for t, f, z in zip(op.tensors, full, zs)
                ]

            def f(*zs, pv=pvals, i=i):
                return op.fn(pv, *embed(zs))[i].reshape(-1)

            jacs = jacrev(f, argnums=tuple(range(len(xs))))(*xs) if xs else ()
            for t, jac in zip(op.tensors, jacs):
                contrib = (jac.reshape(d_i.numel(), -1).square() * d_i[:, None]).sum(0)
                if id(t) in pid:
                    result[pid[id(t)]] += contrib.reshape(t.shape)
                else:
                    prev = diag.get(id(t))
                    if prev is None:
                        prev = diag[id(t)] = torch.zeros_like(t.detach())
                    prev[i] += contrib.reshape(t.shape[1:])
            for name, p in named.items():
                if id(p) not in pid:
                    continue

                def g(q, name=name, i=i):
                    return op.fn({**pvals, name: q}, *full)[i].reshape(-1)

                jac = jacrev(g)(p.detach())
                result[pid[id(p)]] += (jac.reshape(d_i.numel(), -1).square() * d_i[:, None]).sum(0).reshape(p.shape)
        del batched, shared
    return torch.cat([r.flatten() for r in result])
