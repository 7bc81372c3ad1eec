"""Issue #20, entries 12, 13, 15, 16: forward passes curvhook cannot record (``curvhook/guards.py``).

One table of cases, the id naming the catalogue entry. A case either raises a
curvhook error with a phrase that says what went wrong (and leaves no hook
behind), or matches the torch.func float64 reference (``helpers.ggn_reference``:
FullGGN, DiagGGN and BatchJacobian):

- e12: ``torch.autocast`` (CPU, bfloat16) around or inside the forward: refused
  for every layer family (Linear, Conv2d, LayerNorm, attention);
- e13: a model (or some of its parameters or buffers, or the input) on the
  meta device: refused at ``extend`` entry (the input: when the forward starts);
- e15: ``torch.compile``: compiled code of the extended model called inside the
  block is refused; ``extend(torch.compile(model))``, ``module.compile()`` and
  compiled submodules run eagerly inside the block: exact;
- e16: ``torch.func`` transforms inside the forward, the model called inside
  a transform, ``functional_call`` with other parameters: refused;
  ``functional_call`` with the model's own parameters: exact.
"""

from __future__ import annotations

import copy
import shutil
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvhook import extend
from curvhook.errors import CurvhookError, UnsupportedModelError
from curvhook.extensions import BatchJacobian, DiagGGN, FullGGN
from helpers import assert_clean, close, ggn_reference, snapshot

DT = torch.float64
N = 3


# ------------------------------------------------------------------ models


class SelfAttention(nn.Module):
    """``mha(x, x, x)`` on ``[N, L, E]``, then a linear head on the flattened positions."""

    def __init__(self, length: int = 3, embed: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(2, embed)
        self.mha = nn.MultiheadAttention(embed, 2, batch_first=True)
        self.head = nn.Linear(length * embed, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        return self.head(self.mha(h, h, h, need_weights=False)[0].flatten(1))


class AutocastInside(nn.Module):
    """A forward that turns autocast on itself, around its second layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        with torch.autocast("cpu", torch.bfloat16):
            return self.b(h).float()


class VmapModule(nn.Module):
    """``vmap(self.lin)(x)``: a module called inside a transform of the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.func.vmap(self.lin)(x)


class VmapOperation(nn.Module):
    """A tensor operation between modules run inside ``vmap``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.func.vmap(torch.tanh)(self.a(x)))


class VmapLeaf(nn.Module):
    """A leaf without a rule whose forward maps a function over the samples (the fallback replays it)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))

    def forward(self, x: Tensor) -> Tensor:
        return torch.func.vmap(lambda r: torch.tanh(r @ self.w))(x)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def conv() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))


def layer_norm() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))


def inputs(model: nn.Module) -> Tensor:
    """``[N, ...]`` of the shape the model takes, in the model's dtype."""
    dtype = next(model.parameters()).dtype
    if isinstance(model, SelfAttention):
        return torch.randn(N, 3, 2, dtype=dtype)
    if isinstance(model[0] if isinstance(model, nn.Sequential) else None, nn.Conv2d):
        return torch.randn(N, 1, 3, 3, dtype=dtype)
    return torch.randn(N, 4, dtype=dtype)


def labels() -> Tensor:
    return torch.randint(0, 2, (N,))


def block(model: nn.Module, forward: Callable[[Tensor], Tensor], extended: Optional[nn.Module] = None) -> None:
    """One ``extend`` block on ``extended`` (default ``model``) whose forward pass is ``forward(X)``."""
    X, y = inputs(model), labels()
    with extend(model if extended is None else extended, DiagGGN()):
        nn.CrossEntropyLoss()(forward(X), y).backward()


def autocast_forward(model: nn.Module) -> None:
    def forward(X: Tensor) -> Tensor:
        with torch.autocast("cpu", torch.bfloat16):
            out = model(X)
        return out.float()

    block(model, forward)


def compiled(model: nn.Module, backend: str = "aot_eager") -> nn.Module:
    torch._dynamo.reset()  # no graph cached for another case
    return torch.compile(model, backend=backend)


def functional_call_with(params: Callable[[nn.Module], dict]) -> Callable[[nn.Module], None]:
    return lambda m: block(m, lambda X: torch.func.functional_call(m, params(m), (X,)))


def model_under_grad_transform(m: nn.Module) -> None:
    """``torch.func.grad`` of the loss through the model, inside the block."""
    X, y = inputs(m), labels()
    params = {k: v.detach() for k, v in m.named_parameters()}
    with extend(m, DiagGGN()):
        torch.func.grad(lambda p: nn.CrossEntropyLoss()(torch.func.functional_call(m, p, (X,)), y))(params)


def enter(m: nn.Module) -> None:
    """Enter a block (and leave it again if that did not raise)."""
    with extend(m, DiagGGN()):
        pass


def meta_part(m: nn.Module) -> nn.Module:
    m[2].to("meta")
    return m


