"""Behaviour of ``extend``: gradients, cleanup, memory, accumulation, dtypes, sharing, errors."""

import gc
import weakref

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap
from torch.nn.modules import module as module_globals

from curvhook import extend
from curvhook.errors import CurvhookError, UnsupportedLossError, UnsupportedModelError
from curvhook.extensions import BatchJacobian, DiagGGN, DiagGGNApprox, FullGGN
from graph_reference import diag_ggn_approx_graph
from helpers import ALL, Chain, check_against_reference, run_curvhook
from reference import check, collect, compare, reference, trainable

DT = torch.float64
ATTRS = ("batch_jacobian", "diag_ggn", "diag_ggn_approx", "ggn")
EXTENSIONS = {"BatchJacobian": BatchJacobian, "DiagGGN": DiagGGN, "DiagGGNApprox": DiagGGNApprox, "FullGGN": FullGGN}


def mlp(dtype=DT, inplace=False):
    return nn.Sequential(
        nn.Linear(4, 6), nn.ReLU(inplace=inplace), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)
    ).to(dtype)


def all_extensions():
    return [BatchJacobian(), DiagGGN(), DiagGGNApprox(), FullGGN()]


def data(n=4, dtype=DT, d_in=4, classes=3):
    return torch.randn(n, d_in, dtype=dtype), torch.randint(0, classes, (n,))


# ------------------------------------------------------------- hook hygiene
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


def test_hooks_and_attributes_removed_after_normal_block():
    model = Chain(nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True)), nn.Linear(5, 3)).to(DT)
    X, y = data()
    before = snapshot(model)
    with extend(model, *all_extensions()):
        out = model(X)
        loss = nn.CrossEntropyLoss()(out, y)
        loss.backward()
    assert_clean(model, before)
    assert not out._backward_hooks and not loss._backward_hooks  # no tensor hook left on the output either
    for p in model.parameters():
        for a in ATTRS:
            assert hasattr(p, a)


@pytest.mark.parametrize("inner", ["same_model", "submodule"])
def test_nested_blocks_on_the_same_modules_raise_and_leave_them_clean(inner):
    model = Chain(nn.Sequential(nn.Linear(4, 5), nn.ReLU()), nn.Linear(5, 3)).to(DT)
    before = snapshot(model)
    X, y = data()
    with extend(model, DiagGGN()):
        target = model if inner == "same_model" else model.a
        with pytest.raises(CurvhookError, match="already inside an active extend"):
            with extend(target, DiagGGNApprox()):
                pass
        nn.CrossEntropyLoss()(model(X), y).backward()  # the outer block still works
    assert_clean(model, before)
    assert all(p.diag_ggn.shape == p.shape for p in model.parameters())


def test_hooks_removed_when_forward_raises():
    model = mlp()
    before = snapshot(model)
    with pytest.raises(RuntimeError):
        with extend(model, *all_extensions()):
            model(torch.randn(3, 7, dtype=DT))  # wrong input size: the first Linear raises
    assert_clean(model, before)


class Boom(nn.Module):
    def forward(self, x):
        raise ValueError("boom")


def test_hooks_removed_when_forward_raises_midway_and_block_still_usable():
    """A forward that fails in the middle must not confuse later passes of the same block."""
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    X, y = data()
    before = snapshot(model)
    ggn = FullGGN()
    with extend(model, DiagGGN(), ggn, BatchJacobian(), DiagGGNApprox()):
        handle = model[1].register_forward_hook(lambda *a: (_ for _ in ()).throw(ValueError("boom")))
        with pytest.raises(ValueError, match="boom"):
            model(X)
        handle.remove()
        nn.CrossEntropyLoss()(model(X), y).backward()
    assert_clean(model, before)
    compare(collect(model, 4), reference(model, X, lambda out: nn.CrossEntropyLoss()(out, y)), ggn.matrix)


def test_hooks_removed_when_a_leaf_module_raises():
    model = nn.Sequential(nn.Linear(4, 5), Boom(), nn.Linear(5, 3)).to(DT)
    before = snapshot(model)
    with pytest.raises(ValueError, match="boom"):
        with extend(model, *all_extensions()):
            model(torch.randn(3, 4, dtype=DT))
    assert_clean(model, before)


