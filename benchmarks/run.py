"""Benchmark entry point.

Examples::

    python -m benchmarks.run --targets --json targets.json     # only what the targets need
    python -m benchmarks.run --problem all --json out.json --plot out.png --markdown out.md
    python -m benchmarks.run --smoke            # seconds: tiny batch, curvhook + torch.func, in-process

Protocol, per problem and method (docs/benchmarks.md has the short version):

- Step: what a training loop runs per batch: forward, loss, backward, plus
  whatever the library needs (NNGeometry and curvlinops build their object
  from a one-batch loader; torch.func computes its Jacobian). ``curvhook:X``
  is written as the README tells users, a new ``with extend(model, X()):``
  block around every step; ``curvhook:X@one-block`` is the steady state inside
  one block entered once (its entry is reported apart as ``entry_ms``).
- Time: ``--warmup`` steps, then ``--repeats`` samples; a fast method's sample
  is the mean over a block of steps lasting about ``MIN_BLOCK_S``. The median
  is reported, and its ratio to the plain ``loss.backward()`` step.
- Memory: each method runs in its own fresh subprocess, which reports its peak
  resident set size (``VmHWM``); ``Δ vs plain`` subtracts the plain
  subprocess's. ``Δ alloc MB``: the peak of the tensor memory allocated during
  one more step (torch's profiler, ``profile_memory=True``) minus the same for
  plain; it does not see the C allocator's caching. ``--in-process`` skips the
  subprocesses (no memory figures).
- Huge pages: unless ``--no-thp``, every process runs with
  ``THP_MEM_ALLOC_ENABLE=1``, so torch's allocator asks for 2 MiB pages for
  its large buffers, as curvhook does for its results: the peers and the
  floors get the same page-fault cost as curvhook.
- Targets (``benchmarks/targets.json``): the time ratios are measured once more
  in lock step. The numerator and the denominator each run in a process of
  their own, side by side, and take turns: each runs one block of steps
  untimed and one timed (about ``MIN_BLOCK_S`` each) while the other waits,
  the order swapping every round; ``--paired-rounds`` rounds per pair of
  processes, ``--paired-processes`` fresh pairs, the median of all per-round
  ratios decides. ``--no-paired`` skips it; with ``--in-process`` the two
  alternate in one process instead (the smoke test).
- Agreement: at a small batch (``--check-batch``), every method that computes
  the GGN diagonal, the full GGN or the batch Jacobian is compared to a
  torch.func reference (``max|a - ref| / max|ref|``; ``ok`` below 1e-4).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import select
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import torch

from benchmarks import methods as M
from benchmarks import problems as P
from benchmarks import targets as T

AGREE_TOL = 1e-4
MIN_BLOCK_S = 0.05
SMOKE_PROBLEMS = ["fullggn", "conv2d"]
# Every curvhook extension as the README writes it, the steady state of the cheap ones
# (FullGGN's adds seconds), torch.func and the floors.
SMOKE_METHODS = [
    "curvhook:DiagGGN", "curvhook:DiagGGN@one-block", "curvhook:DiagGGNApprox", "curvhook:DiagGGNApprox@one-block",
    "curvhook:DiagGGNApprox-attention-as-one", "curvhook:DiagGGN+DiagGGNApprox", "curvhook:BatchJacobian",
    "curvhook:BatchJacobian@one-block", "curvhook:FullGGN", "torchfunc", "floor",
]
ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ one method
def _classify(err: BaseException) -> str:
    """``"unsupported"`` for a library's refusal (``NotImplementedError``, ``Unsupported…``), else ``"error"``."""
    name = type(err).__name__
    return "unsupported" if "Unsupported" in name or isinstance(err, NotImplementedError) else "error"


def _error_text(err: BaseException) -> str:
    """The error as one line of at most 300 characters, for the tables."""
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text[:300]


def _block_steps(step_s: float) -> int:
    """Steps in a timed block of about ``MIN_BLOCK_S`` for a step of ``step_s`` seconds (1 to 50)."""
    return max(1, min(50, int(MIN_BLOCK_S / max(step_s, 1e-6))))


def _worker_command(args: argparse.Namespace, problem: str, method: str, *extra: str) -> list[str]:
    """The command line of a worker subprocess that runs ``method`` on ``problem``."""
    cmd = [
        sys.executable, "-m", "benchmarks.run", "--worker", *extra, "--problem", problem, "--methods", method,
        "--threads", str(args.threads), "--warmup", str(args.warmup),
    ]
    if args.batch_size is not None:
        cmd += ["--batch-size", str(args.batch_size)]
    if not getattr(args, "thp", True):
        cmd.append("--no-thp")
    return cmd


