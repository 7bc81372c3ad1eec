"""Sparse mixture-of-experts blocks of transformers (curvhook/rules/mixture_of_experts.py).

Before session 46 the whole ``…SparseMoeBlock`` went to the torch.func fallback (its experts
gather token rows by a data-dependent index): past 150 s per DiagGGNApprox step for a
two-layer Mixtral at width 512. The rule's products are checked against torch.func through
the real models (tests/models/zoo.py: ``transformers.Mixtral``, ``transformers.Qwen3Moe``);
here its diagonals are checked against their definitions with dense Jacobians per operation
(an independent evaluator of the eager forward's operations, row by row), and a block that
computes anything else goes to the fallback.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.func import jacrev

from curvhook import extend
from curvhook.extensions import DiagGGN, DiagGGNApprox
from curvhook.records import Scratch
from curvhook.rules import registry
from curvhook.rules.mixture_of_experts import SparseMoeRule
from helpers import CLASSES, DT, fallback_spy, run_curvhook
from reference import compare, reference

transformers = pytest.importorskip("transformers", reason="transformers is in the models extra")

H, I, E = 6, 4, 4


def _block(kind: str = "mixtral", normalize: bool = True, top_k: int = 2, H: int = H) -> nn.Module:  # noqa: N803
    """A block of the installed transformers with eager experts and random weights (float64)."""
    if kind == "mixtral":
        config = transformers.MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                                            num_experts_per_tok=top_k)
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
    elif kind == "qwen3":
        config = transformers.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E,
                                             num_experts_per_tok=top_k, norm_topk_prob=normalize)
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block
    elif kind == "qwen2":  # a shared expert and its gate
        config = transformers.Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=I, shared_expert_intermediate_size=3,
                                             num_experts=E, num_experts_per_tok=top_k, norm_topk_prob=normalize)
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock as Block
    elif kind == "granite":  # a child ``router``: the softmax of the top-k logits
        config = transformers.GraniteMoeConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                                               num_experts_per_tok=top_k)
        from transformers.models.granitemoe.modeling_granitemoe import GraniteMoeMoE as Block
    elif kind == "gpt_oss":  # experts with biases, interleaved [E, H, 2I], a clamped GLU; a router with a bias
        config = transformers.GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                                           num_experts_per_tok=top_k, swiglu_limit=1.0)
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP as Block
    elif kind == "deepseek2":  # DeepSeek-V2: softmax, unnormalized weights times a scale; an ungated shared expert
        config = transformers.DeepseekV2Config(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E,
                                               num_experts_per_tok=top_k, n_shared_experts=1, routed_scaling_factor=1.5,
                                               topk_method="greedy", num_attention_heads=2, num_key_value_heads=2)
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe as Block
    else:  # DeepSeek-V3: sigmoid scores, the best of two groups, a correction bias, a scale; an ungated shared expert
        config = transformers.DeepseekV3Config(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E,
                                               num_experts_per_tok=top_k, n_group=2, topk_group=1 if top_k < 3 else 2,
                                               n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=normalize)
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as Block
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    block = Block(config).to(DT).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.7)
        if hasattr(_router(block), "e_score_correction_bias"):
            _router(block).e_score_correction_bias.normal_(0.0, 0.3)
    return block


def _router(block: nn.Module) -> nn.Module:
    """The router child: ``gate``, or Granite's ``router``."""
    return block.gate if hasattr(block, "gate") else block.router


def _router_name(block: nn.Module) -> str:
    return "gate.weight" if hasattr(block, "gate") else "router.weight"


def _topk_first(block: nn.Module) -> bool:
    """Granite's and GPT-OSS's routers: the top-k logits first, then their softmax."""
    return hasattr(block, "router")


def _gpt_oss(block: nn.Module) -> bool:
    return hasattr(block.experts, "gate_up_proj_bias")


