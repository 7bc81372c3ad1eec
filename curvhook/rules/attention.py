"""``nn.MultiheadAttention`` used as self-attention: closed-form DiagGGNApprox diagonals.

By the definition of DiagGGNApprox the module is one operation, so the metric
is pulled back through its whole per-sample Jacobian (``[L·E, L·E]``) before
only its diagonal is kept. The generic rule would need one vector-Jacobian
product per output entry; this rule forms the same numbers from the structure
of attention instead.

Notation (one sample; ``h, g`` heads, ``a, b, c`` coordinates of one head,
``e, f`` model coordinates, ``l`` query and ``m`` key positions, ``s = dh^-½``)::

    q, k, v = x W_qᵀ + b_q, x W_kᵀ + b_k, x W_vᵀ + b_v        (split into heads)
    A_h = softmax(s q_h k_hᵀ + mask),  O_h = A_h v_h,  y = Σ_h O_h W_o,hᵀ + b_o

With ``d`` the diagonal metric on ``y`` and ``M_l = W_oᵀ diag(d_l) W_o`` (an
``E × E`` matrix per query position), every quantity is a sum over ``l`` of
quadratic forms in ``M_l``, because ``y_l`` depends on ``x`` only through
``O_l``:

- values: ``∂y_l/∂v_m = A[l,m] W_o``;
- keys: ``∂O_h[l]/∂k_h[m] = s A_h[l,m] (v_h[m] − O_h[l]) q_h[l]ᵀ``;
- queries: ``∂O_h[l]/∂q_h[l] = s Σ_j A_h[l,j] (v_h[j] − O_h[l]) (k_h[j] − k̄_h[l])ᵀ``
  with ``k̄ = A k``; it is the only term with ``l = m``.

The input diagonal ``Σ_{l,e} d[l,e] (∂y[l,e]/∂x[m,f])²`` expands into products
of pairs of heads; each product is contracted in the order that keeps the
largest intermediate at ``L·E·H·E`` per sample. The work is about ``L·E³·H``
multiply-adds per sample (the forward pass is ``L·E²``): more than a backward
pass, and far less than the ``L·E`` products of the generic rule.

Other configurations (cross-attention, ``kdim``/``vdim``, ``add_bias_kv``,
``add_zero_attn``, dropout in train mode) and the matrix products of the other
extensions use the exact generic rule. A ``batch_first=False`` module called on
``[L, N, E]`` reaches this rule as its batch-first view
(:mod:`curvhook.rules.batch_axis_view`).

``DiagGGNApprox(split_attention=True)`` asks for another approximation: the
module counts as the operations it is built from (the in-projection, the
scores ``s q_h k_hᵀ`` plus masks, the softmax over keys, ``A_h v_h`` and the
out-projection), with only the diagonal kept between them, as for attention
written out by hand. :class:`SplitAttentionRule` computes it in about the
work of one backward pass through the module (``L·E²`` and ``L²·E`` per sample).
"""

from __future__ import annotations

import inspect
import warnings
from typing import Optional

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.nn import functional as F

from curvhook import _memory
from curvhook._torch_internals import attention_packs_projections, canonical_attention_masks
from curvhook.records import CONST, Operation, fill_template
from curvhook.rules.base import LayerRule
from curvhook.rules.fallback import FallbackRule
from curvhook.rules.registry import register_rule

# Entries of the largest per-chunk intermediate (``[n, L, E, H, E]``).
_CHUNK_ENTRIES = 1 << 23

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _self_attention_arguments(call: Operation) -> Optional[dict]:
    """The call's arguments if the closed forms apply to it, else ``None``."""
    m = call.module
    if not (attention_packs_projections(m) and m.batch_first and m.bias_k is None and not m.add_zero_attn):
        return None
    if (call.training or m.training) and m.dropout > 0:  # the replay below runs in the current mode
        return None
    args, kwargs = fill_template(call.args, call.kwargs, list(call.inputs))
    try:
        bound = _SIGNATURE.bind(m, *args, **kwargs)
    except TypeError:
        return None
    arguments = dict(bound.arguments)
    query = arguments.get("query")
    if not (isinstance(query, Tensor) and query.dim() == 3):
        return None
    if arguments.get("key") is not query or arguments.get("value") is not query:
        return None
    return arguments


