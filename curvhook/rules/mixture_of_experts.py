"""Sparse mixture-of-experts blocks of Hugging Face transformers (Mixtral, Qwen3-MoE, OLMoE, DeepSeek-V3, …).

A ``…SparseMoeBlock`` made of a router ``gate`` (weight ``W_r`` ``[E, H]``, ``top_k``) and
experts ``experts`` (``gate_up_proj`` ``[E, 2I, H]``, ``down_proj`` ``[E, H, I]``, ``act_fn``)
maps every token row ``x`` (``[H]``) on its own::

    z = W_r x,  p = softmax(z),  (v, e) = top-k of p,  w = v / s with s = Σ_j v_j
    (Mixtral, and the routers with ``norm_topk_prob``; else w = v)
    [g_j; u_j] = G_{e_j} x,  h_j = φ(g_j) ∘ u_j,  y_j = D_{e_j} h_j
    out = Σ_j w_j y_j

The choice of experts ``e`` is piecewise constant (its derivative is zero wherever it is
defined), so for a column ``m`` at ``out``::

    m_{y_j} = w_j m,   m_{w_j} = y_j · m
    m_v = (m_w − (m_w · w)) / s        (normalized; else m_v = m_w)
    m_p = m_v at the chosen experts,   m_z = p ∘ (m_p − p · m_p)
    m_{h_j} = D_{e_j}ᵀ m_{y_j},   m_{[g; u]_j} = [m_h ∘ u ∘ φ'(g); m_h ∘ φ(g)]
    J_xᵀ m = W_rᵀ m_z + Σ_j G_{e_j}ᵀ m_{[g; u]_j}

and per sample the parameters get ``Σ_t m_z ⊗ x`` (router), ``Σ m_{[g; u]_j} ⊗ x`` and
``Σ m_{y_j} ⊗ h_j`` (expert ``e_j``'s slices) over the sample's tokens.

Qwen2-MoE's form (Qwen3-Next, Qwen3.5-MoE) adds a shared expert and its gate (children
``shared_expert``, an MLP ``D_s (φ(G_s x) ∘ U_s x)`` of bias-free linear maps, and
``shared_expert_gate``, a bias-free ``Linear(H, 1)`` ``q``): ``out += σ(q·x) S(x)``, with
``m_S = σ m``, ``m_{q·x} = σ(1 − σ) (S · m)`` and the MLP's products as the experts'.
Granite-MoE's router (a child ``router``) takes the softmax of the top-k logits,
``w = softmax(z_e)``: the same weights as the normalized form above, so the same
products; DiagGGNApprox follows its own operations (which comes first, ``softmax`` or
``topk``, is watched in the router's forward). GPT-OSS's block (``GptOssMLP``) has
such a router with a bias and experts of another layout: ``gate_up_proj``
``[E, H, 2I]`` with gate and up interleaved, ``down_proj`` ``[E, I, H]``, a bias for
each, and ``h = (u_c + 1) ∘ g_c σ(α g_c)`` with ``g_c = min(g, limit)``,
``u_c = clamp(u, ±limit)``; the products above with ``∂h/∂g`` and ``∂h/∂u`` of that map,
and the biases' per-sample sums. DeepSeek-V3's form (``…MoE``: GLM-4.5's MoE, Dots1, …) adds such an MLP ungated
(``shared_experts``) and routes by sigmoid scores ``p = σ(z)``: the experts are chosen
from ``p`` plus a correction bias within the best groups (the router's own forward
makes the choice), ``w = c v / (s + 1e-20)`` with its ``routed_scaling_factor`` ``c``,
so ``m_z = m_p ∘ p (1 − p)``.

DiagGGNApprox counts the block as the operations of transformers' eager forward (router
linear map, softmax, top-k selection, sum and division, the gathered rows, the experts'
linear maps, activation and product, the weighting, the scatter-add), as it counts
attention as its operations; ``DiagGGNApprox(split_attention=False)`` counts it as one
operation. Through each, ``Σ_o d_o J_oi²`` is the backward pass above with the diagonal
``d``, squared factors and no cross terms: ``d_y = w² d``, ``d_w = Σ d y²``,
``d_h = (D∘D)ᵀ d_y``, ``d_[g; u] = [d_h (u φ'(g))²; d_h φ(g)²]``,
``d_x = (G∘G)ᵀ d_[g; u] + (W_r∘W_r)ᵀ d_z``, ``d_v = (d_w + Σ_j d_w w²) / s²`` and
softmax's ``d_z = p² ((1 − p)² d_p + Σ_{o≠i} d_o p_o²)`` (sigmoid's: ``(p (1 − p))² d_p``;
Granite's: the softmax's over the k chosen logits with ``d_w``, zero at the others;
GPT-OSS's GLU uses ``g_c`` twice, in the product and in ``σ(α g_c)``, so its split
form sums the two squared paths: ``d_g = (u_c + 1)² (σ² + α² g_c² (σ (1 − σ))²) d_h``
where the clamp passes ``g``).

The block's forward is recomputed from its input and parameters (the choice of experts
from the router's own forward) and compared with its recorded output at every call: a
block that computes anything else (jitter noise, another router, biases) goes to the
exact fallback. The experts run in a loop over experts, not
over tokens or samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from curvhook._torch_internals import enable_torch_function, torch_function_mode_stack_empty
from curvhook.records import Operation
from curvhook.rules.base import LayerRule
from curvhook.rules.registry import fallback_rule, register_rule_by_name

_GATE_UP, _DOWN = "experts.gate_up_proj", "experts.down_proj"
_GATE_UP_BIAS, _DOWN_BIAS = "experts.gate_up_proj_bias", "experts.down_proj_bias"


@dataclass
class _Expert:
    """The token rows routed to one expert ``e`` and what its forward computed for them."""

    e: int
    rows: Tensor  # [P] token rows
    slots: Tensor  # [P] their top-k position
    dg: Tensor  # [P, I] ∂h/∂g (u φ'(g))
    du: Tensor  # [P, I] ∂h/∂u (φ(g))
    dg2: Tensor  # [P, I] Σ over the operations from g to h of their squared slopes (dg² for one activation)
    du2: Tensor  # [P, I] the same from u (du²)
    h: Tensor  # [P, I] φ(g) ∘ u
    y: Tensor  # [P, H] the expert's output


@dataclass
class _Shared:
    """The shared expert's forward for every token row (Qwen2-MoE's form)."""

    sigma: Optional[Tensor]  # [R, 1] σ(q·x), or None (an ungated shared expert)
    g: Tensor  # [R, Is]
    u: Tensor  # [R, Is]
    act: Tensor  # [R, Is] φ(g)
    slope: Tensor  # [R, Is] φ'(g)
    h: Tensor  # [R, Is]
    y: Tensor  # [R, H] S(x)


@dataclass
class _Routing:
    """One call's forward quantities (``R = N·T`` token rows), kept for its backward pass."""

    x: Tensor  # [R, H]
    p: Tensor  # [R, E] softmax (or sigmoid) of the router logits
    index: Tensor  # [R, k] the chosen experts
    v: Tensor  # [R, k] their probabilities
    den: Optional[Tensor]  # [R, 1] Σ v (+ 1e-20 for DeepSeek-V3's router) where normalized, else None
    scale: float  # DeepSeek-V3's routed_scaling_factor (1 for the others)
    topk_first: bool  # the router picks the top-k logits, then takes their softmax (Granite-MoE)
    w: Tensor  # [R, k] the routing weights, scale · v / den
    experts: list[_Expert]
    shared: Optional[_Shared]
    samples: int
    tokens: int
    parts: _Parts  # the block's children, as found when the call was recomputed