def meta_buffer(m: nn.Module) -> nn.Module:
    m[1].running_mean = torch.empty(3, device="meta")
    return m


# ------------------------------------------------------------------ refusals


@dataclass
class Refusal:
    """A case that raises: ``run(model)`` inside ``pytest.raises(error, match=phrase)``."""

    build: Callable[[], nn.Module]
    run: Callable[[nn.Module], None]
    phrase: str
    error: type = UnsupportedModelError
    needs_compiler: bool = False


AUTOCAST = "torch.autocast is on \\(cpu\\).*without autocast inside the extend\\(\\) block"
META = "on the meta device.*to_empty"
COMPILED = "torch.compile'd code cannot be recorded.*Call the original module inside extend"
TRANSFORM = "runs inside a torch.func transform.*Write the batched operation directly"
CALLED_IN_TRANSFORM = "model was called inside a torch.func transform.*outside the block"
OTHER_PARAMS = "is not the parameter the model held.*functional_call"

REFUSALS = {
    "e12-linear": Refusal(mlp, autocast_forward, AUTOCAST),
    "e12-conv2d": Refusal(conv, autocast_forward, AUTOCAST),
    "e12-layernorm": Refusal(layer_norm, autocast_forward, AUTOCAST),
    "e12-attention": Refusal(SelfAttention, autocast_forward, AUTOCAST),
    "e12-inside-forward": Refusal(
        AutocastInside, lambda m: block(m, m), "torch.autocast is on \\(cpu\\) while module 'b'"
    ),
    "e13-meta-model": Refusal(lambda: mlp().to("meta"), enter, "Parameter '0.weight'.*" + META),
    "e13-some-params-meta": Refusal(lambda: meta_part(mlp()), enter, "Parameter '2.weight'.*" + META),
    "e13-meta-buffer": Refusal(
        lambda: meta_buffer(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).eval()),
        enter, "Buffer '1.running_mean'.*" + META,
    ),
    "e13-meta-input": Refusal(mlp, lambda m: block(m, lambda X: m(X.to("meta"))), "model input is on the meta device"),
    "e15-inside-aot_eager": Refusal(mlp, lambda m: block(m, compiled(m)), COMPILED),
    "e15-inside-eager": Refusal(mlp, lambda m: block(m, compiled(m, "eager")), COMPILED),
    "e15-inside-inductor": Refusal(
        mlp, lambda m: block(m, compiled(m, "inductor")), COMPILED, needs_compiler=True
    ),
    "e16-vmap-module": Refusal(VmapModule, lambda m: block(m, m), "Module 'lin' \\(Linear\\) " + TRANSFORM),
    "e16-vmap-operation": Refusal(
        VmapOperation, lambda m: block(m, m), "Operation 'tanh' \\(in 'VmapOperation'\\) " + TRANSFORM
    ),
    "e16-model-in-vmap": Refusal(mlp, lambda m: block(m, torch.func.vmap(m)), CALLED_IN_TRANSFORM),
    "e16-model-in-grad": Refusal(mlp, model_under_grad_transform, CALLED_IN_TRANSFORM),
    "e16-functional-call-other-params": Refusal(
        mlp, functional_call_with(lambda m: {k: v.detach().clone().requires_grad_() for k, v in m.named_parameters()}),
        "Parameter 'weight' of module '0' \\(Linear\\) " + OTHER_PARAMS,
    ),
}


def _has_compiler() -> bool:
    return any(shutil.which(cc) for cc in ("cc", "gcc", "clang", "g++", "c++"))


@pytest.mark.parametrize("case", list(REFUSALS.values()), ids=list(REFUSALS))
def test_refused(case: Refusal) -> None:
    if case.needs_compiler and not _has_compiler():
        pytest.skip("torch.compile's inductor backend needs a C++ compiler")
    model = case.build()
    before = snapshot(model)
    with pytest.raises(case.error, match=case.phrase) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        case.run(model)
    assert isinstance(info.value, CurvhookError)
    assert "not callable" not in str(info.value)
    for obj in (*model.parameters(), *model.modules()):  # torch.compile's marks are no leftovers of curvhook
        for key in [k for k in vars(obj) if k.startswith(("_dynamo", "_is_torch_compile"))]:
            delattr(obj, key)
    assert_clean(model, before)


# ------------------------------------------------------------------ exact


def results(model: nn.Module, forward: Callable[[Tensor], Tensor], X: Tensor, y: Tensor, extended: nn.Module) -> dict:
    """FullGGN, DiagGGN and BatchJacobian of one block on ``extended`` whose forward is ``forward(X)``."""
    ggn = FullGGN()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with extend(extended, DiagGGN(), ggn, BatchJacobian()):
            nn.CrossEntropyLoss()(forward(X), y).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    jac = [p.batch_jacobian.reshape(X.shape[0], p.batch_jacobian.shape[1], -1) for p in params]
    return {"full": ggn.matrix, "diag": torch.cat([p.diag_ggn.flatten() for p in params]), "jac": torch.cat(jac, 2)}


