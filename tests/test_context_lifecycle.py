"""The life of an ``extend`` block: hooks and attributes removed (also when the forward pass,
a layer, the backward pass or user code raises), nested and re-entered blocks refused,
nothing left on the model, torch.func usable afterwards, stale results removed."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap
from torch.nn.modules import module as module_globals

from curvhook import extend
from curvhook.errors import CurvhookError, UnsupportedLossError
from curvhook.extensions import BatchJacobian, DiagGGN, DiagGGNApprox, FullGGN
from graph_reference import diag_ggn_approx_graph
from helpers import (
    ATTRS,
    DT,
    GLOBAL_HOOK_DICTS,
    Chain,
    all_extensions,
    assert_clean,
    data,
    mlp,
    run_curvhook,
    snapshot,
)
from reference import check, collect, compare, reference


# ------------------------------------------ hooks and attributes removed
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


def test_block_entry_makes_few_objects_for_the_cyclic_garbage_collector():
    """Entering a block adds O(1) GC-tracked objects, not a dozen per module.

    A block's hooks, reductions and module records live for the whole step; in a
    training loop each step would move them into Python's oldest generation and
    make its full collections (0.1–0.2 s with large libraries imported) come every
    few steps. A module costs one plain tuple (its name and two flags, which the
    collector stops tracking at its first pass); handles with weak references, a
    reduction per module and module records as objects would cost about 14.
    """
    import gc

    model = nn.Sequential(*[nn.Sequential(nn.Linear(3, 3), nn.Tanh()) for _ in range(100)]).to(DT)  # 301 modules
    X = torch.randn(2, 3, dtype=DT)
    for _ in range(2):  # the per-module reductions are made once, at the first block
        with extend(model, DiagGGN()):
            nn.MSELoss()(model(X), torch.zeros(2, 3, dtype=DT)).backward()
    modules = len(list(model.modules()))
    gc.collect()
    gc.disable()
    try:
        before = len(gc.get_objects())
        with extend(model, DiagGGN()):
            added = len(gc.get_objects()) - before
    finally:
        gc.enable()
    assert added <= modules + 60, f"{added} tracked objects for {modules} modules"


def test_entering_an_active_block_again_raises():
    model = mlp()
    ctx = extend(model, DiagGGN())
    with ctx:
        with pytest.raises(RuntimeError):
            with ctx:
                pass


# ------------------------------------------------------- after the block
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


def test_backward_after_the_block_computes_no_curvature():
    model = mlp()
    X, y = data()
    with extend(model, DiagGGN(), BatchJacobian()):
        loss = nn.CrossEntropyLoss()(model(X), y)
    loss.backward()
    for p in model.parameters():
        assert p.grad is not None
        assert not hasattr(p, "diag_ggn") and not hasattr(p, "batch_jacobian")


# --------------------------------------------------------- stale results
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


def test_results_of_the_previous_backward_are_removed_when_the_next_starts():
    """They are replaced by the new ones; reading them during the next backward finds none."""
    model = nn.Sequential(nn.Linear(3, 2)).to(DT)
    X, y = torch.randn(4, 3, dtype=DT), torch.randint(0, 2, (4,))
    seen = []
    with extend(model, DiagGGN()):
        nn.CrossEntropyLoss()(model(X), y).backward()
        out = model(X)
        out.register_hook(lambda g: seen.append(hasattr(model[0].weight, "diag_ggn")))
        nn.CrossEntropyLoss()(out, y).backward()
    assert seen == [False] and model[0].weight.diag_ggn.shape == (2, 3)