def _attention_weights(q: Tensor, k: Tensor, arguments: dict) -> Tensor:
    """``A = softmax(s q kᵀ + masks)``, ``[N, H, L, L]``, with the masks as torch merges them.

    ``q``, ``k``: ``[N, H, L, dh]``. Boolean masks become ``-inf`` where true; an
    ``attn_mask`` is ``[L, L]`` or ``[N·H, L, L]``, a ``key_padding_mask`` ``[N, L]``.
    """
    n, heads, length, dh = q.shape
    attn_mask, padding = canonical_attention_masks(
        arguments.get("attn_mask"), arguments.get("key_padding_mask"), q.dtype
    )
    scores = (q * dh**-0.5) @ k.transpose(-1, -2)
    if attn_mask is not None:
        scores += attn_mask if attn_mask.dim() == 2 else attn_mask.view(n, heads, length, length)
    if padding is not None:
        scores += padding.view(n, 1, 1, length)
    return attention_softmax(scores, masked=attn_mask is not None or padding is not None)


def attention_softmax(scores: Tensor, masked: bool = True) -> Tensor:
    """``softmax`` over the keys (the last axis), with torch's attention's rows of zeros where
    every key is masked (``-inf``): ``F.scaled_dot_product_attention`` returns zeros for such a
    query (left padding in a causal model, a sample that is all padding), where a plain
    ``softmax`` gives NaN.

    Args:
        scores: ``[*, L, S]``.
        masked: Whether a mask took part (without one no row is all ``-inf``).

    Returns:
        ``[*, L, S]``.
    """
    weights = scores.softmax(-1)
    if masked:
        dead = scores.amax(-1, keepdim=True) == float("-inf")
        if bool(dead.any()):
            weights.masked_fill_(dead, 0.0)
    return weights


