"""Brute-force references for the curvhook extensions, built with torch.func only.

Nothing here imports curvhook: every quantity is computed from the definitions
in docs/mathematics.md,

- ``J``: the full-batch Jacobian of the model output with respect to the
  trainable parameters (``torch.func.jacrev`` of ``functional_call``), ``[N*C, P]``;
- ``H``: the Hessian of the scalar loss (exactly as the test computes it,
  reduction and constant factors included) with respect to the model output
  (``torch.func.hessian``), ``[N*C, N*C]``;
- ``G = Jᵀ H J``;
- DiagGGNApprox: the diagonal backpropagation applied literally, op by op and
  sample by sample, with dense per-op Jacobians from ``torch.func.jacrev``.

A model is treated as the chain of leaf-module calls it makes (recorded with
plain forward hooks, so nested ``nn.Sequential``, custom containers that chain
their children and a module called twice are all handled). Dropout in train
mode is made deterministic with the masks a :class:`DropoutMasks` recorder
captured during the curvhook run.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

# Largest error seen per extension, filled by ``check`` and printed by conftest.
ERRORS: dict[str, dict[str, float]] = {}

ATTRIBUTES = {
    "BatchJacobian": "batch_jacobian",
    "DiagGGN": "diag_ggn",
    "DiagGGNApprox": "diag_ggn_approx",
    "FullGGN": "ggn",
}


# ----------------------------------------------------------------- comparison
def check(actual: Tensor, expected: Tensor, label: str, rtol: float = 1e-6, atol_factor: float = 1e-10) -> None:
    """``assert_close`` with an absolute tolerance relative to the largest entry.

    Records the error for the report: ``max|a - e| / max|e|`` and the largest
    entrywise relative error over entries with ``|e| > 1e-6 max|e|``.
    """
    assert actual.shape == expected.shape, f"{label}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
    scale = e.abs().max().item() if e.numel() else 0.0
    atol = atol_factor * max(scale, 1e-30)
    stats = ERRORS.setdefault(label, {"normwise": 0.0, "entrywise": 0.0, "checks": 0, "failed": 0})
    try:
        torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=atol, msg=lambda m: f"{label}: {m}")
    except AssertionError:
        stats["failed"] += 1
        raise
    if e.numel():  # record only comparisons that passed: the report is about accuracy, not bugs
        diff = (a - e).abs()
        normwise = diff.max().item() / scale if scale > 0 else diff.max().item()
        significant = e.abs() > 1e-6 * scale
        entrywise = (diff[significant] / e.abs()[significant]).max().item() if significant.any() else 0.0
        where = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0].split("::")[-1]
        if normwise >= stats["normwise"]:
            stats["normwise"], stats["normwise_at"] = normwise, where
        if entrywise >= stats["entrywise"]:
            stats["entrywise"], stats["entrywise_at"] = entrywise, where
    stats["checks"] += 1


# ------------------------------------------------------------ dropout masks
class DropoutMasks:
    """Record the multiplier ``y / x`` of every train-mode dropout call, in call order.

    Use as a context manager around the curvhook forward pass. The input is
    cloned in a pre-hook so that ``inplace=True`` dropout is handled.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.masks: list[tuple[nn.Module, Tensor]] = []
        self._handles: list = []
        self._inputs: list[Tensor] = []

    def __enter__(self) -> "DropoutMasks":
        for m in self.model.modules():
            if isinstance(m, nn.Dropout):
                self._handles.append(m.register_forward_pre_hook(self._pre))
                self._handles.append(m.register_forward_hook(self._post))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre(self, module, args):
        self._inputs.append(args[0].detach().clone())

    def _post(self, module, args, output):
        x = self._inputs.pop()
        y = output.detach().clone()
        if module.training and module.p > 0:
            assert (x != 0).all(), "choose a model whose dropout input is nonzero"
            keep = (y != 0).to(x.dtype)
            multiplier = keep / (1 - module.p)
            torch.testing.assert_close(y, x * multiplier, rtol=1e-6, atol=0)
            self.masks.append((module, multiplier))


