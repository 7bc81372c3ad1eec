"""Smoke test of the examples: each file in examples/ runs to the end and saves its picture.

Every example runs as its own process with ``CURVHOOK_EXAMPLES_QUICK=1`` (fewer
epochs and steps) and ``CURVHOOK_EXAMPLES_IMAGES`` pointing at a temporary
folder, so the committed pictures in examples/images/ are left alone. An
example whose optional package (matplotlib, scikit-learn, laplace-torch) is
not installed is skipped with the package's name.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# file name → (the packages it imports beyond curvhook and torch, the picture it saves or None)
CASES = {
    "quickstart.py": ((), None),
    "ewc_two_tasks.py": (("matplotlib", "sklearn"), "ewc_two_tasks.png"),
    "ggn_preconditioner.py": (("matplotlib", "sklearn"), "ggn_preconditioner.png"),
    "obd_pruning.py": (("matplotlib", "sklearn"), "obd_pruning.png"),
    "dp_sgd_clipping.py": (("matplotlib", "sklearn"), "dp_sgd_clipping.png"),
    "ntk_spectrum.py": (("matplotlib", "sklearn"), "ntk_spectrum.png"),
    "laplace_calibration.py": (("matplotlib", "sklearn", "laplace"), "laplace_calibration.png"),
}


def test_every_example_is_listed():
    """A new example file must be added to CASES (and so to the smoke test); ``_common.py``
    holds what the examples share and runs as part of each."""
    assert sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_runs(name, tmp_path):
    packages, picture = CASES[name]
    for package in packages:
        pytest.importorskip(package, reason=f"examples/{name} needs {package}")
    env = dict(
        os.environ,
        CURVHOOK_EXAMPLES_QUICK="1",
        CURVHOOK_EXAMPLES_IMAGES=str(tmp_path),
        MPLBACKEND="Agg",
        OMP_NUM_THREADS="1",  # one thread each: quick runs are small, and idle-waiting threads slow a busy machine
    )
    env.pop("COV_CORE_SOURCE", None)  # pytest-cov would otherwise measure the subprocess too
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"examples/{name} failed:\n{done.stdout}\n{done.stderr}"
    if picture is not None:
        saved = tmp_path / picture
        assert saved.is_file() and saved.stat().st_size > 10_000, f"examples/{name} did not save {picture}"
