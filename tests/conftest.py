"""Shared fixtures and the error report of the reference comparisons."""

import pytest
import torch
from hypothesis import Phase, settings

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


# Hypothesis profiles of the random-architecture test (test_fuzz.py). "ci", the default:
# a fixed seed and a few examples per input family (5 families: 40 examples), no shrinking
# (a failure prints its case, which replays as is); "thorough": thousands, shrunk to a
# minimal case (tests/README.md).
settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=8,
    deadline=None,
    print_blob=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
)
settings.register_profile("thorough", max_examples=1000, deadline=None, print_blob=True)


def pytest_configure(config):
    """Load the "ci" profile unless ``--hypothesis-profile`` names one."""
    if not config.getoption("hypothesis_profile", default=None):
        settings.load_profile("ci")