@dataclass
class Exact:
    """A case that matches the reference: ``setup(model) -> (forward, extended, after)``.

    ``forward(X)`` is the forward pass inside the block on ``extended``; ``after()``
    checks what must hold once the block is over (compiled code restored).
    """

    build: Callable[[], nn.Module]
    setup: Callable[[nn.Module], tuple]


def _extend_compiled(m: nn.Module) -> tuple:
    cm = compiled(m)
    code = cm.__dict__["forward"]
    return cm, cm, lambda: cm.__dict__["forward"] is code


def _compile_in_place(m: nn.Module) -> tuple:
    torch._dynamo.reset()
    m.compile(backend="aot_eager")
    code = m._compiled_call_impl
    return m, m, lambda: m._compiled_call_impl is code


def _compiled_child(m: nn.Module) -> tuple:
    m[0] = compiled(m[0])
    code = m[0].__dict__["forward"]
    return m, m, lambda: m[0].__dict__["forward"] is code


def _autocast_without_grad_then_plain(m: nn.Module) -> tuple:
    def forward(X: Tensor) -> Tensor:
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            m(X)  # evaluation inside the block: no backward follows, nothing refused
        return m(X)

    return forward, m, lambda: True


def _materialized_from_meta() -> nn.Module:
    m = mlp().to("meta").to_empty(device="cpu")
    for layer in (m[0], m[2]):
        layer.reset_parameters()
    return m


EXACT = {
    "e12-autocast-no-grad-forward": Exact(mlp, _autocast_without_grad_then_plain),
    "e13-to-empty-then-initialized": Exact(_materialized_from_meta, lambda m: (m, m, lambda: True)),
    "e15-extend-compiled": Exact(mlp, _extend_compiled),
    "e15-module-compile-in-place": Exact(mlp, _compile_in_place),
    "e15-compiled-submodule": Exact(mlp, _compiled_child),
    "e16-functional-call-own-params": Exact(
        mlp, lambda m: (lambda X: torch.func.functional_call(m, dict(m.named_parameters()), (X,)), m, lambda: True)
    ),
    "e16-vmap-inside-leaf-without-rule": Exact(
        lambda: nn.Sequential(nn.Linear(4, 4), VmapLeaf(), nn.Linear(3, 2)), lambda m: (m, m, lambda: True)
    ),
}


@pytest.mark.parametrize("case", list(EXACT.values()), ids=list(EXACT))
def test_exact(case: Exact) -> None:
    model = case.build().to(DT)
    plain = copy.deepcopy(model)  # the reference runs on the model as built (not compiled)
    X, y = inputs(model), labels()
    forward, extended, restored = case.setup(model)
    got = results(model, forward, X, y, extended)
    J, G = ggn_reference(plain, X, y, nn.CrossEntropyLoss())
    close(got["full"], G, rtol=1e-10)
    close(got["diag"], G.diagonal(), rtol=1e-10)
    close(got["jac"].reshape(-1, J.shape[1]), J, rtol=1e-10)
    assert restored(), "the compiled code was not put back after the block"


# ------------------------------------------------------- the shim entries


def test_the_shim_entries_of_the_guards_on_this_torch() -> None:
    """``curvhook/_torch_internals.py``'s entries for the guards do what ``guards.py`` relies on."""
    from curvhook import _torch_internals as ti

    assert not ti.any_autocast_enabled() and ti.autocast_device_types() == []
    with torch.autocast("cpu", torch.bfloat16):
        assert ti.any_autocast_enabled() and ti.autocast_device_types() == ["cpu"]
    assert ti.functorch_level() is None
    levels = []
    torch.func.vmap(lambda x: levels.append(ti.functorch_level()) or x)(torch.ones(2))
    assert levels[0] is not None
    assert not ti.in_compiled_region()
    m = nn.Linear(2, 2)
    assert ti.compiled_original(m) is None and ti.compiled_forward(m) == ("", None)
    torch._dynamo.reset()
    cm = torch.compile(m, backend="eager")
    assert ti.compiled_original(cm) is m
    attribute, code = ti.compiled_forward(cm)
    assert attribute == "forward"
    ti.set_compiled_forward(cm, attribute, None)  # runs eagerly: no compiled region around the module
    handle = m.register_forward_pre_hook(lambda mod, args: levels.append(ti.in_compiled_region()))
    cm(torch.ones(1, 2))
    ti.set_compiled_forward(cm, attribute, code)
    assert cm.__dict__["forward"] is code and levels[-1] is False
    cm(torch.ones(1, 2))
    handle.remove()
    assert levels[-1] is True  # the hook ran from compiled code
    out = compiled(nn.Linear(2, 2))(torch.ones(1, 2))
    assert ti.is_compiled_node(out.grad_fn) and not ti.is_compiled_node(m(torch.ones(1, 2)).grad_fn)