def _time_steps(runner: M.Runner, warmup: int, repeats: int) -> tuple[list[float], list[float], int]:
    """Warm ``runner`` up, then time ``repeats`` samples of its step.

    A fast method is timed in blocks of ``k`` steps lasting about
    ``MIN_BLOCK_S``, so that one sample is not dominated by timer and scheduler
    noise (a sample is block time / ``k``); a very slow one (over 20 s a step)
    is timed once.

    Args:
        runner: The method on its problem.
        warmup: Untimed steps first (their mean time sets ``k``).
        repeats: Samples.

    Returns:
        ``(wall seconds per step, CPU seconds per step, k)``, one entry per sample.
    """
    t0 = time.perf_counter()
    for _ in range(max(warmup, 0)):
        runner.step()
    first = (time.perf_counter() - t0) / max(warmup, 1)
    reps = 1 if warmup and first > 20 else repeats
    k = _block_steps(first) if warmup else 1
    times, cpu_times = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(k):
            runner.step()
        times.append((time.perf_counter() - t0) / k * runner.extrapolate)
        cpu_times.append((time.process_time() - c0) / k * runner.extrapolate)
    return times, cpu_times, k


def measure(problem: str, method: str, batch_size: Optional[int], repeats: int, warmup: int) -> dict:
    """One separate measurement: build ``problem``, time ``method``, profile one more step.

    Args:
        problem: The problem.
        method: The method.
        batch_size: ``None``: the problem's own.
        repeats: Timed samples (see :func:`_time_steps`).
        warmup: Untimed steps first.

    Returns:
        ``status``, ``note``, the times (``median_s``, ``min_s``, ``times_s``,
        ``cpu_median_s``), the memory (``peak_rss_mb``, ``alloc_peak_mb``) and,
        for a method timed in one block, ``entry_ms``; or a failure's
        ``status`` and ``note``.
    """
    pb = P.make(problem, batch_size)
    m = M.BY_NAME[method]
    reason = m.skip_reason(pb)
    if reason:
        return {"status": "skipped", "note": reason}
    rss_setup = _max_rss_mb()
    runner = None
    try:
        runner = m.build(pb)
        times, cpu_times, k = _time_steps(runner, warmup, repeats)
        peak_rss = _max_rss_mb()  # before the profiled step below, which needs memory of its own
        # a slow method is profiled too (memory targets compare with torch.func's slow forms)
        alloc_peak = _allocator_peak_mb(runner) if len(times) == repeats or times[0] < 60 else None
    except Exception as err:  # noqa: BLE001 - recorded, the suite goes on
        return {"status": _classify(err), "note": _error_text(err), "traceback": traceback.format_exc(limit=6)}
    finally:
        if runner is not None:
            try:
                runner.close()
            except Exception:  # noqa: BLE001
                pass
    out = {
        "alloc_peak_mb": alloc_peak, "status": getattr(runner, "status", "ok"),
        "median_s": statistics.median(times), "min_s": min(times), "times_s": times,
        "cpu_median_s": statistics.median(cpu_times), "steps_per_sample": k, "load1": os.getloadavg()[0],
        "note": runner.note, "setup_rss_mb": rss_setup, "peak_rss_mb": peak_rss,
    }
    if hasattr(runner, "entry_s"):
        out["entry_ms"] = runner.entry_s * 1e3
    if len(times) != repeats:
        out["note"] = (out["note"] + "; " if out["note"] else "") + "timed once (slow)"
    if runner.extrapolate != 1.0:
        out["extrapolated"] = True
    return out


