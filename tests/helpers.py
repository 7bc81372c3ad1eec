"""Run curvhook the way a user does, and compare with the torch.func reference.

Also the small models, data and checks that several test files share: the hook
snapshot of ``extend``'s cleanup, the torch.func GGN of the fallback tests, and
the driver of the layer tables in ``tests/rules/``.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev
from torch.nn.modules import module as module_globals

from curvhook import extend
from curvhook.extensions import BatchJacobian, DiagGGN, DiagGGNApprox, FullGGN
from curvhook.rules import registry, supported_module_types
from graph_reference import diag_ggn_approx_graph
from reference import DropoutMasks, check, collect, compare, reference

ALL = ("BatchJacobian", "DiagGGN", "DiagGGNApprox", "FullGGN")


class Chain(nn.Module):
    """``b(a(x))``: a custom container chaining two children, or a model then a function."""

    def __init__(self, a: Callable[[Tensor], Tensor], b: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.a(x))


def run_curvhook(
    model: nn.Module,
    X: Tensor,
    loss_fn: Callable[[Tensor], Tensor],
    which=ALL,
    record_masks: bool = False,
    split_attention: bool = True,
):
    """One ``with extend(...)`` block: forward, ``loss_fn(out).backward()``.

    ``split_attention`` is DiagGGNApprox's option (``False``: ``nn.MultiheadAttention``
    is one operation, as in ``graph_reference``).

    Returns ``(results, matrix, masks)``: the collected attributes, ``FullGGN.matrix``
    and the dropout-mask recorder (or ``None``).
    """
    ggn = FullGGN()
    approx = DiagGGNApprox(split_attention=split_attention)
    exts = {"BatchJacobian": BatchJacobian(), "DiagGGN": DiagGGN(), "DiagGGNApprox": approx, "FullGGN": ggn}
    masks = DropoutMasks(model) if record_masks else None
    with extend(model, *(exts[k] for k in which)):
        if masks is not None:
            with masks:
                out = model(X)
        else:
            out = model(X)
        loss_fn(out).backward()
    got = collect(model, out.shape[0], which)
    return got, (ggn.matrix if "FullGGN" in which else None), masks


def check_against_reference(
    model: nn.Module,
    X: Tensor,
    loss_fn: Callable[[Tensor], Tensor],
    which=ALL,
    record_masks: bool = False,
    rtol: float = 1e-6,
) -> None:
    """Run curvhook with ``which`` extensions and compare every result with the reference."""
    got, matrix, masks = run_curvhook(model, X, loss_fn, which, record_masks)
    ref = reference(model, X, loss_fn, masks=masks, approx="DiagGGNApprox" in which)
    # the supported losses have no cross-sample Hessian blocks (sanity check of the reference)
    torch.testing.assert_close(ref.H_full, ref.H, rtol=0, atol=1e-12 * ref.H.abs().max().item())
    compare(got, ref, matrix, rtol=rtol)
    return got, ref


def check_graph_against_reference(model: nn.Module, X: Tensor, y: Tensor, moved_axes: bool = False) -> None:
    """All four extensions on a model with tensor operations between modules, cross-entropy loss.

    The exact quantities against the torch.func reference; DiagGGNApprox against its
    definition on the graph (``graph_reference``), from ``diag(H)`` at the output.
    ``graph_reference`` counts every leaf module as one operation, so DiagGGNApprox
    runs with ``split_attention=False`` (the split form: tests/test_attention.py).
    ``moved_axes``: the graph reference finds each tensor's batch axis (``[L, N, E]`` inside).
    """
    crit = nn.CrossEntropyLoss()
    got, matrix, _ = run_curvhook(model, X, lambda out: crit(out, y), split_attention=False)
    ref = reference(model, X, lambda out: crit(out, y), approx=False)
    compare({k: v for k, v in got.items() if k != "DiagGGNApprox"}, ref, matrix)
    d = torch.func.hessian(lambda o: crit(o, y))(ref.out).reshape(ref.out.numel(), -1).diagonal()
    check(got["DiagGGNApprox"], diag_ggn_approx_graph(model, X, d, moved_axes), "DiagGGNApprox")


# ------------------------------------------------------ small models and data
DT = torch.float64
ATTRS = ("batch_jacobian", "diag_ggn", "diag_ggn_approx", "ggn")
EXTENSIONS = {"BatchJacobian": BatchJacobian, "DiagGGN": DiagGGN, "DiagGGNApprox": DiagGGNApprox, "FullGGN": FullGGN}


def mlp(dtype=DT, inplace=False):
    return nn.Sequential(
        nn.Linear(4, 6), nn.ReLU(inplace=inplace), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)
    ).to(dtype)


def conv_net(groups: int = 1) -> nn.Module:
    """Two convolutions and two Linear layers (dense and Kronecker blocks of the full GGN)."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, groups=groups),
        nn.ReLU(),
        nn.Conv2d(4, 4, 2, stride=2, groups=groups),
        nn.Flatten(),
        nn.Linear(16, 5),
        nn.Tanh(),
        nn.Linear(5, 3),
    ).to(DT)


