"""The target figures: read from ``benchmarks/targets.json``, checked against a run's results.

A target is a ratio of two methods' time (or extra memory) on some problems
with an upper bound::

    {"label": "DiagGGN / BackPACK DiagGGNExact", "quantity": "time",
     "numerator": "curvhook:DiagGGN", "denominator": "backpack:DiagGGNExact",
     "problems": ["mlp", "3c3d"], "bound": 0.6, "beside": []}

``beside`` (optional) names methods whose time is printed next to the target
(the floor written into memory touched before, next to the fresh one). For a
curvhook numerator, the steady state inside one ``extend`` block
(``<numerator>@one-block``) is printed next to it too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from benchmarks import methods as M
from benchmarks import problems as P

TARGETS_FILE = Path(__file__).resolve().with_name("targets.json")
QUANTITIES = ("time", "memory")


@dataclass(frozen=True)
class Target:
    """One target ratio.

    Attributes:
        label: What the ratio is, for the tables.
        quantity: ``"time"`` (per step) or ``"memory"`` (extra peak over plain).
        numerator: The method whose cost is bounded.
        denominator: The method it is compared with.
        problems: The problems it is measured on.
        bound: The largest ratio that meets the target.
        beside: Methods whose time is printed next to it.
    """

    label: str
    quantity: str
    numerator: str
    denominator: str
    problems: tuple[str, ...]
    bound: float
    beside: tuple[str, ...] = field(default=())

    @property
    def one_block(self) -> Optional[str]:
        """The numerator's steady-state variant (one ``extend`` block), if there is one."""
        name = self.numerator + M.ONE_BLOCK
        return name if name in M.BY_NAME else None

    def methods(self) -> list[str]:
        """Every method this target needs, with those printed beside it."""
        return [self.numerator, self.denominator, *([self.one_block] if self.one_block else []), *self.beside]


def _check(entry: dict, where: str) -> Target:
    """Validate one entry of the targets file and build its :class:`Target`.

    Args:
        entry: The parsed JSON object.
        where: Its position, for the error messages.

    Returns:
        The target.

    Raises:
        ValueError: A field is missing or names an unknown problem, method or quantity.
    """
    missing = {"label", "quantity", "numerator", "denominator", "problems", "bound"} - set(entry)
    if missing:
        raise ValueError(f"{where}: missing {sorted(missing)}")
    if entry["quantity"] not in QUANTITIES:
        raise ValueError(f"{where}: quantity {entry['quantity']!r} is not one of {QUANTITIES}")
    names = [entry["numerator"], entry["denominator"], *entry.get("beside", [])]
    unknown = [n for n in names if n not in M.BY_NAME]
    if unknown:
        raise ValueError(f"{where}: unknown method(s) {unknown}")
    bad = [p for p in entry["problems"] if p not in P.SPECS]
    if bad or not entry["problems"]:
        raise ValueError(f"{where}: unknown problem(s) {bad} (or none)")
    bound = entry["bound"]
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or bound <= 0:
        raise ValueError(f"{where}: bound {bound!r} is not a positive number")
    return Target(
        entry["label"], entry["quantity"], entry["numerator"], entry["denominator"],
        tuple(entry["problems"]), float(bound), tuple(entry.get("beside", [])),
    )


def load(path: Union[str, Path, None] = None) -> list[Target]:
    """Read and validate the targets file.

    Args:
        path: The file; default :data:`TARGETS_FILE`.

    Returns:
        The targets in file order.

    Raises:
        ValueError: The file is not valid (see :func:`_check`).
    """
    path = Path(path) if path is not None else TARGETS_FILE
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("targets"), list):
        raise ValueError(f"{path}: expected an object with a list 'targets'")
    return [_check(entry, f"{path.name}: target {i}") for i, entry in enumerate(data["targets"])]


def plan(targets: list[Target], problems: Optional[list[str]] = None) -> dict[str, list[str]]:
    """The problems and methods a run of only the targets needs.

    Args:
        targets: The targets.
        problems: Keep only these problems (``None``: all the targets name).

    Returns:
        ``{problem: [method names]}``, ``plain`` first, the methods in registry order.
    """
    wanted: dict[str, set[str]] = {}
    for t in targets:
        for prob in t.problems:
            if problems is None or prob in problems:
                wanted.setdefault(prob, {"plain"}).update(t.methods())
    order = [p for p in P.ALL if p in wanted] + [p for p in wanted if p not in P.ALL]
    return {p: [m.name for m in M.METHODS if m.name in wanted[p]] for p in order}