@dataclass
class _Parts:
    """The children of a block of a form this module serves."""

    gate: nn.Module
    experts: nn.Module
    router: str  # its parameter's name, "gate.weight" or "router.weight"
    router_bias: Optional[str]  # "router.bias" (GPT-OSS), or None
    gpt_oss: bool  # GPT-OSS's experts: [E, H, 2I] interleaved with a bias, [E, I, H] with a bias, a clamped GLU
    sigmoid: bool  # DeepSeek-V3's router (sigmoid scores, a correction bias for the choice, a scale)
    shared: Optional[nn.Module]  # the shared expert's MLP, or None
    shared_gate: Optional[nn.Module]  # its sigmoid gate (Qwen2-MoE), or None (DeepSeek-V3: ungated)
    names: dict  # the shared expert's parameters, by role: "gate", "up", "down", "q"


def _bias_free_linear(module: Optional[nn.Module], shape: tuple) -> bool:
    return (
        isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward and module.bias is None
        and tuple(module.weight.shape) == shape
    )


def _mlp_ok(mlp: Optional[nn.Module], hidden: int) -> bool:
    """A shared expert ``down(φ(gate(x)) ∘ up(x))`` of bias-free linear maps."""
    if not isinstance(mlp, nn.Module) or set(dict(mlp.named_children())) != {"gate_proj", "up_proj", "down_proj", "act_fn"}:
        return False
    inter = getattr(mlp.gate_proj, "out_features", None)
    return (
        isinstance(inter, int) and _bias_free_linear(mlp.gate_proj, (inter, hidden))
        and _bias_free_linear(mlp.up_proj, (inter, hidden)) and _bias_free_linear(mlp.down_proj, (hidden, inter))
    )