def measure_paired(problem: str, num: str, den: str, batch_size: Optional[int], rounds: int, warmup: int) -> dict:
    """Time two methods in one process, alternating blocks of steps, and return their ratio.

    On a noisy machine the speed of the whole machine drifts between the
    subprocesses of the separate measurements; alternating the two methods
    round by round exposes both to the same drift. Each method works on its
    own copy of the problem, and curvhook's block is left between its blocks
    of steps: its global module hooks and torch-function mode would slow the
    other method down. The ratio of a round is ``t_num / t_den`` (per
    step); the median over the rounds is reported.

    Args:
        problem: The problem.
        num: The numerator's method.
        den: The denominator's method.
        batch_size: ``None``: the problem's own.
        rounds: Timed blocks per method.
        warmup: Untimed steps first (at least one).

    Returns:
        ``status``, ``ratio`` (the median), ``ratios``, ``num_median_s``, ``den_median_s``.
    """
    runners = {}
    try:
        for name in (den, num):  # peers copy the model: build them before curvhook hooks it
            runners[name] = M.BY_NAME[name].build(P.make(problem, batch_size))
            runners[name].suspend()  # nothing of one method stays active while the other runs
        k = {}
        for name, runner in runners.items():
            runner.resume()
            t0 = time.perf_counter()
            for _ in range(max(warmup, 1)):
                runner.step()
            first = (time.perf_counter() - t0) / max(warmup, 1)
            runner.suspend()
            k[name] = _block_steps(first)
        per_step: dict[str, list[float]] = {num: [], den: []}
        ratios = []
        for r in range(rounds):
            for name in ((num, den) if r % 2 == 0 else (den, num)):
                runner = runners[name]
                runner.resume()
                runner.step()  # the first step after entering the block is not timed
                t0 = time.perf_counter()
                for _ in range(k[name]):
                    runner.step()
                per_step[name].append((time.perf_counter() - t0) / k[name] * runner.extrapolate)
                runner.suspend()
            ratios.append(per_step[num][-1] / per_step[den][-1])
    except Exception as err:  # noqa: BLE001 - recorded, the suite goes on
        return {"status": _classify(err), "note": _error_text(err)}
    finally:
        for runner in runners.values():
            try:
                runner.close()
            except Exception:  # noqa: BLE001
                pass
    return {
        "status": "ok", "ratio": statistics.median(ratios), "ratios": ratios, "rounds": rounds,
        "num_median_s": statistics.median(per_step[num]), "den_median_s": statistics.median(per_step[den]),
    }


def lockstep_worker(problem: str, method: str, batch_size: Optional[int], warmup: int) -> None:
    """The worker of :func:`lockstep_subprocesses`: time one block of steps per ``go`` on stdin.

    Prints ``READY k`` once the method is built and warm (``k`` steps make a
    block of about ``MIN_BLOCK_S``), then ``TIME t`` (seconds per step) for each
    ``go``; any other line ends it. A failure is reported as ``RESULT {json}``.

    Args:
        problem: The problem.
        method: The method.
        batch_size: ``None``: the problem's own.
        warmup: Untimed steps after the first (their mean time sets ``k``).
    """
    pb = P.make(problem, batch_size)
    m = M.BY_NAME[method]
    reason = m.skip_reason(pb)
    if reason:
        print("RESULT " + json.dumps({"status": "skipped", "note": reason}), flush=True)
        return
    runner = None
    try:
        runner = m.build(pb)
        runner.step()  # the first step inside curvhook's block recycles nothing: not part of k
        t0 = time.perf_counter()
        for _ in range(max(warmup, 1)):
            runner.step()
        first = (time.perf_counter() - t0) / max(warmup, 1)
        k = _block_steps(first)
        print(f"READY {k}", flush=True)
        for line in sys.stdin:
            if line.strip() != "go":
                break
            # The first block after the other worker's turn runs slower (by up to half on a
            # 2-vCPU VM: its OpenMP threads still spin, caches are cold); it is not timed.
            for _ in range(k):
                runner.step()
            t0 = time.perf_counter()
            for _ in range(k):
                runner.step()
            print(f"TIME {(time.perf_counter() - t0) / k * runner.extrapolate!r}", flush=True)
    except Exception as err:  # noqa: BLE001 - reported to the parent
        print("RESULT " + json.dumps({"status": _classify(err), "note": _error_text(err)}), flush=True)
    finally:
        if runner is not None:
            runner.close()


def _reply(proc: subprocess.Popen, timeout: float) -> str:
    """The next line a lock-step worker prints.

    Args:
        proc: The worker.
        timeout: Seconds to wait.

    Returns:
        The line, or ``""`` if the worker died or took longer.
    """
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(proc.stdout, select.POLLIN)
        if not poller.poll(timeout * 1000):
            return ""
    return proc.stdout.readline().strip()