class Glued(nn.Module):
    """Tensor operations between layers: recorded only while the block's mode is active."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.tanh(h) + 0.5 * h)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_torch_layer_that_raises_leaves_the_block_usable_and_clean(error):
    """Inside a torch layer the block's torch-function mode is off the stack; an
    exception there (also one that skips torch's always-called hooks) must not
    lose it for the next forward, leave it behind or take another mode with it."""
    model = Glued().to(DT)
    X, y = data()
    before = snapshot(model)

    def fail(x):
        raise error("inside the layer")

    crit = nn.CrossEntropyLoss()
    with extend(model, DiagGGN(), DiagGGNApprox()):
        model.b.forward = fail
        with pytest.raises(error, match="inside the layer"):
            model(X)
        del model.b.forward
        crit(model(X), y).backward()
        approx = collect(model, 4, ("DiagGGNApprox",))
        crit(2 * model(X), y).backward()  # an operation after the model: the stack is clean
    assert_clean(model, before)
    d = torch.func.hessian(lambda o: crit(o, y))(model(X)).reshape(4 * 3, -1).diagonal()
    check(approx["DiagGGNApprox"], diag_ggn_approx_graph(model, X, d), "DiagGGNApprox")
    ref = reference(Chain(model, lambda out: 2 * out), X, lambda out: crit(out, y), approx=False)
    compare(collect(model, 4, ("DiagGGN",)), ref)


def test_hooks_removed_when_backward_raises():
    model = mlp()
    X, y = data()
    before = snapshot(model)
    with pytest.raises(UnsupportedLossError):
        with extend(model, *all_extensions()):
            nn.L1Loss()(model(X), torch.randn(4, 3, dtype=DT)).backward()
    assert_clean(model, before)


def test_hooks_removed_when_user_code_raises_between_forward_and_backward():
    model = mlp()
    X, y = data()
    before = snapshot(model)
    with pytest.raises(KeyError):
        with extend(model, *all_extensions()):
            nn.CrossEntropyLoss()(model(X), y)
            raise KeyError("user error")
    assert_clean(model, before)


def test_global_hook_bookkeeping_does_not_grow_per_block():
    """Each block must leave the global hook tables as it found them, flags included.

    (``register_module_forward_hook(..., with_kwargs=True)`` adds an entry to
    ``_global_forward_hooks_with_kwargs`` that ``handle.remove()`` does not
    delete, so whoever registers it must delete it.)
    """
    model = mlp()
    X, y = data()
    names = GLOBAL_HOOK_DICTS + ("_global_forward_hooks_with_kwargs",)
    before = {d: dict(getattr(module_globals, d)) for d in names if hasattr(module_globals, d)}
    for _ in range(3):
        with extend(model, DiagGGN()):
            nn.CrossEntropyLoss()(model(X), y).backward()
    after = {d: dict(getattr(module_globals, d)) for d in names if hasattr(module_globals, d)}
    assert after == before


# -------------------------------------------------------------- gradients
GRAD_MODELS = {
    "mlp": lambda: mlp(),
    "inplace_relu": lambda: mlp(inplace=True),
    "dropout_eval_flatten": lambda: nn.Sequential(
        nn.Flatten(), nn.Linear(4, 6), nn.Dropout(0.3), nn.SiLU(inplace=True), nn.Linear(6, 3)
    ).to(DT).eval(),
    "shared": lambda: (lambda l: nn.Sequential(l, nn.Tanh(), l, nn.Linear(4, 3)))(nn.Linear(4, 4)).to(DT),
}


@pytest.mark.parametrize("x_requires_grad", [False, True])
@pytest.mark.parametrize("case", sorted(GRAD_MODELS))
def test_grad_identical_to_plain_backward(case, x_requires_grad):
    model = GRAD_MODELS[case]()
    X, y = data()
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)

    X1 = X.clone().requires_grad_(x_requires_grad)
    crit(model(X1), y).backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    X2 = X.clone().requires_grad_(x_requires_grad)
    with extend(model, *all_extensions()):
        crit(model(X2), y).backward()
    for g, p in zip(plain, model.parameters()):
        assert torch.equal(g, p.grad)
    if x_requires_grad:
        assert torch.equal(X1.grad, X2.grad)


# ------------------------------------------------------------ torch.func
def test_torch_func_works_on_the_model_after_the_block():
    model = mlp()
    X, y = data()
    got, _, _ = run_curvhook(model, X, lambda out: nn.CrossEntropyLoss()(out, y), which=("BatchJacobian", "DiagGGN"))
    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = jacrev(lambda pr: functional_call(model, pr, (X,)))(params)
    J = torch.cat([jac[n].reshape(4, 3, -1) for n in params], 2)
    check(got["BatchJacobian"], J, "BatchJacobian")
    per_sample = vmap(lambda x: functional_call(model, params, (x[None],))[0])(X)
    torch.testing.assert_close(per_sample, model(X))
    grads = vmap(torch.func.grad(lambda pr, x, t: nn.functional.cross_entropy(functional_call(model, pr, (x[None],)), t[None])),
                 in_dims=(None, 0, 0))(params, X, y)
    assert grads["0.weight"].shape == (4, 6, 4)


# ---------------------------------------------------------------- memory
class Keep(nn.Module):
    """Records a weak reference to what passes through (a leaf module of the model)."""

    def __init__(self):
        super().__init__()
        self.refs = []

    def forward(self, x):
        self.refs.append(weakref.ref(x))
        return x


def leak_model():
    keep = Keep()
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), keep, nn.Linear(6, 3)).to(DT)
    return model, keep


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("keep_context", [False, True])
def test_no_tensor_outlives_the_block(backward, keep_context):
    model, keep = leak_model()
    X, y = data()
    x_ref = weakref.ref(X)
    exts = [DiagGGN(), BatchJacobian(), FullGGN(), DiagGGNApprox()]
    ctx = extend(model, *exts)
    with warnings_ignored():
        with ctx:
            out = model(X)
            out_ref = weakref.ref(out)
            loss = nn.CrossEntropyLoss()(out, y)
            if backward:
                loss.backward()
    del out, loss, X
    if not keep_context:
        del ctx
    gc.collect()
    assert keep.refs and keep.refs[0]() is None, "an intermediate activation is still alive"
    assert x_ref() is None, "the input is still alive"
    assert out_ref() is None, "the model output is still alive"


class ResidualNet(nn.Module):
    """Leaf modules and functional operations (``+``, ``relu``, ``mean``) between them."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = torch.tanh(self.b(h)) + h
        return self.out(h - h.mean(1, keepdim=True))


@pytest.mark.parametrize(
    "make",
    [lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)), ResidualNet],
    ids=["sequential", "residual"],
)
def test_steps_make_no_reference_cycles(make):
    """Stored tensors are freed by reference counting, not left to the garbage collector
    (a cycle per step made Python's full collections run, ~0.1 s each on a real model).
    Layers with rules only: torch.func, used by the fallback, makes cycles of its own."""
    model = make().to(DT)
    X, y = data()
    with extend(model, DiagGGN(), BatchJacobian(), FullGGN(), DiagGGNApprox()):
        nn.CrossEntropyLoss()(model(X), y).backward()
        gc.collect()
        gc.disable()
        try:
            for _ in range(3):
                nn.CrossEntropyLoss()(model(X), y).backward()
            assert gc.collect() == 0
        finally:
            gc.enable()


