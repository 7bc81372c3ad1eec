"""NTK, OutputCovariance, GGNVectorProduct and LowRankGGN against torch.func.

The reference is ``tests/reference.py`` (through ``products_reference.py``;
neither imports curvhook): in float64, the Jacobian ``J_n = ∂f_n/∂θ`` is
``jacrev`` of ``functional_call`` over the trainable parameters in
``model.parameters()`` order, and ``G = Σ_n J_nᵀ H_n J_n`` with ``H_n`` the
per-sample blocks of ``torch.func.hessian`` of the scalar loss exactly as
backpropagated (reduction included). From these, by their definitions:

- NTK: ``K[n,c,m,d] = Σ_p J[n,c,p] J[m,d,p]``; per parameter, the sum over
  that parameter's entries only;
- OutputCovariance: ``J_n Σ J_nᵀ`` with ``Σ`` assembled densely (diagonal
  entries, Kronecker blocks ``torch.kron(B, A)`` in ``p.flatten()`` order, or
  given dense);
- GGNVectorProduct: ``G v`` with the flattened ``v`` (one vector or ``K`` at once);
- LowRankGGN: the top-k of ``torch.linalg.eigh(G)``; eigenvectors compared up to
  sign, and by projectors where eigenvalues cluster.

Models: a representative subset of every layer family of ``tests/rules/`` (the
``FAMILIES`` of ``test_batch_grad.py``), the graphs of that file (residual,
weight sharing, a transformer encoder layer, ...), N = 1 and N = 3, CE and MSE
with both reductions, and a float32 smoke run of each extension.
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvhook import extend
from curvhook.errors import CurvhookError
from curvhook.extensions import NTK, GGNVectorProduct, LowRankGGN, OutputCovariance
from curvhook.rules import shared_weight
from extensions.products_reference import (
    check,
    check_eigensystem,
    dense_covariance,
    flatten_per_parameter,
    ggn,
    jacobian,
    kronecker_factors,
    ntk,
    numerical_rank,
    output_covariance,
    random_spd,
    slices,
    trainable,
)
from extensions.test_batch_grad import FAMILIES, GRAPHS, _targets
from helpers import DT

RTOL = 1e-10

# One or more cases of every layer family (the full tables run in tests/rules/ and test_batch_grad.py).
CASES = [
    "linear-positions",
    "linear-no_bias_after_linear",
    "conv-conv2d_padding_dilation_groups",
    "conv-conv3d_first_layer",
    "conv-convT1d_stride_pad_outpad_groups_dilation",
    "elementwise-gelu_tanh_positions",
    "elementwise-prelu_per_channel_conv2d_maps",
    "embedding-embedding_padding_idx",
    "normalization-batchnorm2d_after_conv",
    "normalization-groupnorm_1d",
    "normalization-layernorm_positions_no_bias",
    "normalization-rmsnorm_last_dim",
    "padding-reflectionpad2d",
    "pooling-avgpool2d_ceil_exclude_pad",
    "pooling-maxpool2d_dilation_padding_ceil",
    "reshape-pixel_shuffle",
    "softmax-softmax_middle_dim",
    "upsampling-upsample_bilinear_align_corners",
    "fallback-channel_shuffle",
    "fallback-squared_weight",
    "recurrent-lstm_last",
    "recurrent-gru_all_bidirectional_two_layers",
    "attention-causal_bool",
    "attention-key_padding",
    "tensor_ops-gated_cat_split",
    "tensor_ops-mha",
    "tensor_ops-own_parameters",
    "tensor_ops-shared_weights",
    "functional-embedding",
    "functional-layer_norm_last",
    "functional-sdpa_causal",
    "parameters_only-class_token",
    "parameters_only-frozen_tokens_trainable_positions",
]
# residual, weight sharing (a Linear called twice, a convolution called twice), attention block, ...
GRAPH_CASES = sorted(GRAPHS)
ALL_CASES = [f"family:{c}" for c in CASES] + [f"graph:{g}" for g in GRAPH_CASES]


def problem(case: str, n: int, loss: str = "ce_mean"):
    """``(model, X, loss_fn)`` for ``"family:<name>"`` or ``"graph:<name>"``; ``loss`` as in
    ``test_batch_grad._targets`` (``ce_mean``, ``ce_sum``, ``mse_mean``, ``mse_sum``)."""
    torch.manual_seed(0)
    source, name = case.split(":")
    if source == "family":
        model, X, _ = FAMILIES[name](n)
    else:
        build, shape = GRAPHS[name]
        model, X = build().to(DT).eval(), torch.randn(n, *shape, dtype=DT)
    with torch.no_grad():
        out_shape = model(X).shape
    return model, X, _targets(loss, out_shape, n)


def run(model: nn.Module, X: Tensor, backward: Callable[[Tensor], Tensor], *extensions, **kwargs) -> None:
    """One ``extend`` block as a user writes it (warnings of the fallback silenced)."""
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with extend(model, *extensions, **kwargs):
            backward(model(X)).backward()


def run_warning(model: nn.Module, X: Tensor, backward: Callable[[Tensor], Tensor], *extensions) -> None:
    """As :func:`run`, warnings left to the caller."""
    model.zero_grad(set_to_none=True)
    with extend(model, *extensions):
        backward(model(X)).backward()


def plain_grads(model: nn.Module, X: Tensor, loss_fn: Callable[[Tensor], Tensor]) -> list:
    model.zero_grad(set_to_none=True)
    loss_fn(model(X)).backward()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def total_sum(out: Tensor) -> Tensor:
    return out.sum()


# ======================================================================= NTK
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("case", ALL_CASES)
def test_ntk_is_the_gram_matrix_of_the_jacobians(case, n):
    """``ntk.matrix[n,c,m,d] = J_n J_mᵀ``; each ``p.ntk`` is ``p``'s share, and the shares sum to it."""
    model, X, _ = problem(case, n)
    ext = NTK(per_parameter=True)
    run(model, X, total_sum, ext)
    J = jacobian(model, X)
    c = J.shape[1]
    assert ext.matrix.shape == (n, c, n, c)
    check(ext.matrix, ntk(J), "NTK", rtol=RTOL)
    _, params = trainable(model)
    for p, where in zip(params, slices(params)):
        assert p.ntk.shape == (n, c, n, c)
        check(p.ntk, ntk(J[:, :, where]), "NTK per parameter", rtol=RTOL, atol_factor=1e-10)
    check(sum(p.ntk for p in params), ext.matrix, "NTK shares sum to the matrix", rtol=RTOL)


