"""Loss Hessians with respect to the model output, and their square-root factors.

For every supported loss the Hessian ``∂²ℓ/∂f²`` is block-diagonal over samples
(and over positions, for per-position losses). A rule returns

- ``sqrt_hessian``: ``S`` of shape ``[V, N, *out]`` with ``H_n = Σ_v s_vn s_vnᵀ``;
- ``hessian_diag``: ``diag(H_n)``, shape ``[N, *out]``;
- ``gradient``: ``∂L/∂f``, shape ``[N, *out]``, used to check that the scalar being
  backpropagated really is (a multiple of) this loss.

All three include the reduction: ``mean`` divides by the number of terms the
loss averages over, exactly as PyTorch does.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, TypeVar, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from curvhook.records import LossCall
from curvhook.errors import UnsupportedLossError

L = TypeVar("L", bound=type)

_LOSS_RULES: dict[type, "LossRule"] = {}


def register_loss(*loss_types: type) -> Callable[[L], L]:
    """Class decorator: register a :class:`LossRule` for loss module types."""

    def decorate(rule_cls: L) -> L:
        rule = rule_cls()
        for loss_type in loss_types:
            _LOSS_RULES[loss_type] = rule
        return rule_cls

    return decorate


# Unsupported losses that a supported one computes after a change to the model's last step.
_EQUIVALENTS = {
    "NLLLoss": " NLLLoss of log_softmax(logits) is CrossEntropyLoss of the logits: drop the "
               "log_softmax from the model and use nn.CrossEntropyLoss (the same loss; its GGN "
               "counts the softmax as part of the loss, the usual choice).",
    "BCELoss": " BCELoss of sigmoid(logits) is BCEWithLogitsLoss of the logits: drop the sigmoid "
               "from the model and use nn.BCEWithLogitsLoss (the same loss, computed stably; its "
               "GGN counts the sigmoid as part of the loss).",
}


def loss_rule_for(loss: nn.Module) -> "LossRule":
    """Return the rule for a loss module, or raise a clear error."""
    rule = _LOSS_RULES.get(type(loss))
    if rule is None:
        names = ", ".join(sorted(t.__name__ for t in _LOSS_RULES))
        hint = _EQUIVALENTS.get(type(loss).__name__, "")
        raise UnsupportedLossError(
            f"curvhook has no Hessian for the loss {type(loss).__name__}. "
            f"Supported losses: {names}.{hint}"
        )
    if getattr(loss, "reduction", "mean") not in ("mean", "sum"):
        raise UnsupportedLossError(
            f"{type(loss).__name__}(reduction={loss.reduction!r}) is not supported: the "
            "curvature is defined for the scalar loss. Use reduction='mean' or 'sum'."
        )
    return rule


def identity_factor(out: Tensor) -> Tensor:
    """The columns ``e_1 … e_C`` of the identity, ``[C, N, *out]`` (an expanded view)."""
    n, c = out.shape[0], out[0].numel()
    eye = torch.eye(c, dtype=out.dtype, device=out.device)
    return eye[:, None, :].expand(c, n, c).reshape(c, *out.shape)


def diagonal_factor(h: Tensor) -> Tensor:
    """Square-root factor of a diagonal Hessian ``diag(h_n)``: ``[C, N, *out]``."""
    return identity_factor(h) * h.clamp(min=0).sqrt().unsqueeze(0)


def _softmax_factor(p: Tensor) -> Tensor:
    """Orthonormal basis ``Q`` of ``√p``'s complement: ``I - √p √pᵀ = Q Qᵀ``, ``[..., C, C-1]``.

    ``diag(p) - p pᵀ = D (I - q qᵀ) D`` with ``q = √p`` (a unit vector) and
    ``D = diag(√p)``, so ``D Q`` is a square-root factor with ``C - 1`` columns
    instead of ``C``: the Hessian has rank ``C - 1`` (``H 1 = 0``). The Householder
    reflection ``R = I - 2 w wᵀ / wᵀw`` with ``w = q + e_m`` maps ``q`` to ``-e_m``;
    its columns ``k ≠ m`` span ``q⊥``. They are ``Q[c, k] = δ_ck - w_c q_k / (1 + q_m)``.

    The pivot ``m`` is the most probable class, so no entry cancels, even when one
    class has ``p ≈ 1``: ``wᵀw = 2 (1 + q_m) ≥ 2``; on the diagonal, ``q_k² = p_k ≤ 1/2``
    for ``k ≠ m``, so ``1 - q_k² / (1 + q_m) ≥ 1/2``; row ``m`` is ``-q_k``; the other
    entries are products. (A fixed pivot on the last class gives ``1 - q_k² / (1 + q_C)``
    with ``q_k ≈ 1``: ``0`` instead of ``p_C``.)

    Args:
        p: Probabilities ``[..., C]`` summing to one over the last axis.

    Returns:
        ``Q`` with ``Q[..., c, k]`` the ``c``-th entry of basis vector ``k``.
    """
    c = p.shape[-1]
    q = p.sqrt()
    m = p.argmax(-1, keepdim=True)  # [..., 1]
    k = torch.arange(c - 1, device=p.device)
    cols = k + (k >= m).to(k.dtype)  # [..., C-1]: every class but m
    q_m = q.gather(-1, m)  # [..., 1]
    w = q.scatter_add(-1, m, torch.ones_like(q_m))  # q + e_m
    outer = (w / (1 + q_m)).unsqueeze(-1) * q.gather(-1, cols).unsqueeze(-2)  # [..., C, C-1]
    eye = (torch.arange(c, device=p.device).unsqueeze(-1) == cols.unsqueeze(-2)).to(q.dtype)
    return eye - outer


def _one_minus(p: Tensor, dim: int) -> Tensor:
    """``1 - p`` for probabilities ``p`` summing to one along ``dim``, without cancellation.

    For the most probable class, ``1 - p_m`` is the sum of the other probabilities
    (a sum of non-negative terms; ``1 - p_m`` cancels when ``p_m ≈ 1``: ``0`` instead
    of ``1.8e-35`` at logits ``±40``). For the others, ``p_c ≤ 1/2`` and ``1 - p_c ≥ 1/2``.

    Args:
        p: Probabilities, any shape, summing to one along ``dim``.
        dim: The class axis.

    Returns:
        ``1 - p``, the shape of ``p``.
    """
    m = p.argmax(dim, keepdim=True)
    others = p.scatter(dim, m, 0).sum(dim, keepdim=True)  # Σ_{c ≠ m} p_c
    return torch.rsub(p, 1).scatter_(dim, m, others)


def _with_alpha(p: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(p, a, α)`` with ``α = Σ_c a_c``, ``[N, 1, *d]``."""
    return p, a, a.sum(1, keepdim=True)


