"""Issue #20, the entries on hooks, threads, copies and checkpoints.

Every case either matches the torch.func reference in float64 (``assert_exact``:
FullGGN, DiagGGN and BatchJacobian against ``J`` and ``Jᵀ H J``) or raises a
curvhook error whose message names the problem. Ids name the catalogue entry.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import subprocess
import sys
import threading
from typing import Callable

import pytest
import torch
from torch import nn

import curvhook
from curvhook import extend
from curvhook.errors import CurvhookError, UnsupportedLossError
from curvhook.extensions import BatchJacobian, DiagGGN, DiagGGNApprox, FullGGN
from helpers import DT, assert_clean, assert_exact, close, ggn_reference, run_all, snapshot

CE = nn.CrossEntropyLoss()


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)


def _data(n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 4, dtype=DT), torch.randint(0, 3, (n,))


class _Then(nn.Module):
    """``g(model(x))``: the reference model of operations applied after ``model``."""

    def __init__(self, model: nn.Module, g: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.model, self.g = model, g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.g(self.model(x))


def _diag_reference(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``diag(Jᵀ H J)`` of ``model`` with cross-entropy, ``[P]``."""
    return ggn_reference(model, X, y, CE)[1].diagonal()


def _diag(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.diag_ggn.flatten() for p in model.parameters()])


# ------------------------------------------------------------------ entry 1
class _Net(nn.Module):
    """A custom container: ``b(a(x))`` with ``b`` a Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Sequential(nn.Tanh(), nn.Linear(5, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


class _NoRule(nn.Module):
    """A leaf without a rule: the torch.func fallback replays its forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.5 * torch.tanh(x)


def _net() -> nn.Module:
    return _Net().to(DT)


def _with_fallback() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), _NoRule(), nn.Linear(5, 3)).to(DT)


def _hooked(build: Callable[[], nn.Module], where: str, kind: str, hook: Callable, **options) -> nn.Module:
    """``build()`` with ``hook`` registered on its submodule ``where`` (``""``: the model)."""
    model = build()
    getattr(model.get_submodule(where), kind)(hook, **options)
    return model


def _exact_with_forward_hook(build, where: str, kind: str, hook: Callable, **options) -> Callable[[], None]:
    """A user hook registered before the block: all extensions match torch.func (which runs it too)."""

    def check() -> None:
        X, y = _data()
        assert_exact(_hooked(build, where, kind, hook, **options), X, y, CE)

    return check


def _exact_with_hook_inside_block(where: str, kind: str, hook: Callable, **options) -> Callable[[], None]:
    """A user hook registered inside the block, before the forward pass; automatic and named loss."""

    def check() -> None:
        X, y = _data()
        for ext in (DiagGGN(), DiagGGN(loss=nn.CrossEntropyLoss())):
            m = _mlp()
            with extend(m, ext):
                getattr(m.get_submodule(where), kind)(hook, **options)
                CE(m(X), y).backward()
            close(_diag(m), _diag_reference(m, X, y))

    return check


