"""DiagGGNApprox by its definition on arbitrary graphs, with dense per-sample Jacobians.

Written independently of curvhook's recorder: module hooks find the leaf
modules (no children, or ``nn.MultiheadAttention``), a torch-function mode
finds the tensor operations between them, and every operation is
differentiated per sample with ``jacrev`` (an in-place operation out of place, on
a copy of its first argument as it was before the call; on a view, on a copy of the
view's base through the same view; a complex tensor as its real view ``[*shape, 2]``):

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


Key = tuple  # (id(t), t._version): a tensor as it was at one point of the forward pass


def _key(t: Tensor) -> Key:
    return id(t), t._version


class _Op:
    """One differentiated operation: ``output = fn(params, *tensors)``.

    ``in_keys`` and ``out_key`` name the tensors as they were when it ran (an in-place
    operation makes a new version of the tensor it changes, a read after it reads that
    version); ``values`` are the inputs' values then."""

    def __init__(self, fn: Callable, tensors: list[Tensor], output: Tensor, in_keys: list[Key], values: list[Tensor]):
        self.fn, self.tensors, self.output = fn, tensors, output
        self.in_keys, self.out_key, self.values = in_keys, _key(output), values


def _changes_first_argument(name: str) -> bool:
    return name in ("__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__") or (
        name.endswith("_") and not name.startswith("_")
    )


class _Recorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.ops: list[_Op] = []
        self.depth = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.depth or name in ("__get__", "detach"):
            return func(*args, **kwargs)
        inplace = _changes_first_argument(name) and bool(args) and isinstance(args[0], Tensor)
        view = args[0] if inplace and args[0]._base is not None else None
        base = view._base if view is not None else None
        flat, spec = torch.utils._pytree.tree_flatten((args, kwargs))
        # an in-place operation on a view changes its base: the base is the tensor here
        flat_tensors = [base if view is not None and a is view else a for a in flat]
        tensors = [a for a in flat_tensors if isinstance(a, Tensor) and a.requires_grad]
        distinct = list({id(t): t for t in tensors}.values())
        in_keys = [_key(t) for t in distinct]
        values = [t.detach().clone() for t in distinct]
        if view is not None:
            base_before = base.detach().clone()  # (the base itself when it needs no gradient)
            assert base_before.stride() == base.stride(), "the base's copy must keep its strides"
            where = (view.size(), view.stride(), view.storage_offset() - base.storage_offset())
        positions = [
            next(j for j, d in enumerate(distinct) if d is a) if isinstance(a, Tensor) and a.requires_grad else None
            for a in flat_tensors
        ]
        # constants as they were (an in-place write into a buffer of zeros changes it)
        constants = [a.detach().clone() if isinstance(a, Tensor) and p is None else a for a, p in zip(flat, positions)]
        result = out = func(*args, **kwargs)
        if inplace:  # recorded as the tensor it changed; the caller gets what the call returned
            out = args[0] if view is None else base
        outs = [out] if isinstance(out, Tensor) else [o for o in out] if isinstance(out, (tuple, list)) else []
        if not any(isinstance(o, Tensor) and o.requires_grad for o in outs):
            return result

        for i, o in enumerate(outs):
            if not (isinstance(o, Tensor) and o.requires_grad):
                continue

            def fn(params, *xs, flat=flat, constants=constants, spec=spec, positions=positions, func=func, i=i,
                   inplace=inplace):
                if view is not None:  # on a copy of the base, through the same view of it
                    copy = (xs[positions[0]] if positions[0] is not None else base_before).clone()
                    assert copy.stride() == base.stride(), "the view needs the base's strides"
                    filled = [
                        copy.as_strided(*where) if a is view else xs[p] if p is not None else c
                        for a, c, p in zip(flat, constants, positions)
                    ]
                    a, k = torch.utils._pytree.tree_unflatten(filled, spec)
                    func(*a, **k)
                    return copy
                filled = [xs[p] if p is not None else c for c, p in zip(constants, positions)]
                a, k = torch.utils._pytree.tree_unflatten(filled, spec)
                if inplace:  # out of place: on a copy of the first argument
                    a = (a[0].clone(), *a[1:])
                    func(*a, **k)
                    return a[0]
                res = func(*a, **k)
                return res if isinstance(res, Tensor) else res[i]

            self.ops.append(_Op(fn, distinct, o, in_keys, values))
        if view is not None and view.requires_grad:
            # the view's new version is read from its base's: later reads of the view (the
            # ``__setitem__`` that ends ``h[:, 1:3] *= s``) reach the write
            self.ops.append(_Op(lambda params, b, where=where: b.as_strided(*where), [base], view,
                                [_key(base)], [base.detach().clone()]))
        # (positions[0] is the base's, or None for a base without gradient: the view is flat[0])
        return result