def lockstep_subprocesses(args: argparse.Namespace, problem: str, num: str, den: str) -> dict:
    """The ratio of two methods, each in its own process, timed in alternating blocks.

    ``--paired-processes`` times, a fresh pair of workers is built side by
    side; then, ``--paired-rounds`` times, each worker runs one block of steps
    untimed and one timed (about ``MIN_BLOCK_S`` each) while the other waits on
    its pipe, the order swapping every round.

    - Separate processes keep the two methods from disturbing each other
      (curvhook's global hooks, one method's freed memory).
    - Blocks a fraction of a second apart expose both to the same drift of the
      machine, which on a small VM moves by tens of percent within seconds.
    - The untimed block absorbs the switch: right after the other worker's turn
      a block runs up to 1.5 times slower (its OpenMP threads still spin,
      caches are cold), which alone made the ratios of alternate rounds differ
      by a factor of two.
    - Fresh pairs average over what a process draws at its start (the same
      step differs by up to 1.5 times from one process to the next).

    The ratio of a round is ``t_num / t_den`` per step; the median over all
    rounds of all pairs is reported, with the per-pair medians.

    Args:
        args: The command line (``paired_processes``, ``paired_rounds``, ``timeout``,
            ``wait_idle`` and what :func:`_worker_command` reads).
        problem: The problem.
        num: The numerator's method.
        den: The denominator's method.

    Returns:
        ``status``, ``ratio``, ``ratios``, ``pair_ratios``, ``num_median_s``,
        ``den_median_s``; or the failing worker's ``status`` and ``note``.
    """
    ratios: list[float] = []
    pairs: list[float] = []
    nums: list[float] = []
    dens: list[float] = []
    for _ in range(args.paired_processes):
        one = _lockstep_pair(args, problem, num, den)
        if one.get("status") != "ok":
            return one
        ratios += one["ratios"]
        pairs.append(statistics.median(one["ratios"]))
        nums += one["num_s"]
        dens += one["den_s"]
    return {
        "status": "ok", "ratio": statistics.median(ratios), "ratios": ratios, "pair_ratios": pairs,
        "rounds": args.paired_rounds, "processes": args.paired_processes,
        "num_median_s": statistics.median(nums), "den_median_s": statistics.median(dens),
    }


def _lockstep_pair(args: argparse.Namespace, problem: str, num: str, den: str) -> dict:
    """One pair of lock-step workers: ``{"status", "ratios", "num_s", "den_s"}`` (see above)."""
    procs: dict[str, subprocess.Popen] = {}
    logs: dict[str, Any] = {}

    def fail(name: str, line: str) -> dict:
        """The result for a worker that answered ``line`` instead of what was expected."""
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT "):])
            return {"status": res.get("status", "error"), "note": f"{name}: {res.get('note', '')}"}
        if not line:
            logs[name].seek(0)
            tail = logs[name].read().strip().splitlines()[-1:] or [""]
            return {"status": "crashed", "note": f"{name}: exited or silent for {args.timeout} s: {tail[0][:200]}"}
        return {"status": "error", "note": f"{name}: unexpected reply {line[:200]!r}"}

    try:
        for name in (num, den):
            cmd = _worker_command(args, problem, name, "--lockstep")
            logs[name] = tempfile.TemporaryFile(mode="w+")
            procs[name] = subprocess.Popen(
                cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logs[name],
                text=True, bufsize=1,
            )
        for name, proc in procs.items():
            line = _reply(proc, args.timeout)
            if not line.startswith("READY "):
                return fail(name, line)
        if args.wait_idle > 0:
            wait_until_idle(args.wait_idle)
        per_step: dict[str, list[float]] = {num: [], den: []}
        for r in range(args.paired_rounds):
            for name in ((num, den) if r % 2 == 0 else (den, num)):
                proc = procs[name]
                proc.stdin.write("go\n")
                proc.stdin.flush()
                line = _reply(proc, args.timeout)
                if not line.startswith("TIME "):
                    return fail(name, line)
                per_step[name].append(float(line.split()[1]))
    finally:
        for proc in procs.values():
            try:
                proc.stdin.close()
                proc.wait(timeout=60)
            except Exception:  # noqa: BLE001 - a stuck worker is killed
                proc.kill()
        for log in logs.values():
            log.close()
    ratios = [a / b for a, b in zip(per_step[num], per_step[den])]
    return {"status": "ok", "ratios": ratios, "num_s": per_step[num], "den_s": per_step[den]}


def paired_measurements(args: argparse.Namespace, results: dict, targets: list[T.Target]) -> dict:
    """The lock-step ratio of every time target whose two methods ran (and are not slow).

    Args:
        args: The command line (pairing options, ``--in-process``).
        results: The separate measurements so far (``problems``).
        targets: The targets.

    Returns:
        ``{"problem:numerator/denominator": result}`` (see :func:`lockstep_subprocesses`).
    """
    out = {}
    for t in targets:
        if t.quantity != "time":
            continue
        for prob in t.problems:
            pr = results["problems"].get(prob)
            if not pr:
                continue
            a, b = pr["methods"].get(t.numerator, {}), pr["methods"].get(t.denominator, {})
            if a.get("status") != "ok" or b.get("status") != "ok":
                continue
            key = f"{prob}:{t.numerator}/{t.denominator}"
            if max(a["median_s"], b["median_s"]) > 20:
                out[key] = {"status": "skipped", "note": "a step takes over 20 s"}
                continue
            if args.in_process:
                r = measure_paired(prob, t.numerator, t.denominator, args.batch_size, args.repeats, args.warmup)
            else:
                r = lockstep_subprocesses(args, prob, t.numerator, t.denominator)
            out[key] = r
            value = f"{r['ratio']:.2f}" if r.get("status") == "ok" else r.get("status")
            print(f"  [paired] {prob:<12} {t.numerator} / {t.denominator}: {value}", flush=True)
    return out