def all_extensions():
    return [BatchJacobian(), DiagGGN(), DiagGGNApprox(), FullGGN()]


def data(n=4, dtype=DT, d_in=4, classes=3):
    return torch.randn(n, d_in, dtype=dtype), torch.randint(0, classes, (n,))


def ce(y):
    crit = nn.CrossEntropyLoss()
    return lambda out: crit(out, y)


def mse(y, reduction="mean"):
    crit = nn.MSELoss(reduction=reduction)
    return lambda out: crit(out, y)


def bce(y, reduction="mean"):
    crit = nn.BCEWithLogitsLoss(reduction=reduction)
    return lambda out: crit(out, y)


def randomize_linear(model: nn.Module, scale: float = 1.5) -> nn.Module:
    """float64 parameters with a spread large enough to reach every regime of the activations."""
    model.to(DT)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn_like(m.weight) * scale / m.in_features**0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn_like(m.bias))
    return model


# Small MLPs with several activations (tests/test_whole_models.py, tests/extensions/).
DEEP_MLPS = {
    "tanh_relu": lambda: nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)
    ),
    "sigmoid_gelu_elu": lambda: nn.Sequential(
        nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 5), nn.GELU(), nn.Linear(5, 4), nn.ELU(), nn.Linear(4, 3)
    ),
    "inplace_chain": lambda: nn.Sequential(
        nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 6), nn.Hardswish(inplace=True), nn.Linear(6, 3),
        nn.LeakyReLU(0.2, inplace=True),
    ),
    "two_activations_in_a_row": lambda: nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.SiLU(), nn.Softplus(), nn.Linear(6, 3)
    ),
}


class warnings_ignored:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)


# -------------------------------------------------------------- hook hygiene
HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
)
GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
    "_global_forward_hooks_always_called",
)


def snapshot(model):
    """Everything that must be the same before and after a block."""
    modules = {
        id(m): (sorted(vars(m).keys()), {d: len(getattr(m, d, None) or {}) for d in HOOK_DICTS})
        for m in model.modules()
    }
    params = {
        id(p): (sorted(k for k in vars(p).keys() if k not in ATTRS), len(p._backward_hooks or {}))
        for p in model.parameters()
    }
    glob = {d: len(getattr(module_globals, d)) for d in GLOBAL_HOOK_DICTS if hasattr(module_globals, d)}
    return modules, params, glob, torch._C._len_torch_function_stack()


def assert_clean(model, before):
    after = snapshot(model)
    assert after[3] == before[3], "torch-function mode left behind (or one of the caller's removed)"
    assert after[2] == before[2], "global module hooks left behind"
    assert after[1] == before[1], "parameter attributes or tensor hooks left behind"
    for m in model.modules():
        keys, hooks = after[0][id(m)]
        assert keys == before[0][id(m)][0], f"new attributes on {type(m).__name__}"
        assert all(v == 0 for v in hooks.values()), f"hooks left on {type(m).__name__}: {hooks}"