def _time_figures(a: dict, b: dict, paired: dict) -> dict:
    """The time figures of one target on one problem (see :func:`evaluate`).

    The step times shown are the lock-step medians where the pair was measured,
    else the separate runs' medians.
    """
    ok = a.get("status") == "ok" and b.get("status") == "ok"
    value = a["median_s"] / b["median_s"] if ok else None
    value_min = a["min_s"] / b["min_s"] if ok else None
    if paired.get("status") == "ok":
        value_paired, num_s, den_s = paired["ratio"], paired["num_median_s"], paired["den_median_s"]
    else:
        value_paired, num_s, den_s = None, a.get("median_s"), b.get("median_s")
    return {"value": value, "value_min": value_min, "value_paired": value_paired,
            "decisive": value_paired if value_paired is not None else value,
            "num_ms": None if num_s is None else num_s * 1e3, "den_ms": None if den_s is None else den_s * 1e3}


def _memory_figures(a: dict, b: dict) -> dict:
    """The memory figures of one target: resident set (``value``) and allocator (``value_min``)."""
    def ratio(x: Optional[float], y: Optional[float]) -> Optional[float]:
        return None if x is None or y is None or y <= 0 else max(x, 0.0) / y

    ok = a.get("status") == "ok" and b.get("status") == "ok"
    value = ratio(a.get("delta_rss_mb"), b.get("delta_rss_mb")) if ok else None
    value_min = ratio(a.get("delta_alloc_mb"), b.get("delta_alloc_mb")) if ok else None
    return {"value": value, "value_min": value_min, "value_paired": None,
            "decisive": value_min if value_min is not None else value, "num_ms": None, "den_ms": None}


def evaluate(targets: list[Target], results: dict) -> list[dict]:
    """Every target on every problem of ``results`` it names.

    Time: ``value`` is the ratio of the separate runs' medians, ``value_min`` of
    their minima, ``value_paired`` the lock-step ratio, which decides where it
    was measured. Memory: ``value`` compares the extra resident set over plain,
    ``value_min`` the extra tensor memory (torch's profiler), which decides.

    Args:
        targets: The targets.
        results: A run's results (``problems`` and optionally ``paired``).

    Returns:
        One dict per target and problem, with ``met`` (``None``: not measured).
    """
    out = []
    for t in targets:
        for prob in t.problems:
            pr = results["problems"].get(prob)
            if not pr:
                continue
            a, b = pr["methods"].get(t.numerator, {}), pr["methods"].get(t.denominator, {})
            if t.quantity == "time":
                paired = results.get("paired", {}).get(f"{prob}:{t.numerator}/{t.denominator}", {})
                fig = _time_figures(a, b, paired)
            else:
                fig = _memory_figures(a, b)
            steady = pr["methods"].get(t.one_block or "", {})
            one_block = (steady["median_s"] / b["median_s"] if t.quantity == "time" and steady.get("status") == "ok"
                         and b.get("status") == "ok" else None)
            beside = {n: pr["methods"][n]["median_s"] * 1e3 for n in t.beside
                      if pr["methods"].get(n, {}).get("status") == "ok"}
            decisive = fig.pop("decisive")
            out.append({
                "target": t.label, "quantity": t.quantity, "problem": prob, "numerator": t.numerator,
                "denominator": t.denominator, **fig, "one_block": one_block, "beside_ms": beside,
                "bound": t.bound, "met": None if decisive is None else decisive <= t.bound,
                "why_missing": None if decisive is not None else
                f"{t.numerator}: {a.get('status', 'not run')}, {t.denominator}: {b.get('status', 'not run')}",
            })
    return out


def _cells(t: dict) -> list[str]:
    """The table cells of one evaluated target (see :data:`HEADER`)."""
    def f(v: Optional[float], spec: str = ".2f", unit: str = "") -> str:
        return "-" if v is None else format(v, spec) + unit

    memory = t["quantity"] == "memory"
    beside = ", ".join(f"{n.split(':', 1)[1]} {ms:,.1f} ms" for n, ms in t["beside_ms"].items())
    met = {True: "yes", False: "NO", None: "n/a (" + (t["why_missing"] or "") + ")"}[t["met"]]
    return [
        t["target"], t["problem"], f(t["value_paired"]),
        f(t["value"], unit=" (RSS)" if memory else ""), f(t["value_min"], unit=" (allocator)" if memory else ""),
        f(t["num_ms"], ",.1f"), f(t["den_ms"], ",.1f"), f(t["one_block"]), beside or "-",
        f"≤ {t['bound']:g}", met,
    ]


HEADER = ["target", "problem", "paired", "separate (medians)", "separate (minima)", "numerator ms",
          "denominator ms", "one block", "beside", "bound", "met"]


def text(evaluated: list[dict], markdown: bool = False) -> str:
    """The evaluated targets as a table.

    Args:
        evaluated: From :func:`evaluate`.
        markdown: A markdown table instead of aligned text.

    Returns:
        The table (empty when there is nothing to show).
    """
    rows = [_cells(t) for t in evaluated]
    if not rows:
        return ""
    if markdown:
        lines = ["| " + " | ".join(HEADER) + " |", "|---|---|" + "--:|" * 6 + "---|--:|---|"]
        return "\n".join(lines + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows])
    table = [HEADER] + rows
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    left = {0, 1, 8, 10}
    return "\n".join(
        "  " + "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in table
    )