class LossRule:
    """Hessian rules of one loss family."""

    def sqrt_hessian(self, call: LossCall) -> Tensor:
        """``S`` with ``H_n = Σ_v s_vn s_vnᵀ``, shape ``[V, N, *out]``."""
        raise NotImplementedError

    def hessian_diag(self, call: LossCall) -> Tensor:
        """``diag(H_n)``, shape ``[N, *out]``."""
        raise NotImplementedError

    def gradient(self, call: LossCall) -> Tensor:
        """``∂L/∂f``, shape ``[N, *out]``."""
        raise NotImplementedError

    def sample_sqrt_hessian(self, call: LossCall, mc_samples: int, generator: Optional[torch.Generator]) -> Tensor:
        """``M`` sampled columns ``s_m``, ``[M, N, *out]``, each with ``E[s_mn s_mnᵀ] = H_n``.

        Every column is the gradient of the loss at targets drawn from the
        model's own predictive distribution (zero mean), scaled so that its
        second moment is the Hessian, reduction included. The ``M`` columns are
        independent; positions and samples are drawn independently too.

        Args:
            call: The loss call.
            mc_samples: ``M``.
            generator: The random number generator (``None``: torch's default one).
        """
        raise NotImplementedError

    def residual(self, call: LossCall, grad: Tensor, scale: float) -> Tensor:
        """``grad - scale · ∂L/∂f``, a new tensor of shape ``[N, *out]``: zero when ``grad``
        is the gradient of ``scale · L``."""
        gradient = self.gradient(call)
        return grad - (gradient if scale == 1.0 else scale * gradient)  # no multiplication by one


def _require_batch(call: LossCall, min_dim: int) -> None:
    if call.input.dim() < min_dim:
        raise UnsupportedLossError(
            f"{type(call.module).__name__} got an input of shape {tuple(call.input.shape)}; "
            f"curvhook needs a batch axis first (at least {min_dim} dimensions)."
        )