def test_forward_without_backward_leaks_nothing_after_the_block():
    model, keep = leak_model()
    with warnings_ignored():
        with extend(model, DiagGGN(), BatchJacobian()):
            for _ in range(3):
                X, y = data()
                nn.CrossEntropyLoss()(model(X), y)  # no backward, result dropped
            del X
    gc.collect()
    assert len(keep.refs) == 3
    assert all(r() is None for r in keep.refs)


def test_forward_without_backward_is_released_when_its_graph_is_dropped_inside_the_block():
    """docs/index.md (Memory): stored tensors are released "when the block exits or when the
    graph is freed". An evaluation loop run with grad enabled inside a long block must not
    keep every pass alive until the block ends."""
    model, keep = leak_model()
    with warnings_ignored():
        with extend(model, DiagGGN(), BatchJacobian()):
            for _ in range(3):
                X, y = data()
                nn.CrossEntropyLoss()(model(X), y)  # no backward, result dropped
            del X
            gc.collect()
            alive_inside = sum(r() is not None for r in keep.refs)
    assert alive_inside == 0, f"{alive_inside} of 3 dropped forward passes still alive inside the block"


class warnings_ignored:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)


def test_backward_after_the_block_computes_no_curvature():
    model = mlp()
    X, y = data()
    with extend(model, DiagGGN(), BatchJacobian()):
        loss = nn.CrossEntropyLoss()(model(X), y)
    loss.backward()
    for p in model.parameters():
        assert p.grad is not None
        assert not hasattr(p, "diag_ggn") and not hasattr(p, "batch_jacobian")