def _weight_products(m: nn.MultiheadAttention) -> dict:
    """Products of the weights alone, shared by all chunks of samples."""
    e_dim, heads = m.embed_dim, m.num_heads
    w_in = m.in_proj_weight.detach()
    w_q_flat, w_k_flat, w_v_flat = w_in.chunk(3)  # [(h a), f] each
    w_k, w_v = (rearrange(w, "(h a) f -> h a f", h=heads) for w in (w_k_flat, w_v_flat))
    w_o = m.out_proj.weight.detach()  # [e, (h a)]
    w_o_h = rearrange(w_o, "e (h a) -> h e a", h=heads)
    # P_h = W_o,h W_v,h: the value path of head h, [H, e, f].
    p = w_o_h @ w_v
    return {
        "w_in": w_in, "w_k": w_k, "w_o_h": w_o_h, "p": p,
        "w_o_sq": w_o.square(),
        # M_l = W_oᵀ diag(d_l) W_o = d_l @ W2 (whole) and its diagonal blocks of heads.
        "w2": torch.einsum("ec,ed->ecd", w_o, w_o).reshape(e_dim, e_dim * e_dim),
        "w2_heads": rearrange(torch.einsum("hea,heb->ehab", w_o_h, w_o_h), "e h a b -> e (h a b)"),
        # PP[e, (h, g, f)] = P_h[e, f] P_g[e, f]
        "pp": rearrange(torch.einsum("hef,gef->ehgf", p, p), "e h g f -> e (h g f)"),
        "p_cat": rearrange(p, "h e f -> e (h f)"),
        "w_o_h_s": w_o_h * (e_dim // heads) ** -0.5,
        "w_v_flat": w_v_flat,
        "w_q_flat": w_q_flat,
    }


def _approx_diagonals(call: Operation, arguments: dict, diag: Tensor, need_input: bool) -> dict:
    """Every DiagGGNApprox quantity of one call, computed a chunk of samples at a time.

    Args:
        call: The recorded call (self-attention, ``batch_first``).
        arguments: Its bound arguments.
        diag: ``d``, ``[N, L, E]``.
        need_input: Whether to compute the input diagonal.

    Returns:
        ``{"input": [N, L, E] or None, parameter name: [*θ.shape]}``.
    """
    m = call.module
    x = call.input.detach()
    n_all, length, e_dim = x.shape
    heads = m.num_heads
    dh = e_dim // heads
    w = _weight_products(m)
    b_in = None if m.in_proj_bias is None else m.in_proj_bias.detach()
    with torch.no_grad():
        q, k, v = rearrange(F.linear(x, w["w_in"], b_in), "n l (t h a) -> t n h l a", t=3, h=heads)
        weights = _attention_weights(q, k, arguments)
    acc = {
        "out_w": diag.new_zeros(e_dim, e_dim), "q_b": diag.new_zeros(heads * dh),
        "v_b": diag.new_zeros(heads, dh), "d_in": torch.empty_like(x) if need_input else None,
        **{name: diag.new_zeros(heads, dh, e_dim) for name in ("q_w", "k_w", "v_w")},
    }
    step = max(1, _CHUNK_ENTRIES // (length * e_dim * heads * max(e_dim, length)))
    for start in range(0, n_all, step):
        ch = slice(start, min(start + step, n_all))
        _approx_chunk(acc, ch, diag[ch], x[ch], weights[ch], (q[ch], k[ch], v[ch]), w, dh**-0.5)
    results = {
        "input": acc["d_in"],
        "in_proj_weight": torch.cat([acc[t].reshape(e_dim, e_dim) for t in ("q_w", "k_w", "v_w")]),
        "out_proj.weight": acc["out_w"],
        "out_proj.bias": diag.sum((0, 1)),
    }
    if b_in is not None:
        results["in_proj_bias"] = torch.cat([acc["q_b"], torch.zeros_like(acc["q_b"]), acc["v_b"].flatten()])
    return results


def _approx_chunk(
    acc: dict, ch: slice, d: Tensor, xc: Tensor, A: Tensor, qkv: tuple, w: dict, s: float
) -> None:
    """Add one chunk of samples' terms to ``acc`` (see :func:`_approx_diagonals`).

    Args:
        acc: The running sums, and ``d_in`` written at the chunk's rows.
        ch: The chunk's samples.
        d: ``[n, L, E]``; xc: ``[n, L, E]``; A: ``[n, H, L, L]``.
        qkv: ``q, k, v``, each ``[n, H, L, dh]``.
        w: :func:`_weight_products`.
        s: ``dh^-½``.
    """
    qc, kc, vc = qkv
    n, heads, length, dh = qc.shape
    e_dim = xc.shape[-1]
    d_rows = d.reshape(n * length, e_dim)
    O = A @ vc  # [n, h, l, a]
    Ax = torch.einsum("nhlm,nmf->nhlf", A, xc)
    # out_proj: y = O W_oᵀ + b_o, a linear layer on O.
    acc["out_w"] += d_rows.T @ rearrange(O, "n h l a -> (n l) (h a)").square()
    # values: ∂y[l,e]/∂W_v[(h,a),f] = W_o[e,(h,a)] (A_h x)[l,f], one term: no cross products.
    d_wo = rearrange(d_rows @ w["w_o_sq"], "(n l) (h a) -> n h a l", n=n, h=heads)
    acc["v_w"] += (d_wo @ Ax.square()).sum(0)
    acc["v_b"] += (d_wo @ A.sum(-1).square().unsqueeze(-1)).sum(0).squeeze(-1)
    wo_cq = _query_products(d, A, qc, kc, vc, O, w)
    sq = torch.mul(wo_cq, wo_cq, out=_memory.scratch(wo_cq.shape, d, "attention_sq"))
    d_q = torch.bmm(d_rows.unsqueeze(1), sq.view(n * length, e_dim, e_dim)).view(n * length, e_dim)
    acc["q_w"] += rearrange(d_q.T @ xc.reshape(n * length, e_dim).square(), "(h c) f -> h c f", h=heads)
    acc["q_b"] += d_q.sum(0)
    M, m_heads = _metric_blocks(d_rows, w, n, length, heads, acc["d_in"] is not None)
    acc["k_w"] += (qc.square().transpose(-1, -2) @ _key_terms(d, A, xc, vc, O, m_heads)).sum(0) * s**2
    if acc["d_in"] is not None:
        acc["d_in"][ch] = _input_diagonal(d, A, qc, vc, O, wo_cq, M, w, s)


def _query_products(d: Tensor, A: Tensor, qc: Tensor, kc: Tensor, vc: Tensor, O: Tensor, w: dict) -> Tensor:
    """``s W_o C_q``, ``[n, L, E, (H dh)]``: ``∂y_l/∂q_l`` per query position.

    ``∂O_h[l,a]/∂q_h[l,c] = s C_q[l,c,a]`` with
    ``C_q = Σ_j A[l,j] k[j,c] v[j,a] − k̄[l,c] O[l,a]``.
    """
    n, heads, length, dh = qc.shape
    e_dim = d.shape[-1]
    kv = rearrange(kc.unsqueeze(-1) * vc.unsqueeze(-2), "n h j c a -> n h j (c a)")
    cq = (A @ kv).view(n, heads, length, dh, dh)
    cq.sub_((A @ kc).unsqueeze(-1) * O.unsqueeze(-2))
    woc = torch.bmm(w["w_o_h_s"], rearrange(cq, "n h l c a -> h a (n l c)"))  # [h, e, (n l c)]
    wo_cq = _memory.scratch((n, length, e_dim, e_dim), d, "attention_woc")
    rearrange(wo_cq, "n l e (h c) -> h e n l c", h=heads).copy_(woc.view(heads, e_dim, n, length, dh))
    return wo_cq


def _metric_blocks(d_rows: Tensor, w: dict, n: int, length: int, heads: int, whole: bool) -> tuple:
    """``M_l = W_oᵀ diag(d_l) W_o`` (whole, if ``whole``) and its head blocks ``[n, H, L, dh, dh]``."""
    e_dim = d_rows.shape[-1]
    dh = e_dim // heads
    if not whole:
        return None, rearrange(d_rows @ w["w2_heads"], "(n l) (h a b) -> n h l a b", n=n, h=heads, a=dh)
    M = torch.mm(d_rows, w["w2"], out=_memory.scratch((n * length, e_dim * e_dim), d_rows, "attention_m"))
    M = M.view(n, length, heads, dh, heads, dh)
    return M, rearrange(M.diagonal(dim1=2, dim2=4), "n l a b h -> n h l a b")


def _key_terms(d: Tensor, A: Tensor, xc: Tensor, vc: Tensor, O: Tensor, m_heads: Tensor) -> Tensor:
    """``Σ_{a,b} M_l[a,b] C_k[l,a,f] C_k[l,b,f]`` per head, ``[n, H, L, E]`` (the key weights' terms).

    ``∂y[l,e]/∂W_k[(h,c),f] = s q_h[l,c] Σ_a W_o[e,(h,a)] C_k[l,a,f]`` with
    ``C_k = Σ_m A[l,m] v[m,a] x[m,f] − O[l,a] (A x)[l,f]`` (``b_k``: softmax is
    shift-invariant). One GEMM over ``m`` per sample, with the weights
    ``B[(h,l,a),m] = A_h[l,m] (v_h[m,a] − O_h[l,a])`` on the left and ``x``
    shared by the heads.
    """
    n, heads, length, dh = vc.shape
    e_dim = xc.shape[-1]
    b = torch.sub(
        vc.transpose(-1, -2).unsqueeze(2), O.unsqueeze(-1),
        out=_memory.scratch((n, heads, length, dh, length), d, "attention_b"),
    ).mul_(A.unsqueeze(3))
    ck = torch.bmm(b.view(n, -1, length), xc, out=_memory.scratch((n, heads * length * dh, e_dim), d, "attention_ck"))
    ck = ck.view(n, heads, length, dh, e_dim)
    mck = torch.matmul(m_heads, ck, out=_memory.scratch(ck.shape, d, "attention_mck"))
    return mck.mul_(ck).sum(3)  # [n, h, l, f]


def _input_diagonal(
    d: Tensor, A: Tensor, q: Tensor, v: Tensor, O: Tensor, wo_cq: Tensor, M: Tensor, w: dict, s: float
) -> Tensor:
    """``Σ_{l,e} d[l,e] (∂y[l,e]/∂x[m,f])²`` for a chunk of samples, ``[n, L, E]``.

    Off the diagonal ``l = m`` the Jacobian is
    ``J[l,e,m,f] = Σ_h A_h[l,m] (P_h[e,f] + (U_h[m,e] − Y_h[l,e]) R_h[l,f])`` with
    ``P_h = W_o,h W_v,h``, ``U_h = v_h W_o,hᵀ``, ``Y_h = O_h W_o,hᵀ``, ``R_h = s q_h W_k,h``;
    the query path adds ``T[l,e,f] = Σ_{h,c} (W_o C_q)[l,e,(h,c)] W_q[(h,c),f]`` at ``l = m``.
    The square expands into pairs of heads ``(h, g)``, weighted by ``A_h[l,m] A_g[l,m]``.

    Args:
        d: ``[n, L, E]``; A: ``[n, H, L, L]``; q, v, O: ``[n, H, L, dh]``;
        wo_cq: ``[n, L, E, (H dh)]`` (``s W_o C_q``); M: ``M_l``, ``[n, L, E, E]`` (any view);
        w: :func:`_weight_products`.
    """
    n, heads, length, dh = v.shape
    e_dim = d.shape[-1]
    d_rows = d.reshape(n * length, e_dim)
    U = torch.einsum("nhma,hea->nhme", v, w["w_o_h"])
    Y = A @ U
    R = (q @ w["w_k"]) * s  # [n, h, l, f]
    dY = d.unsqueeze(1) * Y  # [n, g, l, e]
    # Pair terms are laid out [n, h, g, l, ·] and contracted with A_h A_g over (h, g, l).
    # Without m: Σ_e d P_h P_g − 2 R_g Σ_e d Y_g P_h (the W_v·W_v and W_v·O cross terms).
    f1 = (d_rows @ w["pp"]).view(n, length, heads, heads, e_dim)
    f3 = (dY.reshape(-1, e_dim) @ w["p_cat"]).view(n, heads, length, heads, e_dim)
    f3.mul_(R.unsqueeze(3))
    f_terms = torch.empty((n, heads, heads, length, e_dim), dtype=d.dtype, device=d.device)
    torch.sub(rearrange(f1, "n l h g f -> n h g l f"), rearrange(f3, "n g l h f -> n h g l f"), alpha=2, out=f_terms)
    # With m: (U_h[m] − Y_h[l]) M_l (U_g[m] − Y_g[l]) R_h R_g, X laid out [n, m, h, g, l].
    u_t = rearrange(U, "n h m e -> n m h e").contiguous()
    uu = (u_t.unsqueeze(3) * u_t.unsqueeze(2)).view(n, -1, e_dim)  # [n, (m h g), e]
    X = (uu @ d.transpose(1, 2)).view(n, length, heads, heads, length)
    vmo = (u_t.view(n, -1, e_dim) @ rearrange(dY, "n g l e -> n e (g l)")).view(X.shape)
    omo = torch.einsum("ngle,nhle->nhgl", dY, Y)
    X.sub_(vmo).sub_(vmo.transpose(2, 3)).add_(omo.unsqueeze(1))
    a_t = rearrange(A, "n h l m -> n m h l").contiguous()
    AA = a_t.unsqueeze(3) * a_t.unsqueeze(2)  # [n, m, h, g, l]
    RR = (R.unsqueeze(2) * R.unsqueeze(1)).view(n, -1, e_dim)  # [n, (h g l), f]
    d_in = AA.view(n, length, -1) @ f_terms.view(n, -1, e_dim)
    d_in.baddbmm_(X.mul_(AA).view(n, length, -1), RR)
    d_in.add_(_value_cross_term(d, A, v, M, R, w), alpha=2)
    d_in += _query_diagonal_term(d_rows, A, U, Y, R, wo_cq, w).view(n, length, e_dim)
    return d_in


def _value_cross_term(d: Tensor, A: Tensor, v: Tensor, M: Tensor, R: Tensor, w: dict) -> Tensor:
    """The ``W_v·U`` cross term of the input diagonal (before its factor 2), ``[n, L, E]``.

    ``Σ_{l,g} A_g[l,m] R_g[l,f] Σ_{h,a} A_h[l,m] (M_l v_g[m])[(h,a)] W_v[(h,a),f]``,
    one head ``g`` at a time: ``(M_l v_g[m])`` is ``[n, m, l, (h a)]``.
    """
    n, heads, length, dh = v.shape
    e_dim = d.shape[-1]
    M = M.view(n, length, e_dim, heads, dh)
    a_mlh = rearrange(A, "n h l m -> n m l h 1")
    cross = torch.zeros_like(d)
    for g in range(heads):
        m_g = M[:, :, :, g].reshape(n, length * e_dim, dh)  # a view: (l, c) merge
        mv = torch.bmm(v[:, g], m_g.transpose(1, 2), out=_memory.scratch((n, length, length * e_dim), d, "attention_mv"))
        mv.view(n, length, length, heads, dh).mul_(a_mlh)
        W = torch.mm(mv.view(-1, e_dim), w["w_v_flat"], out=_memory.scratch((n * length * length, e_dim), d, "attention_w"))
        W = W.view(n, length, length, e_dim).mul_(R[:, g].unsqueeze(1))  # [n, m, l, f]
        cross += (A[:, g].transpose(1, 2).unsqueeze(2) @ W).squeeze(2)
    return cross


def _query_diagonal_term(
    d_rows: Tensor, A: Tensor, U: Tensor, Y: Tensor, R: Tensor, wo_cq: Tensor, w: dict
) -> Tensor:
    """The diagonal ``l = m``, where ``J = J_off + T``: ``Σ_e d (T² + 2 T J_off[l,e,l,f])``, ``[(n L), E]``."""
    n, heads, length, _ = U.shape
    e_dim = d_rows.shape[-1]
    T = torch.mm(wo_cq.view(-1, e_dim), w["w_q_flat"], out=_memory.scratch((n * length * e_dim, e_dim), d_rows, "attention_t"))
    a_diag = rearrange(A.diagonal(dim1=-2, dim2=-1), "n h l -> (n l) h")
    J = torch.mm(a_diag, w["p"].view(heads, -1), out=_memory.scratch((n * length, e_dim * e_dim), d_rows, "attention_j"))
    J = J.view(n * length, e_dim, e_dim)
    uy = rearrange((U - Y) * rearrange(a_diag, "(n l) h -> n h l 1", n=n), "n h l e -> (n l) e h")
    J.baddbmm_(uy, rearrange(R, "n h l f -> (n l) h f"))
    J.mul_(2).add_(T.view(J.shape)).mul_(T.view(J.shape))
    return torch.bmm(d_rows.unsqueeze(1), J).view(n * length, e_dim)


def _split_diagonals(call: Operation, arguments: dict, diag: Tensor, need_input: bool) -> dict:
    """DiagGGNApprox through self-attention split into its operations, for all samples at once.

    Going backwards, with ``d`` the diagonal at each operation's output (one
    sample; ``A``, ``q``, ``k``, ``v``, ``O`` per head, ``s = dh^-½``):

    - out-projection ``y = O W_oᵀ + b_o``: ``d_O = d (W_o∘W_o)``;
    - ``O = A v``: ``d_A = d_O (v∘v)ᵀ``, ``d_v = (A∘A)ᵀ d_O``;
    - softmax over keys, ``J[j,i] = A_j (δ_ij − A_i)``:
      ``d_S[i] = A_i² (d_A[i] (1 − 2 A_i) + Σ_j d_A[j] A_j²)`` (masks add constants: identity);
    - ``S = s q kᵀ``: ``d_q = s² d_S (k∘k)``, ``d_k = s² d_Sᵀ (q∘q)``;
    - in-projection ``[q k v] = x W_inᵀ + b_in``: ``d_x = [d_q d_k d_v] (W_in∘W_in)``.

    A linear map's weight gets ``Σ_n d_outᵀ (in∘in)`` and its bias ``Σ_n d_out``.
    Arguments and result as for :func:`_approx_diagonals` (``diag`` is ``[N, L, E]``).
    """
    m, x = call.module, call.input.detach()
    n, length, e_dim = x.shape
    heads = m.num_heads
    dh = e_dim // heads
    w_in, w_o = m.in_proj_weight.detach(), m.out_proj.weight.detach()
    b_in = None if m.in_proj_bias is None else m.in_proj_bias.detach()
    with torch.no_grad():
        # q, k, v as [N, H, L, dh] each, contiguous for the batched GEMMs below
        qkv = _memory.scratch((3, n, heads, length, dh), diag, "attention_qkv")
        qkv.copy_(rearrange(F.linear(x, w_in, b_in), "n l (t h a) -> t n h l a", t=3, h=heads))
        q, k, v = qkv
        A = _attention_weights(q, k, arguments)  # [N, H, L, L]
        O = A @ v
    q_sq, k_sq, v_sq = qkv.square_()  # q, k, v are not needed any more
    d_rows = diag.reshape(n * length, e_dim)
    results = {
        "out_proj.weight": d_rows.T @ rearrange(O, "n h l a -> (n l) (h a)").square_(),
        "out_proj.bias": d_rows.sum(0),
    }
    d_o = rearrange(d_rows @ w_o.square(), "(n l) (h a) -> n h l a", n=n, h=heads).contiguous()
    a_sq = A.square()
    d_a = d_o @ v_sq.transpose(-1, -2)  # [N, H, L, L]
    d_v = a_sq.transpose(-1, -2) @ d_o
    d_s = A.mul_(-2).add_(1).mul_(d_a)  # d_A (1 − 2A), in the place of A
    d_s.add_(d_a.mul_(a_sq).sum(-1, keepdim=True)).mul_(a_sq)
    # [d_q d_k d_v] laid out as the in-projection's output, [N, L, (3 H dh)]
    d_qkv = _memory.scratch((n, length, 3, heads, dh), diag, "attention_d_qkv")
    s_sq = 1.0 / dh
    torch.mul(d_s @ k_sq, s_sq, out=d_qkv[:, :, 0].transpose(1, 2))
    torch.mul(d_s.transpose(-1, -2) @ q_sq, s_sq, out=d_qkv[:, :, 1].transpose(1, 2))
    d_qkv[:, :, 2].transpose(1, 2).copy_(d_v)
    d_qkv = d_qkv.view(n * length, 3 * e_dim)
    x_sq = _memory.square(x.reshape(n * length, e_dim), "attention_x_sq")
    results["in_proj_weight"] = d_qkv.T @ x_sq
    if b_in is not None:
        results["in_proj_bias"] = d_qkv.sum(0)
    results["input"] = (d_qkv @ w_in.square()).view(n, length, e_dim) if need_input else None
    return results


def sdpa_weights(q: Tensor, k: Tensor, mask: Optional[Tensor], causal: bool, scale: Optional[float]) -> Tensor:
    """``A = softmax(s q kᵀ + mask)`` as ``F.scaled_dot_product_attention`` forms it.

    Args:
        q: ``[*, L, E]``; k: ``[*, S, E]`` (as many heads as ``q``).
        mask: Boolean (``True`` takes part) or added, broadcast to ``[*, L, S]``; or ``None``.
        causal: Keep only keys ``j ≤ i`` (top-left aligned, as torch does).
        scale: ``s``; ``None`` for ``E^-½``.

    Returns:
        ``[*, L, S]``.
    """
    s = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)).mul_(s)
    if causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores.masked_fill_(~keep, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return attention_softmax(scores, masked=mask is not None)


def attention_diagonals(
    q: Tensor, k: Tensor, v: Tensor, d_o: Tensor, mask: Optional[Tensor], causal: bool, scale: Optional[float],
    with_scores: bool = False,
) -> tuple[Tensor, ...]:
    """DiagGGNApprox through ``O = softmax(s q kᵀ + mask) v`` counted as its operations.

    Going backwards (``A``, ``q``, ``k``, ``v``, ``O`` of one head): ``d_A = d_O (v∘v)ᵀ``,
    ``d_v = (A∘A)ᵀ d_O``; the softmax over keys
    ``d_S[i] = A_i² (d_A[i] (1 − 2 A_i) + Σ_j d_A[j] A_j²)``; a mask adds a constant
    (identity); ``d_q = s² d_S (k∘k)``, ``d_k = s² d_Sᵀ (q∘q)``. Key and value
    heads shared by several query heads (grouped-query attention) sum their diagonals.

    Args:
        q: ``[*, H, L, E]`` (or ``[*, L, E]``); k: ``[*, H_kv, S, E]``; v: ``[*, H_kv, S, E_v]``.
        d_o: The diagonal at the output, ``[*, H, L, E_v]``.
        mask, causal, scale: As for :func:`sdpa_weights`.

        with_scores: Also return ``d_S``, the diagonal at the scores, which is that at
            an added mask (``∂S/∂mask = I``).

    Returns:
        ``d_q``, ``d_k``, ``d_v``, shaped like ``q``, ``k``, ``v`` (and ``d_S``, ``[*, H, L, S]``).
    """
    groups = q.shape[-3] // k.shape[-3] if q.dim() >= 3 and k.dim() >= 3 else 1
    k_all, v_all = (t.repeat_interleave(groups, -3) if groups > 1 else t for t in (k, v))
    s = q.shape[-1] ** -0.5 if scale is None else scale
    with torch.no_grad():
        A = sdpa_weights(q, k_all, mask, causal, scale)
        a_sq = A.square()
        d_a = d_o @ v_all.square().transpose(-1, -2)
        d_v = a_sq.transpose(-1, -2) @ d_o
        d_s = A.mul_(-2).add_(1).mul_(d_a)  # d_A (1 − 2A), in the place of A
        d_s.add_(d_a.mul_(a_sq).sum(-1, keepdim=True)).mul_(a_sq)
        d_q = (d_s @ k_all.square()).mul_(s * s)
        d_k = (d_s.transpose(-1, -2) @ q.square()).mul_(s * s)
    if groups > 1:
        d_k, d_v = (t.unflatten(-3, (-1, groups)).sum(-3) for t in (d_k, d_v))
    return (d_q, d_k, d_v, d_s) if with_scores else (d_q, d_k, d_v)


@register_rule(nn.MultiheadAttention)
class SelfAttentionRule(FallbackRule):
    """Closed-form DiagGGNApprox diagonals for self-attention; the exact generic rule otherwise."""

    _cache_key = "attention_approx"

    def operations_rule(self) -> LayerRule:
        return SPLIT_ATTENTION

    def _diagonals(self, call: Operation, arguments: dict, diag: Tensor, need_input: bool) -> dict:
        return _approx_diagonals(call, arguments, diag, need_input)

    def _results(self, call: Operation, diag: Tensor) -> Optional[dict]:
        cached = call.scratch.attention
        if cached is not None and cached[0] == self._cache_key and cached[1] is diag:
            return cached[2]
        arguments = _self_attention_arguments(call)
        if arguments is None:
            return None
        need_input = bool(call.input_kinds) and call.input_kinds[0] != CONST
        results = self._diagonals(call, arguments, diag, need_input)
        call.scratch.attention = (self._cache_key, diag, results)
        return results

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        results = self._results(call, diag)
        if results is None or results["input"] is None:
            return super().diag_jac_t_diag_jac(call, diag)
        return results["input"]

    def param_diag(self, call: Operation, name: str, diag: Tensor) -> Tensor:
        results = self._results(call, diag)
        if results is None or name not in results:
            return super().param_diag(call, name, diag)
        return results[name]


_SPLIT_WARNED: set[str] = set()


class SplitAttentionRule(SelfAttentionRule):
    """DiagGGNApprox with self-attention split into its operations (the default).

    Not registered: :meth:`SelfAttentionRule.operations_rule` returns it, which
    :class:`~curvhook.sources.LossHessianDiag` uses unless asked for the
    module as one operation (``DiagGGNApprox(split_attention=False)``). A configuration the split form does
    not cover (see the module docstring) keeps the module as one operation,
    with a warning.
    """

    _cache_key = "attention_split"

    def operations_rule(self) -> LayerRule:
        return self

    def _diagonals(self, call: Operation, arguments: dict, diag: Tensor, need_input: bool) -> dict:
        return _split_diagonals(call, arguments, diag, need_input)

    def _results(self, call: Operation, diag: Tensor) -> Optional[dict]:
        results = super()._results(call, diag)
        if results is None and call.name not in _SPLIT_WARNED:
            _SPLIT_WARNED.add(call.name)
            warnings.warn(
                f"DiagGGNApprox (split_attention=True, the default) splits self-attention with batch_first=True, "
                f"the same tensor as query, key and value, no add_bias_kv or add_zero_attn and no "
                f"dropout in train mode; module {call.name!r} is not such a call, so it counts as "
                "one operation (the exact, slower rule of the definition).",
                stacklevel=2,
            )
        return results


SPLIT_ATTENTION = SplitAttentionRule()