def _any_ignored(y: Tensor, ignore_index: int) -> bool:
    """Whether some class-index target equals ``ignore_index``.

    ``cross_entropy`` accepts no other negative target, so for the usual negative
    ``ignore_index`` the minimum tells, in one operation fewer.
    """
    if ignore_index < 0 and y.numel():
        return int(y.min()) < 0
    return bool((y == ignore_index).any())


@register_loss(nn.CrossEntropyLoss)
class CrossEntropyRule(LossRule):
    """``CrossEntropyLoss`` on ``[N, C]`` or ``[N, C, d1, ...]`` logits.

    With ``p = softmax(f)``, every supported target form gives a per-position loss
    ``-Σ_c a_c log p_c`` with non-negative coefficients ``a`` (class weight, label
    smoothing, ignored positions and the mean's denominator folded in). Its
    gradient is ``α p - a`` and its Hessian ``α (diag(p) - p pᵀ)`` with ``α = Σ_c a_c``.
    Its square-root factor has ``C - 1`` columns per position (see :func:`_softmax_factor`).
    """

    def _coefficients(self, call: LossCall) -> tuple[Tensor, Optional[Tensor], Union[Tensor, float]]:
        """Return ``p`` and ``a``, both ``[N, C, *d]``, and ``α = Σ_c a_c``, ``[N, 1, *d]``.

        In the usual case (class indices, none ignored, no weights, no label
        smoothing) ``a`` is ``α`` times the one-hot targets and the same ``α`` for
        every position: ``a`` is then ``None`` (``call.target`` gives it) and ``α``
        a number. Cached per backward pass: the loss check, the Hessian diagonal
        and its factor all start from them.
        """
        if call.scratch.coefficients is None:
            call.scratch.coefficients = self._compute_coefficients(call)
        return call.scratch.coefficients

    def _compute_coefficients(self, call: LossCall) -> tuple[Tensor, Tensor, Tensor]:
        _require_batch(call, 2)
        loss, f, y = call.module, call.input, call.target
        p = f.softmax(1)
        c = f.shape[1]
        eps = loss.label_smoothing
        if y is not None and loss.weight is None and eps == 0 and not y.dtype.is_floating_point:
            if not _any_ignored(y, loss.ignore_index):
                # the usual case: a = α one_hot(y) with α = 1 / count, kept implicit
                return p, None, 1.0 / y.numel() if loss.reduction == "mean" else 1.0
            # ignored positions: a = one_hot(y) on valid positions / their count
            valid = y != loss.ignore_index
            a = torch.zeros_like(p).scatter_(1, torch.where(valid, y, 0).unsqueeze(1), valid.unsqueeze(1).to(p.dtype))
            return _with_alpha(p, a / valid.sum() if loss.reduction == "mean" else a)
        w = loss.weight if loss.weight is not None else f.new_ones(c)
        w = w.to(f.dtype).reshape(1, c, *([1] * (f.dim() - 2)))
        if (w < 0).any():
            raise UnsupportedLossError("CrossEntropyLoss with negative class weights has an indefinite Hessian.")
        if y is None:  # a named loss: no target, so no weights that depend on it
            if loss.weight is not None:
                raise UnsupportedLossError(
                    "A named CrossEntropyLoss with class weights needs the targets: call the "
                    "loss module on the model output inside the block instead of naming it."
                )
            a = p.new_full(p.shape, 1.0 / c)  # any a with Σ_c a_c = 1 gives the Hessian
            denom = f.numel() / c if loss.reduction == "mean" else 1.0
            return _with_alpha(p, a / denom)
        if y.dtype.is_floating_point:  # class probabilities
            t = y.to(f.dtype) * (1 - eps) + eps / c
            a = w * t
            denom = f.numel() / c if loss.reduction == "mean" else 1.0
            return _with_alpha(p, a / denom)
        valid = y != loss.ignore_index
        onehot = F.one_hot(torch.where(valid, y, 0), c).movedim(-1, 1).to(f.dtype)
        a = (1 - eps) * w * onehot + (eps / c) * w
        a = a * valid.unsqueeze(1).to(f.dtype)
        if loss.reduction == "mean":
            denom = (w * onehot).sum(1)[valid].sum()
            a = a / denom
        return _with_alpha(p, a)

    def sqrt_hessian(self, call: LossCall) -> Tensor:
        p, _, alpha = self._coefficients(call)
        n, c = p.shape[:2]
        # rearrange "n c ... -> n (...) c" (for [N, C] a view: einops' pattern costs more than the op)
        p3 = p.unsqueeze(1) if p.dim() == 2 else rearrange(p, "n c ... -> n (...) c")  # [N, D, C]
        if isinstance(alpha, Tensor):
            alpha = rearrange(alpha, "n 1 ... -> n (...) 1")  # [N, D, 1]
        core = _softmax_factor(p3) * (alpha * p3).sqrt().unsqueeze(-1)  # [N, D, C, C-1]
        positions = p3.shape[1]
        if positions == 1:
            s = core[:, 0].permute(2, 0, 1)  # "n 1 c k -> k n c"
        else:  # one block of C - 1 columns per position: V = (C - 1) · D
            eye_d = torch.eye(positions, dtype=p.dtype, device=p.device)
            s = torch.einsum("ndck,ed->kencd", core, eye_d).reshape(-1, n, c, positions)
        return s.reshape(s.shape[0], *p.shape)

    def hessian_diag(self, call: LossCall) -> Tensor:
        p, _, alpha = self._coefficients(call)
        return _one_minus(p, 1).mul_(p).mul_(alpha)  # α p (1 - p)

    def sample_sqrt_hessian(self, call: LossCall, mc_samples: int, generator: Optional[torch.Generator]) -> Tensor:
        """``s = √α (p - e_ŷ)`` with ``ŷ ~ Categorical(p)`` at every position: ``E[s sᵀ] = α (diag(p) - p pᵀ)``.

        ``√α (p - e_ŷ)`` is ``√α`` times the gradient of ``-log p_ŷ``. The labels are
        drawn as ``torch.multinomial(p, 1)`` draws them: ``M = 1`` calls it on the rows
        ``[(N ...), C]`` (curvlinops' draws); ``M > 1`` runs its exponential race
        (``argmax p / q``, ``q ~ Exp(1)``) for all ``M`` at once, which on torch 2.13
        draws what ``M`` such calls draw (torch 2.6 draws other numbers, from the same
        distribution).
        """
        p, _, alpha = self._coefficients(call)
        rows = rearrange(p, "n c ... -> (n ...) c")
        if mc_samples == 1:
            labels = torch.multinomial(rows, 1, generator=generator).T  # [1, (N ...)]
        else:  # the exponential race torch.multinomial runs for one sample, M times at once
            q = torch.empty((mc_samples, *rows.shape), dtype=p.dtype, device=p.device)
            labels = (rows / q.exponential_(generator=generator)).argmax(-1)  # [M, (N ...)]
        onehot = F.one_hot(labels, p.shape[1]).to(p.dtype)  # [M, (N ...), C]
        onehot = rearrange(onehot, "m (n d) c -> m n c d", n=p.shape[0]).reshape(mc_samples, *p.shape)
        s = p.unsqueeze(0) - onehot
        return s.mul_(alpha.sqrt() if isinstance(alpha, Tensor) else math.sqrt(alpha))

    def gradient(self, call: LossCall) -> Tensor:
        p, a, alpha = self._coefficients(call)
        if a is None:  # α p - α one_hot(y)
            return torch.mul(p, alpha).scatter_(1, call.target.unsqueeze(1), -alpha, reduce="add")
        return (alpha * p).sub_(a)

    def residual(self, call: LossCall, grad: Tensor, scale: float) -> Tensor:
        p, a, alpha = self._coefficients(call)
        if a is None:  # grad - c α p + c α one_hot(y): two operations
            c = scale * alpha
            return torch.sub(grad, p, alpha=c).scatter_(1, call.target.unsqueeze(1), c, reduce="add")
        return super().residual(call, grad, scale)