def _observer_sees_the_module_output() -> None:
    """An observing hook gets what the module returned, inside the block as without it."""
    seen: list = []
    m, (X, y) = _mlp(), _data()
    m[0].register_forward_hook(lambda mod, args, out: seen.append(out.detach().clone()))
    m[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    expected = m[0](X).detach()
    seen.clear()
    with extend(m, DiagGGN()):
        CE(m(X), y).backward()
    assert len(seen) == 2 and torch.equal(seen[0], X) and torch.equal(seen[1], expected)
    close(_diag(m), _diag_reference(m, X, y))


def _double(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return 2 * out


def _tanh(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out.tanh()


def _scale_input(module: nn.Module, args: tuple) -> tuple:
    return (3 * args[0],)


def _scale_input_bare(module: nn.Module, args: tuple) -> torch.Tensor:
    return 3 * args[0]  # a tensor, not a tuple: torch wraps it


def _observe(*args) -> None:
    return None


def _double_kwargs(module: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
    return 2 * out


def _scale_input_kwargs(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
    return (3 * args[0],), kwargs


POST, PRE = "register_forward_hook", "register_forward_pre_hook"
FORWARD_HOOKS = [
    ("e1-post-2o", _exact_with_forward_hook(_mlp, "0", POST, _double)),
    ("e1-post-tanh", _exact_with_forward_hook(_mlp, "0", POST, _tanh)),
    ("e1-post-on-last-layer", _exact_with_forward_hook(_mlp, "2", POST, _double)),
    ("e1-post-prepend", _exact_with_forward_hook(_mlp, "0", POST, _double, prepend=True)),
    ("e1-pre-scales-input", _exact_with_forward_hook(_mlp, "2", PRE, _scale_input)),
    ("e1-pre-returns-tensor", _exact_with_forward_hook(_mlp, "1", PRE, _scale_input_bare)),
    ("e1-pre-on-first-layer", _exact_with_forward_hook(_mlp, "0", PRE, _scale_input)),
    ("e1-observer-post", _exact_with_forward_hook(_mlp, "0", POST, _observe)),
    ("e1-observer-pre", _exact_with_forward_hook(_mlp, "1", PRE, _observe)),
    ("e1-post-with-kwargs", _exact_with_forward_hook(_mlp, "0", POST, _double_kwargs, with_kwargs=True)),
    ("e1-pre-with-kwargs", _exact_with_forward_hook(_mlp, "2", PRE, _scale_input_kwargs, with_kwargs=True)),
    ("e1-root-sequential-post", _exact_with_forward_hook(_mlp, "", POST, _tanh)),
    ("e1-root-sequential-pre", _exact_with_forward_hook(_mlp, "", PRE, _scale_input)),
    ("e1-root-container-post", _exact_with_forward_hook(_net, "", POST, _tanh)),
    ("e1-root-container-pre", _exact_with_forward_hook(_net, "", PRE, _scale_input)),
    ("e1-container-post", _exact_with_forward_hook(_net, "b", POST, _tanh)),
    ("e1-container-pre", _exact_with_forward_hook(_net, "b", PRE, _scale_input)),
    ("e1-in-container-post", _exact_with_forward_hook(_net, "b.0", POST, _double)),
    ("e1-fallback-post", _exact_with_forward_hook(_with_fallback, "1", POST, _double)),
    ("e1-fallback-pre", _exact_with_forward_hook(_with_fallback, "1", PRE, _scale_input)),
    ("e1-inside-block-pre", _exact_with_hook_inside_block("2", PRE, _scale_input)),
    ("e1-inside-block-post", _exact_with_hook_inside_block("0", POST, _double)),
    ("e1-inside-block-post-prepend", _exact_with_hook_inside_block("0", POST, _double, prepend=True)),
    ("e1-inside-block-root-post", _exact_with_hook_inside_block("", POST, _tanh)),
    ("e1-inside-block-root-pre-prepend", _exact_with_hook_inside_block("", PRE, _scale_input, prepend=True)),
    ("e1-observer-values", _observer_sees_the_module_output),
]


# ------------------------------------------------------------------ entry 2
def _after_caught_loss_error(named: bool) -> None:
    """A loss module raised inside the block (target of the wrong shape), and the user caught it."""
    m, (X, y) = _mlp(), _data()
    ext = DiagGGN(loss=nn.CrossEntropyLoss()) if named else DiagGGN()
    with extend(m, ext):
        with pytest.raises(ValueError):
            CE(m(X), y[:2])
        CE(2 * m(X).tanh(), y).backward()
    close(_diag(m), _diag_reference(_Then(m, lambda o: 2 * o.tanh()), X, y))


def _plain_after_caught_loss_error() -> None:
    m, (X, y) = _mlp(), _data()
    with extend(m, DiagGGN()):
        with pytest.raises(ValueError):
            CE(m(X), y[:2])
        CE(m(X), y).backward()
    close(_diag(m), _diag_reference(m, X, y))


def _threads(steps: int = 150) -> None:
    """Two threads, each with its own model and block, every step exact.

    The global module hooks of one block see the other thread's loss calls, and
    the model output (a temporary) dies after ``tanh``, so the product may reuse
    its id: both went wrong at random before.
    """
    cases = []
    for _ in range(2):
        m, (X, y) = _mlp(), _data()
        cases.append((m, X, y, _diag_reference(_Then(m, lambda o: 2 * o.tanh()), X, y)))
    failures: list = []

    def work(m: nn.Module, X: torch.Tensor, y: torch.Tensor, expected: torch.Tensor) -> None:
        for step in range(steps):
            try:
                with extend(m, DiagGGN()):
                    CE(2 * m(X).tanh(), y).backward()
                close(_diag(m), expected, rtol=1e-9)
            except Exception as err:  # noqa: BLE001 - reported below
                failures.append((step, f"{type(err).__name__}: {str(err)[:200]}"))

    threads = [threading.Thread(target=work, args=case) for case in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:3]


# ------------------------------------------------------------------ entry 7
_FORWARD_TABLES = (
    "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
)


def _hook_count(model: nn.Module) -> int:
    """Forward hooks of every module, and ``__dict__`` entries that are not the module's own."""
    hooks = sum(len(getattr(m, t)) for m in model.modules() for t in _FORWARD_TABLES)
    return hooks + sum("__reduce_ex__" in vars(m) for m in model.modules())


def _copies_inside_block() -> None:
    """An EMA/teacher copy and checkpoints made inside the block: clean, usable, and the block exact."""
    m, (X, y) = _mlp(), _data()
    before = snapshot(m)
    with extend(m, DiagGGN()):
        teacher = copy.deepcopy(m)
        saved = io.BytesIO()
        torch.save(m, saved)
        pickled = pickle.dumps(m)
        assert _hook_count(teacher) == 0
        out = m(X)
        with torch.no_grad():
            soft = teacher(X).softmax(1)  # a teacher forward between the model and its loss
        (CE(out, y) + 0.5 * CE(teacher(X), soft)).backward()
    assert_clean(m, before)
    close(_diag(m), _diag_reference(m, X, y))
    assert b"curvhook" not in pickled  # loads without curvhook
    loaded = [teacher, torch.load(io.BytesIO(saved.getvalue()), weights_only=False), pickle.loads(pickled)]
    for c in loaded:
        assert _hook_count(c) == 0
        assert_exact(c, X, y, CE)  # extendable, exact


# ------------------------------------------------------------------ entry 14
def _clean_copy(model: nn.Module) -> nn.Module:
    """The model without its backward hooks: the forward function (torch.func cannot run the hooks)."""
    clean = copy.deepcopy(model)
    for m in clean.modules():
        m._backward_hooks.clear()
        m._backward_pre_hooks.clear()
        m._is_full_backward_hook = None
    return clean


def _exact_with_backward_hook(build, where: str, kind: str) -> Callable[[], None]:
    """A full backward (pre-)hook that only observes: curvature exact, hooks fire with the same gradients."""

    def check() -> None:
        X, y = _data()
        model, seen = build(), []
        getattr(model.get_submodule(where), kind)(lambda mod, *grads: seen.append(_grads(grads)))
        CE(model(X), y).backward()
        without_block = seen[:]
        seen.clear()
        model.zero_grad()
        got = run_all(model, X, y, CE)
        assert len(seen) == len(without_block)
        for a, b in zip(seen, without_block):
            for u, v in zip(a, b):
                assert (u is None) == (v is None) and (u is None or torch.equal(u, v))
        J, G = ggn_reference(_clean_copy(model), X, y, CE)
        close(got["full"], G)
        close(got["diag"], G.diagonal())
        close(got["jac"].reshape(-1, J.shape[1]), J)

    return check


def _grads(grads: tuple) -> list:
    """The gradient tensors a backward hook received (``grad_input, grad_output`` or ``grad_output``)."""
    return [g if g is None else g.clone() for group in grads for g in group]


def _changed_grad_input() -> None:
    """A backward hook that changes ``grad_input`` changes ``p.grad``, not the curvature of the forward."""
    m, (X, y) = _mlp(), _data()
    m[2].register_full_backward_hook(lambda mod, grad_input, grad_output: (3 * grad_input[0],))
    CE(m(X), y).backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    with extend(m, DiagGGN()):
        CE(m(X), y).backward()
    for p, g in zip(m.parameters(), grads):
        assert torch.equal(p.grad, g)
    close(_diag(m), _diag_reference(_clean_copy(m), X, y))


def _changed_grad_output_of_model() -> None:
    """A backward pre-hook on the model that changes the gradient reaching its output: not the loss's."""
    m, (X, y) = _mlp(), _data()
    m.register_full_backward_pre_hook(lambda mod, grad_output: (2 * grad_output[0],))
    with extend(m, DiagGGN()):
        CE(m(X), y).backward()


BACKWARD, BACKWARD_PRE = "register_full_backward_hook", "register_full_backward_pre_hook"
BACKWARD_HOOKS = [
    ("e14-layer", _exact_with_backward_hook(_mlp, "0", BACKWARD)),
    ("e14-layer-pre", _exact_with_backward_hook(_mlp, "2", BACKWARD_PRE)),
    ("e14-root-sequential", _exact_with_backward_hook(_mlp, "", BACKWARD)),
    ("e14-root-sequential-pre", _exact_with_backward_hook(_mlp, "", BACKWARD_PRE)),
    ("e14-root-container", _exact_with_backward_hook(_net, "", BACKWARD)),
    ("e14-container", _exact_with_backward_hook(_net, "b", BACKWARD)),
    ("e14-container-pre", _exact_with_backward_hook(_net, "b", BACKWARD_PRE)),
    ("e14-last-layer-in-container", _exact_with_backward_hook(_net, "b.1", BACKWARD)),
    ("e14-fallback-leaf", _exact_with_backward_hook(_with_fallback, "1", BACKWARD)),
    ("e14-changed-grad-input", _changed_grad_input),
]


# ------------------------------------------------------------------ entry 19
def _import_runs_no_subprocess() -> None:
    # torch is imported first: PyPI's CUDA build of torch itself runs ``ldconfig -p`` at import.
    code = (
        "import subprocess, torch\n"
        "calls = []\n"
        "init = subprocess.Popen.__init__\n"
        "def spy(self, *a, **k):\n"
        "    calls.append(a)\n"
        "    return init(self, *a, **k)\n"
        "subprocess.Popen.__init__ = spy\n"
        "import curvhook\n"
        "from curvhook import _memory\n"
        "_memory._fresh((2 << 20,), torch.float64, torch.device('cpu'))  # loads madvise\n"
        "print(calls)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(curvhook.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


# ------------------------------------------------------------------ entry 20
def _pickled_size(obj: object) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return len(buffer.getvalue())


def _clear_keeps_results_out_of_checkpoints() -> None:
    m, (X, y) = _mlp(), _data()
    with extend(m, FullGGN(), BatchJacobian(), DiagGGN(), DiagGGNApprox()):
        CE(m(X), y).backward()
    assert _pickled_size(m) > 3 * _pickled_size(m.state_dict())
    curvhook.clear(m)
    for p in m.parameters():
        assert not {"diag_ggn", "diag_ggn_approx", "ggn", "batch_jacobian"} & set(vars(p))
    # what is left is the module structure around the state_dict's tensors
    assert _pickled_size(m) < _pickled_size(m.state_dict()) + 2000
    assert len(pickle.dumps(m)) < _pickled_size(m.state_dict()) + 2000
    assert_exact(m, X, y, CE)  # still extendable


def _clear_finds_user_extensions() -> None:
    class Scaled(DiagGGN):
        attribute = "scaled_diag_ggn"

    m, (X, y) = _mlp(), _data()
    with extend(m, Scaled()):
        CE(m(X), y).backward()
    assert all(hasattr(p, "scaled_diag_ggn") for p in m.parameters())
    curvhook.clear(m)
    assert not any(hasattr(p, "scaled_diag_ggn") for p in m.parameters())


def _clear_inside_block() -> None:
    m, (X, y) = _mlp(), _data()
    with extend(m, DiagGGN()):
        CE(m(X), y).backward()
        curvhook.clear(m)


# -------------------------------------------------------------------- table
# (id, check, error class or None, phrase of its message)
CASES = [
    *((name, check, None, "") for name, check in FORWARD_HOOKS),
    ("e2-auto-loss-after-caught-error", lambda: _after_caught_loss_error(named=False), None, ""),
    # the loss found in the block comes before the named one: exact (it raised "operations after the model")
    ("e2-named-loss-after-caught-error", lambda: _after_caught_loss_error(named=True), None, ""),
    ("e2-plain-after-caught-error", _plain_after_caught_loss_error, None, ""),
    ("e2-two-threads", _threads, None, ""),
    ("e7-copies-inside-block", _copies_inside_block, None, ""),
    *((name, check, None, "") for name, check in BACKWARD_HOOKS),
    ("e14-changed-grad-output-of-model", _changed_grad_output_of_model, UnsupportedLossError,
     "gradient reaching the model output is not that of the loss"),
    ("e19-import-no-subprocess", _import_runs_no_subprocess, None, ""),
    ("e20-clear", _clear_keeps_results_out_of_checkpoints, None, ""),
    ("e20-clear-user-extension", _clear_finds_user_extensions, None, ""),
    ("e20-clear-inside-block", _clear_inside_block, CurvhookError, "after the block"),
]


@pytest.mark.parametrize("check, error, phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_catalogue(check: Callable[[], None], error, phrase: str) -> None:
    if error is None:
        check()
    else:
        with pytest.raises(error, match=phrase):
            check()