def _allocator_peak_mb(runner: M.Runner) -> Optional[float]:
    """Peak of the tensor memory allocated during one step, above what was live before it, in MiB.

    From torch's profiler (``profile_memory=True``): the running sum of the
    allocations and frees of the CPU allocator over one step, each counted once
    (the events' self memory; until 2026-12-06 the inclusive figures were summed,
    which counted a buffer once per operator on the call stack that allocated it). Unlike the
    resident set size it does not see the C allocator's caching.
    """
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            runner.step()
    # Self memory of each event: an operator's inclusive figure repeats what the operators
    # it calls allocate (reshape → clone → empty_like → empty would count one buffer four times).
    changes = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return peak / 2**20


def cpu_busy(interval: float = 0.5) -> Optional[float]:
    """Fraction of all cores busy over ``interval`` seconds (from /proc/stat), or None."""
    def read() -> Optional[tuple[int, int]]:
        """``(all jiffies, idle jiffies)`` from /proc/stat, or ``None``."""
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except Exception:  # noqa: BLE001 - not Linux
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    a = read()
    time.sleep(interval)
    b = read()
    if a is None or b is None or b[0] == a[0]:
        return None
    return 1.0 - (b[1] - a[1]) / (b[0] - a[0])


def wait_until_idle(limit_s: float, threshold: float = 0.15) -> Optional[float]:
    """Wait (at most ``limit_s``) until other processes leave the CPU; return the last busy fraction."""
    start = time.perf_counter()
    busy = cpu_busy()
    while busy is not None and busy > threshold and time.perf_counter() - start < limit_s:
        time.sleep(2.0)
        busy = cpu_busy()
    return busy


def _max_rss_mb() -> float:
    """Peak resident set of this process image, in MiB.

    ``VmHWM`` from /proc (reset by ``exec``); ``ru_maxrss`` is the fallback, but on
    Linux it survives ``exec`` and so includes the parent's size at fork time.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def run_in_subprocess(args: argparse.Namespace, problem: str, method: str) -> dict:
    """One separate measurement (:func:`measure`) in a fresh subprocess, for its peak memory.

    Args:
        args: The command line.
        problem: The problem.
        method: The method.

    Returns:
        The worker's result, or ``{"status": "timeout" | "crashed", "note"}``.
    """
    cmd = _worker_command(args, problem, method, "--repeats", str(args.repeats))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "note": f"over {args.timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
    return {"status": "crashed", "note": f"exit code {proc.returncode}: {tail[0][:200]}"}


# ------------------------------------------------------------------ agreement
def _one_result(problem: str, method: M.Method, batch_size: int) -> Any:
    """One step of ``method`` at ``batch_size``: ``(flat result, index)``, or the exception it raised."""
    runner = None
    try:
        runner = method.build(P.make(problem, batch_size))
        runner.step()
        return runner.result()
    except Exception as err:  # noqa: BLE001 - reported by the caller
        return err
    finally:
        if runner is not None:
            runner.close()


def _agreement(value: Optional[torch.Tensor], index: Optional[torch.Tensor], ref: torch.Tensor) -> str:
    """``ok (err)`` or ``MISMATCH (err)`` for ``max|value - ref| / max|ref|``, or the shapes that differ."""
    expected = ref if index is None else ref[index]
    if value is None or value.shape != expected.shape:
        return f"SHAPE {tuple(value.shape) if value is not None else None} != {tuple(expected.shape)}"
    scale = expected.abs().max().item()
    err = (value.double() - expected.double()).abs().max().item() / max(scale, 1e-30)
    return f"ok ({err:.0e})" if err < AGREE_TOL else f"MISMATCH ({err:.1e})"


def cross_check(problem: str, chosen: list[M.Method], batch_size: int) -> dict[str, str]:
    """Compare every method that has a quantity to the torch.func reference at a small batch.

    Args:
        problem: The problem.
        chosen: The methods (those without a quantity are left out).
        batch_size: The batch size of the check.

    Returns:
        ``{method: "ok (err)" | "MISMATCH (err)" | "reference" | "n/a" | ...}``.
    """
    pb = P.make(problem, batch_size)
    out: dict[str, str] = {}
    refs: dict[str, Any] = {}
    for m in chosen:
        if m.quantity is None:
            continue
        if m.skip_reason(pb):
            out[m.name] = "n/a"
            continue
        ref_name = M.REFERENCE[m.quantity]
        if ref_name not in refs:
            ref_method = M.BY_NAME[ref_name]
            got = None if ref_method.skip_reason(pb) else _one_result(problem, ref_method, batch_size)
            refs[ref_name] = got[0] if isinstance(got, tuple) else got
        ref = refs[ref_name]
        if m.name == ref_name:
            out[m.name] = "reference" if isinstance(ref, torch.Tensor) else "n/a"
        elif not isinstance(ref, torch.Tensor):
            out[m.name] = "no reference"
        else:
            got = _one_result(problem, m, batch_size)
            out[m.name] = _classify(got) if isinstance(got, BaseException) else _agreement(*got, ref)
    return out


# ----------------------------------------------------------------- reporting
def machine_info(threads: int) -> dict:
    """The CPU model (``lscpu``), logical CPUs, torch threads and platform."""
    model = platform.processor() or ""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except Exception:  # noqa: BLE001
        pass
    return {"cpu_model": model, "logical_cpus": os.cpu_count(), "torch_threads": threads, "platform": platform.platform()}


def versions() -> dict:
    """The versions of Python, torch, curvhook and the peers (``None``: not installed)."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ["curvhook", "backpack-for-pytorch", "nngeometry", "curvlinops-for-pytorch", "matplotlib"]:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _fmt_ms(r: dict, key: str = "median_s") -> str:
    """A time of ``r`` in ms (``*``: extrapolated), ``-`` if absent."""
    if key not in r:
        return "-"
    v = r[key] * 1e3
    s = f"{v:,.1f}" if v < 1e4 else f"{v:,.0f}"
    return s + ("*" if r.get("extrapolated") else "")


