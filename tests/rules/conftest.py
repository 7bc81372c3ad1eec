"""Fixtures of the rule-family tests (the shared helpers are in ``tests/helpers.py``)."""

import pytest

from curvhook.rules import fallback


@pytest.fixture
def no_fallback(monkeypatch):
    """Fail if any module goes through the torch.func fallback."""

    def refuse(*args, **kwargs):
        raise AssertionError("the torch.func fallback was used")

    for method in ("jac_t_mat_prod", "param_jac_t_mat_prod", "param_sq_sum", "diag_jac_t_diag_jac", "param_diag"):
        monkeypatch.setattr(fallback.FALLBACK, method, refuse)
    monkeypatch.setattr(fallback, "_WARNED", set())  # a fallback warning would be raised again