# ------------------------------------------------ exact GGN from torch.func
def ggn_reference(model, X, y, criterion):
    """``J`` ``[N*C, P]`` and ``G = Jᵀ H J`` from torch.func, in the model's dtype."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    out = functional_call(model, params, (X,))
    n, c = out.shape[0], out[0].numel()
    jac = jacrev(lambda pr: functional_call(model, pr, (X,)))(params)
    J = torch.cat([jac[k].reshape(n * c, -1) for k in params], 1)
    H = hessian(lambda o: criterion(o, y))(out).reshape(n * c, n * c)
    return J, J.T @ H @ J


def run_all(model, X, y, criterion):
    ggn = FullGGN()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with extend(model, DiagGGN(), ggn, BatchJacobian(), DiagGGNApprox()):
            criterion(model(X), y).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    n = X.shape[0]
    return {
        "diag": torch.cat([p.diag_ggn.flatten() for p in params]),
        "full": ggn.matrix,
        "jac": torch.cat([p.batch_jacobian.reshape(n, p.batch_jacobian.shape[1], -1) for p in params], 2),
        "approx": torch.cat([p.diag_ggn_approx.flatten() for p in params]),
    }


def float32_follows_float64(model: nn.Module, X: Tensor, y: Tensor, rtol: float = 1e-4) -> None:
    """DiagGGNApprox of ``model`` (cross-entropy) in float32 against the same in float64, every parameter."""
    results = []
    for dtype in (torch.float64, torch.float32):
        model.to(dtype)
        with extend(model, DiagGGNApprox()):
            nn.CrossEntropyLoss()(model(X.to(dtype)), y).backward()
        results.append(torch.cat([p.diag_ggn_approx.flatten().double() for p in model.parameters()]))
    torch.testing.assert_close(results[1], results[0], rtol=rtol, atol=1e-6 * float(results[0].abs().max()))


def ggn_vector_product_and_full(model: nn.Module, X: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``(G v, FullGGN · v)`` for a random ``v``, both from one ``extend`` block (cross-entropy),
    flattened over the parameters: the forward products against the exact matrix."""
    from curvhook.extensions import GGNVectorProduct

    vec = [torch.randn_like(p) for p in model.parameters()]
    full = FullGGN()
    with extend(model, GGNVectorProduct(vec), full):
        nn.CrossEntropyLoss()(model(X), y).backward()
    product = torch.cat([p.ggn_v.flatten() for p in model.parameters()])
    return product, full.matrix @ torch.cat([v.flatten() for v in vec])


def close(actual, expected, rtol=1e-6):
    scale = expected.abs().max().clamp(min=1e-30)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def assert_exact(model, X, y, criterion):
    """Run every extension and compare FullGGN, DiagGGN and BatchJacobian with torch.func."""
    got = run_all(model, X, y, criterion)
    J, G = ggn_reference(model, X, y, criterion)
    close(got["full"], G)
    close(got["diag"], G.diagonal())
    close(got["jac"].reshape(-1, J.shape[1]), J)


# ------------------------------------------- layer tables (tests/rules/)
# A table case is ``(model builder, input builder)``: the builder returns a small
# float64-ready model around the layer under test, the input builder ``n ↦ X``.
CLASSES = 3