# ---------------------------------------------------------- accumulation
def two_batches(reduction):
    model = mlp()
    (X1, y1), (X2, y2) = data(3), data(2)
    crit = nn.CrossEntropyLoss(reduction=reduction)
    return model, crit, (X1, y1), (X2, y2)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_second_backward_overwrites_by_default(reduction):
    model, crit, (X1, y1), (X2, y2) = two_batches(reduction)
    ggn = FullGGN()
    with extend(model, BatchJacobian(), DiagGGN(), DiagGGNApprox(), ggn):
        crit(model(X1), y1).backward()
        first = {k: v.clone() for k, v in collect(model, 3).items()}
        crit(model(X2), y2).backward()
    compare(collect(model, 2), reference(model, X2, lambda out: crit(out, y2)), ggn.matrix)
    compare(first, reference(model, X1, lambda out: crit(out, y1)))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_accumulate_sums_and_concatenates(reduction):
    model, crit, (X1, y1), (X2, y2) = two_batches(reduction)
    ggn = FullGGN()
    with extend(model, BatchJacobian(), DiagGGN(), DiagGGNApprox(), ggn, accumulate=True):
        crit(model(X1), y1).backward()
        crit(model(X2), y2).backward()
    got = collect(model, 5)
    r1 = reference(model, X1, lambda out: crit(out, y1))
    r2 = reference(model, X2, lambda out: crit(out, y2))
    check(got["DiagGGN"], r1.diag_ggn + r2.diag_ggn, "DiagGGN")
    check(got["DiagGGNApprox"], r1.approx + r2.approx, "DiagGGNApprox")
    check(got["FullGGN"], r1.G + r2.G, "FullGGN")
    check(ggn.matrix, r1.G + r2.G, "FullGGN.matrix")
    check(got["BatchJacobian"], torch.cat([r1.batch_jacobian, r2.batch_jacobian]), "BatchJacobian")
    if reduction == "sum":  # then the sum over batches is the curvature of the combined data
        X, y = torch.cat([X1, X2]), torch.cat([y1, y2])
        compare(got, reference(model, X, lambda out: crit(out, y)), ggn.matrix)


def test_accumulate_over_three_batches_of_different_sizes_with_mse():
    model = mlp()
    crit = nn.MSELoss(reduction="sum")
    batches = [(torch.randn(n, 4, dtype=DT), torch.randn(n, 3, dtype=DT)) for n in (1, 3, 2)]
    ggn = FullGGN()
    with extend(model, BatchJacobian(), DiagGGN(), DiagGGNApprox(), ggn, accumulate=True):
        for X, y in batches:
            crit(model(X), y).backward()
    X, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    compare(collect(model, 6), reference(model, X, lambda out: crit(out, y)), ggn.matrix)


def test_retain_graph_second_backward_recomputes():
    model = mlp()
    X, y = data()
    crit = nn.CrossEntropyLoss()
    ggn = FullGGN()
    with extend(model, DiagGGN(), ggn, accumulate=True):
        loss = crit(model(X), y)
        loss.backward(retain_graph=True)
        loss.backward()
    ref = reference(model, X, lambda out: crit(out, y), approx=False)
    check(collect(model, 4, ("DiagGGN",))["DiagGGN"], 2 * ref.diag_ggn, "DiagGGN")
    check(ggn.matrix, 2 * ref.G, "FullGGN.matrix")


def test_two_forward_passes_in_one_loss_are_never_silently_wrong():
    """ℓ = L(model(X1)) + L(model(X2)) in one backward: G is the sum of both GGNs.

    curvhook must either return that sum or raise; returning the GGN of one of
    the two batches would be a silently wrong number.
    """
    model = mlp()
    (X1, y1), (X2, y2) = data(3), data(2)
    crit = nn.CrossEntropyLoss(reduction="sum")
    ggn = FullGGN()
    try:
        with extend(model, DiagGGN(), ggn):
            (crit(model(X1), y1) + crit(model(X2), y2)).backward()
    except CurvhookError:
        return
    X, y = torch.cat([X1, X2]), torch.cat([y1, y2])
    ref = reference(model, X, lambda out: crit(out, y), approx=False)
    check(ggn.matrix, ref.G, "FullGGN.matrix")
    check(collect(model, 5, ("DiagGGN",))["DiagGGN"], ref.diag_ggn, "DiagGGN")