@pytest.mark.parametrize(
    "scalar",
    {
        "sum": total_sum,
        "cross_entropy": lambda out: nn.CrossEntropyLoss()(out, torch.tensor([0, 2, 1])),
        "scaled_mse_sum": lambda out: 0.25 * nn.MSELoss(reduction="sum")(out, torch.ones_like(out)),
    }.items(),
    ids=lambda s: s[0],
)
def test_ntk_does_not_depend_on_the_backpropagated_scalar(scalar):
    model, X, _ = problem("graph:residual", 3)
    ext = NTK()
    run(model, X, scalar[1], ext)
    check(ext.matrix, ntk(jacobian(model, X)), "NTK", rtol=RTOL)


def test_ntk_without_per_parameter_writes_no_parameter_attribute():
    model, X, _ = problem("graph:mlp", 3)
    ext = NTK()
    run(model, X, total_sum, ext)
    assert not any(hasattr(p, "ntk") for p in model.parameters())
    check(ext.matrix, ntk(jacobian(model, X)), "NTK", rtol=RTOL)


@pytest.mark.parametrize("n", [1, 3])
def test_ntk_of_an_output_with_positions_is_flattened_row_major(n):
    """Output ``[N, T, O]``: ``C = T·O`` entries per sample in row-major order."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    X = torch.randn(n, 5, 3, dtype=DT)
    ext = NTK(per_parameter=True)
    run(model, X, total_sum, ext)
    J = jacobian(model, X)
    assert J.shape[1] == 10
    check(ext.matrix, ntk(J), "NTK", rtol=RTOL)
    _, params = trainable(model)
    for p, where in zip(params, slices(params)):
        check(p.ntk, ntk(J[:, :, where]), "NTK per parameter", rtol=RTOL)


def test_ntk_leaves_out_frozen_parameters():
    model, X, _ = problem("graph:mlp", 3)
    model[0].weight.requires_grad_(False)
    ext = NTK(per_parameter=True)
    run(model, X, total_sum, ext)
    assert not hasattr(model[0].weight, "ntk")
    check(ext.matrix, ntk(jacobian(model, X)), "NTK", rtol=RTOL)  # J over the trainable parameters only


# ========================================================== OutputCovariance
def diagonal_cov(params) -> dict:
    return {p: 0.5 + torch.rand(p.shape, dtype=torch.float64).to(p.dtype) for p in params}


def kronecker_cov(model: nn.Module, diagonal_bias: bool = False) -> dict:
    """Kronecker factors for every Linear and Conv weight (and bias, unless ``diagonal_bias``);
    diagonal entries for every other trainable parameter."""
    _, params = trainable(model)
    cov = diagonal_cov(params)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            for p in m.parameters(recurse=False):
                if p.requires_grad and not (diagonal_bias and p is m.bias):
                    cov[p] = kronecker_factors(p, m)
    return cov


def check_covariance(model, X, ext, cov_dense, label):
    J = jacobian(model, X)
    n, c = J.shape[:2]
    assert ext.covariance.shape == (n, c, c)
    check(ext.covariance, output_covariance(J, cov_dense), label, rtol=RTOL)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("case", ALL_CASES)
def test_output_covariance_with_a_diagonal_sigma(case, n):
    model, X, _ = problem(case, n)
    _, params = trainable(model)
    cov = diagonal_cov(params)
    ext = OutputCovariance(cov)
    run(model, X, total_sum, ext)
    check_covariance(model, X, ext, dense_covariance(cov, params), "OutputCovariance (diagonal)")


class LinearSequence(nn.Module):
    """Linear layers on ``[N, T, in]`` (a sequence axis), output ``[N, T, C]`` or pooled ``[N, C]``."""

    def __init__(self, pool: bool) -> None:
        super().__init__()
        self.pool = pool
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h.mean(1) if self.pool else h)


class SharedConv(nn.Module):
    """One Conv2d called twice, then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 2, 3, padding=1), nn.Linear(32, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(torch.tanh(self.conv(x)))).flatten(1))