def _gpt_oss_diag_by_operations(block: nn.Module, x: torch.Tensor, d: torch.Tensor):
    """:func:`_diag_by_operations` for GPT-OSS's block: the operations of its eager forward
    (``x @ W_e``, ``+ b_e``, the interleaved gate and up, the clamps, ``g_c · α``, the sigmoid,
    ``g_c · σ``, ``u_c + 1``, the product, ``h @ D_e``, ``+ b_D``, the weighting), the router
    ``F.linear`` with its bias, ``topk`` of the logits and the softmax of those."""
    router, experts = block.router, block.experts
    w_r, b_r = router.weight.detach(), router.bias.detach()
    gate_up, gate_up_b = experts.gate_up_proj.detach(), experts.gate_up_proj_bias.detach()
    down, down_b = experts.down_proj.detach(), experts.down_proj_bias.detach()
    alpha, limit = experts.alpha, experts.limit
    rows, d_rows = x.reshape(-1, H), d.reshape(-1, H)
    with torch.no_grad():
        chosen = router.forward(rows)[2]
    d_x = torch.zeros_like(rows)
    d_params = {"router.weight": torch.zeros_like(w_r), "router.bias": torch.zeros_like(b_r),
                "experts.gate_up_proj": torch.zeros_like(gate_up), "experts.gate_up_proj_bias": torch.zeros_like(gate_up_b),
                "experts.down_proj": torch.zeros_like(down), "experts.down_proj_bias": torch.zeros_like(down_b)}

    def sq_pull(f, inputs, slot, d_out):  # Σ_o d_o (∂f_o/∂input_slot)²
        jac = jacrev(f, argnums=slot)(*inputs)
        return torch.einsum("o...,o->...", jac.reshape(d_out.numel(), *inputs[slot].shape).square(), d_out.flatten())

    lin = lambda m, b, x_: m @ x_ + b  # noqa: E731
    for r in range(rows.shape[0]):
        xr, index = rows[r], chosen[r]
        z = w_r @ xr + b_r
        z_chosen = z[index]
        w = torch.softmax(z_chosen, -1)
        d_w = torch.zeros_like(w)
        for j in range(index.shape[0]):
            e = int(index[j])
            xw = xr @ gate_up[e]
            gu = xw + gate_up_b[e]
            gate, up = gu[0::2], gu[1::2]
            g_c, u_c = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
            a = g_c * alpha
            sig = torch.sigmoid(a)
            glu = g_c * sig
            up1 = u_c + 1
            h = up1 * glu
            hd = h @ down[e]
            y = hd + down_b[e]
            # backward, one operation at a time
            d_y = sq_pull(lambda y_, w_: y_ * w_, (y, w[j]), 0, d_rows[r])
            d_w[j] = sq_pull(lambda y_, w_: y_ * w_, (y, w[j]), 1, d_rows[r])
            d_params["experts.down_proj_bias"][e] += d_y
            d_params["experts.down_proj"][e] += sq_pull(lambda h_, m: h_ @ m, (h, down[e]), 1, d_y)
            d_h = sq_pull(lambda h_, m: h_ @ m, (h, down[e]), 0, d_y)
            d_up1 = sq_pull(lambda p_, q_: p_ * q_, (up1, glu), 0, d_h)
            d_glu = sq_pull(lambda p_, q_: p_ * q_, (up1, glu), 1, d_h)
            d_uc = d_up1  # + 1
            d_gc = sq_pull(lambda p_, q_: p_ * q_, (g_c, sig), 0, d_glu)
            d_sig = sq_pull(lambda p_, q_: p_ * q_, (g_c, sig), 1, d_glu)
            d_a = sq_pull(torch.sigmoid, (a,), 0, d_sig)
            d_gc = d_gc + sq_pull(lambda g_: g_ * alpha, (g_c,), 0, d_a)  # g_c used twice: the sum
            d_gate = sq_pull(lambda g_: g_.clamp(max=limit), (gate,), 0, d_gc)
            d_up = sq_pull(lambda u_: u_.clamp(min=-limit, max=limit), (up,), 0, d_uc)
            d_gu = torch.stack([d_gate, d_up], -1).flatten()  # interleaved back
            d_params["experts.gate_up_proj_bias"][e] += d_gu
            d_params["experts.gate_up_proj"][e] += sq_pull(lambda x_, m: x_ @ m, (xr, gate_up[e]), 1, d_gu)
            d_x[r] += sq_pull(lambda x_, m: x_ @ m, (xr, gate_up[e]), 0, d_gu)
        d_chosen = sq_pull(lambda z_: torch.softmax(z_, -1), (z_chosen,), 0, d_w)
        d_z = sq_pull(lambda z_: z_[index], (z,), 0, d_chosen)
        d_params["router.weight"] += sq_pull(lin, (w_r, b_r, xr), 0, d_z)
        d_params["router.bias"] += d_z
        d_x[r] += sq_pull(lin, (w_r, b_r, xr), 2, d_z)
    return d_x, d_params