# -------------------------------------------------------- inputs and dtypes
@pytest.mark.parametrize("x_requires_grad", [False, True])
@pytest.mark.parametrize("first", ["Linear", "Tanh", "Flatten", "ReLU_inplace_after_Linear"])
def test_first_layer_input_with_and_without_grad(first, x_requires_grad):
    head = {
        "Linear": [],
        "Tanh": [nn.Tanh()],
        "Flatten": [nn.Flatten()],
        "ReLU_inplace_after_Linear": [nn.Linear(4, 4), nn.ReLU(inplace=True)],
    }[first]
    model = nn.Sequential(*head, nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3)).to(DT)
    X, y = data()
    X.requires_grad_(x_requires_grad)
    check_against_reference(model, X, lambda out: nn.CrossEntropyLoss()(out, y))


def test_float32_smoke():
    model = mlp(torch.float32)
    X, y = data(dtype=torch.float32)
    crit = nn.CrossEntropyLoss()
    got, matrix, _ = run_curvhook(model, X, lambda out: crit(out, y))
    for v in list(got.values()) + [matrix]:
        assert v.dtype == torch.float32
    ref = reference(model, X, lambda out: crit(out.to(torch.float64), y), dtype=torch.float64)
    assert ref.G.dtype == torch.float64
    compare(got, ref, matrix, rtol=1e-4, atol_factor=1e-5, tag=" (float32)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_result_dtype_follows_parameter_dtype(dtype):
    model = mlp(dtype)
    X, y = data(dtype=dtype)
    ggn = FullGGN()
    with extend(model, BatchJacobian(), DiagGGN(), DiagGGNApprox(), ggn):
        nn.CrossEntropyLoss()(model(X), y).backward()
    assert ggn.matrix.dtype == dtype
    for p in model.parameters():
        for a in ATTRS:
            assert getattr(p, a).dtype == dtype, a
            assert getattr(p, a).device == p.device


def test_default_dtype_float64_without_explicit_casts():
    torch.set_default_dtype(torch.float64)  # restored by the autouse fixture
    model = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2))
    X, y = torch.randn(3, 3), torch.randint(0, 2, (3,))
    check_against_reference(model, X, lambda out: nn.CrossEntropyLoss()(out, y))


# ----------------------------------------------------- several extensions
def test_several_extensions_in_one_pass_equal_each_alone():
    model = mlp()
    X, y = data()
    crit = nn.MSELoss()
    target = torch.randn(4, 3, dtype=DT)
    together, matrix, _ = run_curvhook(model, X, lambda out: crit(out, target))
    for name in ALL:
        alone, alone_matrix, _ = run_curvhook(model, X, lambda out: crit(out, target), which=(name,))
        torch.testing.assert_close(alone[name], together[name], rtol=1e-12, atol=0)
        if name == "FullGGN":
            torch.testing.assert_close(alone_matrix, matrix, rtol=1e-12, atol=0)


def test_pairs_of_extensions_with_named_and_found_loss():
    """Extensions with different sources and different loss= share a pass correctly."""
    model = mlp()
    X, y = data()
    crit = nn.CrossEntropyLoss()
    ggn = FullGGN(loss=nn.CrossEntropyLoss())
    with extend(model, DiagGGN(), ggn, DiagGGNApprox(loss=nn.CrossEntropyLoss()), BatchJacobian()):
        crit(model(X), y).backward()
    compare(collect(model, 4), reference(model, X, lambda out: crit(out, y)), ggn.matrix)


def test_same_extension_type_twice_is_rejected():
    with pytest.raises(ValueError):
        extend(mlp(), DiagGGN(), DiagGGN())


def test_extend_rejects_non_modules_and_classes():
    with pytest.raises(TypeError):
        extend(lambda x: x, DiagGGN())
    with pytest.raises(TypeError):
        extend(mlp(), DiagGGN)


# ---------------------------------------------------------- frozen params
def test_frozen_parameters_get_no_attribute_and_are_excluded():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).to(DT)
    model[0].weight.requires_grad_(False)
    model[2].requires_grad_(False)
    X, y = data()
    ggn = FullGGN()
    with extend(model, BatchJacobian(), DiagGGN(), DiagGGNApprox(), ggn):
        nn.CrossEntropyLoss()(model(X), y).backward()
    frozen = [model[0].weight, model[2].weight, model[2].bias]
    for p in frozen:
        for a in ATTRS:
            assert not hasattr(p, a), a
    _, params = trainable(model)
    P = sum(p.numel() for p in params)
    assert P == 6 + 5 * 3 + 3
    assert ggn.matrix.shape == (P, P)
    compare(collect(model, 4), reference(model, X, lambda out: nn.CrossEntropyLoss()(out, y)), ggn.matrix)


