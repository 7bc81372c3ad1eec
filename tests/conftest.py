"""Shared fixtures and the error report of the reference comparisons."""

import pytest
import torch

import reference


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state and the default dtype."""
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


def pytest_terminal_summary(terminalreporter):
    """Print the largest error against the torch.func reference, per extension."""
    if not reference.ERRORS:
        return
    terminalreporter.write_line("")
    terminalreporter.write_line(
        "max error vs torch.func reference (normwise = max|a-e|/max|e|; "
        "entrywise = max |a-e|/|e| over |e| > 1e-6 max|e|):"
    )
    for label in sorted(reference.ERRORS):
        s = reference.ERRORS[label]
        terminalreporter.write_line(
            f"  {label:<28} normwise {s['normwise']:.3e}  entrywise {s['entrywise']:.3e}  ({s['checks']} passed, {s['failed']} failed comparisons)"
        )
        if s.get("normwise_at"):
            terminalreporter.write_line(f"      worst normwise in {s['normwise_at']}; worst entrywise in {s.get('entrywise_at')}")
