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
from helpers import DT, assert_clean, assert_exact, close, ggn_reference, snapshot

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


# ------------------------------------------------------------------ entry 19
def _import_runs_no_subprocess() -> None:
    code = (
        "import subprocess\n"
        "calls = []\n"
        "init = subprocess.Popen.__init__\n"
        "def spy(self, *a, **k):\n"
        "    calls.append(a)\n"
        "    return init(self, *a, **k)\n"
        "subprocess.Popen.__init__ = spy\n"
        "import curvhook, torch\n"
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
    ("e2-auto-loss-after-caught-error", lambda: _after_caught_loss_error(named=False), None, ""),
    ("e2-named-loss-after-caught-error", lambda: _after_caught_loss_error(named=True), UnsupportedLossError,
     "operations applied to the output after the model"),
    ("e2-plain-after-caught-error", _plain_after_caught_loss_error, None, ""),
    ("e2-two-threads", _threads, None, ""),
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