def test_all_parameters_frozen_except_last_layer():
    model = mlp()
    for p in list(model.parameters())[:-2]:
        p.requires_grad_(False)
    X, y = data()
    check_against_reference(model, X, lambda out: nn.CrossEntropyLoss()(out, y))


def test_parameter_frozen_after_a_block_keeps_no_stale_result():
    """Frozen parameters get no attribute: not even a stale one from an earlier block."""
    model = mlp()
    X, y = data()
    with extend(model, DiagGGN(), BatchJacobian()):
        nn.CrossEntropyLoss()(model(X), y).backward()
    model[0].weight.requires_grad_(False)
    with extend(model, DiagGGN(), BatchJacobian()):
        nn.CrossEntropyLoss()(model(X), y).backward()
    assert not hasattr(model[0].weight, "diag_ggn")
    assert not hasattr(model[0].weight, "batch_jacobian")


# ---------------------------------------------------------- weight sharing
@pytest.mark.parametrize("n", [1, 3])
def test_weight_sharing_exact_with_cross_terms(n):
    l = nn.Linear(4, 4)
    model = nn.Sequential(l, nn.Tanh(), l).to(DT)
    X, y = data(n, classes=4)
    got, ref = check_against_reference(model, X, lambda out: nn.CrossEntropyLoss()(out, y))
    assert ref.G.shape == (20, 20)
    # The cross terms matter: summing the diagonals of two untied copies would be wrong.
    import copy

    untied = nn.Sequential(copy.deepcopy(l), nn.Tanh(), copy.deepcopy(l)).to(DT)
    G_untied = reference(untied, X, lambda out: nn.CrossEntropyLoss()(out, y), approx=False).G.diagonal()
    assert not torch.allclose(got["DiagGGN"], G_untied[:20] + G_untied[20:], rtol=1e-3)


def test_weight_sharing_in_custom_container_and_shared_activation():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.l, self.act, self.out = nn.Linear(3, 3), nn.Sigmoid(), nn.Linear(3, 2)

        def forward(self, x):
            return self.out(self.act(self.l(self.act(self.l(x)))))

    model = Twice().to(DT)
    X = torch.randn(3, 3, dtype=DT)
    target = torch.randn(3, 2, dtype=DT)
    check_against_reference(model, X, lambda out: nn.MSELoss()(out, target))


def test_weight_sharing_with_a_frozen_bias():
    l = nn.Linear(4, 4)
    l.bias.requires_grad_(False)
    model = nn.Sequential(l, nn.ELU(), l, nn.Linear(4, 2)).to(DT)
    X, y = data(3)
    y = y % 2
    check_against_reference(model, X, lambda out: nn.CrossEntropyLoss(reduction="sum")(out, y))


# ----------------------------------------------------------- stale results
@pytest.mark.parametrize("second", ["enter_only", "forward_only", "backward_raises"])
def test_stale_attributes_removed_at_start_of_new_block(second):
    model = mlp()
    X, y = data()
    exts = all_extensions()
    with extend(model, *exts):
        nn.CrossEntropyLoss()(model(X), y).backward()
    for p in model.parameters():
        assert all(hasattr(p, a) for a in ATTRS)
    assert exts[3].matrix is not None

    def assert_none():
        for p in model.parameters():
            for a in ATTRS:
                assert not hasattr(p, a), a
        assert exts[3].matrix is None

    try:
        with extend(model, *exts):
            assert_none()
            if second == "forward_only":
                nn.CrossEntropyLoss()(model(X), y)
            elif second == "backward_raises":
                nn.L1Loss()(model(X), torch.randn(4, 3, dtype=DT)).backward()
    except UnsupportedLossError:
        assert second == "backward_raises"
    assert_none()


def test_new_block_with_new_extension_instances_removes_stale_results():
    model = mlp()
    X, y = data()
    with extend(model, *all_extensions()):
        nn.CrossEntropyLoss()(model(X), y).backward()
    with extend(model, *all_extensions()):
        pass
    for p in model.parameters():
        for a in ATTRS:
            assert not hasattr(p, a), a


# ------------------------------------------------------------ model errors
class TupleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x):
        out = self.a(x)
        return out, out