def _scores(block: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """The router's probabilities (DeepSeek-V3's sigmoid scores, else softmax)."""
    return torch.sigmoid(z) if hasattr(_router(block), "e_score_correction_bias") else torch.softmax(z, -1)


def _weights(block: nn.Module, v: torch.Tensor, normalize: bool) -> torch.Tensor:
    """The routing weights from the chosen probabilities ``v`` ``[..., k]``."""
    eps = 1e-20 if hasattr(_router(block), "e_score_correction_bias") else 0.0
    return getattr(_router(block), "routed_scaling_factor", 1.0) * (v / (v.sum(-1, keepdim=True) + eps) if normalize else v)


def _shared_mlp(block: nn.Module):
    """``(mlp, gate or None)`` of the block's shared expert, or ``(None, None)``."""
    if hasattr(block, "shared_experts"):
        return block.shared_experts, None
    if hasattr(block, "shared_expert"):
        return block.shared_expert, block.shared_expert_gate
    return None, None


def _call(block: nn.Module, x: torch.Tensor) -> SimpleNamespace:
    """What the rule reads of a recorded call."""
    with torch.no_grad():
        out = block(x)
    return SimpleNamespace(module=block, input=x, output=_first(out), scratch=Scratch(), params=tuple(block.named_parameters()),
                           name="moe")


def _diag_by_operations(block: nn.Module, x: torch.Tensor, d: torch.Tensor, normalize: bool, topk_first=None):
    """DiagGGNApprox's definition on the operations of the eager forward, one token row at a
    time, with a dense Jacobian of every operation (``Σ_o d_o J_oi²``, summed where a tensor
    is used twice): ``(d_x [R, H], {parameter name: diagonal})``."""
    router, router_name = _router(block), _router_name(block)
    topk_first = _topk_first(block) if topk_first is None else topk_first
    w_r = router.weight.detach()
    gate_up, down, act_fn = block.experts.gate_up_proj.detach(), block.experts.down_proj.detach(), block.experts.act_fn
    k = router.top_k
    rows = x.reshape(-1, H)
    with torch.no_grad():
        chosen = router.forward(rows)[2]  # the router's own choice
    d_rows = d.reshape(-1, H)
    d_x = torch.zeros_like(rows)
    d_params = {router_name: torch.zeros_like(w_r), "experts.gate_up_proj": torch.zeros_like(gate_up),
                "experts.down_proj": torch.zeros_like(down)}

    def sq_pull(f, inputs, slot, d_out):  # Σ_o d_o (∂f_o/∂input_slot)²
        jac = jacrev(f, argnums=slot)(*inputs)
        return torch.einsum("o...,o->...", jac.reshape(d_out.numel(), *inputs[slot].shape).square(), d_out.flatten())

    for r in range(rows.shape[0]):
        xr = rows[r]
        # forward, one value per operation
        z = w_r @ xr
        p = _scores(block, z)
        index = chosen[r]
        v = p[index]
        sigmoid = hasattr(router, "e_score_correction_bias")
        c = getattr(router, "routed_scaling_factor", 1.0)
        s = v.sum() + (1e-20 if sigmoid else 0.0)
        w0 = v / s if normalize else v
        if topk_first:  # the softmax of the chosen logits
            w0 = torch.softmax(z[index], -1)
        w = c * w0
        pieces = []
        for j in range(k):
            e = int(index[j])
            gu = gate_up[e] @ xr
            g, u = gu[:I], gu[I:]
            a = act_fn(g)
            h = a * u
            y = down[e] @ h
            pieces.append((e, gu, g, u, a, h, y))
        # backward: out = Σ_j c_j with c_j = y_j * w_j
        d_w = torch.zeros(k, dtype=DT)
        for j, (e, gu, g, u, a, h, y) in enumerate(pieces):
            d_c = d_rows[r]
            d_y = sq_pull(lambda y_, w_: y_ * w_, (y, w[j]), 0, d_c)
            d_w[j] = sq_pull(lambda y_, w_: y_ * w_, (y, w[j]), 1, d_c)
            d_params["experts.down_proj"][e] += sq_pull(lambda m, h_: m @ h_, (down[e], h), 0, d_y)
            d_h = sq_pull(lambda m, h_: m @ h_, (down[e], h), 1, d_y)
            d_a = sq_pull(lambda a_, u_: a_ * u_, (a, u), 0, d_h)
            d_u = sq_pull(lambda a_, u_: a_ * u_, (a, u), 1, d_h)
            d_g = sq_pull(act_fn, (g,), 0, d_a)
            d_gu = torch.cat([d_g, d_u])  # the split: entries copied
            d_params["experts.gate_up_proj"][e] += sq_pull(lambda m, x_: m @ x_, (gate_up[e], xr), 0, d_gu)
            d_x[r] += sq_pull(lambda m, x_: m @ x_, (gate_up[e], xr), 1, d_gu)
        d_w0 = sq_pull(lambda w_: c * w_, (w0,), 0, d_w)
        if topk_first:  # w0 = softmax(z_chosen), z_chosen = z[index]
            d_chosen = sq_pull(lambda z_: torch.softmax(z_, -1), (z[index],), 0, d_w0)
            d_z = sq_pull(lambda z_: z_[index], (z,), 0, d_chosen)
        elif normalize:  # w0 = v / s, s = Σ v (+ 1e-20)
            d_v = sq_pull(lambda v_, s_: v_ / s_, (v, s), 0, d_w0)
            d_s = sq_pull(lambda v_, s_: v_ / s_, (v, s), 1, d_w0)
            d_v = d_v + sq_pull(lambda v_: v_.sum() + (1e-20 if sigmoid else 0.0), (v,), 0, d_s)
        else:
            d_v = d_w0
        if not topk_first:
            d_p = sq_pull(lambda p_: p_[index], (p,), 0, d_v)
            d_z = sq_pull(lambda z_: _scores(block, z_), (z,), 0, d_p)
        d_params[router_name] += sq_pull(lambda m, x_: m @ x_, (w_r, xr), 0, d_z)
        d_x[r] += sq_pull(lambda m, x_: m @ x_, (w_r, xr), 1, d_z)
        mlp, shared_gate = _shared_mlp(block)
        if mlp is not None:  # + [sigmoid(q x) *] down(act(gate(x)) * up(x))
            prefix = "shared_experts" if shared_gate is None else "shared_expert"
            gs_w, us_w, ds_w = mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach()
            gs, us = gs_w @ xr, us_w @ xr
            a_s = mlp.act_fn(gs)
            hs = a_s * us
            ys = ds_w @ hs
            d_ys = d_rows[r]
            if shared_gate is not None:
                q = shared_gate.weight.detach()
                qx = q @ xr
                sig = torch.sigmoid(qx)
                d_sig = sq_pull(lambda s_, y_: s_ * y_, (sig, ys), 0, d_ys)
                d_ys = sq_pull(lambda s_, y_: s_ * y_, (sig, ys), 1, d_ys)
                d_qx = sq_pull(torch.sigmoid, (qx,), 0, d_sig)
                d_params.setdefault("shared_expert_gate.weight", torch.zeros_like(q))
                d_params["shared_expert_gate.weight"] += sq_pull(lambda m, x_: m @ x_, (q, xr), 0, d_qx)
                d_x[r] += sq_pull(lambda m, x_: m @ x_, (q, xr), 1, d_qx)
            d_params.setdefault(f"{prefix}.down_proj.weight", torch.zeros_like(ds_w))
            d_params[f"{prefix}.down_proj.weight"] += sq_pull(lambda m, h_: m @ h_, (ds_w, hs), 0, d_ys)
            d_hs = sq_pull(lambda m, h_: m @ h_, (ds_w, hs), 1, d_ys)
            d_as = sq_pull(lambda a_, u_: a_ * u_, (a_s, us), 0, d_hs)
            d_us = sq_pull(lambda a_, u_: a_ * u_, (a_s, us), 1, d_hs)
            d_gs = sq_pull(mlp.act_fn, (gs,), 0, d_as)
            for name, weight, d_out in ((f"{prefix}.gate_proj.weight", gs_w, d_gs),
                                        (f"{prefix}.up_proj.weight", us_w, d_us)):
                d_params.setdefault(name, torch.zeros_like(weight))
                d_params[name] += sq_pull(lambda m, x_: m @ x_, (weight, xr), 0, d_out)
                d_x[r] += sq_pull(lambda m, x_: m @ x_, (weight, xr), 1, d_out)
    return d_x, d_params


@pytest.mark.parametrize("kind,normalize,top_k", [
    ("mixtral", True, 2), ("qwen3", False, 2), ("qwen3", True, 3), ("mixtral", True, 1), ("qwen2", False, 2),
    ("qwen2", True, 3), ("deepseek", True, 2), ("deepseek", False, 3), ("deepseek2", False, 2), ("granite", True, 2),
    ("granite", True, 3), ("gpt_oss", True, 2), ("gpt_oss", True, 1),
])
@pytest.mark.parametrize("n", [1, 3])
def test_diagonals_follow_the_definition_by_operations(kind, normalize, top_k, n):
    block = _block(kind, normalize, top_k)
    rule = registry.rule_for(block)
    assert isinstance(rule, SparseMoeRule)
    torch.manual_seed(1)
    x = torch.randn(n, 5, H, dtype=DT)
    d = torch.rand(n, 5, H, dtype=DT)
    if _gpt_oss(block):
        want_x, want_params = _gpt_oss_diag_by_operations(block, x, d)
    else:
        want_x, want_params = _diag_by_operations(block, x, d, normalize)
    split = rule.operations_rule()
    call = _call(block, x)
    torch.testing.assert_close(split.diag_jac_t_diag_jac(call, d), want_x.reshape(x.shape), rtol=1e-10, atol=1e-13)
    for name, want in want_params.items():
        torch.testing.assert_close(split.param_diag(call, name, d), want, rtol=1e-10, atol=1e-13)


def test_the_order_of_the_routers_operations_decides_the_split_form():
    """A ``gate`` that takes the softmax of its top-k logits (Granite's order under Mixtral's
    name) gets that order's split diagonal: the order of ``softmax`` and ``topk`` in the
    router's forward is watched, the child's name does not decide."""
    block = _block("mixtral")
    cls = type(block.gate)
    block.gate.__class__ = type(cls.__name__, (cls,), {"forward": _float64_topk_first_router_forward})
    torch.manual_seed(1)
    x, d = torch.randn(2, 5, H, dtype=DT), torch.rand(2, 5, H, dtype=DT)
    want_x, want_params = _diag_by_operations(block, x, d, True, topk_first=True)
    split, call = registry.rule_for(block).operations_rule(), _call(block, x)
    torch.testing.assert_close(split.diag_jac_t_diag_jac(call, d), want_x.reshape(x.shape), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(split.param_diag(call, "gate.weight", d), want_params["gate.weight"], rtol=1e-10, atol=1e-13)
    softmax_first, _ = _diag_by_operations(block, x, d, True, topk_first=False)
    assert not torch.allclose(softmax_first, want_x, rtol=1e-3)  # the two forms differ here


def _formula(block: nn.Module, params: dict, x: torch.Tensor, index: torch.Tensor, normalize: bool) -> torch.Tensor:
    """The block's map in float64 throughout, for chosen experts ``index`` ``[R, k]`` (its router
    computes the softmax in float32; the choice is the block's)."""
    rows = x.reshape(-1, H)
    if _gpt_oss(block):  # the softmax of the chosen logits; biases; the experts' own clamped GLU
        z = rows @ params["router.weight"].T + params["router.bias"]
        w = torch.softmax(z.gather(1, index), -1)
        out = torch.zeros_like(rows)
        for j in range(index.shape[1]):
            e = index[:, j]
            gu = torch.einsum("rh,rhi->ri", rows, params["experts.gate_up_proj"][e]) + params["experts.gate_up_proj_bias"][e]
            h = block.experts._apply_gate(gu)
            y = torch.einsum("ri,rih->rh", h, params["experts.down_proj"][e]) + params["experts.down_proj_bias"][e]
            out = out + w[:, j : j + 1] * y
        return out.reshape(x.shape)
    p = _scores(block, rows @ params[_router_name(block)].T)
    w = _weights(block, p.gather(1, index), normalize)
    out = torch.zeros_like(rows)
    for j in range(index.shape[1]):
        gu = torch.einsum("rh,rih->ri", rows, params["experts.gate_up_proj"][index[:, j]])
        h = block.experts.act_fn(gu[:, :I]) * gu[:, I:]
        out = out + w[:, j : j + 1] * torch.einsum("ri,rhi->rh", h, params["experts.down_proj"][index[:, j]])
    mlp, shared_gate = _shared_mlp(block)
    if mlp is not None:
        pre = "shared_experts" if shared_gate is None else "shared_expert"
        hs = mlp.act_fn(rows @ params[f"{pre}.gate_proj.weight"].T) * (rows @ params[f"{pre}.up_proj.weight"].T)
        shared = hs @ params[f"{pre}.down_proj.weight"].T
        if shared_gate is not None:
            shared = torch.sigmoid(rows @ params["shared_expert_gate.weight"].T) * shared
        out = out + shared
    return out.reshape(x.shape)


@pytest.mark.parametrize("kind,normalize", [
    ("mixtral", True), ("qwen3", False), ("qwen2", True), ("deepseek", True), ("deepseek2", False), ("granite", True),
    ("gpt_oss", True),
])
def test_one_operation_diagonal_and_columns_match_dense_jacobians(kind, normalize):
    """The block as one operation (``split_attention=False``): ``Σ_o d_o J_oi²`` of the whole
    block's Jacobian, its column products for the input and every parameter per sample, against
    ``jacrev`` of the block's map written out in float64 (which agrees with the block's output)."""
    block = _block(kind, normalize)
    rule = registry.rule_for(block)
    torch.manual_seed(1)
    n, t = 2, 3
    x = torch.randn(n, t, H, dtype=DT)
    d = torch.rand(n, t, H, dtype=DT)
    call = _call(block, x)
    params = {k: v.detach() for k, v in block.named_parameters()}
    with torch.no_grad():
        index = _router(block).forward(x.reshape(-1, H))[2]  # the router's own choice
    # (the routers compute in float32 by design: the block's output agrees to float32's rounding)
    torch.testing.assert_close(_formula(block, params, x, index, normalize), _first(call.output), rtol=1e-5, atol=1e-7)
    f = lambda x_: _formula(block, params, x_, index, normalize)  # noqa: E731
    jac = jacrev(f)(x).reshape(n * t * H, n * t * H)  # a row of one sample reads only that sample
    want = (jac.square() * d.reshape(-1, 1)).sum(0).reshape(x.shape)
    torch.testing.assert_close(rule.diag_jac_t_diag_jac(call, d), want, rtol=1e-10, atol=1e-14)
    mat = torch.randn(4, n, t, H, dtype=DT)
    torch.testing.assert_close(rule.jac_t_mat_prod(call, mat), (mat.reshape(4, -1) @ jac).reshape(mat.shape),
                               rtol=1e-10, atol=1e-13)
    for name, value in params.items():
        def per_sample(theta, name=name):
            return _formula(block, {**params, name: theta}, x, index, normalize).reshape(n, -1)

        jac_p = jacrev(per_sample)(value)  # [N, T·H, *θ]
        want_p = torch.einsum("vno,no...->vn...", mat.reshape(4, n, -1), jac_p)
        torch.testing.assert_close(rule.param_jac_t_mat_prod(call, name, mat), want_p, rtol=1e-10, atol=1e-13)


class _Model(nn.Module):
    """Token features, a block, a mean over the tokens, a head (``[N, CLASSES]``)."""

    def __init__(self, block: nn.Module, hidden: int = H) -> None:
        super().__init__()
        self.inp, self.block, self.head = nn.Linear(3, hidden), block, nn.Linear(hidden, CLASSES)

    def forward(self, x):
        return self.head(torch.tanh(_first(self.block(self.inp(x)))).mean(1))


def _first(out):
    """The block's output (GPT-OSS's block also returns its routing weights)."""
    return out[0] if isinstance(out, tuple) else out


def _data(n: int = 3):
    torch.manual_seed(2)
    return torch.randn(n, 4, 3, dtype=DT), torch.randint(0, CLASSES, (n,))


def _float64_router_forward(self, hidden_states):
    """The routers' forward with the softmax in float64 (theirs is in float32, so a torch.func
    reference through it carries float32's rounding): the reference is then exact to float64."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    logits = torch.nn.functional.linear(hidden_states, self.weight)
    values, index = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)
    # (Mixtral's router always normalizes; DeepSeek-V2's never, and scales)
    if getattr(self, "norm_topk_prob", not hasattr(self, "routed_scaling_factor")):
        values = values / values.sum(-1, keepdim=True)
    return logits, values * getattr(self, "routed_scaling_factor", 1.0), index


def _float64_topk_first_router_forward(self, hidden_states):
    """Granite's router forward without its cast to float32."""
    logits = torch.nn.functional.linear(hidden_states, self.weight)
    values, index = torch.topk(logits, self.top_k, dim=-1)
    return logits, torch.softmax(values, dim=-1), index


def _float64_sigmoid_router_forward(self, hidden_states):
    """DeepSeek-V3's router forward without its casts to float32 (the same choice, in float64)."""
    hidden_states = hidden_states.view(-1, self.hidden_dim)
    scores = torch.nn.functional.linear(hidden_states, self.weight).sigmoid()
    choice = scores + self.e_score_correction_bias
    groups = choice.view(-1, self.num_group, self.num_experts // self.num_group).topk(2, dim=-1)[0].sum(-1)
    best = torch.topk(groups, k=self.topk_group, dim=-1, sorted=False)[1]
    mask = torch.zeros_like(groups).scatter_(1, best, 1).unsqueeze(-1)
    mask = mask.expand(-1, self.num_group, self.num_experts // self.num_group).reshape(-1, self.num_experts)
    index = torch.topk(choice.masked_fill(~mask.bool(), float("-inf")), k=self.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, index)
    if self.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return scores, weights * self.routed_scaling_factor, index


_FLOAT64_ROUTERS: dict = {}


def _float64_router(block: nn.Module) -> nn.Module:
    router = _router(block)
    if _gpt_oss(block):  # its router computes in the model's dtype already
        return block
    cls = type(router)
    if cls not in _FLOAT64_ROUTERS:  # a subclass (the reference deep-copies the model)
        forward = (
            _float64_sigmoid_router_forward if hasattr(router, "e_score_correction_bias")
            else _float64_topk_first_router_forward if _topk_first(block) else _float64_router_forward
        )
        _FLOAT64_ROUTERS[cls] = type(cls.__name__, (cls,), {"forward": forward})
        _FLOAT64_ROUTERS[cls].__module__ = cls.__module__
    router.__class__ = _FLOAT64_ROUTERS[cls]
    return block


def _exact_against_torch_func(model: nn.Module, n: int = 3) -> None:
    """DiagGGN, FullGGN and BatchJacobian against the torch.func reference, to float64's rounding."""
    X, y = _data(n)
    crit = nn.CrossEntropyLoss()
    got, matrix, _ = run_curvhook(model, X, lambda out: crit(out, y))
    ref = reference(model, X, lambda out: crit(out, y), approx=False)
    compare({k: v for k, v in got.items() if k != "DiagGGNApprox"}, ref, matrix, rtol=1e-10)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("kind,normalize", [
    ("mixtral", True), ("qwen3", False), ("qwen2", True), ("deepseek", True), ("deepseek", False), ("deepseek2", False),
    ("granite", True), ("gpt_oss", True),
])
def test_the_block_in_a_model_is_exact_without_the_fallback(kind, normalize, n, monkeypatch):
    served = fallback_spy(monkeypatch)
    _exact_against_torch_func(_Model(_float64_router(_block(kind, normalize))).to(DT), n)
    assert served == []


def test_split_and_one_operation_diagonals_are_each_used(monkeypatch):
    """DiagGGNApprox counts the block as its operations; with ``split_attention=False`` as one."""
    served = fallback_spy(monkeypatch)
    model = _Model(_block()).to(DT)
    X, y = _data()
    results = []
    for extension in (DiagGGNApprox(), DiagGGNApprox(split_attention=False)):
        model.zero_grad()
        with extend(model, extension):
            nn.CrossEntropyLoss()(model(X), y).backward()
        results.append([p.diag_ggn_approx.clone() for p in model.block.parameters()])
    assert served == []
    assert any(not torch.allclose(a, b) for a, b in zip(*results))


def test_a_block_that_computes_another_map_goes_to_the_exact_fallback(monkeypatch):
    """The recomputed output must match the recorded one: a subclass whose forward scales the
    output (a name and structure the rule accepts) is served by the exact fallback."""
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    class ScaledSparseMoeBlock(MixtralSparseMoeBlock):
        def forward(self, hidden_states):
            return super().forward(hidden_states) * 1.01

    ScaledSparseMoeBlock.__module__ = "transformers.models.x.modeling_x"
    config = transformers.MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=2)
    config._experts_implementation = "eager"
    scaled = ScaledSparseMoeBlock(config)
    scaled.load_state_dict(_block().state_dict())
    scaled = _float64_router(scaled.to(DT).eval())
    assert isinstance(registry.rule_for(scaled), SparseMoeRule)
    served = fallback_spy(monkeypatch)
    _exact_against_torch_func(_Model(scaled).to(DT))
    assert served


def test_a_shared_expert_of_another_form_is_not_served():
    """Qwen2-MoE's form needs bias-free linear maps: a shared gate with a bias is another map."""
    block = _block("qwen2")
    assert isinstance(registry.rule_for(block), SparseMoeRule)
    block.shared_expert_gate = nn.Linear(H, 1)
    assert registry.rule_for(block) is None
    block = _block("qwen2")
    block.shared_expert.extra = nn.Identity()
    assert registry.rule_for(block) is None


def test_float32_with_grouped_matrix_products_follows_float64(monkeypatch):
    """Users run transformers' default experts (``grouped_mm``, float32 only): the same rule
    serves the block, and its results follow the float64 ones of the eager loop."""
    import copy

    model64 = _Model(_block("qwen2", True, H=8), hidden=8).to(DT)  # (grouped_mm: rows of 16 bytes)
    model32 = copy.deepcopy(model64).float()
    model32.block.experts.config._experts_implementation = "grouped_mm"
    X, y = _data()
    results = []
    served = fallback_spy(monkeypatch)
    for model, x in ((model64, X), (model32, X.float())):
        model.zero_grad()
        with extend(model, DiagGGNApprox(), DiagGGN()):
            nn.CrossEntropyLoss()(model(x), y).backward()
        results.append([(p.diag_ggn_approx.double(), p.diag_ggn.double()) for p in model.block.parameters()])
    assert served == []
    for (a64, g64), (a32, g32) in zip(*results):
        torch.testing.assert_close(a32, a64, rtol=1e-3, atol=1e-5 * float(a64.abs().max()))
        torch.testing.assert_close(g32, g64, rtol=1e-3, atol=1e-5 * float(g64.abs().max()))


def test_a_router_whose_form_the_output_does_not_decide_goes_to_the_fallback():
    """Mixtral's router has no ``norm_topk_prob``: the rule takes the form of the weights that
    reproduces the output. Where the chosen probabilities sum to one within the tolerance, both
    forms do, with different derivatives: the call is not served (the review of session 46)."""
    from curvhook.rules import mixture_of_experts

    block = _block("mixtral")
    torch.manual_seed(3)
    x = torch.randn(2, 3, H, dtype=DT)
    assert mixture_of_experts._routing(_call(block, x)) is not None
    with torch.no_grad():  # two experts take all the probability: Σ v = 1 − 1e-9
        block.gate.weight.zero_()
        block.gate.weight[0, 0], block.gate.weight[1, 0] = 40.0, 40.0
    x[..., 0] = 1.0
    assert mixture_of_experts._routing(_call(block, x)) is None