def _fmt(v: Optional[float], spec: str) -> str:
    """``v`` formatted with ``spec``, ``-`` if ``None``."""
    return "-" if v is None else format(v, spec)


def table_rows(prob: dict) -> list[list[str]]:
    """The cells of one problem's table (see :data:`HEADER`), one row per method."""
    rows = []
    for name, r in prob["methods"].items():
        status = r.get("status", "?")
        rows.append([
            name, status, _fmt_ms(r), _fmt_ms(r, "min_s"), _fmt(r.get("ratio"), ".2f"), _fmt(r.get("ratio_min"), ".2f"),
            _fmt(r.get("peak_rss_mb"), ".0f"), _fmt(r.get("delta_rss_mb"), ".0f"), _fmt(r.get("delta_alloc_mb"), ".1f"),
            prob.get("check", {}).get(name, ""),
            (r.get("note") or "")[:90],
        ])
    return rows


HEADER = ["method", "status", "median ms", "min ms", "x plain", "x plain (min)", "peak MB", "Δ MB vs plain",
          "Δ alloc MB", "agrees", "note"]


def text_table(prob_name: str, prob: dict) -> str:
    """One problem's table as aligned text, with a title line."""
    rows = [HEADER] + table_rows(prob)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = [f"== {prob_name}: {prob['description']} (N={prob['batch_size']}, P={prob['num_params']:,})"]
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i in (0, 1, 9, 10) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(prob_name: str, prob: dict) -> str:
    """One problem's table as markdown, with a title."""
    lines = [
        f"### {prob_name}: {prob['description']} (N={prob['batch_size']}, P={prob['num_params']:,})",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join(["---", "---", "--:", "--:", "--:", "--:", "--:", "--:", "--:", "---", "---"]) + "|",
    ]
    for r in table_rows(prob):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    """A bar chart of every method's ratio to plain, one panel per problem (log scale).

    curvhook is blue, the peers orange, the floors green, plain gray.

    Args:
        results: The run's results.
        path: The image file to write.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        print(f"matplotlib not importable: no plot written to {path}")
        return
    probs = [(k, v) for k, v in results["problems"].items()]
    fig, axes = plt.subplots(len(probs), 1, figsize=(9, 0.32 * sum(len(v["methods"]) for _, v in probs) + 1.2 * len(probs)), squeeze=False)
    for ax, (name, pr) in zip(axes[:, 0], probs):
        items = [(m, r["ratio"]) for m, r in pr["methods"].items() if r.get("ratio")]
        labels = [m for m, _ in items]
        colors = ["tab:blue" if m.startswith("curvhook") else "tab:gray" if m == "plain"
                  else "tab:green" if m.startswith("floor") else "tab:orange" for m in labels]
        ax.barh(range(len(items)), [v for _, v in items], color=colors)
        ax.set_yticks(range(len(items)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.axvline(1.0, color="k", lw=0.5)
        ax.set_title(f"{name} (N={pr['batch_size']}): time / plain backward", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


# ------------------------------------------------------------------------ main
def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    """Parse the command line; ``--smoke`` and ``--targets`` fill in their defaults.

    Args:
        argv: The arguments (``None``: ``sys.argv[1:]``).

    Returns:
        The options.
    """
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--problem", default=None, help=f"one of {P.ALL}, 'all', or a comma-separated list (default: mlp)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: each problem's own (128)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--methods", nargs="*", default=None,
                    help="method names (exact) or prefixes (e.g. curvhook backpack:DiagGGNExact); default: all")
    ap.add_argument("--targets", action="store_true",
                    help="only the problems and methods of the targets (with --problem: of those problems)")
    ap.add_argument("--targets-file", default=None, help=f"default: {T.TARGETS_FILE.relative_to(ROOT)}")
    ap.add_argument("--json", default=None, help="write the results to this file")
    ap.add_argument("--plot", default=None, help="write a bar chart (needs matplotlib)")
    ap.add_argument("--markdown", default=None, help="write the tables as markdown")
    ap.add_argument("--in-process", action="store_true", help="no subprocesses, no memory figures")
    ap.add_argument("--check-batch", type=int, default=8, help="batch size of the agreement check")
    ap.add_argument("--no-check", action="store_true", help="skip the agreement check")
    ap.add_argument("--no-thp", dest="thp", action="store_false",
                    help="do not set THP_MEM_ALLOC_ENABLE=1 (torch's allocator then uses 4 KiB pages)")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per method subprocess")
    ap.add_argument("--wait-idle", type=float, default=0.0,
                    help="before each method wait up to this many seconds for other processes to leave the CPU")
    ap.add_argument("--smoke", action="store_true",
                    help="CI config: problems fullggn,conv2d at N=4, curvhook + torch.func + floors, 1 repeat, "
                         "in-process")
    ap.add_argument("--no-paired", action="store_true",
                    help="skip the paired measurement of the target ratios (the two methods in processes of "
                         "their own, in lock step; with --in-process: blocks of steps alternating in one process)")
    ap.add_argument("--paired-rounds", type=int, default=5,
                    help="timed blocks of steps per method and pair of processes in the paired measurement")
    ap.add_argument("--paired-processes", type=int, default=3,
                    help="fresh pairs of processes in the paired measurement")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--lockstep", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.targets and args.methods:
        ap.error("--targets chooses the methods itself: leave out --methods")
    if args.smoke:
        args.problem = args.problem or ",".join(SMOKE_PROBLEMS)
        args.batch_size = args.batch_size or 4
        args.methods = args.methods or SMOKE_METHODS
        args.repeats, args.warmup, args.in_process, args.check_batch = 1, 0, True, 4
    return args


def run_plan(args: argparse.Namespace, targets: list[T.Target]) -> dict[str, list[M.Method]]:
    """The problems to run and the methods to run on each.

    Args:
        args: The command line (``--problem``, ``--methods``, ``--targets``).
        targets: The targets.

    Returns:
        ``{problem: methods}`` in run order.

    Raises:
        SystemExit: An unknown problem or method.
    """
    chosen = None if args.problem is None else P.ALL if args.problem == "all" else args.problem.split(",")
    for name in chosen or []:
        if name not in P.SPECS:
            raise SystemExit(f"unknown problem {name!r}; known: {P.ALL} or 'all'")
    if args.targets:
        return {prob: [M.BY_NAME[n] for n in names] for prob, names in T.plan(targets, chosen).items()}
    methods = M.select(args.methods)
    return {prob: methods for prob in chosen or ["mlp"]}


def run_problem(args: argparse.Namespace, name: str, methods: list[M.Method]) -> dict:
    """Measure every method on one problem, each in its own subprocess unless ``--in-process``.

    Args:
        args: The command line.
        name: The problem.
        methods: The methods.

    Returns:
        The problem's description and ``methods: {name: result}``, with the ratios to plain.
    """
    pb = P.make(name, args.batch_size)
    prob: dict[str, Any] = {
        "description": pb.description, "batch_size": pb.batch_size,
        "num_params": pb.num_params, "num_outputs": pb.num_outputs, "methods": {},
    }
    del pb
    for m in methods:
        busy = wait_until_idle(args.wait_idle) if args.wait_idle > 0 else None
        t0 = time.perf_counter()
        if args.in_process:
            r = measure(name, m.name, args.batch_size, args.repeats, args.warmup)
            r.pop("setup_rss_mb", None), r.pop("peak_rss_mb", None)
        else:
            r = run_in_subprocess(args, name, m.name)
        if busy is not None:
            r["cpu_busy_before"] = round(busy, 3)
        prob["methods"][m.name] = r
        print(f"  [{name}] {m.name:<36} {r['status']:<11} {_fmt_ms(r):>10} ms  ({time.perf_counter() - t0:.1f} s,"
              f" load {os.getloadavg()[0]:.1f})", flush=True)
    add_ratios(prob["methods"])
    if not args.no_check:
        try:
            prob["check"] = cross_check(name, methods, args.check_batch)
        except Exception as err:  # noqa: BLE001
            prob["check"] = {"error": _error_text(err)}
    return prob


def add_ratios(results: dict) -> None:
    """Add each method's ratios (time, memory) to the plain step of the same problem, in place.

    Args:
        results: ``{method: result}`` of one problem.
    """
    plain = results.get("plain", {})
    if plain.get("status") != "ok":
        return
    for r in results.values():
        if "median_s" not in r:
            continue
        r["ratio"] = r["median_s"] / plain["median_s"]
        r["ratio_min"] = r["min_s"] / plain["min_s"]
        if r.get("peak_rss_mb") is not None and plain.get("peak_rss_mb") is not None:
            r["delta_rss_mb"] = r["peak_rss_mb"] - plain["peak_rss_mb"]
        if r.get("alloc_peak_mb") is not None and plain.get("alloc_peak_mb") is not None:
            r["delta_alloc_mb"] = r["alloc_peak_mb"] - plain["alloc_peak_mb"]


def write_outputs(args: argparse.Namespace, results: dict) -> None:
    """Write the JSON, markdown and plot files the command line asks for.

    Args:
        args: The command line (``--json``, ``--markdown``, ``--plot``).
        results: The run's results.
    """
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
        print(f"JSON written to {args.json}")
    if args.markdown:
        md = [markdown_table(k, v) for k, v in results["problems"].items()]
        if results["targets"]:
            md.append("### Targets\n\n" + T.text(results["targets"], markdown=True))
        Path(args.markdown).write_text("\n\n".join(md) + "\n")
        print(f"markdown written to {args.markdown}")
    if args.plot:
        plot(results, args.plot)


def _meta(args: argparse.Namespace, argv: Optional[list[str]]) -> dict:
    """The run's command, date, machine, versions and options, for the JSON."""
    command = "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    return {
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(args.threads),
        "versions": versions(),
        "config": {k: v for k, v in vars(args).items() if k != "worker"},
        "env": {"THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE")},
    }