@pytest.mark.parametrize("ext", sorted(EXTENSIONS))
def test_model_returning_a_tuple_raises(ext):
    model = TupleModel().to(DT)
    before = snapshot(model)
    with extend(model, EXTENSIONS[ext]()):
        with pytest.raises(UnsupportedModelError, match="tuple|one tensor"):
            model(torch.randn(2, 4, dtype=DT))
    assert_clean(model, before)


def test_module_that_is_never_called_gets_zero_results():
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.spare, self.b = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

        def forward(self, x):
            return self.b(self.a(x))

    model = WithSpare().to(DT)
    X, y = data()
    got, ref = check_against_reference(model, X, lambda out: nn.CrossEntropyLoss()(out, y))
    assert torch.count_nonzero(model.spare.weight.diag_ggn) == 0
    assert torch.count_nonzero(ref.J[:, 25:55]) == 0  # the reference agrees that spare has no effect


def test_all_parameters_frozen_and_input_requires_grad():
    """Input gradients inside the block (P = 0): nothing to compute, nothing must break."""
    model = mlp()
    model.requires_grad_(False)
    X, y = data()
    X.requires_grad_(True)
    ggn = FullGGN()
    with extend(model, BatchJacobian(), DiagGGN(), DiagGGNApprox(), ggn):
        nn.CrossEntropyLoss()(model(X), y).backward()
    assert X.grad is not None
    assert ggn.matrix is None or ggn.matrix.shape == (0, 0)
    for p in model.parameters():
        for a in ATTRS:
            assert not hasattr(p, a)


def test_forward_under_no_grad_inside_the_block_then_training_step():
    model, keep = leak_model()
    X, y = data()
    ggn = FullGGN()
    with warnings_ignored():
        with extend(model, DiagGGN(), ggn):
            with torch.no_grad():
                model(torch.randn(5, 4, dtype=DT))  # evaluation
            gc.collect()
            assert keep.refs[0]() is None  # nothing kept for a pass without graph
            nn.CrossEntropyLoss()(model(X), y).backward()
    compare(collect(model, 4, ("DiagGGN", "FullGGN")), reference(model, X, lambda out: nn.CrossEntropyLoss()(out, y)), ggn.matrix)


def test_second_backward_through_an_earlier_forward_is_never_silently_dropped():
    """backward(retain_graph=True), a new forward, then backward through the first graph again.

    With accumulate=True the second backward must either be added (2 × G) or raise a
    CurvhookError (context.py has a "released ... Run the forward pass again" error for
    this case); silently ignoring it leaves a sum that misses one backward.
    """
    model = mlp()
    X, y = data()
    crit = nn.CrossEntropyLoss()
    ggn = FullGGN()
    with extend(model, DiagGGN(), ggn, accumulate=True):
        loss = crit(model(X), y)
        loss.backward(retain_graph=True)
        model(X)  # the next forward pass releases what the first one stored
        try:
            loss.backward()
        except CurvhookError:
            return
    ref = reference(model, X, lambda out: crit(out, y), approx=False)
    check(ggn.matrix, 2 * ref.G, "FullGGN.matrix")
    check(collect(model, 4, ("DiagGGN",))["DiagGGN"], 2 * ref.diag_ggn, "DiagGGN")


def test_entering_an_active_block_again_raises():
    model = mlp()
    ctx = extend(model, DiagGGN())
    with ctx:
        with pytest.raises(RuntimeError):
            with ctx:
                pass