def head() -> list[nn.Module]:
    """``Flatten`` and a linear classifier onto ``CLASSES`` outputs (sized by a first forward pass)."""
    return [nn.Flatten(), nn.LazyLinear(CLASSES)]


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values, with the last two dimensions stored transposed."""
    if t.dim() < 2:
        return t
    out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert torch.equal(out, t) and (t.dim() < 2 or t.shape[-1] == 1 or not out.is_contiguous())
    return out


def randomize_layers(model: nn.Module) -> nn.Module:
    """float64, with affine parameters and running statistics away from their trivial init."""
    model.to(DT)
    with torch.no_grad():
        for m in model.modules():
            for name, p in m.named_parameters(recurse=False):
                if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
                    p.copy_((1.0 if name == "weight" else 0.0) + 0.5 * torch.randn_like(p))
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
                m.running_mean.copy_(0.3 * torch.randn_like(m.running_mean))
                m.running_var.copy_(0.5 + torch.rand_like(m.running_var))
    return model.eval()


def float_input(shape):
    return lambda n: torch.randn(n, *shape, dtype=DT)


def index_input(vocab, shape):
    return lambda n: torch.randint(0, vocab, (n, *shape))


def seq(*layers):
    return lambda: nn.Sequential(*layers)


def prefix_conv(dims, channels):
    """A 1x1 convolution, so that the layer under test has an input that needs its Jacobian."""
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](channels, channels, 1)


class OneHotEmbedding(nn.Module):
    """``onehot(x) @ W``: an embedding with a float input, for the DiagGGNApprox reference."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.weight = embedding.weight  # the same parameter

    def forward(self, x):
        return x @ self.weight


def check_embedding_model(model, X, loss_fn):
    """Integer input: the reference's per-op Jacobians cannot differentiate it, so DiagGGNApprox
    is checked on the equivalent model with one-hot float input (same parameters, same chain)."""
    got, matrix, _ = run_curvhook(model, X, loss_fn)
    approx = got.pop("DiagGGNApprox")
    ref = reference(model, X, loss_fn, approx=False)
    compare(got, ref, matrix)
    embedding = model[0]
    one_hot = nn.Sequential(OneHotEmbedding(embedding), *model[1:])
    X_hot = nn.functional.one_hot(X, embedding.num_embeddings).to(DT)
    ref_hot = reference(one_hot, X_hot, loss_fn)
    keep = torch.ones(ref.G.shape[0], dtype=torch.bool)
    if embedding.padding_idx is not None:  # PyTorch gives the padding row no gradient
        keep[: embedding.weight.numel()].view_as(embedding.weight)[embedding.padding_idx] = False
    # the two chains agree wherever the padding row plays no part
    torch.testing.assert_close(ref_hot.G[keep][:, keep], ref.G[keep][:, keep], rtol=1e-12, atol=1e-14)
    ref = dataclasses.replace(ref, approx=torch.where(keep, ref_hot.approx, 0.0))
    compare({"DiagGGNApprox": approx}, ref)
    return ref


