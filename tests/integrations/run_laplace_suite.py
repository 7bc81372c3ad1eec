"""Run laplace-torch's own test suite with curvhook's backends added.

laplace's tests are parametrised over its backends. This script copies the
test folder of a Laplace checkout into a temporary directory (nothing of
laplace is kept in this repository) and adds a ``conftest.py`` that

- appends ``CurvhookGGN`` / ``CurvhookEF`` to every ``parametrize`` over an
  argument whose name contains "backend" (next to each GGN-type / EF-type
  backend, and to the bare interfaces of tests/test_jacobians.py), and
- keeps only the test items that use a curvhook backend (``--all`` keeps
  laplace's own too).

It also writes two rebound copies of laplace's backend-specific files,
``test_curv_backends_curvlinops.py`` and ``test_curv_backends_backpack.py``,
in which ``CurvlinopsGGN/EF`` and ``BackPackGGN/EF`` name the curvhook
backends (their references, ASDL, BackPACK, torch.func, stay as they are).

Usage (in a virtualenv with laplace-torch, curvhook, pytest and pytest-mock)::

    python tests/integrations/run_laplace_suite.py                    # clone laplace at PINNED_REF
    python tests/integrations/run_laplace_suite.py --laplace PATH     # a checkout, or its git dir
    python tests/integrations/run_laplace_suite.py -- -x -k kron      # extra pytest arguments

It prints the pass/fail counts per file and every failure with the last line
of its message; ``--junitxml`` keeps pytest's report. Exit status: pytest's.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ElementTree
from collections import Counter
from pathlib import Path

REPOSITORY = "https://github.com/aleximmer/Laplace"
# The newest commit of laplace's main branch these tests were run against (2025-04-22).
PINNED_REF = "44ea62ac1f8cfd6f797f31c75e2cf34414fdddae"

# Test files with the backend of their name rebound to curvhook's, and the names rebound.
REBOUND = {
    "test_curv_backends_curvlinops.py": ("CurvlinopsGGN", "CurvlinopsEF"),
    "test_curv_backends_backpack.py": ("BackPackGGN", "BackPackEF"),
}

CONFTEST = '''"""Added by curvhook's run_laplace_suite.py: curvhook backends in laplace's parametrisations."""
import os

import pytest
from laplace.curvature import CurvatureInterface, EFInterface, GGNInterface

from curvhook.integrations.laplace import CurvhookEF, CurvhookGGN, CurvhookInterface

KEEP_ALL = os.environ.get("CURVHOOK_LAPLACE_ALL") == "1"
REBOUND = {rebound}


def _counterpart(value):
    """The curvhook backend to add next to a laplace backend class, or None."""
    if not isinstance(value, type) or not issubclass(value, CurvatureInterface):
        return None
    if issubclass(value, CurvhookInterface):
        return None
    if issubclass(value, GGNInterface):
        return CurvhookGGN
    if issubclass(value, EFInterface):
        return CurvhookEF
    if value.__name__.endswith("Interface"):  # CurvatureInterface, BackPackInterface: Jacobians only
        return CurvhookGGN
    return None  # Hessian backends


def _extended(argnames, argvalues):
    names = [n.strip() for n in (argnames.split(",") if isinstance(argnames, str) else argnames)]
    slots = [i for i, n in enumerate(names) if "backend" in n.lower()]
    if not slots:
        return None
    values, added, seen = list(argvalues), [], set()
    for value in values:
        marks = ()
        if hasattr(value, "values") and hasattr(value, "marks"):  # pytest.param
            marks, value = value.marks, value.values if len(names) > 1 else value.values[0]
        row = list(value) if len(names) > 1 else [value]
        for slot in slots:
            new = _counterpart(row[slot])
            if new is None:
                continue
            changed = row.copy()
            changed[slot] = new
            key = tuple(map(repr, changed))
            if key in seen:
                continue
            seen.add(key)
            new_value = tuple(changed) if len(names) > 1 else changed[0]
            added.append(pytest.param(*changed, marks=marks) if marks else new_value)
    return values + added if added else None


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc):
    markers = metafunc.definition.own_markers
    for index, mark in enumerate(markers):
        if mark.name != "parametrize" or len(mark.args) < 2:
            continue
        values = _extended(mark.args[0], mark.args[1])
        if values is not None:
            markers[index] = type(mark)(mark.name, (mark.args[0], values, *mark.args[2:]), mark.kwargs, _ispytest=True)


def _uses_curvhook(item):
    if os.path.basename(str(item.fspath)) in REBOUND:
        return True
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return False
    def curvhook_class(v):
        return isinstance(v, type) and issubclass(v, CurvhookInterface)
    return any(curvhook_class(v) or (isinstance(v, (tuple, list)) and any(map(curvhook_class, v)))
               for v in callspec.params.values())


def pytest_collection_modifyitems(config, items):
    if KEEP_ALL:
        return
    kept = [item for item in items if _uses_curvhook(item)]
    config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    items[:] = kept
'''


def _laplace_tests(source: str | None, workdir: Path) -> Path:
    """Puts laplace's tests/ folder under ``workdir`` and returns it."""
    target = workdir / "tests"
    if source is None:
        clone = workdir / "laplace-clone"
        subprocess.run(["git", "clone", "--quiet", REPOSITORY, str(clone)], check=True)
        subprocess.run(["git", "-C", str(clone), "checkout", "--quiet", PINNED_REF], check=True)
        source = str(clone)
    path = Path(source)
    if (path / "tests").is_dir():
        shutil.copytree(path / "tests", target)
    else:  # a bare or mirror git directory
        archive = workdir / "tests.tar"
        with open(archive, "wb") as out:
            subprocess.run(["git", "--git-dir", str(path), "archive", PINNED_REF, "tests"], stdout=out, check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(workdir)
    return target


def _rebind(tests: Path) -> None:
    """Writes the rebound copies of laplace's backend-specific test files."""
    for name, (ggn, ef) in REBOUND.items():
        text = (tests / name).read_text()
        rebinding = f"\nfrom curvhook.integrations.laplace import CurvhookGGN as {ggn}, CurvhookEF as {ef}  # noqa\n"
        # Before the first top-level decorator, function or class: after all imports.
        lines = text.splitlines(keepends=True)
        first = next(i for i, line in enumerate(lines) if re.match(r"(@|def |class )", line))
        lines.insert(first, rebinding + "\n")
        (tests / name.replace(".py", "_as_curvhook.py")).write_text("".join(lines))


def _summary(report: Path) -> tuple[Counter, list[tuple[str, str]]]:
    counts: Counter = Counter()
    failures = []
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        module = case.get("classname", "").split(".")[-1]
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
                message = (child.get("message") or child.text or "").strip().splitlines()
                failures.append((f"{module}::{case.get('name')}", message[-1] if message else ""))
            elif child.tag == "skipped":
                outcome = "skipped"
        counts[(module, outcome)] += 1
    return counts, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--laplace", help="a Laplace checkout or git dir (default: clone at PINNED_REF)")
    parser.add_argument("--all", action="store_true", help="also run laplace's own backends")
    parser.add_argument("--junitxml", help="keep pytest's report here")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="laplace-suite-") as tmp:
        workdir = Path(tmp)
        tests = _laplace_tests(args.laplace, workdir)
        (tests / "conftest.py").write_text(CONFTEST.replace("{rebound}", repr(
            {name.replace(".py", "_as_curvhook.py") for name in REBOUND})))
        _rebind(tests)
        report = Path(args.junitxml) if args.junitxml else workdir / "report.xml"
        env = dict(os.environ, CURVHOOK_LAPLACE_ALL="1" if args.all else "0")
        env["PYTHONPATH"] = os.pathsep.join(
            [str(workdir), str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
        command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-W", "ignore",
                   "--rootdir", str(workdir), f"--junitxml={report}", "tests", *args.pytest_args]
        status = subprocess.run(command, cwd=workdir, env=env).returncode
        counts, failures = _summary(report)

    modules = sorted({module for module, _ in counts})
    print(f"\n{'file':<45} {'passed':>7} {'failed':>7} {'skipped':>8}")
    for module in modules:
        print(f"{module:<45} {counts[(module, 'passed')]:>7} {counts[(module, 'failed')]:>7} "
              f"{counts[(module, 'skipped')]:>8}")
    total = Counter()
    for (_, outcome), n in counts.items():
        total[outcome] += n
    print(f"{'total':<45} {total['passed']:>7} {total['failed']:>7} {total['skipped']:>8}")
    if failures:
        print("\nfailures:")
        for name, message in failures:
            print(f"  {name}\n      {message[:300]}")
    return status


if __name__ == "__main__":
    sys.exit(main())