@register_loss(nn.MSELoss)
class MSERule(LossRule):
    """``MSELoss``: ``L = s Σ (f - y)²`` with ``s = 1/numel`` (mean) or 1 (sum); ``H = 2s I``."""

    @staticmethod
    def _scale(call: LossCall) -> float:
        _require_batch(call, 1)
        return 2.0 / call.input.numel() if call.module.reduction == "mean" else 2.0

    def sqrt_hessian(self, call: LossCall) -> Tensor:
        return identity_factor(call.input) * math.sqrt(self._scale(call))

    def hessian_diag(self, call: LossCall) -> Tensor:
        return torch.full_like(call.input, self._scale(call))

    def sample_sqrt_hessian(self, call: LossCall, mc_samples: int, generator: Optional[torch.Generator]) -> Tensor:
        """``s = √(2s) ε`` with ``ε ~ N(0, I)``: the gradient at ``ŷ = f + ε/√2``, ``E[s sᵀ] = 2s I``.

        ``ε`` is ``torch.randn`` of shape ``[M, N, *out]`` in one call (for ``M = 1``
        the numbers ``torch.randn(f.shape, generator=g)`` gives).
        """
        f = call.input
        eps = torch.randn((mc_samples, *f.shape), generator=generator, dtype=f.dtype, device=f.device)
        return eps.mul_(math.sqrt(self._scale(call)))

    def gradient(self, call: LossCall) -> Tensor:
        return self._scale(call) * (call.input - call.target)