class DropsBatchAxis(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.flat, self.unflat, self.b = nn.Linear(4, 3), nn.Flatten(0), nn.Unflatten(0, (4, 3)), nn.Linear(3, 3)

    def forward(self, x):
        return self.b(self.unflat(self.flat(self.a(x))))


@pytest.mark.parametrize("ext", sorted(EXTENSIONS))
@pytest.mark.parametrize("case", ["batch_axis_not_kept"])
def test_modules_without_per_sample_structure_raise(case, ext):
    # several distinct differentiable inputs are supported now (tests/test_graphs.py, "two_inputs")
    model = {"batch_axis_not_kept": DropsBatchAxis}[case]().to(DT)
    X, y = data()
    before = snapshot(model)
    with warnings_ignored():
        with extend(model, EXTENSIONS[ext]()):
            loss = nn.CrossEntropyLoss()(model(X), y)
            with pytest.raises(UnsupportedModelError):
                loss.backward()
    assert_clean(model, before)


# ------------------------------------------------- exact answers, not only errors
def test_two_forward_passes_in_one_backward_sum_exactly():
    """ℓ = L(model(X1)) + L(model(X2)): every extension covers both batches."""
    model = mlp()
    (X1, y1), (X2, y2) = data(3), data(2)
    crit = nn.CrossEntropyLoss(reduction="sum")
    exts = all_extensions()
    with extend(model, *exts):
        (crit(model(X1), y1) + crit(model(X2), y2)).backward()
    X, y = torch.cat([X1, X2]), torch.cat([y1, y2])
    ref = reference(model, X, lambda out: crit(out, y), approx=False)
    got = collect(model, 5, ("BatchJacobian", "DiagGGN", "FullGGN"))
    compare(got, ref, exts[3].matrix)


def test_second_backward_after_a_new_forward_raises_in_both_modes():
    model = mlp()
    X, y = data()
    for accumulate in (False, True):
        with extend(model, DiagGGN(), accumulate=accumulate):
            loss = nn.CrossEntropyLoss()(model(X), y)
            loss.backward(retain_graph=True)
            model(X)
            with pytest.raises(CurvhookError, match="Run the forward pass again"):
                loss.backward()


def test_retain_graph_backward_twice_without_new_forward_recomputes():
    model = mlp()
    X, y = data()
    crit = nn.CrossEntropyLoss()
    with extend(model, DiagGGN()):
        loss = crit(model(X), y)
        loss.backward(retain_graph=True)
        first = [p.diag_ggn.clone() for p in model.parameters()]
        loss.backward()
    for a, p in zip(first, model.parameters()):
        torch.testing.assert_close(p.diag_ggn, a, rtol=0, atol=0)


@pytest.mark.parametrize("use", ["exp_logged", "detached_square", "item"])
def test_nonlinear_function_of_the_loss_that_is_not_backpropagated_is_fine(use):
    """Logging exp(loss) (a perplexity) must not trip the nonlinearity check."""
    model = mlp()
    X, y = data()
    crit = nn.CrossEntropyLoss()
    with extend(model, DiagGGN()):
        loss = crit(model(X), y)
        logged = {"exp_logged": lambda: loss.exp(), "detached_square": lambda: loss.detach() ** 2,
                  "item": lambda: loss.item()}[use]()
        (2.0 * loss + 1.0).backward()
    ref = reference(model, X, lambda out: 2.0 * crit(out, y), approx=False)
    compare(collect(model, 4, ("DiagGGN",)), ref)
    assert logged is not None


def test_nonlinear_function_of_the_loss_raises_before_any_result_is_written():
    model = mlp()
    X, y = data()
    with extend(model, DiagGGN()):
        loss = nn.CrossEntropyLoss()(model(X), y)
        with pytest.raises(UnsupportedLossError, match="nonlinear function of a loss"):
            (loss * loss).backward()
    assert not any(hasattr(p, "diag_ggn") for p in model.parameters())


def test_a_layer_of_the_model_applied_to_a_loss_value_is_watched():
    """Inside torch layers the mode is off the stack, except for inputs that carry a loss value."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Softplus()).to(DT)
    X, y = torch.randn(4, 3, dtype=DT), torch.randint(0, 3, (4,))
    crit = nn.CrossEntropyLoss()
    with extend(model, DiagGGN()):
        loss = crit(model(X), y)
        again = model(loss.expand(4, 3))  # the model's layers on the loss value: nonlinear in it
        with pytest.raises(UnsupportedLossError, match="nonlinear function of a loss"):
            (loss + crit(again, y)).backward()


def test_batch_jacobian_does_not_care_how_the_loss_is_used():
    model = mlp()
    X, y = data()
    with extend(model, BatchJacobian()):
        nn.CrossEntropyLoss()(model(X), y).exp().backward()
    ref = reference(model, X, lambda out: out.sum(), approx=False)
    compare(collect(model, 4, ("BatchJacobian",)), ref)


def test_trace_is_freed_with_its_graph_for_every_extension():
    model, keep = leak_model()
    with warnings_ignored():
        with extend(model, *all_extensions()):
            out = model(torch.randn(3, 4, dtype=DT))
            nn.CrossEntropyLoss()(out, torch.tensor([0, 1, 2]))
            del out
            gc.collect()
            assert keep.refs[0]() is None


def test_empty_sequential_is_no_operation():
    model = nn.Sequential(nn.Linear(4, 5), nn.Sequential(), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    X, y = data()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        check_against_reference(model, X, lambda out: nn.CrossEntropyLoss()(out, y))