KRONECKER_MODELS = {
    "linear": (lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), (4,)),
    "linear_sequence": (lambda: LinearSequence(pool=False), (5, 3)),
    "linear_sequence_pooled": (lambda: LinearSequence(pool=True), (5, 3)),
    "conv2d": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 2, stride=2), nn.Tanh(),
            nn.Flatten(), nn.Linear(16, 3),
        ),
        (2, 4, 4),
    ),
    "conv2d_shared": (SharedConv, (2, 4, 4)),
    "conv2d_layernorm": (  # LayerNorm's parameters take diagonal entries next to Kronecker blocks
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 2), nn.Flatten(), nn.LayerNorm(27), nn.Tanh(), nn.Linear(27, 3, bias=False)
        ),
        (2, 4, 4),
    ),
}


def kronecker_problem(name: str, n: int):
    torch.manual_seed(0)
    build, shape = KRONECKER_MODELS[name]
    model = build().to(DT).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.add_(0.5 * torch.randn_like(m.weight))
                m.bias.add_(0.5 * torch.randn_like(m.bias))
    return model, torch.randn(n, *shape, dtype=DT)


@pytest.mark.parametrize("diagonal_bias", [False, True], ids=["kronecker_bias", "diagonal_bias"])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("name", sorted(KRONECKER_MODELS))
def test_output_covariance_with_kronecker_factors(name, n, diagonal_bias):
    """``(A, B)`` per parameter in KFAC's layout is the block ``torch.kron(B, A)``; may mix with diagonals."""
    model, X = kronecker_problem(name, n)
    _, params = trainable(model)
    cov = kronecker_cov(model, diagonal_bias)
    assert any(isinstance(v, tuple) for v in cov.values())
    ext = OutputCovariance(cov)
    run(model, X, total_sum, ext)
    check_covariance(model, X, ext, dense_covariance(cov, params), "OutputCovariance (Kronecker)")