@register_loss(nn.BCEWithLogitsLoss)
class BCEWithLogitsRule(LossRule):
    """``BCEWithLogitsLoss`` on any shape, multi-label included.

    Per entry ``l = -w [r y log σ(f) + (1 - y) log(1 - σ(f))]`` with ``r`` the
    ``pos_weight``; ``∂l/∂f = w ((r y + 1 - y) σ - r y)`` and
    ``∂²l/∂f² = w (r y + 1 - y) σ (1 - σ)``. The Hessian is diagonal; it is computed
    as ``σ(f) σ(-f)``, which keeps its relative precision where ``σ(f) ≈ 1``
    (``1 - σ(f)`` gives ``0`` instead of ``4e-18`` at ``f = 40``).
    """

    def _parts(self, call: LossCall) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Return ``σ(f)``, the per-entry factor ``s w (r y + 1 - y)`` and ``s w r y`` (cached)."""
        if call.scratch.parts is None:
            call.scratch.parts = self._compute_parts(call)
        return call.scratch.parts

    def _compute_parts(self, call: LossCall) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        _require_batch(call, 1)
        loss, f, y = call.module, call.input, call.target
        s = 1.0 / f.numel() if loss.reduction == "mean" else 1.0
        w = loss.weight.to(f.dtype) if loss.weight is not None else f.new_ones(())
        if loss.pos_weight is None:
            coef, pos = s * w * f.new_ones(()), (None if y is None else s * w * y)
        elif y is None:
            raise UnsupportedLossError(
                "A named BCEWithLogitsLoss with pos_weight needs the targets: call the loss "
                "module on the model output inside the block instead of naming it."
            )
        else:
            ry = loss.pos_weight.to(f.dtype) * y
            coef, pos = s * w * (ry + 1 - y), s * w * ry
        coef = coef.expand_as(f)
        if (coef < 0).any():
            raise UnsupportedLossError(
                "BCEWithLogitsLoss with these weights or targets has a negative second "
                "derivative; curvhook needs targets in [0, 1] and non-negative weights."
            )
        return torch.sigmoid(f), coef, pos

    def sqrt_hessian(self, call: LossCall) -> Tensor:
        return diagonal_factor(self.hessian_diag(call))

    def hessian_diag(self, call: LossCall) -> Tensor:
        sig, coef, _ = self._parts(call)
        return coef * sig * torch.sigmoid(-call.input)  # σ(f) (1 - σ(f)) = σ(f) σ(-f)

    def gradient(self, call: LossCall) -> Tensor:
        sig, coef, pos = self._parts(call)
        return coef * sig - pos

    def sample_sqrt_hessian(self, call: LossCall, mc_samples: int, generator: Optional[torch.Generator]) -> Tensor:
        """``s = √coef (σ(f) - ŷ)`` with ``ŷ ~ Bernoulli(σ(f))`` per entry: ``E[s²] = coef σ(f) σ(-f)``.

        ``coef = s w (r y + 1 - y)`` is the entry's Hessian factor (weights, ``pos_weight``
        and reduction). The draws are ``σ(f).bernoulli(generator=g)`` on ``[M, N, *out]``
        (for ``M = 1`` the numbers a single call on ``[N, *out]`` gives).
        """
        sig, coef, _ = self._parts(call)
        sig_m = sig.expand(mc_samples, *sig.shape)
        return (sig_m - sig_m.bernoulli(generator=generator)).mul_(coef.sqrt())


def supported_losses() -> list[type]:
    """All loss module types with a registered rule."""
    return list(_LOSS_RULES)