def _sigmoid_router(gate: nn.Module) -> bool:
    """DeepSeek-V3's ``TopkRouter``: a buffer ``e_score_correction_bias`` and a float scale."""
    bias = getattr(gate, "e_score_correction_bias", None)
    return (
        isinstance(bias, Tensor) and not isinstance(bias, nn.Parameter)
        and isinstance(getattr(gate, "routed_scaling_factor", None), (int, float))
        and isinstance(getattr(gate, "norm_topk_prob", None), bool)
    )


def _experts_of(module: nn.Module) -> Optional[_Parts]:
    """The parts of a block of a form in the module docstring, else ``None``."""
    children = dict(module.named_children())
    # the router: ``gate`` (Mixtral, Qwen, DeepSeek) or ``router`` (Granite-MoE)
    named = [name for name in ("gate", "router") if name in children]
    if len(named) != 1:
        return None
    gate, experts = children[named[0]], children.get("experts")
    extra = set(children) - {named[0], "experts"}
    if extra not in (set(), {"shared_expert", "shared_expert_gate"}, {"shared_experts"}) or experts is None:
        return None
    w, gu, down = getattr(gate, "weight", None), getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not all(isinstance(t, Tensor) for t in (w, gu, down)) or w.dim() != 2 or gu.dim() != 3 or down.dim() != 3:
        return None
    n_experts, hidden = w.shape
    if _gpt_oss_experts(experts, n_experts, hidden):  # GPT-OSS: its own layout, biases; no shared expert
        names = {f"{named[0]}.weight", f"{named[0]}.bias", _GATE_UP, _DOWN, _GATE_UP_BIAS, _DOWN_BIAS}
        bias = getattr(gate, "bias", None)
        if (extra or not isinstance(getattr(gate, "top_k", None), int) or not isinstance(bias, Tensor)
                or tuple(bias.shape) != (n_experts,) or {n for n, _ in module.named_parameters()} != names):
            return None
        return _Parts(gate, experts, f"{named[0]}.weight", f"{named[0]}.bias", True, False, None, None, {})
    prefix = next(iter(extra - {"shared_expert_gate"}), None)
    names = {}
    if prefix is not None:
        names = {role: f"{prefix}.{role}_proj.weight" for role in ("gate", "up", "down")}
        if "shared_expert_gate" in extra:
            names["q"] = "shared_expert_gate.weight"
    shared_gate = children.get("shared_expert_gate")
    ok = (
        gu.shape[0] == n_experts and gu.shape[2] == hidden and gu.shape[1] % 2 == 0
        and tuple(down.shape) == (n_experts, hidden, gu.shape[1] // 2)
        and isinstance(getattr(gate, "top_k", None), int) and isinstance(getattr(experts, "act_fn", None), nn.Module)
        and {n for n, _ in module.named_parameters()} == {f"{named[0]}.weight", _GATE_UP, _DOWN, *names.values()}
        and (prefix is None or _mlp_ok(children[prefix], hidden))
        and (shared_gate is None or _bias_free_linear(shared_gate, (1, hidden)))
        and not getattr(experts, "has_bias", False) and getattr(experts, "has_gate", True)
        and not getattr(experts, "is_transposed", False) and getattr(experts, "is_concatenated", True)
        and not getattr(experts, "has_post_expert_norm", False)
    )
    if not ok:
        return None
    return _Parts(
        gate, experts, f"{named[0]}.weight", None, False, _sigmoid_router(gate),
        None if prefix is None else children[prefix], shared_gate, names,
    )


def _gpt_oss_experts(experts: nn.Module, n_experts: int, hidden: int) -> bool:
    """GPT-OSS's ``GptOssExperts``: ``gate_up_proj [E, H, 2I]`` (gate and up interleaved) and
    ``down_proj [E, I, H]``, each with a bias, and ``(clamp(u) + 1) ∘ g_c σ(α g_c)`` with
    ``g_c = min(g, limit)`` between them."""
    gu, down = experts.gate_up_proj, experts.down_proj
    gub, db = getattr(experts, "gate_up_proj_bias", None), getattr(experts, "down_proj_bias", None)
    if not (isinstance(gub, Tensor) and isinstance(db, Tensor) and callable(getattr(experts, "_apply_gate", None))):
        return False
    if not all(isinstance(getattr(experts, a, None), (int, float)) for a in ("alpha", "limit")):
        return False
    inter2 = gu.shape[2]
    return (
        gu.shape[:2] == (n_experts, hidden) and inter2 % 2 == 0
        and tuple(down.shape) == (n_experts, inter2 // 2, hidden)
        and tuple(gub.shape) == (n_experts, inter2) and tuple(db.shape) == (n_experts, hidden)
    )


def _routing(call: Operation) -> Optional[_Routing]:
    """The block's forward, recomputed and checked against its recorded output (cached per
    backward pass); ``None`` where it does not match (the fallback serves the call)."""
    cached = call.scratch.moe
    if cached is not None:
        return cached or None
    routing = None
    try:
        routing = _recompute(call)
    except Exception:  # noqa: BLE001 - a block the recomputation does not fit: the fallback serves it
        routing = None
    call.scratch.moe = routing if routing is not None else False
    return routing


def _recompute(call: Operation) -> Optional[_Routing]:
    module, x3 = call.module, call.input.detach()
    parts = _experts_of(module)
    if x3.dim() != 3 or (module.training and getattr(module, "jitter_noise", 0) > 0):
        return None
    n, t, hidden = x3.shape
    x = x3.reshape(n * t, hidden)
    gate, experts = parts.gate, parts.experts
    # the choice as the router makes it (its own forward: a float32 softmax, DeepSeek-V3's
    # groups and correction bias), the weights in the call's dtype
    with torch.no_grad():
        chosen, order = _run_router(gate, x)
    if not (isinstance(chosen, tuple) and len(chosen) == 3 and isinstance(chosen[2], Tensor)):
        return None
    # which comes first in the router's forward: the softmax over every logit (Mixtral, Qwen,
    # OLMoE: top-k of the probabilities, then renormalized or not) or the top-k logits (Granite:
    # the softmax of those): the same weights where normalized, but other operations for
    # DiagGGNApprox's split form. A ``router`` of neither order (or not watched) goes to the
    # fallback; a ``gate`` keeps the softmax-first form of the routers served before.
    topk_first = not parts.sigmoid and order == ("topk", "softmax")
    if not (parts.sigmoid or topk_first or order == ("softmax", "topk") or parts.router == "gate.weight"):
        return None
    index = chosen[2].long()
    z = x @ gate.weight.detach().T
    if parts.router_bias is not None:
        z = z + gate.bias.detach()
    p = torch.sigmoid(z) if parts.sigmoid else torch.softmax(z, dim=-1)
    v = p.gather(1, index)
    found = []
    for e in index.unique().tolist():
        rows, slots = torch.nonzero(index == e, as_tuple=True)
        xe = x[rows]
        g_up, b_gu, d_map, b_d = _expert_maps(parts, e)
        pre = xe @ g_up.T if b_gu is None else xe @ g_up.T + b_gu
        g, u = pre.chunk(2, dim=-1)
        h, dg, du, dg2, du2 = _gpt_oss_glu(experts, g, u) if parts.gpt_oss else _glu(experts.act_fn, g, u)
        y = h @ d_map.T if b_d is None else h @ d_map.T + b_d
        found.append(_Expert(e, rows, slots, dg, du, dg2, du2, h, y))
    shared = None
    if parts.shared is not None:
        mlp = parts.shared
        sigma = None if parts.shared_gate is None else torch.sigmoid(x @ parts.shared_gate.weight.detach().T)  # [R, 1]
        g, u = x @ mlp.gate_proj.weight.detach().T, x @ mlp.up_proj.weight.detach().T
        act, slope = _activation(mlp.act_fn, g)
        h = act * u
        y = h @ mlp.down_proj.weight.detach().T
        shared = _Shared(sigma, g, u, act, slope, h, y)
    recorded = call.output.detach().reshape(n * t, hidden).to(x.dtype)
    tol = (1e-5 if x.dtype == torch.float64 else 1e-4) * float(recorded.abs().max()) + 1e-30
    scale = float(getattr(gate, "routed_scaling_factor", 1.0))
    normalized = True if topk_first else getattr(gate, "norm_topk_prob", None)
    # the routing weights c v / den of the router's form: a softmax router without
    # ``norm_topk_prob`` normalizes (Mixtral) or not (DeepSeek-V2): the form that gives the
    # recorded output
    matches = []
    for normalize in (True, False) if normalized is None else (bool(normalized),):
        den = (v.sum(-1, keepdim=True) + (1e-20 if parts.sigmoid else 0.0)) if normalize else None
        w = scale * (v if den is None else v / den)
        out = torch.zeros_like(x)
        for ex in found:
            out.index_add_(0, ex.rows, ex.y * w[ex.rows, ex.slots, None])
        if shared is not None:
            out = out + (shared.y if shared.sigma is None else shared.sigma * shared.y)
        if torch.allclose(out, recorded, rtol=0.0, atol=tol):
            matches.append(_Routing(x, p, index, v, den, scale, topk_first, w, found, shared, n, t, parts))
    if len(matches) == 2 and index.shape[1] < p.shape[1]:
        # both forms reproduce the output (the chosen probabilities sum to one within the
        # tolerance), but their derivatives differ: not proven, the fallback serves the call.
        # (Every expert chosen: Σ v = 1 always, the same map.)
        return None
    return matches[0] if matches else None


class _OrderWatch(TorchFunctionMode):
    """Notes whether ``softmax`` or ``topk`` is called first (and the other after it)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("softmax", "topk") and name not in self.names:
            self.names.append(name)
        return func(*args, **(kwargs or {}))


def _run_router(gate: nn.Module, x: Tensor) -> tuple[object, Optional[tuple[str, ...]]]:
    """The router's own forward on ``x``, and the order of its first ``softmax`` and ``topk``
    (``None`` where it cannot be watched: another torch-function mode is active)."""
    if not torch_function_mode_stack_empty():
        return gate.forward(x), None
    watch = _OrderWatch()
    with enable_torch_function(), watch:  # (the backward walk runs with torch functions disabled)
        chosen = gate.forward(x)
    return chosen, tuple(watch.names)


def _expert_maps(parts: _Parts, e: int) -> tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]]:
    """Expert ``e`` as ``[g; u] = G x + b_G``, ``y = D h + b_D``: ``(G [2I, H], b_G [2I] or None,
    D [H, I], b_D [H] or None)``, the rows of ``G`` and ``b_G`` gate first, then up."""
    ex = parts.experts
    if not parts.gpt_oss:
        return ex.gate_up_proj.detach()[e], None, ex.down_proj.detach()[e], None
    w, b = ex.gate_up_proj.detach()[e], ex.gate_up_proj_bias.detach()[e]  # [H, 2I], [2I], interleaved
    return (
        torch.cat([w[:, 0::2], w[:, 1::2]], 1).T, torch.cat([b[0::2], b[1::2]]),
        ex.down_proj.detach()[e].T, ex.down_proj_bias.detach()[e],
    )


def _as_stored(parts: _Parts, name: str, t: Tensor) -> Tensor:
    """A product for an expert's parameter laid out as ``_expert_maps`` reads it (``[…, 2I, H]``,
    ``[…, 2I]``, ``[…, H, I]``, ``[…, H]``) in the parameter's own layout."""
    if not parts.gpt_oss or name == _DOWN_BIAS:
        return t
    if name == _DOWN:
        return t.transpose(-1, -2)
    half = t.shape[-2 if name == _GATE_UP else -1] // 2
    if name == _GATE_UP:  # [.., 2I, H] gate rows then up rows → [.., H, 2I] interleaved
        return torch.stack([t[..., :half, :], t[..., half:, :]], -2).flatten(-3, -2).transpose(-1, -2)
    return torch.stack([t[..., :half], t[..., half:]], -1).flatten(-2)  # the bias, interleaved


def _glu(act_fn: nn.Module, g: Tensor, u: Tensor) -> tuple[Tensor, ...]:
    """``h = φ(g) ∘ u`` and its slopes (``_Expert``): one activation, one product."""
    act, slope = _activation(act_fn, g)
    dg = u * slope
    return act * u, dg, act, dg.square(), act.square()


def _gpt_oss_glu(experts: nn.Module, g: Tensor, u: Tensor) -> tuple[Tensor, ...]:
    """GPT-OSS's ``h = (u_c + 1) ∘ g_c σ(α g_c)``, ``g_c = min(g, limit)``, ``u_c = clamp(u, ±limit)``,
    and its slopes. Its operations (``_apply_gate``) use ``g_c`` twice, in the product and
    in ``σ(α g_c)``: DiagGGNApprox's split form sums the two squared paths,
    ``(u_c + 1)² (σ² + α² g_c² (σ (1 − σ))²)``, where the exact slope squares their sum."""
    alpha, limit = float(experts.alpha), float(experts.limit)
    with torch.enable_grad():
        gl, ul = g.detach().requires_grad_(True), u.detach().requires_grad_(True)
        g_c, u_c = gl.clamp(max=limit), ul.clamp(min=-limit, max=limit)
        slope_g, slope_u = torch.autograd.grad((g_c.sum(), u_c.sum()), (gl, ul))
    g_c, u_c = g_c.detach(), u_c.detach()
    sig = torch.sigmoid(alpha * g_c)
    glu = g_c * sig
    up = u_c + 1
    dsig = sig * (1 - sig)
    dg = up * (sig + alpha * g_c * dsig) * slope_g
    dg2 = up.square() * (sig.square() + (alpha * g_c * dsig).square()) * slope_g.square()
    du = glu * slope_u
    return up * glu, dg, du, dg2, du.square()


def _activation(act_fn: nn.Module, g: Tensor) -> tuple[Tensor, Tensor]:
    """``(φ(g), φ'(g))`` of an entrywise activation module."""
    with torch.enable_grad():
        leaf = g.detach().requires_grad_(True)
        act = act_fn(leaf)
        (slope,) = torch.autograd.grad(act, leaf, torch.ones_like(act))
    return act.detach(), slope


def _sample_of(rows: Tensor, tokens: int, samples: int, dtype: torch.dtype) -> Tensor:
    """One-hot ``[P, N]``: the sample of each token row."""
    return F.one_hot(torch.div(rows, tokens, rounding_mode="floor"), samples).to(dtype)


class SparseMoeRule(LayerRule):
    """The exact products of the block (see the module docstring); its diagonal pullbacks
    count it as one operation (the default of :class:`LayerRule`, from the columns)."""

    serves_whole_module = True  # its children (router, experts) are part of its one call

    def accepts(self, module: nn.Module) -> bool:
        return _experts_of(module) is not None

    def operations_rule(self) -> LayerRule:
        return _SPLIT

    # --------------------------------------------------------------- columns
    @staticmethod
    def _pull(call: Operation, routing: _Routing, mat: Tensor) -> tuple:
        """``(m_x [V, R, H], m_z [V, R, E], m_[g; u] per expert, m_y per expert, shared)`` for
        ``mat`` ``[V, N, T, H]``; ``shared``: per parameter of the shared expert, ``(m [V, R, O],
        a [R, I])`` with the product ``Σ_t m ⊗ a`` per sample (``None`` without one)."""
        cached = call.scratch.moe_pull
        if cached is not None and cached[0] is mat:
            return cached[1]
        parts, r = routing.parts, routing
        m = mat.reshape(mat.shape[0], r.x.shape[0], r.x.shape[1])
        m_x = torch.zeros_like(m)
        m_w = m.new_zeros(m.shape[0], *r.w.shape)
        m_gus, m_ys = [], []
        for ex in r.experts:
            mr = m[:, ex.rows]  # [V, P, H]
            m_w[:, ex.rows, ex.slots] = (mr * ex.y).sum(-1)
            m_y = mr * r.w[ex.rows, ex.slots, None]
            g_up, _, d_map, _ = _expert_maps(parts, ex.e)
            m_h = m_y @ d_map  # [V, P, I]
            m_gu = torch.cat([m_h * ex.dg, m_h * ex.du], dim=-1)  # [V, P, 2I]
            m_x.index_add_(1, ex.rows, m_gu @ g_up)
            m_gus.append(m_gu)
            m_ys.append(m_y)
        # w = c v / den: m_v = c (m_w − m_w · (v / den)) / den
        m_w = m_w * r.scale
        m_v = m_w if r.den is None else (m_w - (m_w * (r.v / r.den)).sum(-1, keepdim=True)) / r.den
        m_p = torch.zeros_like(r.p).expand(m.shape[0], *r.p.shape).scatter(2, r.index.expand(m.shape[0], *r.index.shape), m_v)
        m_z = m_p * r.p * (1 - r.p) if parts.sigmoid else r.p * (m_p - (m_p * r.p).sum(-1, keepdim=True))
        m_x = m_x + m_z @ parts.gate.weight.detach()  # (a router bias adds nothing to J_x)
        shared = None
        if r.shared is not None:  # out += σ(q·x) S(x), or S(x)
            sh, mlp, names = r.shared, parts.shared, parts.names
            m_s = m if sh.sigma is None else sh.sigma * m  # [V, R, H]
            m_h = m_s @ mlp.down_proj.weight.detach()  # [V, R, Is]
            m_g, m_u = m_h * sh.u * sh.slope, m_h * sh.act
            m_x = m_x + m_g @ mlp.gate_proj.weight.detach() + m_u @ mlp.up_proj.weight.detach()
            shared = {names["gate"]: (m_g, r.x), names["up"]: (m_u, r.x), names["down"]: (m_s, sh.h)}
            if sh.sigma is not None:
                m_q = (m * sh.y).sum(-1, keepdim=True) * sh.sigma * (1 - sh.sigma)  # [V, R, 1]
                m_x = m_x + m_q * parts.shared_gate.weight.detach()[0]
                shared[names["q"]] = (m_q, r.x)
        result = (m_x, m_z, m_gus, m_ys, shared)
        call.scratch.moe_pull = (mat, result)
        return result

    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        routing = _routing(call)
        if routing is None:
            return fallback_rule().jac_t_mat_prod(call, mat)
        return self._pull(call, routing, mat)[0].reshape(mat.shape)

    def param_jac_t_mat_prod(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        routing = _routing(call)
        if routing is None:
            return fallback_rule().param_jac_t_mat_prod(call, name, mat)
        r = routing
        _, m_z, m_gus, m_ys, shared = self._pull(call, r, mat)
        v, n, t = mat.shape[0], r.samples, r.tokens
        parts = r.parts
        if name == parts.router or name in (shared or {}):  # Σ_t m ⊗ a per sample
            m, a = (m_z, r.x) if name == parts.router else shared[name]
            return torch.einsum("vnto,nti->vnoi", m.reshape(v, n, t, -1), a.reshape(n, t, -1))
        if name == parts.router_bias:
            return m_z.reshape(v, n, t, -1).sum(2)
        param = dict(call.params)[name]
        out = mat.new_zeros(v, n, *param.shape)
        for ex, m_gu, m_y in zip(r.experts, m_gus, m_ys):
            one_hot = _sample_of(ex.rows, t, n, mat.dtype)
            if name == _GATE_UP:
                term = torch.einsum("vpi,ph,pn->vnih", m_gu, r.x[ex.rows], one_hot)
            elif name == _DOWN:
                term = torch.einsum("vph,pi,pn->vnhi", m_y, ex.h, one_hot)
            else:  # the biases: Σ over the sample's tokens
                term = torch.einsum("vpo,pn->vno", m_gu if name == _GATE_UP_BIAS else m_y, one_hot)
            out[:, :, ex.e] = _as_stored(parts, name, term)
        return out


def _router_diag(r: _Routing, sigmoid: bool, d_w: Tensor) -> Tensor:
    """``d_z`` ``[R, E]`` at the router logits from ``d_w`` ``[R, k]`` at the routing weights,
    through the router's operations (module docstring)."""
    from curvhook.rules.tensor_ops import sum_of_others

    if r.topk_first:  # q = softmax of the chosen logits (its diagonal over those k), then the top-k scatter
        q = r.v / r.den
        q_sq = q.square()
        d_chosen = q_sq * (d_w * (1 - q).square() + sum_of_others(d_w * q_sq, -1))
        return torch.zeros_like(r.p).scatter(1, r.index, d_chosen)
    if r.den is not None:  # v / den: the division, and the sum through den
        d_w = (d_w + (d_w * (r.v / r.den).square()).sum(-1, keepdim=True)) / r.den.square()
    d_p = torch.zeros_like(r.p).scatter(1, r.index, d_w)
    if sigmoid:
        return d_p * (r.p * (1 - r.p)).square()
    p_sq = r.p.square()
    return p_sq * (d_p * (1 - r.p).square() + sum_of_others(d_p * p_sq, -1))


class _SplitSparseMoeRule(SparseMoeRule):
    """The block as the operations of its eager forward for DiagGGNApprox (module docstring)."""

    def operations_rule(self) -> LayerRule:
        return self

    @staticmethod
    def _pull_diag(call: Operation, routing: _Routing, diag: Tensor) -> tuple:
        """``(d_x [R, H], d_z [R, E], d_[g; u] per expert, d_y per expert, shared)`` for ``diag``
        ``[N, T, H]``; ``shared`` as in :meth:`SparseMoeRule._pull` with ``d [R, O]``."""
        cached = call.scratch.moe_pull
        if cached is not None and cached[0] is diag:
            return cached[1]
        parts, r = routing.parts, routing
        d = diag.reshape(r.x.shape)
        d_x = torch.zeros_like(d)
        d_w = torch.zeros_like(r.w)
        d_gus, d_ys = [], []
        for ex in r.experts:
            dr = d[ex.rows]  # [P, H]
            d_w[ex.rows, ex.slots] = (dr * ex.y.square()).sum(-1)
            d_y = dr * r.w[ex.rows, ex.slots, None].square()
            g_up, _, d_map, _ = _expert_maps(parts, ex.e)
            d_h = d_y @ d_map.square()  # [P, I]
            d_gu = torch.cat([d_h * ex.dg2, d_h * ex.du2], dim=-1)
            d_x.index_add_(0, ex.rows, d_gu @ g_up.square())
            d_gus.append(d_gu)
            d_ys.append(d_y)
        # the scaling by c, then v / den: d_v = d_w / den² (the division) + Σ_j d_w (v / den)² / den²
        # (through the sum)
        d_w = d_w * r.scale**2
        d_z = _router_diag(r, parts.sigmoid, d_w)
        d_x = d_x + d_z @ parts.gate.weight.detach().square()
        shared = None
        if r.shared is not None:  # the operations σ(q·x), S(x) = D_s(φ(G_s x) ∘ U_s x), their product, the sum
            sh, mlp, names = r.shared, parts.shared, parts.names
            d_s = d if sh.sigma is None else sh.sigma.square() * d
            d_h = d_s @ mlp.down_proj.weight.detach().square()
            d_g, d_u = d_h * (sh.u * sh.slope).square(), d_h * sh.act.square()
            d_x = d_x + d_g @ mlp.gate_proj.weight.detach().square() + d_u @ mlp.up_proj.weight.detach().square()
            shared = {names["gate"]: (d_g, r.x), names["up"]: (d_u, r.x), names["down"]: (d_s, sh.h)}
            if sh.sigma is not None:
                d_q = (d * sh.y.square()).sum(-1, keepdim=True) * (sh.sigma * (1 - sh.sigma)).square()  # [R, 1]
                d_x = d_x + d_q * parts.shared_gate.weight.detach()[0].square()
                shared[names["q"]] = (d_q, r.x)
        result = (d_x, d_z, d_gus, d_ys, shared)
        call.scratch.moe_pull = (diag, result)
        return result

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        routing = _routing(call)
        if routing is None:
            return fallback_rule().diag_jac_t_diag_jac(call, diag)
        return self._pull_diag(call, routing, diag)[0].reshape(diag.shape)

    def param_diag(self, call: Operation, name: str, diag: Tensor) -> Tensor:
        routing = _routing(call)
        if routing is None:
            return fallback_rule().param_diag(call, name, diag)
        r = routing
        _, d_z, d_gus, d_ys, shared = self._pull_diag(call, r, diag)
        parts = r.parts
        if name == parts.router or name in (shared or {}):
            d, a = (d_z, r.x) if name == parts.router else shared[name]
            return d.T @ a.square()
        if name == parts.router_bias:
            return d_z.sum(0)
        out = torch.zeros_like(dict(call.params)[name])
        for ex, d_gu, d_y in zip(r.experts, d_gus, d_ys):
            term = {
                _GATE_UP: lambda: d_gu.T @ r.x[ex.rows].square(), _DOWN: lambda: d_y.T @ ex.h.square(),
                _GATE_UP_BIAS: lambda: d_gu.sum(0), _DOWN_BIAS: lambda: d_y.sum(0),
            }[name]()
            out[ex.e] = _as_stored(parts, name, term)
        return out


_SPLIT = _SplitSparseMoeRule()
register_rule_by_name("transformers", "*SparseMoeBlock", "*MoE", "*Moe", "GptOssMLP")(SparseMoeRule)