def general_kronecker_factors(p: nn.Parameter) -> tuple[Tensor, Tensor]:
    """``(A, B)`` for any parameter by its shape: ``B`` over ``p.shape[0]``, ``A`` over the rest."""
    rows = p.shape[0] if p.dim() else 1
    return random_spd(p.numel() // rows), random_spd(rows)


@pytest.mark.parametrize(
    "case",
    ["family:embedding-embedding_plain", "family:normalization-layernorm_positions_no_bias",
     "family:attention-plain", "family:recurrent-gru_last", "family:conv-convT2d_plain",
     "family:conv-conv2d_padding_dilation_groups", "graph:weight_sharing"],
)
def test_output_covariance_with_kronecker_factors_on_any_parameter(case):
    """``(A, B)`` is accepted for any parameter (``B`` ``[p.shape[0]]²``, ``A`` the rest, as validated):
    the block is still ``torch.kron(B, A)`` in ``p.flatten()`` order (transposed and grouped
    convolutions, embeddings, normalisation, attention and recurrent weights)."""
    model, X, _ = problem(case, 3)
    _, params = trainable(model)
    cov = {p: general_kronecker_factors(p) for p in params}
    ext = OutputCovariance(cov)
    run(model, X, total_sum, ext)
    check_covariance(model, X, ext, dense_covariance(cov, params), "OutputCovariance (Kronecker)")


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize(
    "case",
    ["graph:conv_net", "graph:weight_sharing", "graph:transformer_encoder_layer", "family:embedding-embedding_plain",
     "family:recurrent-gru_last", "family:normalization-layernorm_last_dim", "family:fallback-softsign",
     "family:tensor_ops-residual", "family:functional-rms_norm",
     "family:parameters_only-frozen_tokens_trainable_positions"],
)
def test_output_covariance_with_a_dense_sigma(case, n):
    model, X, _ = problem(case, n)
    _, params = trainable(model)
    sigma = random_spd(sum(p.numel() for p in params))
    ext = OutputCovariance(sigma)
    run(model, X, total_sum, ext)
    check_covariance(model, X, ext, sigma, "OutputCovariance (dense)")


def test_output_covariance_is_the_same_from_a_loss():
    model, X, loss_fn = problem("graph:residual", 3)
    _, params = trainable(model)
    sigma = random_spd(sum(p.numel() for p in params))
    ext = OutputCovariance(sigma)
    run(model, X, loss_fn, ext)
    check_covariance(model, X, ext, sigma, "OutputCovariance (dense)")


@pytest.mark.parametrize("kind", ["diagonal", "kronecker"])
def test_output_covariance_refuses_a_dict_without_every_trainable_parameter(kind):
    model, X = kronecker_problem("linear", 3)
    cov = kronecker_cov(model) if kind == "kronecker" else diagonal_cov(list(model.parameters()))
    del cov[model[2].bias]
    with pytest.raises((CurvhookError, TypeError, ValueError)):
        run(model, X, total_sum, OutputCovariance(cov))


def test_output_covariance_leaves_out_frozen_parameters():
    """A dense ``Σ`` is over the trainable parameters only; a dict needs no frozen key."""
    model, X = kronecker_problem("conv2d", 3)
    model[0].weight.requires_grad_(False)
    _, params = trainable(model)
    sigma = random_spd(sum(p.numel() for p in params))
    dense = OutputCovariance(sigma)
    run(model, X, total_sum, dense)
    check_covariance(model, X, dense, sigma, "OutputCovariance (dense)")
    cov = kronecker_cov(model)
    assert all(p is not model[0].weight for p in cov)
    factored = OutputCovariance(cov)
    run(model, X, total_sum, factored)
    check_covariance(model, X, factored, dense_covariance(cov, params), "OutputCovariance (Kronecker)")


# ========================================================== GGNVectorProduct
def random_vectors(params, k=None) -> dict:
    lead = () if k is None else (k,)
    return {p: torch.randn(*lead, *p.shape, dtype=p.dtype) for p in params}


def check_ggn_vector_product(model, X, loss_fn, v, k, label="GGNVectorProduct", rtol=RTOL):
    _, params = trainable(model)
    G = ggn(model, X, loss_fn)
    for p in params:
        assert p.ggn_v.shape == v[p].shape, f"{label}: ggn_v {tuple(p.ggn_v.shape)} != v {tuple(v[p].shape)}"
    lead = 0 if k is None else 1
    V = flatten_per_parameter(v, params, lead).to(torch.float64)  # [P] or [K, P]
    got = flatten_per_parameter({p: p.ggn_v for p in params}, params, lead)
    check(got, V @ G, label, rtol=rtol)  # G symmetric: (G v)ᵀ = vᵀ G


class TableThroughNorm(nn.Module):
    """A parameter passed to a module as its input, ``ln(self.table)``, then times the batch."""

    def __init__(self):
        super().__init__()
        self.stem, self.table, self.ln = nn.Linear(3, 3), nn.Parameter(torch.randn(4, 3)), nn.LayerNorm(3)
        self.head = nn.Linear(12, 3)

    def forward(self, x):  # [N, 4, 3]
        return self.head((torch.tanh(self.stem(x)) * self.ln(self.table)).flatten(1))


@pytest.mark.parametrize("n", [1, 3])
def test_ggn_vector_product_of_a_parameter_passed_to_a_module(n):
    """(Before: KeyError 't0': the forward products looked the passed parameter up among the
    module's own.)"""
    torch.manual_seed(0)
    model = TableThroughNorm().to(DT)
    X, y = torch.randn(n, 4, 3, dtype=DT), torch.arange(n) % 3
    loss_fn = lambda out: F.cross_entropy(out, y)  # noqa: E731
    _, params = trainable(model)
    v = random_vectors(params)
    run(model, X, loss_fn, GGNVectorProduct(v))
    check_ggn_vector_product(model, X, loss_fn, v, None)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("case", ALL_CASES)
def test_ggn_vector_product_every_family(case, n):
    model, X, loss_fn = problem(case, n)
    _, params = trainable(model)
    v = random_vectors(params)
    run(model, X, loss_fn, GGNVectorProduct(v))
    check_ggn_vector_product(model, X, loss_fn, v, None)


@pytest.mark.parametrize("k", [None, 3], ids=["one_vector", "three_vectors"])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("loss", ["ce_mean", "ce_sum", "mse_mean", "mse_sum"])
@pytest.mark.parametrize("graph", ["conv_net", "residual", "weight_sharing", "transformer_encoder_layer"])
def test_ggn_vector_product_losses_reductions_and_blocks(graph, loss, n, k):
    """``p.ggn_v = (G v)[p]`` for one ``v`` or ``K`` at once; ``p.grad`` as a plain backward gives it."""
    model, X, loss_fn = problem(f"graph:{graph}", n, loss)
    _, params = trainable(model)
    v = random_vectors(params, k)
    want = plain_grads(model, X, loss_fn)
    run(model, X, loss_fn, GGNVectorProduct(v))
    check_ggn_vector_product(model, X, loss_fn, v, k)
    for g, p in zip(want, model.parameters()):
        assert torch.equal(g, p.grad), "p.grad differs from a plain backward"


def test_ggn_vector_product_of_an_output_with_positions():
    """MSE on ``[N, T, C]``: the per-sample Hessian covers all ``T·C`` entries."""
    model, X = kronecker_problem("linear_sequence", 3)
    target = torch.randn(3, 5, 2, dtype=DT)
    loss_fn = lambda out: nn.MSELoss()(out, target)  # noqa: E731
    v = random_vectors(list(model.parameters()), 3)
    run(model, X, loss_fn, GGNVectorProduct(v))
    check_ggn_vector_product(model, X, loss_fn, v, 3)


def test_ggn_vector_product_with_a_named_functional_loss():
    model, X, _ = problem("graph:residual", 3)
    y = torch.randint(0, 3, (3,))
    v = random_vectors(list(model.parameters()))
    run(model, X, lambda out: F.cross_entropy(out, y), GGNVectorProduct(v, loss=nn.CrossEntropyLoss()))
    check_ggn_vector_product(model, X, lambda out: F.cross_entropy(out, y), v, None)


def test_ggn_vector_product_is_linear_in_v():
    """``G (2 v₁ - v₂)`` from a block of two vectors against the same product of single runs."""
    model, X, loss_fn = problem("graph:weight_sharing", 3)
    _, params = trainable(model)
    v1, v2 = random_vectors(params), random_vectors(params)
    results = []
    for v in (v1, v2, {p: 2 * v1[p] - v2[p] for p in params}):
        run(model, X, loss_fn, GGNVectorProduct(v))
        results.append(flatten_per_parameter({p: p.ggn_v for p in params}, params))
    check(results[2], 2 * results[0] - results[1], "GGNVectorProduct linear", rtol=1e-9)


def test_ggn_vector_product_accepts_a_list_in_parameter_order():
    model, X, loss_fn = problem("graph:conv_net", 3)
    _, params = trainable(model)
    v = random_vectors(params, 2)
    run(model, X, loss_fn, GGNVectorProduct([v[p] for p in params]))
    check_ggn_vector_product(model, X, loss_fn, v, 2)


def test_ggn_vector_product_keeps_a_block_of_one():
    """``v[p]`` ``[1, *p.shape]`` gives ``p.ggn_v`` ``[1, *p.shape]``."""
    model, X, loss_fn = problem("graph:residual", 3, "mse_sum")
    _, params = trainable(model)
    v = random_vectors(params, 1)
    run(model, X, loss_fn, GGNVectorProduct(v))
    check_ggn_vector_product(model, X, loss_fn, v, 1)


def test_ggn_vector_product_refuses_a_dict_without_every_trainable_parameter():
    model, X, loss_fn = problem("graph:mlp", 3)
    v = random_vectors(list(model.parameters()))
    del v[model[0].bias]
    with pytest.raises(CurvhookError):
        run(model, X, loss_fn, GGNVectorProduct(v))


def test_ggn_vector_product_leaves_out_frozen_parameters():
    model, X, loss_fn = problem("graph:conv_net", 3)
    model[0].weight.requires_grad_(False)
    _, params = trainable(model)
    v = random_vectors(params, 2)
    run(model, X, loss_fn, GGNVectorProduct(v))
    assert not hasattr(model[0].weight, "ggn_v")
    check_ggn_vector_product(model, X, loss_fn, v, 2)


class PerPositionLogits(nn.Module):
    """Logits ``[N, C, T]`` for a cross-entropy per position (C = 3 classes, T = 4 positions)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 3)

    def forward(self, x):  # [N, T, 3]
        return self.b(torch.tanh(self.a(x))).transpose(1, 2)


def per_position_problem(n: int, reduction: str = "mean"):
    torch.manual_seed(0)
    model = PerPositionLogits().to(DT)
    X, y = torch.randn(n, 4, 3, dtype=DT), torch.randint(0, 3, (n, 4))
    crit = nn.CrossEntropyLoss(reduction=reduction)
    return model, X, lambda out: crit(out, y)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n", [1, 3])
def test_ggn_vector_product_per_position_cross_entropy(n, reduction):
    model, X, loss_fn = per_position_problem(n, reduction)
    v = random_vectors(list(model.parameters()), 3)
    run(model, X, loss_fn, GGNVectorProduct(v))
    check_ggn_vector_product(model, X, loss_fn, v, 3)


def test_ggn_vector_product_accumulates_over_batches():
    """``accumulate=True`` sums the products: ``(G₁ + G₂) v``."""
    torch.manual_seed(0)
    model = GRAPHS["residual"][0]().to(DT)
    batches = [(torch.randn(3, 4, dtype=DT), torch.randint(0, 3, (3,))) for _ in range(2)]
    v = random_vectors(list(model.parameters()), 2)
    with extend(model, GGNVectorProduct(v), accumulate=True):
        for X, y in batches:
            nn.CrossEntropyLoss()(model(X), y).backward()
    G = sum(ggn(model, X, lambda out, y=y: nn.CrossEntropyLoss()(out, y)) for X, y in batches)
    params = list(model.parameters())
    got = flatten_per_parameter({p: p.ggn_v for p in params}, params, 1)
    check(got, flatten_per_parameter(v, params, 1) @ G, "GGNVectorProduct (accumulated)", rtol=RTOL)


def test_ggn_vector_product_of_two_forward_passes_in_one_loss():
    """``ℓ = L(f(X₁)) + L(f(X₂))``: its GGN is ``G₁ + G₂``."""
    torch.manual_seed(0)
    model = GRAPHS["weight_sharing"][0]().to(DT)
    (X1, y1), (X2, y2) = [(torch.randn(n, 4, dtype=DT), torch.randint(0, 3, (n,))) for n in (3, 2)]
    crit = nn.CrossEntropyLoss()
    v = random_vectors(list(model.parameters()))
    model.zero_grad(set_to_none=True)
    with extend(model, GGNVectorProduct(v)):
        (crit(model(X1), y1) + crit(model(X2), y2)).backward()
    G = ggn(model, X1, lambda out: crit(out, y1)) + ggn(model, X2, lambda out: crit(out, y2))
    params = list(model.parameters())
    got = flatten_per_parameter({p: p.ggn_v for p in params}, params)
    check(got, flatten_per_parameter(v, params) @ G, "GGNVectorProduct (two forward passes)", rtol=RTOL)


# ================================================================ LowRankGGN
def collect_low_rank(model, ext, k):
    _, params = trainable(model)
    assert ext.eigenvalues.shape == (k,)
    for p in params:
        assert p.ggn_eigvecs.shape == (k, *p.shape)
    return ext.eigenvalues, flatten_per_parameter({p: p.ggn_eigvecs for p in params}, params, 1)


# (case, N, loss, k): k ≤ (C - 1)·N for CE (the rank of its Hessian), ≤ C·N for MSE, ≤ rank(G)
LOW_RANK_PROBLEMS = {
    "mlp_ce_mean_n1": ("graph:mlp", 1, "ce_mean", 2),
    "mlp_ce_sum_n3": ("graph:mlp", 3, "ce_sum", 4),
    "conv_net_mse_mean_n3": ("graph:conv_net", 3, "mse_mean", 6),
    "residual_mse_sum_n1": ("graph:residual", 1, "mse_sum", 3),
    "weight_sharing_ce_mean_n3": ("graph:weight_sharing", 3, "ce_mean", 5),
    "transformer_ce_mean_n3": ("graph:transformer_encoder_layer", 3, "ce_mean", 4),
    "embedding_ce_mean_n3": ("family:embedding-embedding_plain", 3, "ce_mean", 4),
    "attention_ce_sum_n3": ("family:attention-plain", 3, "ce_sum", 5),
    "layernorm_mse_mean_n3": ("family:normalization-layernorm_positions_no_bias", 3, "mse_mean", 6),
    "lstm_ce_mean_n3": ("family:recurrent-lstm_last", 3, "ce_mean", 4),
    "fallback_ce_mean_n3": ("family:fallback-channel_shuffle", 3, "ce_mean", 4),
    "tensor_ops_ce_mean_n3": ("family:tensor_ops-gated_cat_split", 3, "ce_mean", 4),
    "functional_sdpa_ce_mean_n3": ("family:functional-sdpa", 3, "ce_mean", 4),
}


def low_rank_problem(name):
    case, n, loss, k = LOW_RANK_PROBLEMS[name]
    model, X, loss_fn = problem(case, n, loss)
    G = ggn(model, X, loss_fn)
    assert numerical_rank(G) >= k, "test setup: k exceeds the rank of G"
    return model, X, loss_fn, k, G


@pytest.mark.parametrize("method", ["gram", "dense", "auto"])
@pytest.mark.parametrize("name", sorted(LOW_RANK_PROBLEMS))
def test_low_rank_ggn_exact_methods(name, method):
    """Top-k eigenpairs of ``G``: eigenvalues to 1e-8, eigenvectors up to sign or as eigenspaces."""
    model, X, loss_fn, k, G = low_rank_problem(name)
    ext = LowRankGGN(k, method=method)
    run(model, X, loss_fn, ext)
    values, vectors = collect_low_rank(model, ext, k)
    check_eigensystem(values, vectors, G, f"LowRankGGN ({method})", rtol=1e-8)


@pytest.mark.parametrize("name", ["mlp_ce_sum_n3", "conv_net_mse_mean_n3", "transformer_ce_mean_n3", "lstm_ce_mean_n3"])
def test_low_rank_ggn_randomized_is_exact_when_the_rank_is_small(name):
    """rank(G) ≤ (C - 1)·N or C·N ≤ k + 10: the randomized range finder sees all of it."""
    model, X, loss_fn, k, G = low_rank_problem(name)
    assert numerical_rank(G) <= k + 10
    ext = LowRankGGN(k, method="randomized")
    run(model, X, loss_fn, ext)
    values, vectors = collect_low_rank(model, ext, k)
    check_eigensystem(values, vectors, G, "LowRankGGN (randomized)", rtol=1e-6, vector_tol=1e-5)


@pytest.mark.parametrize("method", ["gram", "dense", "auto", "randomized"])
@pytest.mark.parametrize("n", [1, 3])
def test_low_rank_ggn_per_position_cross_entropy(n, method):
    """V = (C - 1)·T = 8 square-root columns per sample; rank(G) ≤ 8·N (P = 38)."""
    model, X, loss_fn = per_position_problem(n)
    G = ggn(model, X, loss_fn)
    k = 6
    assert numerical_rank(G) >= k + 1
    ext = LowRankGGN(k, method=method)
    run(model, X, loss_fn, ext)
    values, vectors = collect_low_rank(model, ext, k)
    if method == "randomized" and n == 3:
        # rank(G) up to 24 > k + 10: not exact, but Rayleigh–Ritz values never exceed the true ones
        # (Cauchy interlacing), the vectors are orthonormal and each value is its vector's Rayleigh quotient
        top = torch.linalg.eigvalsh(G).flip(0)[:k]
        assert (values <= top * (1 + 1e-10)).all(), f"Ritz values above the eigenvalues: {values} > {top}"
        check(vectors @ vectors.T, torch.eye(k, dtype=DT), "LowRankGGN (randomized) orthonormal", rtol=0)
        check(values, torch.einsum("kp,pq,kq->k", vectors, G, vectors), "LowRankGGN (randomized) Rayleigh", rtol=1e-8)
        return
    if method == "randomized":  # N = 1: rank ≤ 8 ≤ k + 10, exact
        check_eigensystem(values, vectors, G, "LowRankGGN (randomized)", rtol=1e-6, vector_tol=1e-5)
        return
    check_eigensystem(values, vectors, G, f"LowRankGGN ({method})", rtol=1e-8)


@pytest.mark.parametrize("method", ["gram", "dense", "auto"])
def test_low_rank_ggn_with_fewer_parameters_than_columns(method):
    """``Linear(2, 3)``, MSE, N = 5: P = 9 < V·N = 15 ("auto" takes the dense path)."""
    torch.manual_seed(0)
    model = nn.Linear(2, 3).to(DT)
    X, target = torch.randn(5, 2, dtype=DT), torch.randn(5, 3, dtype=DT)
    loss_fn = lambda out: nn.MSELoss(reduction="sum")(out, target)  # noqa: E731
    G = ggn(model, X, loss_fn)
    assert numerical_rank(G) == 9
    ext = LowRankGGN(9, method=method)
    run(model, X, loss_fn, ext)
    values, vectors = collect_low_rank(model, ext, 9)
    check_eigensystem(values, vectors, G, f"LowRankGGN ({method})", rtol=1e-8)


def test_low_rank_ggn_leaves_grad_untouched():
    model, X, loss_fn, k, _ = low_rank_problem("weight_sharing_ce_mean_n3")
    want = plain_grads(model, X, loss_fn)
    run(model, X, loss_fn, LowRankGGN(k))
    for g, p in zip(want, model.parameters()):
        assert torch.equal(g, p.grad)


def rank_deficient_problem():
    """``Linear(4, 3)`` with MSE, N = 5, the last two input features zero: ``P = 15``, ``V·N = 15``,
    ``rank(G) = 3·rank([x_n, 1]) = 9``."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(DT)
    X = torch.randn(5, 4, dtype=DT)
    X[:, 2:] = 0
    target = torch.randn(5, 3, dtype=DT)
    loss_fn = lambda out: nn.MSELoss()(out, target)  # noqa: E731
    G = ggn(model, X, loss_fn)
    assert numerical_rank(G) == 9
    return model, X, loss_fn, G


@pytest.mark.parametrize("method", ["gram", "dense", "randomized", "auto"])
def test_low_rank_ggn_k_above_the_rank_warns_and_returns_zero_eigenvalues(method):
    """As documented: a warning; the eigenvalues beyond the rank are 0; their eigenvectors are
    zeros ("gram") or orthonormal null-space vectors ("dense", "randomized"); the first ``rank``
    pairs are exact."""
    model, X, loss_fn, G = rank_deficient_problem()
    k, rank = 11, 9
    ext = LowRankGGN(k, method=method)
    with pytest.warns(UserWarning, match="nonzero"):
        run_warning(model, X, loss_fn, ext)
    values, vectors = collect_low_rank(model, ext, k)
    check_eigensystem(values[:rank], vectors[:rank], G, f"LowRankGGN ({method}, k > rank)", rtol=1e-8,
                      vector_tol=1e-6 if method == "randomized" else None)
    assert torch.equal(values[rank:], torch.zeros(k - rank, dtype=DT))
    rest = vectors[rank:]
    if ext.used_method == "gram":
        assert torch.equal(rest, torch.zeros_like(rest))
    else:
        check(vectors @ vectors.T, torch.eye(k, dtype=DT), "LowRankGGN null space orthonormal", rtol=0, atol_factor=1e-10)
        torch.testing.assert_close(rest @ G, torch.zeros_like(rest), rtol=0, atol=1e-10 * G.abs().max().item())


def test_low_rank_ggn_gram_refuses_k_above_the_gram_rows():
    """CE with C = 3, N = 1: V = C - 1 = 2 square-root columns; k = 3 > V·N with "gram" raises."""
    model, X, loss_fn, _, _ = low_rank_problem("mlp_ce_mean_n1")
    with pytest.raises(CurvhookError, match="k ≤ 2"):
        run(model, X, loss_fn, LowRankGGN(3, method="gram"))


def test_low_rank_ggn_auto_falls_back_to_dense_when_the_gram_matrix_is_too_small():
    """CE with C = 3, N = 1: "auto" guesses C·N = 3 columns ≤ P and tries "gram", which has only
    V·N = 2 rows; for k = 3 it goes on with "dense" (the third eigenvalue is 0, with a warning)."""
    model, X, loss_fn, _, G = low_rank_problem("mlp_ce_mean_n1")
    ext = LowRankGGN(3)
    with pytest.warns(UserWarning, match="nonzero"):
        run_warning(model, X, loss_fn, ext)
    assert ext.used_method == "dense"
    values, vectors = collect_low_rank(model, ext, 3)
    check_eigensystem(values[:2], vectors[:2], G, "LowRankGGN (auto → dense)", rtol=1e-8)
    assert values[2] == 0


@pytest.mark.parametrize("method", ["gram", "dense", "randomized", "auto"])
def test_low_rank_ggn_refuses_k_above_the_number_of_parameters(method):
    model, X, loss_fn, _ = rank_deficient_problem()
    with pytest.raises(CurvhookError, match="P = 15"):
        run(model, X, loss_fn, LowRankGGN(16, method=method))


def test_low_rank_ggn_refuses_an_unknown_method_and_k_below_one():
    with pytest.raises(ValueError):
        LowRankGGN(2, method="lanczos")
    with pytest.raises(ValueError):
        LowRankGGN(0)


@pytest.mark.parametrize("which", ["NTK", "LowRankGGN"])
def test_batch_coupled_results_refuse_accumulate(which):
    """The kernel and the eigenpairs of two batches are not sums of per-batch results: refused."""
    model, X, loss_fn = problem("graph:mlp", 3)
    ext = NTK() if which == "NTK" else LowRankGGN(2, method="dense")
    with pytest.raises(CurvhookError):
        with extend(model, ext, accumulate=True):
            for _ in range(2):
                loss_fn(model(X)).backward()


def test_output_covariance_accumulate_concatenates_the_samples():
    torch.manual_seed(0)
    model = GRAPHS["residual"][0]().to(DT)
    X1, X2 = torch.randn(3, 4, dtype=DT), torch.randn(2, 4, dtype=DT)
    _, params = trainable(model)
    cov = kronecker_cov(model)
    ext = OutputCovariance(cov)
    with extend(model, ext, accumulate=True):
        for X in (X1, X2):
            model(X).sum().backward()
    sigma = dense_covariance(cov, params)
    want = torch.cat([output_covariance(jacobian(model, X), sigma) for X in (X1, X2)])
    check(ext.covariance, want, "OutputCovariance (accumulated)", rtol=RTOL)


# ===================================================================== float32
FLOAT32_EXTENSIONS = ["NTK", "OutputCovariance", "GGNVectorProduct", "LowRankGGN"]


@pytest.mark.parametrize("which", FLOAT32_EXTENSIONS)
def test_float32_smoke(which):
    """The conv net in float32: results are float32 and follow the float64 reference."""
    model64, X, _ = problem("graph:conv_net", 3)
    model = copy.deepcopy(model64).float()
    X32 = X.float()
    y = torch.randint(0, 3, (3,))
    loss32 = loss64 = lambda out: nn.CrossEntropyLoss()(out, y)  # noqa: E731
    params = list(model.parameters())
    if which == "NTK":
        ext = NTK(per_parameter=True)
        run(model, X32, total_sum, ext)
        assert ext.matrix.dtype == torch.float32
        check(ext.matrix.double(), ntk(jacobian(model64, X)), "NTK (float32)", rtol=1e-4, atol_factor=1e-5)
    elif which == "OutputCovariance":
        cov = kronecker_cov(model)
        cov = {p: tuple(t.float() for t in e) if isinstance(e, tuple) else e.float() for p, e in cov.items()}
        ext = OutputCovariance(cov)
        run(model, X32, total_sum, ext)
        assert ext.covariance.dtype == torch.float32
        sigma = dense_covariance(cov, params)
        check(ext.covariance.double(), output_covariance(jacobian(model64, X), sigma), "OutputCovariance (float32)",
              rtol=1e-4, atol_factor=1e-5)
    elif which == "GGNVectorProduct":
        v = random_vectors(params, 2)
        run(model, X32, loss32, GGNVectorProduct(v))
        assert all(p.ggn_v.dtype == torch.float32 for p in params)
        got = flatten_per_parameter({p: p.ggn_v for p in params}, params, 1).double()
        want = flatten_per_parameter(v, params, 1).double() @ ggn(model64, X, loss64)
        check(got, want, "GGNVectorProduct (float32)", rtol=1e-4, atol_factor=1e-5)
    else:
        ext = LowRankGGN(3, method="dense")
        run(model, X32, loss32, ext)
        assert ext.eigenvalues.dtype == torch.float32
        assert all(p.ggn_eigvecs.dtype == torch.float32 for p in params)
        values, vectors = collect_low_rank(model, ext, 3)
        check_eigensystem(values, vectors, ggn(model64, X, loss64), "LowRankGGN (float32)", rtol=1e-4, vector_tol=1e-3)


# ============================================================ all in one block
def test_the_four_extensions_share_one_backward():
    model, X, loss_fn = problem("graph:weight_sharing", 3)
    _, params = trainable(model)
    sigma = random_spd(sum(p.numel() for p in params))
    v = random_vectors(params, 2)
    exts = NTK(), OutputCovariance(sigma), GGNVectorProduct(v), LowRankGGN(3, method="dense")
    run(model, X, loss_fn, *exts)
    J = jacobian(model, X)
    check(exts[0].matrix, ntk(J), "NTK", rtol=RTOL)
    check(exts[1].covariance, output_covariance(J, sigma), "OutputCovariance (dense)", rtol=RTOL)
    check_ggn_vector_product(model, X, loss_fn, v, 2)
    values, vectors = collect_low_rank(model, exts[3], 3)
    check_eigensystem(values, vectors, ggn(model, X, loss_fn), "LowRankGGN (dense)")


# ============================================ products formed a chunk at a time
@pytest.mark.parametrize("chunk", [1, 40])
@pytest.mark.parametrize("name", sorted(KRONECKER_MODELS))
def test_products_formed_in_many_chunks(monkeypatch, name, chunk):
    """Layers with positions form their products a few output features (or samples) at a time:
    with a tiny chunk every layer takes many chunks, and NTK and OutputCovariance (diagonal and
    Kronecker) stay exact."""
    monkeypatch.setattr(shared_weight, "CHUNK_ENTRIES", chunk)
    model, X = kronecker_problem(name, 3)
    _, params = trainable(model)
    ntk_ext = NTK()
    run(model, X, total_sum, ntk_ext)
    check(ntk_ext.matrix, ntk(jacobian(model, X)), "NTK (chunks)", rtol=RTOL)
    for cov in (diagonal_cov(params), kronecker_cov(model)):
        ext = OutputCovariance(cov)
        run(model, X, total_sum, ext)
        check_covariance(model, X, ext, dense_covariance(cov, params), "OutputCovariance (chunks)")


@pytest.mark.parametrize("case", [c for c in ALL_CASES if "embedding" in c])
def test_embedding_gram_in_many_chunks(monkeypatch, case):
    """The embedding's NTK Gram matrix, a few distinct rows at a time."""
    monkeypatch.setattr(shared_weight, "CHUNK_ENTRIES", 1)
    model, X, _ = problem(case, 3)
    ext = NTK()
    run(model, X, total_sum, ext)
    check(ext.matrix, ntk(jacobian(model, X)), "NTK (embedding chunks)", rtol=RTOL)


@pytest.mark.parametrize("rows", [1, 255, 600, 1100])
def test_gram_by_blocks_on_and_above_the_diagonal(rows):
    """``add_gram_`` + ``mirror_gram_`` (the upper blocks, then mirrored) is ``p pᵀ``, over two chunks."""
    torch.manual_seed(0)
    p, q = torch.randn(rows, 7, dtype=DT), torch.randn(rows, 3, dtype=DT)
    out = torch.zeros(rows, rows, dtype=DT)
    shared_weight.add_gram_(out, p)
    shared_weight.add_gram_(out, q)
    check(shared_weight.mirror_gram_(out), p @ p.T + q @ q.T, "Gram by blocks", rtol=1e-12)