def _worker_main(args: argparse.Namespace) -> dict:
    """A worker subprocess: a lock-step worker, or one separate measurement printed as ``RESULT``."""
    warnings.filterwarnings("ignore")
    if args.lockstep:
        lockstep_worker(args.problem, args.methods[0], args.batch_size, args.warmup)
        return {}
    result = measure(args.problem, args.methods[0], args.batch_size, args.repeats, args.warmup)
    print("RESULT " + json.dumps(result), flush=True)
    return result


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the benchmarks the command line asks for, print the tables, write the files.

    Args:
        argv: The arguments (``None``: ``sys.argv[1:]``).

    Returns:
        The results (``meta``, ``problems``, ``paired``, ``targets``), as written to ``--json``.
    """
    args = parse(argv)
    if args.worker or not args.in_process:
        # torch reads it at its first large allocation; the worker subprocesses inherit it.
        # An in-process run (the smoke test) leaves the environment of its process alone.
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1" if args.thp else "0"
    torch.set_num_threads(args.threads)
    if args.worker:
        return _worker_main(args)
    targets = T.load(args.targets_file)
    plan = run_plan(args, targets)
    results: dict[str, Any] = {"meta": _meta(args, argv), "problems": {}}
    print(f"# {results['meta']['command']}\n# {results['meta']['machine']['cpu_model']}, {args.threads} threads, "
          f"torch {torch.__version__}, THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}")
    for name, methods in plan.items():
        results["problems"][name] = run_problem(args, name, methods)
        print(text_table(name, results["problems"][name]), flush=True)
        print()
    if not args.no_paired:
        results["paired"] = paired_measurements(args, results, targets)
    results["targets"] = T.evaluate(targets, results)
    if results["targets"]:
        print("Targets (benchmarks/targets.json; 'met' reads the paired ratio for time, the allocator for memory):")
        print(T.text(results["targets"]))
    write_outputs(args, results)
    return results


if __name__ == "__main__":
    main()
