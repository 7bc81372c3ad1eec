"""Smoke test of the benchmark suite: a tiny in-process run, no timing assertions.

Runs curvhook and torch.func only (the peers are optional and not installed in
the test environment), so it needs nothing beyond the package itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

run = pytest.importorskip("benchmarks.run")


def test_smoke_run_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    results = run.main(["--smoke", "--threads", "1", "--json", str(out), "--markdown", str(md)])

    printed = capsys.readouterr().out
    assert "median ms" in printed and "x plain" in printed

    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(results, default=str))
    assert set(data) >= {"meta", "problems", "targets"}
    assert set(data["meta"]) >= {"command", "machine", "versions", "config"}
    assert data["meta"]["versions"]["torch"]
    assert set(data["problems"]) == set(run.SMOKE_PROBLEMS)

    for name, prob in data["problems"].items():
        assert {"description", "batch_size", "num_params", "methods", "check"} <= set(prob)
        assert prob["batch_size"] == 4
        methods = prob["methods"]
        assert methods["plain"]["status"] == "ok" and methods["plain"]["ratio"] == 1.0
        for method in ["curvhook:DiagGGN", "curvhook:DiagGGNApprox", "curvhook:BatchJacobian",
                       "torchfunc:BatchJacobian", "torchfunc:DiagGGN"]:
            r = methods[method]
            assert r["status"] == "ok", (name, method, r)
            assert {"median_s", "times_s", "ratio"} <= set(r)
            assert r["median_s"] > 0
        # Only curvhook and torch.func were asked for.
        assert all(m == "plain" or m.split(":")[0] in ("curvhook", "torchfunc") for m in methods)
        # Same quantity: curvhook agrees with the torch.func reference.
        assert prob["check"]["curvhook:DiagGGN"].startswith("ok"), prob["check"]
        assert prob["check"]["curvhook:BatchJacobian"].startswith("ok"), prob["check"]

    fullggn = data["problems"]["fullggn"]["methods"]
    assert fullggn["curvhook:FullGGN"]["status"] == "ok"
    assert data["problems"]["fullggn"]["check"]["curvhook:FullGGN"].startswith("ok")
    assert any(t["problem"] == "fullggn" and t["value"] is not None for t in data["targets"])
    assert "| method |" in md.read_text()


def _lockstep_args(**kw):
    import argparse

    base = dict(threads=1, warmup=1, batch_size=2, timeout=300, wait_idle=0, paired_rounds=2, paired_processes=1)
    base.update(kw)
    return argparse.Namespace(**base)


def test_lockstep_pairs_time_both_methods_in_their_own_processes():
    res = run.lockstep_subprocesses(_lockstep_args(paired_processes=2), "fullggn", "curvhook:DiagGGNApprox", "plain")
    assert res["status"] == "ok", res
    # two pairs of two rounds: four per-round ratios, one median per pair
    assert len(res["ratios"]) == 4 and len(res["pair_ratios"]) == 2
    assert all(r > 0 for r in res["ratios"]) and res["num_median_s"] > 0 and res["den_median_s"] > 0


def test_lockstep_reports_a_worker_that_cannot_run():
    # No attention in fullggn: the split variant's worker says it is skipped instead of timing.
    res = run.lockstep_subprocesses(_lockstep_args(), "fullggn", "curvhook:DiagGGNApprox-split", "plain")
    assert res["status"] == "skipped"
    assert res["note"].startswith("curvhook:DiagGGNApprox-split: ") and "MultiheadAttention" in res["note"]


def test_unknown_problem_is_rejected():
    with pytest.raises(SystemExit):
        run.main(["--problem", "nope", "--in-process"])


def test_skips_are_reported_not_raised():
    from benchmarks import methods, problems

    pb = problems.make("mlp", batch_size=2)
    reason = methods.BY_NAME["curvhook:FullGGN"].skip_reason(pb)
    assert reason and "dense" in reason
    assert methods.BY_NAME["plain"].skip_reason(pb) is None


def test_floor_script_agrees_with_curvhook_and_reports_ratios(capsys):
    floor = pytest.importorskip("benchmarks.floor")
    results = floor.main(["--problem", "fullggn", "mlp", "--batch-size", "3", "--rounds", "1",
                          "--steps", "2", "--threads", "1"])
    assert "ratio to plain" in capsys.readouterr().out
    for name in ("fullggn", "mlp"):
        res = results[name]
        # The bare straight-line code computes curvhook's numbers (else its timing means nothing).
        assert res["agreement"] < 1e-6
        assert set(res["times_us"]) == {"plain", "curvhook", "bare", "guarded"}
        assert all(len(v) == 1 and v[0] > 0 for v in res["times_us"].values())
        assert res["ratio"]["plain"] == 1.0


def test_floor_script_gives_one_row_per_batch_size(capsys):
    floor = pytest.importorskip("benchmarks.floor")
    results = floor.main(["--problem", "fullggn", "--batch-size", "1", "4", "--rounds", "1",
                          "--steps", "1", "--threads", "1"])
    assert set(results) == {"fullggn@N=1", "fullggn@N=4"}
    assert [results[k]["batch_size"] for k in ("fullggn@N=1", "fullggn@N=4")] == [1, 4]
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [(r[0], r[1]) for r in rows] == [("fullggn", "1"), ("fullggn", "4")]


def test_floor_script_refuses_models_it_does_not_cover():
    floor = pytest.importorskip("benchmarks.floor")
    with pytest.raises(SystemExit, match="chains of Linear"):
        floor.main(["--problem", "3c3d", "--batch-size", "2", "--rounds", "1", "--steps", "1"])


def test_floor_agreement_sees_a_wrong_bare_result(monkeypatch):
    floor = pytest.importorskip("benchmarks.floor")
    from benchmarks import problems

    backward = floor.Bare._backward

    def slightly_off(self, *args):
        backward(self, *args)
        first = next(iter(self.results))
        self.results[first] = self.results[first] * 1.001

    monkeypatch.setattr(floor.Bare, "_backward", slightly_off)
    assert floor.agreement(problems.make("fullggn", batch_size=3)) > 5e-4


def test_floor_guards_refuse_a_gradient_that_is_not_the_loss():
    floor = pytest.importorskip("benchmarks.floor")
    from benchmarks import problems

    pb = problems.make("fullggn", batch_size=3)
    bare = floor.Bare(pb.model, guarded=True)
    try:
        out = bare.forward(pb.X, pb.y)
        with pytest.raises(RuntimeError, match="not that of the loss"):
            (pb.loss_fn(out, pb.y) + out.sum()).backward()
    finally:
        bare.close()


def test_split_attention_variant_runs_only_where_there_is_attention():
    import torch
    from curvhook.extensions import DiagGGNApprox

    from benchmarks import methods, problems

    split = methods.BY_NAME["curvhook:DiagGGNApprox-split"]
    assert "MultiheadAttention" in split.skip_reason(problems.make("mlp", batch_size=2))
    pb = problems.make("transformer", batch_size=2)
    assert split.skip_reason(pb) is None
    runner = split.build(pb)
    try:
        assert isinstance(runner.exts[0], DiagGGNApprox) and runner.exts[0].split_attention
        runner.step()
        got, _ = runner.result()
    finally:
        runner.close()
    assert got.numel() == pb.num_params and bool(torch.isfinite(got).all())