def run_layer_case(case, n, contiguous, fast=True):
    """One table case, all four extensions against the float64 reference.

    Args:
        case: ``(model builder, input builder)``.
        n: The batch size.
        contiguous: ``False``: the input is stored with its last two axes transposed.
        fast: ``True``: every leaf module has a registered rule and no module goes
            through the fallback (no "no rule" warning); ``False``: at least one leaf
            module has none (the fallback's tables), and its warning is expected.

    Returns:
        ``(model, X, y, ref)``.
    """
    torch.manual_seed(0)
    build, make_input = case
    model = build().to(DT).eval()
    X = make_input(n)
    with torch.no_grad():
        model(X)  # materializes the LazyLinear head
    model = randomize_layers(model)
    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    if fast:
        for m in leaves:
            assert registry.rule_for(m) is not None, f"{type(m).__name__} has no fast rule"
    else:
        assert any(registry.rule_for(m) is None for m in leaves), "no module goes through the fallback"
    if not contiguous:
        X = noncontiguous(X)
    y = torch.randint(0, CLASSES, (n,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if X.is_floating_point():
            _, ref = check_against_reference(model, X, ce(y))
        else:
            ref = check_embedding_model(model, X, ce(y))
    if fast:
        assert not [w for w in caught if "no rule" in str(w.message)]
    return model, X, y, ref


def check_layer_batch_noncontiguous_and_float32(case, fast=True):
    """``run_layer_case`` for a batch of 3 with a non-contiguous input, then a float32 smoke check."""
    model, X, y, ref = run_layer_case(case, 3, contiguous=False, fast=fast)
    # float32 smoke: the same model and data in single precision, against the float64 reference
    model32 = copy.deepcopy(model).float()
    X32 = X.float() if X.is_floating_point() else X
    with warnings.catch_warnings():
        if not fast:
            warnings.simplefilter("ignore")
        got, matrix, _ = run_curvhook(model32, X32, ce(y))
    for value in got.values():
        assert value.dtype == torch.float32
    compare(got, ref, matrix, rtol=1e-4, atol_factor=1e-4, tag=" (float32, more layers)")


def leaf_types(cases) -> set:
    """The leaf-module types the models of a table are built from."""
    types = set()
    for build, _ in cases.values():
        types |= {type(m) for m in build().modules() if next(m.children(), None) is None}
    return types


def registered_types(rule_module: str) -> set:
    """The module types whose registered rule is defined in ``curvhook.rules.<rule_module>``."""
    return {t for t in supported_module_types() if type(registry._RULES[t]).__module__ == f"curvhook.rules.{rule_module}"}


def layer_table_tests(cases: dict, family: str) -> tuple:
    """The three tests every rule family's table runs, for its module to bind at top level.

    ``test_layer_one_sample`` (N = 1), ``test_layer_batch_noncontiguous_and_float32``
    (N = 3, a non-contiguous input, then float32), both with the fallback refused
    (the ``no_fallback`` fixture of ``tests/rules/conftest.py``), and
    ``test_table_covers_every_registered_type`` (every type registered in
    ``curvhook.rules.<family>`` appears in the table).

    Args:
        cases: The family's table, ``name -> (model builder, input builder)``.
        family: The rule module's name (``"conv"``).
    """

    @pytest.mark.usefixtures("no_fallback")
    @pytest.mark.parametrize("case", sorted(cases))
    def test_layer_one_sample(case):
        run_layer_case(cases[case], 1, contiguous=True)

    @pytest.mark.usefixtures("no_fallback")
    @pytest.mark.parametrize("case", sorted(cases))
    def test_layer_batch_noncontiguous_and_float32(case):
        check_layer_batch_noncontiguous_and_float32(cases[case])

    def test_table_covers_every_registered_type():
        assert registered_types(family) <= leaf_types(cases)

    return test_layer_one_sample, test_layer_batch_noncontiguous_and_float32, test_table_covers_every_registered_type


def fallback_spy(monkeypatch) -> list:
    """Record the names of the calls the fallback serves on the batch (per-sample Jacobians of a
    whole module; not a module computed from parameters only): a test that expects none
    asserts the list stays empty."""
    from curvhook.rules import fallback as fallback_module

    served = []
    for method in ("input_jac_t_mat_prod", "param_jac_t_mat_prod", "input_diag", "param_diag", "jac_t_mat_prod",
                   "diag_jac_t_diag_jac"):
        original = getattr(fallback_module.FallbackRule, method)

        def spy(self, call, *args, original=original):
            if "batched" in call.input_kinds or not call.from_parameters:
                served.append(call.name)
            return original(self, call, *args)

        monkeypatch.setattr(fallback_module.FallbackRule, method, spy)
    return served


def check_exact_without_fallback(model, X, y, monkeypatch, moved_axes: bool = False) -> None:
    """:func:`assert_exact` and :func:`check_graph_against_reference` (cross-entropy), with nothing
    served by the fallback on the batch (:func:`fallback_spy`)."""
    served = fallback_spy(monkeypatch)
    assert_exact(model, X, y, nn.CrossEntropyLoss())
    check_graph_against_reference(model, X, y, moved_axes=moved_axes)
    assert served == [], f"served by the fallback: {served}"
