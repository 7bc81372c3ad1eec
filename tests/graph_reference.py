"""DiagGGNApprox by its definition on arbitrary graphs, with dense per-sample Jacobians.

Written independently of curvhook's recorder: module hooks find the leaf
modules (no children, or ``nn.MultiheadAttention``), a torch-function mode
finds the tensor operations between them, and every operation is
differentiated per sample with ``jacrev``:

    d_in  += Σ_o d_o J_oi²     (for every distinct differentiable input)
    θ     += Σ_n Σ_o d_no J_oθ²

starting from ``d = diag(H_n)`` at the model output. A tensor computed from
parameters and constants only (no batch axis: T5's position bias) keeps its
diagonal per sample, ``[N, *shape]``, as curvhook does, down to the parameters.
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


def _batch_axes(model: nn.Module, X: Tensor, ops: list[_Op]) -> list[tuple[list[tuple[int, int]], tuple[int, int]]]:
    """Per operation, the batch axis and rows per sample of each tensor input and of the output.

    Found without curvhook: the model runs again on one sample more, and the
    batch axis of a tensor is the axis whose size grew (axis ``0`` where none did);
    it grew by the number of rows of one sample (``k`` where a reshape merged the
    batch axis with ``k`` rows of the axes after it, ``[N·k, …]``).
    """
    more, _ = record(model, torch.cat([X, X[:1]]))
    assert len(more) == len(ops), "the graph changed with the batch size"

    def axis(a: Tensor, b: Tensor) -> tuple[int, int]:
        grown = [j for j, (p, q) in enumerate(zip(a.shape, b.shape)) if p != q]
        if len(grown) == 1 and a.dim() == b.dim():
            return grown[0], b.shape[grown[0]] - a.shape[grown[0]]
        return 0, 1

    return [
        ([axis(t, u) for t, u in zip(op.tensors, other.tensors)], axis(op.output, other.output))
        for op, other in zip(ops, more)
    ]


def diag_ggn_approx_graph(model: nn.Module, X: Tensor, hessian_diag: Tensor, moved_axes: bool = False) -> Tensor:
    """``[P]``: the DiagGGNApprox reference of ``model`` at ``X`` (float64 model).

    With ``moved_axes``, tensors may have their batch axis elsewhere than first
    (``[L, N, E]`` between transposes), or merged with the axes after it
    (``[N·k, …]``: sample ``i`` is rows ``i·k … i·k + k − 1``); both are found by
    :func:`_batch_axes`.
    """
    ops, out = record(model, X)
    axes = _batch_axes(model, X, ops) if moved_axes else [([(0, 1)] * len(op.tensors), (0, 1)) for op in ops]
    params = [p for p in model.parameters() if p.requires_grad]
    pid = {id(p): i for i, p in enumerate(params)}
    shared = _shared_outputs(model, X, ops)
    result = [torch.zeros_like(p) for p in params]
    n = X.shape[0]
    diag = {id(out): hessian_diag.reshape(out.shape).detach()}
    for op, (in_axes, (out_axis, out_rows)) in zip(reversed(ops), reversed(axes)):
        d = diag.pop(id(op.output), None)
        if d is None:
            continue
        mod = getattr(op, "module", None)
        named = dict(mod.named_parameters()) if mod is not None else {}
        pvals = {k: v.detach() for k, v in named.items()}
        full = [t.detach() for t in op.tensors]
        whole = id(op.output) in shared  # no batch axis: sample i's diagonal is d[i]
        for i in range(n):
            d_i = (d[i] if whole else d.narrow(out_axis, i * out_rows, out_rows)).reshape(-1)
            _sample_terms(op, i, d_i, full, in_axes, (out_axis, out_rows), pvals, pid, diag, result, shared, n)
            for name, p in named.items():
                if id(p) not in pid:
                    continue

                def g(q, name=name, i=i):
                    res = op.fn({**pvals, name: q}, *full)
                    return (res if whole else res.narrow(out_axis, i * out_rows, out_rows)).reshape(-1)

                jac = jacrev(g)(p.detach())
                result[pid[id(p)]] += (jac.reshape(d_i.numel(), -1).square() * d_i[:, None]).sum(0).reshape(p.shape)
    return torch.cat([r.flatten() for r in result])


def _shared_outputs(model: nn.Module, X: Tensor, ops: list[_Op]) -> set[int]:
    """``id`` of the outputs computed without the batch (from parameters and constants:
    T5's position bias): their shape does not change when the model runs on one sample
    more. Their diagonal is kept per sample, ``[N, *shape]``, as for a parameter."""
    more, _ = record(model, torch.cat([X, X[:1]]))
    assert len(more) == len(ops), "the graph changed with the batch size"
    found = {id(op.output) for op, other in zip(ops, more) if op.output.shape == other.output.shape}
    # inputs that are no operation's output (a module's buffer passed in: a coordinate table)
    found.update(
        id(t) for op, other in zip(ops, more) for t, u in zip(op.tensors, other.tensors)
        if not t.requires_grad and t.shape == u.shape
    )
    return found


def _sample_terms(op, i, d_i, full, in_axes, out, pvals, pid, diag, result, shared, n) -> None:
    """Sample ``i``'s terms of one operation: its inputs' diagonals and the parameters passed to it.

    ``in_axes`` and ``out`` are ``(batch axis, rows per sample)`` of each input and of the output."""
    out_axis, out_rows = out
    fixed = [id(t) in pid or id(t) in shared for t in op.tensors]  # no batch axis: not cut per sample
    whole = id(op.output) in shared
    xs = [f if k else f.narrow(a, i * r, r) for k, f, (a, r) in zip(fixed, full, in_axes)]

    def embed(zs):  # sample i replaced by the variables, the others fixed
        return [
            z if k else torch.cat([f.narrow(a, 0, i * r), z, f.narrow(a, (i + 1) * r, f.shape[a] - (i + 1) * r)], a)
            for k, f, z, (a, r) in zip(fixed, full, zs, in_axes)
        ]

    def f(*zs):
        res = op.fn(pvals, *embed(zs))
        return (res if whole else res.narrow(out_axis, i * out_rows, out_rows)).reshape(-1)

    jacs = jacrev(f, argnums=tuple(range(len(xs))))(*xs) if xs else ()
    for t, jac, (a, r) in zip(op.tensors, jacs, in_axes):
        contrib = (jac.reshape(d_i.numel(), -1).square() * d_i[:, None]).sum(0)
        if id(t) in pid:
            result[pid[id(t)]] += contrib.reshape(t.shape)
        elif id(t) in shared:
            prev = diag.get(id(t))
            if prev is None:
                prev = diag[id(t)] = torch.zeros(n, *t.shape, dtype=t.dtype)
            prev[i] += contrib.reshape(t.shape)
        else:
            prev = diag.get(id(t))
            if prev is None:
                prev = diag[id(t)] = torch.zeros_like(t.detach())
            rows = prev.narrow(a, i * r, r)
            rows += contrib.reshape(rows.shape)