# ---------------------------------------------------------------- the chain
@dataclass
class Op:
    """One leaf-module call of the chain."""

    module: nn.Module
    multiplier: Optional[Tensor] = None  # train-mode dropout: the recorded y / x

    def local_params(self, values: dict[str, Tensor], names: dict[int, str]) -> dict[str, Tensor]:
        out = {}
        for local, p in self.module.named_parameters(recurse=False):
            out[local] = values[names[id(p)]] if id(p) in names else p.detach()
        return out

    def __call__(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        if self.multiplier is not None:
            return x * self.multiplier.to(x.dtype)
        return functional_call(self.module, params, (x.clone(),))  # clone: in-place modules


def leaf_ops(model: nn.Module, X: Tensor, masks: Optional[DropoutMasks] = None) -> list[Op]:
    """The leaf modules ``model(X)`` calls, in call order (recorded with forward hooks)."""
    calls: list[nn.Module] = []
    handles = [
        m.register_forward_hook(lambda mod, a, o: calls.append(mod))
        for m in model.modules()
        if next(m.children(), None) is None
    ]
    try:
        with torch.no_grad():
            model(X.detach().clone())
    finally:
        for h in handles:
            h.remove()
    recorded = list(masks.masks) if masks is not None else []
    ops = []
    for m in calls:
        if isinstance(m, nn.Dropout) and m.training and m.p > 0:
            assert recorded, "train-mode dropout needs the masks of the curvhook run"
            mod, mult = recorded.pop(0)
            assert mod is m
            ops.append(Op(m, mult))
        else:
            ops.append(Op(m))
    assert not recorded
    return ops


def trainable(model: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
    """Names and parameters with requires_grad, in ``model.parameters()`` order."""
    pairs = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in pairs], [p for _, p in pairs]


@dataclass
class Reference:
    """Everything the extensions are compared with (float64 unless the model is not)."""

    out: Tensor  # [N, *out]
    J: Tensor  # [N*C, P]
    H: Optional[Tensor]  # [N*C, N*C], the per-sample blocks H_n only (None: no loss)
    approx: Optional[Tensor]  # [P]
    names: list[str] = field(default_factory=list)
    H_full: Optional[Tensor] = None  # [N*C, N*C] including cross-sample blocks
    _G: Optional[Tensor] = field(default=None, repr=False)

    @property
    def batch_jacobian(self) -> Tensor:
        n = self.out.shape[0]
        return self.J.reshape(n, -1, self.J.shape[1])

    @property
    def G(self) -> Optional[Tensor]:
        """``Jᵀ H J``, ``[P, P]``, formed when first read (9 GB at P = 33,000)."""
        if self._G is None and self.H is not None:
            self._G = self.J.T @ self.H @ self.J
        return self._G

    @property
    def diag_ggn(self) -> Tensor:
        """``diag(Jᵀ H J)`` as ``Σ_i J_ip (H J)_ip``, without ``G`` unless it was formed."""
        if self._G is not None:
            return self._G.diagonal()
        return ((self.H @ self.J) * self.J).sum(0)


def reference(
    model: nn.Module,
    X: Tensor,
    loss_fn: Optional[Callable[[Tensor], Tensor]] = None,
    masks: Optional[DropoutMasks] = None,
    approx: bool = True,
    dtype: torch.dtype = torch.float64,
    loss_hessian: Optional[Callable[[Tensor], Tensor]] = None,
) -> Reference:
    """Compute ``J``, ``H``, ``G`` and the DiagGGNApprox reference.

    Args:
        model: A model that is a chain of leaf-module calls.
        X: The input.
        loss_fn: ``out ↦ ℓ`` exactly as the test backpropagates it. ``None``:
            no loss (``H`` and ``G`` are ``None``-free zeros, approx skipped).
        masks: The dropout masks of the curvhook run (train-mode dropout only).
        approx: Whether to compute the DiagGGNApprox reference.
        dtype: The dtype the reference is computed in (the model is not changed:
            parameters are cast on the fly).
        loss_hessian: ``out [N, C] ↦ [N*C, N*C]``, a closed form of ``loss_fn``'s
            Hessian to use in place of ``torch.func.hessian``'s, which loses digits
            where the loss saturates (:func:`cross_entropy_hessian`). It is checked
            against ``torch.func.hessian`` to an absolute 1e-13.
    """
    names, params = trainable(model)
    ids = {id(p): n for n, p in zip(names, params)}
    values = {n: p.detach().to(dtype) for n, p in zip(names, params)}
    X = X.detach().to(dtype) if X.is_floating_point() else X
    ops = leaf_ops(model, X.to(next(model.parameters()).dtype) if X.is_floating_point() else X, masks)
    cast = dtype != next(model.parameters()).dtype

    def chain(vals: dict[str, Tensor], x: Tensor) -> Tensor:
        for op in ops:
            local = op.local_params(vals, ids)
            if cast:
                local = {k: v.to(dtype) for k, v in local.items()}
            x = op(local, x)
        return x

    use_chain = masks is not None and masks.masks or cast
    if use_chain:
        forward = chain
    else:
        # A copy: functional_call on a model that registers one module twice (weight
        # sharing) leaves plain tensors in place of the parameters afterwards (torch 2.13).
        whole = copy.deepcopy(model)

        def forward(vals, x):
            return functional_call(whole, vals, (x,))

        # The chain must describe the model exactly, or the approx reference is meaningless.
        if approx:
            with torch.no_grad():
                torch.testing.assert_close(chain(values, X), forward(values, X), rtol=0, atol=0)

    out = forward(values, X).detach()
    n, c = out.shape[0], out[0].numel()
    jac = jacrev(lambda v: forward(v, X))(values)
    J = torch.cat([jac[k].reshape(n * c, -1) for k in names], 1) if names else out.new_zeros(n * c, 0)
    if loss_fn is None:
        return Reference(out=out, J=J, H=None, approx=None, names=names)
    H_full = hessian(loss_fn)(out).reshape(n * c, n * c)
    if loss_hessian is not None:
        closed = loss_hessian(out)
        torch.testing.assert_close(closed, H_full, rtol=1e-7, atol=1e-13, msg=lambda m: f"closed-form loss Hessian: {m}")
        H_full = closed
    # The contract: G = Σ_n J_nᵀ H_n J_n uses the per-sample blocks H_n only.
    same_sample = torch.block_diag(*[torch.ones(c, c, dtype=torch.bool)] * n)
    H = torch.where(same_sample, H_full, torch.zeros_like(H_full))
    a = diag_ggn_approx(ops, ids, values, X, H, dtype, cast) if approx else None
    return Reference(out=out, J=J, H=H, approx=a, names=names, H_full=H_full)


def cross_entropy_hessian(out: Tensor, reduction: str) -> Tensor:
    """Hessian of ``CrossEntropyLoss(reduction)(out, y)`` in ``out``, without cancellation.

    ``H_n = s (diag(p_n) − p_n p_nᵀ)``, ``p_n = softmax(out_n)``, ``s = 1/N`` for
    ``'mean'``, 1 for ``'sum'``; it does not depend on ``y``. ``torch.func.hessian``
    forms the diagonal as ``p_i (1 − p_i)``: where ``p_i ≈ 1`` the difference keeps
    only a few digits (6e-6 relative at ``1 − p_i ≈ 2e-10``). Here it is
    ``p_i Σ_{j≠i} p_j``, every factor accurate to a few ulps.

    Args:
        out: The logits, ``[N, C]``.
        reduction: ``'mean'`` or ``'sum'``.

    Returns:
        ``[N*C, N*C]``, block-diagonal.
    """
    n, c = out.shape
    p = out.softmax(1)
    others = (p[:, None, :] * (1 - torch.eye(c, dtype=p.dtype))).sum(2)  # [N, C]: Σ_{j≠i} p_j
    blocks = -p[:, :, None] * p[:, None, :]
    blocks.diagonal(dim1=1, dim2=2).copy_(p * others)
    return torch.block_diag(*blocks) / (n if reduction == "mean" else 1)


def bce_with_logits_hessian(out: Tensor, reduction: str) -> Tensor:
    """Hessian of ``BCEWithLogitsLoss(reduction)(out, y)`` in ``out``, without cancellation.

    ``diag(σ(z) σ(−z)) s``, ``s = 1/(N C)`` for ``'mean'``, 1 for ``'sum'``: the form
    ``σ (1 − σ)`` loses digits where ``σ ≈ 1``.

    Args:
        out: The logits, ``[N, C]``.
        reduction: ``'mean'`` or ``'sum'``.

    Returns:
        ``[N*C, N*C]``, diagonal.
    """
    d = (torch.sigmoid(out) * torch.sigmoid(-out)).flatten()
    return torch.diag(d) / (out.numel() if reduction == "mean" else 1)


def diag_ggn_approx(ops, ids, values, X, H, dtype, cast) -> Tensor:
    """DiagGGNApprox by its definition, with dense per-op, per-sample Jacobians."""
    xs = [X]
    with torch.no_grad():
        for op in ops:
            local = {k: v.to(dtype) for k, v in op.local_params(values, ids).items()}
            xs.append(op(local, xs[-1]))
    n = X.shape[0]
    d = H.diagonal().reshape(n, -1)  # diag(H_n) per sample
    result = {k: torch.zeros_like(v) for k, v in values.items()}
    for op, x in zip(reversed(ops), reversed(xs[:-1])):
        local = {k: v.to(dtype) for k, v in op.local_params(values, ids).items()}
        own = [(ln, ids[id(p)]) for ln, p in op.module.named_parameters(recurse=False) if id(p) in ids]
        d_in = x.new_zeros(n, x[0].numel())
        for i in range(n):
            x_i = x[i : i + 1]
            if op.multiplier is not None:
                m_i = op.multiplier[i : i + 1].to(dtype)
                f = lambda z: z * m_i  # noqa: E731
            else:
                f = lambda z: op(local, z)  # noqa: E731
            jx = jacrev(f)(x_i).reshape(d.shape[1], -1)  # [out, in]
            d_in[i] = (jx.square() * d[i][:, None]).sum(0)
            for ln, global_name in own:
                def g(q, ln=ln):
                    return op({**local, ln: q}, x_i)

                jp = jacrev(g)(local[ln]).reshape(d.shape[1], -1)  # [out, |θ|]
                result[global_name] = result[global_name] + (jp.square() * d[i][:, None]).sum(0).reshape(
                    result[global_name].shape
                )
        d = d_in
    return torch.cat([result[k].flatten() for k in values]) if values else X.new_zeros(0)


# ------------------------------------------------------- reading the results
def collect(model: nn.Module, n: int, which=("BatchJacobian", "DiagGGN", "DiagGGNApprox", "FullGGN")) -> dict:
    """Concatenate the attributes curvhook wrote, checking their shapes."""
    _, params = trainable(model)
    total = sum(p.numel() for p in params)
    got = {}
    if "DiagGGN" in which:
        for p in params:
            assert p.diag_ggn.shape == p.shape
        got["DiagGGN"] = torch.cat([p.diag_ggn.flatten() for p in params])
    if "DiagGGNApprox" in which:
        for p in params:
            assert p.diag_ggn_approx.shape == p.shape
        got["DiagGGNApprox"] = torch.cat([p.diag_ggn_approx.flatten() for p in params])
    if "FullGGN" in which:
        for p in params:
            assert p.ggn.shape == (p.numel(), total)
        got["FullGGN"] = torch.cat([p.ggn for p in params])
    if "BatchJacobian" in which:
        c = params[0].batch_jacobian.shape[1]
        for p in params:
            assert p.batch_jacobian.shape == (n, c, *p.shape)
        got["BatchJacobian"] = torch.cat([p.batch_jacobian.reshape(n, c, -1) for p in params], 2)
    return got


def compare(
    got: dict, ref: Reference, matrix: Optional[Tensor] = None, rtol: float = 1e-6, atol_factor: float = 1e-10, tag: str = ""
) -> None:
    """Compare collected results with the reference (``tag`` is appended to the report label)."""
    if "BatchJacobian" in got:
        check(got["BatchJacobian"], ref.batch_jacobian, "BatchJacobian" + tag, rtol, atol_factor)
    if "DiagGGN" in got:
        check(got["DiagGGN"], ref.diag_ggn, "DiagGGN" + tag, rtol, atol_factor)
    if "FullGGN" in got:
        check(got["FullGGN"], ref.G, "FullGGN" + tag, rtol, atol_factor)
        if matrix is not None:
            check(matrix, ref.G, "FullGGN.matrix" + tag, rtol, atol_factor)
    if "DiagGGNApprox" in got:
        assert ref.approx is not None
        check(got["DiagGGNApprox"], ref.approx, "DiagGGNApprox" + tag, rtol, atol_factor)