def record(model: nn.Module, X: Tensor) -> list[_Op]:
    rec = _Recorder()
    handles = []
    for m in model.modules():
        if _is_leaf(m) and m is not model:
            def pre(mod, args, kwargs):
                rec.depth += 1
                # integer inputs (nn.Embedding's indices) have no Jacobian: held fixed
                tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor) and a.is_floating_point()]
                distinct = list({id(t): t for t in tensors}.values())
                mod._graph_reference_inputs = distinct, [_key(t) for t in distinct], [t.detach().clone() for t in distinct]

            def post(mod, args, kwargs, out):
                rec.depth -= 1
                distinct, in_keys, values = mod.__dict__.pop("_graph_reference_inputs")

                def fn(params, *xs, mod=mod, args=args, kwargs=kwargs, distinct=distinct):
                    sub = {id(d): x for d, x in zip(distinct, xs)}
                    a = tuple(sub.get(id(t), t) if isinstance(t, Tensor) else t for t in args)
                    k = {n: sub.get(id(t), t) if isinstance(t, Tensor) else t for n, t in kwargs.items()}
                    res = functional_call(mod, params, a, k)
                    return res[0] if isinstance(res, tuple) else res

                first = out[0] if isinstance(out, tuple) else out
                rec.ops.append(_Op(fn, distinct, first, in_keys, values))
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
    diag = {_key(out): hessian_diag.reshape(out.shape).detach()}
    for op, (in_axes, (out_axis, out_rows)) in zip(reversed(ops), reversed(axes)):
        d = diag.pop(op.out_key, None)
        if d is None:
            continue
        mod = getattr(op, "module", None)
        named = dict(mod.named_parameters()) if mod is not None else {}
        pvals = {k: v.detach() for k, v in named.items()}
        full = op.values
        whole = op.out_key in shared  # no batch axis: sample i's diagonal is d[i]
        for i in range(n):
            d_i = (d[i] if whole else d.narrow(out_axis, i * out_rows, out_rows)).reshape(-1)
            _sample_terms(op, i, d_i, full, in_axes, (out_axis, out_rows), pvals, pid, diag, result, shared, n)
            for name, p in named.items():
                if id(p) not in pid:
                    continue

                def g(q, name=name, i=i):
                    res = _real(op.fn({**pvals, name: q}, *full))
                    return (res if whole else res.narrow(out_axis, i * out_rows, out_rows)).reshape(-1)

                jac = jacrev(g)(p.detach())
                result[pid[id(p)]] += (jac.reshape(d_i.numel(), -1).square() * d_i[:, None]).sum(0).reshape(p.shape)
    # every diagonal reached the operation that made its tensor (none lost on the way)
    owner = {k: t for op in ops for t, k in zip(op.tensors, op.in_keys)}
    lost = [k for k in diag if owner[k].requires_grad and id(owner[k]) not in pid and k != _key(X)]
    assert not lost, f"graph_reference: no recorded operation made the tensors {[tuple(owner[k].shape) for k in lost]}"
    return torch.cat([r.flatten() for r in result])


def _real(t: Tensor) -> Tensor:
    """A complex tensor as its real view ``[*shape, 2]`` (the diagonal of each coordinate); a real one as it is."""
    return torch.view_as_real(t) if t.is_complex() else t


def _shared_outputs(model: nn.Module, X: Tensor, ops: list[_Op]) -> set[Key]:
    """The keys of the outputs computed without the batch (from parameters and constants:
    T5's position bias): their shape does not change when the model runs on one sample
    more. Their diagonal is kept per sample, ``[N, *shape]``, as for a parameter."""
    more, _ = record(model, torch.cat([X, X[:1]]))
    assert len(more) == len(ops), "the graph changed with the batch size"
    found = {op.out_key for op, other in zip(ops, more) if op.output.shape == other.output.shape}
    # inputs that are no operation's output (a module's buffer passed in: a coordinate table)
    found.update(
        key for op, other in zip(ops, more) for t, key, u in zip(op.tensors, op.in_keys, other.tensors)
        if not t.requires_grad and t.shape == u.shape
    )
    return found


def _sample_terms(op, i, d_i, full, in_axes, out, pvals, pid, diag, result, shared, n) -> None:
    """Sample ``i``'s terms of one operation: its inputs' diagonals and the parameters passed to it.

    ``in_axes`` and ``out`` are ``(batch axis, rows per sample)`` of each input and of the output."""
    out_axis, out_rows = out
    fixed = [id(t) in pid or key in shared for t, key in zip(op.tensors, op.in_keys)]  # no batch axis: not cut
    whole = op.out_key in shared
    xs = [f if k else f.narrow(a, i * r, r) for k, f, (a, r) in zip(fixed, full, in_axes)]

    def embed(zs):  # sample i replaced by the variables, the others fixed
        return [
            z if k else torch.cat([f.narrow(a, 0, i * r), z, f.narrow(a, (i + 1) * r, f.shape[a] - (i + 1) * r)], a)
            for k, f, z, (a, r) in zip(fixed, full, zs, in_axes)
        ]

    complex_in = [x.is_complex() for x in xs]

    def f(*zs):  # complex tensors as their real views [*shape, 2], in and out
        zs = [torch.view_as_complex(z) if c else z for z, c in zip(zs, complex_in)]
        res = _real(op.fn(pvals, *embed(zs)))
        return (res if whole else res.narrow(out_axis, i * out_rows, out_rows)).reshape(-1)

    xs = [torch.view_as_real(x) if c else x for x, c in zip(xs, complex_in)]
    jacs = jacrev(f, argnums=tuple(range(len(xs))))(*xs) if xs else ()
    for t, key, jac, (a, r) in zip(op.tensors, op.in_keys, jacs, in_axes):
        contrib = (jac.reshape(d_i.numel(), -1).square() * d_i[:, None]).sum(0)
        if id(t) in pid:
            result[pid[id(t)]] += contrib.reshape(t.shape)
        elif key in shared:
            prev = diag.get(key)
            if prev is None:
                prev = diag[key] = torch.zeros(n, *_real(t).shape, dtype=_real(t).dtype)
            prev[i] += contrib.reshape(t.shape)
        else:
            prev = diag.get(key)
            if prev is None:
                prev = diag[key] = torch.zeros_like(_real(t.detach()))
            rows = prev.narrow(a, i * r, r)
            rows += contrib.reshape(rows.shape)
