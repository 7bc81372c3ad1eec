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
    """The CI run measures every asked-for method, checks agreement and evaluates the targets."""
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
        for method in ["curvhook:DiagGGN", "curvhook:DiagGGN@one-block", "curvhook:DiagGGNApprox",
                       "curvhook:BatchJacobian", "curvhook:BatchJacobian@one-block", "torchfunc:BatchJacobian",
                       "torchfunc:DiagGGN", "floor:BatchJacobian-write-fresh", "floor:BatchJacobian-write-touched"]:
            r = methods[method]
            assert r["status"] == "ok", (name, method, r)
            assert {"median_s", "times_s", "ratio"} <= set(r)
            assert r["median_s"] > 0
        # Only curvhook, torch.func and the floors were asked for.
        assert all(m == "plain" or m.split(":")[0] in ("curvhook", "torchfunc", "floor") for m in methods)
        # Same quantity: curvhook agrees with the torch.func reference, in both usages.
        for method in ["curvhook:DiagGGN", "curvhook:DiagGGN@one-block", "curvhook:BatchJacobian",
                       "curvhook:BatchJacobian@one-block"]:
            assert prob["check"][method].startswith("ok"), (method, prob["check"])
        assert "entry_ms" in methods["curvhook:DiagGGN@one-block"] and "entry_ms" not in methods["curvhook:DiagGGN"]

    fullggn = data["problems"]["fullggn"]["methods"]
    assert fullggn["curvhook:FullGGN"]["status"] == "ok"
    assert data["problems"]["fullggn"]["check"]["curvhook:FullGGN"].startswith("ok")
    full = [t for t in data["targets"] if t["problem"] == "fullggn" and t["numerator"] == "curvhook:FullGGN"]
    assert len(full) == 1 and full[0]["value"] is not None and full[0]["value_paired"] is not None
    assert full[0]["met"] == (full[0]["value_paired"] <= full[0]["bound"])
    text = md.read_text()
    assert "| method |" in text and "| target |" in text


def test_targets_file_names_existing_problems_and_methods():
    """Every target in benchmarks/targets.json parses and names problems and methods that exist."""
    from benchmarks import methods, problems, targets

    loaded = targets.load()
    assert loaded
    for t in loaded:
        assert t.quantity in ("time", "memory") and t.bound > 0 and t.label
        assert t.problems and all(p in problems.SPECS for p in t.problems)
        assert all(m in methods.BY_NAME for m in t.methods())
    # The conditions: DiagGGNApprox is no longer bounded on fullggn, FullGGN is.
    approx = [t for t in loaded if t.numerator == "curvhook:DiagGGNApprox" and t.quantity == "time"]
    assert len(approx) == 1 and "fullggn" not in approx[0].problems
    floor = [t for t in loaded if t.denominator == "floor:BatchJacobian-write-fresh"]
    assert len(floor) == 1 and "floor:BatchJacobian-write-touched" in floor[0].beside


@pytest.mark.parametrize("change, message", [
    ({"numerator": "curvhook:Nope"}, "unknown method"),
    ({"problems": ["mlp", "nope"]}, "unknown problem"),
    ({"quantity": "speed"}, "quantity"),
    ({"bound": -1}, "bound"),
])
def test_targets_file_errors_name_the_bad_entry(tmp_path, change, message):
    """A targets file with an unknown method, problem or quantity, or a bad bound, is refused."""
    from benchmarks import targets

    entry = {"label": "x", "quantity": "time", "numerator": "curvhook:DiagGGN", "denominator": "plain",
             "problems": ["mlp"], "bound": 1.0, **change}
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"targets": [entry]}))
    with pytest.raises(ValueError, match=message):
        targets.load(path)


def test_targets_run_plan_runs_only_what_the_targets_need():
    """``--targets`` runs per problem the targets' methods, their steady state and what is printed beside."""
    from benchmarks import targets

    args = run.parse(["--targets"])
    plan = {prob: [m.name for m in ms] for prob, ms in run.run_plan(args, targets.load()).items()}
    assert list(plan) == ["mlp", "3c3d", "resnet", "transformer", "fullggn"]
    assert plan["resnet"] == ["plain", "curvhook:DiagGGNApprox", "curvhook:DiagGGNApprox@one-block"]
    assert {"curvhook:BatchJacobian", "curvhook:BatchJacobian@one-block", "torchfunc:BatchJacobian",
            "floor:BatchJacobian-write-fresh", "floor:BatchJacobian-write-touched", "backpack:DiagGGNExact",
            "curvhook:DiagGGN"} <= set(plan["mlp"])
    assert "torchfunc:BatchJacobian" not in plan["transformer"]
    assert set(plan["fullggn"]) == {"plain", "curvhook:FullGGN", "curvhook:FullGGN@one-block", "torchfunc:FullGGN"}
    only = run.run_plan(run.parse(["--targets", "--problem", "fullggn"]), targets.load())
    assert list(only) == ["fullggn"]


def test_method_names_select_exactly_and_prefixes_select_all():
    """An exact method name selects that method only; a prefix selects every method it starts."""
    from benchmarks import methods

    assert [m.name for m in methods.select(["curvhook:DiagGGN"])] == ["plain", "curvhook:DiagGGN"]
    names = [m.name for m in methods.select(["floor:BatchJacobian"])]
    assert names == ["plain", "floor:BatchJacobian-write-fresh", "floor:BatchJacobian-write-touched"]
    floors = [m.name for m in methods.select(["floor"])]
    assert floors == ["plain", *(m.name for m in methods.METHODS if m.name.startswith("floor:"))]
    assert "floor:BatchGrad-plain+write-touched" in floors
    with pytest.raises(SystemExit):
        methods.select(["curvhook:Nope"])


def _lockstep_args(**kw):
    """The options :func:`run.lockstep_subprocesses` reads, small, updated by ``kw``."""
    import argparse

    base = dict(threads=1, warmup=1, batch_size=2, timeout=300, wait_idle=0, paired_rounds=2, paired_processes=1)
    base.update(kw)
    return argparse.Namespace(**base)


def test_lockstep_pairs_time_both_methods_in_their_own_processes():
    """Two fresh pairs of two rounds give four per-round ratios and one median per pair."""
    res = run.lockstep_subprocesses(_lockstep_args(paired_processes=2), "fullggn", "curvhook:DiagGGNApprox", "plain")
    assert res["status"] == "ok", res
    assert len(res["ratios"]) == 4 and len(res["pair_ratios"]) == 2
    assert all(r > 0 for r in res["ratios"]) and res["num_median_s"] > 0 and res["den_median_s"] > 0


def test_lockstep_reports_a_worker_that_cannot_run():
    """A worker whose method is skipped on the problem reports it instead of timing."""
    res = run.lockstep_subprocesses(_lockstep_args(), "fullggn", "curvhook:DiagGGNApprox-attention-as-one", "plain")
    assert res["status"] == "skipped"
    assert res["note"].startswith("curvhook:DiagGGNApprox-attention-as-one: ")
    assert "MultiheadAttention" in res["note"]


def test_unknown_problem_is_rejected():
    """An unknown problem name stops the run before anything is measured."""
    with pytest.raises(SystemExit):
        run.main(["--problem", "nope", "--in-process"])


def test_skips_are_reported_not_raised():
    """A method too large for a problem says why instead of running."""
    from benchmarks import methods, problems

    pb = problems.make("mlp", batch_size=2)
    reason = methods.BY_NAME["curvhook:FullGGN"].skip_reason(pb)
    assert reason and "dense" in reason
    assert methods.BY_NAME["plain"].skip_reason(pb) is None


def _active_hooks() -> int:
    """Global module hooks and torch-function modes active in this process."""
    import torch
    from torch.nn.modules import module

    hooks = [module._global_forward_hooks, module._global_forward_pre_hooks, module._global_backward_hooks]
    return sum(len(h) for h in hooks) + torch._C._len_torch_function_stack()


def test_curvhook_is_timed_with_a_new_block_per_step_and_in_one_block():
    """``curvhook:X`` leaves its block after every step (README idiom); ``@one-block`` stays inside one."""
    from benchmarks import methods, problems

    before = _active_hooks()
    readme = methods.BY_NAME["curvhook:DiagGGN"].build(problems.make("fullggn", batch_size=3))
    try:
        readme.step()
        assert _active_hooks() == before
        first = readme.result()[0]
        readme.step()
        assert readme.result()[0].shape == first.shape
    finally:
        readme.close()
    steady = methods.BY_NAME["curvhook:DiagGGN@one-block"].build(problems.make("fullggn", batch_size=3))
    try:
        steady.step()
        assert _active_hooks() > before
        assert float((steady.result()[0] - first).abs().max()) <= 1e-6 * float(first.abs().max())
    finally:
        steady.close()
    assert _active_hooks() == before


def test_torchfunc_batch_jacobian_is_per_parameter_not_concatenated():
    """torch.func's batch Jacobian is timed as it returns it: one ``[N, C, *p.shape]`` per parameter."""
    from benchmarks import methods, problems

    pb = problems.make("fullggn", batch_size=3)
    runner = methods.BY_NAME["torchfunc:BatchJacobian"].build(pb)
    runner.step()
    shapes = [tuple(t.shape) for t in runner.out.values()]
    assert shapes == [(3, 10, *p.shape) for p in pb.params]
    assert runner.result()[0].shape == (3, 10, pb.num_params)


def test_write_floors_write_the_bytes_of_the_batch_jacobian():
    """Both floors write ``N C P`` numbers a step; the touched one into the same memory every step."""
    from benchmarks import methods, problems

    pb = problems.make("fullggn", batch_size=3)
    for name, fresh in [("floor:BatchJacobian-write-fresh", True), ("floor:BatchJacobian-write-touched", False)]:
        runner = methods.BY_NAME[name].build(pb)
        runner.step()
        ptrs = [t.data_ptr() for t in runner.out]
        assert sum(t.numel() for t in runner.out) == 3 * 10 * pb.num_params
        assert all(bool((t == 1).all()) for t in runner.out)
        runner.step()
        assert ([t.data_ptr() for t in runner.out] == ptrs) or fresh
        runner.close()


def test_floor_script_agrees_with_curvhook_and_reports_ratios(capsys):
    """The bare implementation computes curvhook's numbers and every variant is timed."""
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
    """Several batch sizes give one row each."""
    floor = pytest.importorskip("benchmarks.floor")
    results = floor.main(["--problem", "fullggn", "--batch-size", "1", "4", "--rounds", "1",
                          "--steps", "1", "--threads", "1"])
    assert set(results) == {"fullggn@N=1", "fullggn@N=4"}
    assert [results[k]["batch_size"] for k in ("fullggn@N=1", "fullggn@N=4")] == [1, 4]
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [(r[0], r[1]) for r in rows] == [("fullggn", "1"), ("fullggn", "4")]


def test_floor_script_refuses_models_it_does_not_cover():
    """A model that is not a Linear/ReLU chain is refused with a clear message."""
    floor = pytest.importorskip("benchmarks.floor")
    with pytest.raises(SystemExit, match="chains of Linear"):
        floor.main(["--problem", "3c3d", "--batch-size", "2", "--rounds", "1", "--steps", "1"])


def test_floor_agreement_sees_a_wrong_bare_result(monkeypatch):
    """The agreement check notices a bare result that is off by 0.1 %."""
    floor = pytest.importorskip("benchmarks.floor")
    from benchmarks import problems

    backward = floor.Bare._backward

    def slightly_off(self, *args):
        """The bare backward with its first result scaled by 1.001."""
        backward(self, *args)
        first = next(iter(self.results))
        self.results[first] = self.results[first] * 1.001

    monkeypatch.setattr(floor.Bare, "_backward", slightly_off)
    assert floor.agreement(problems.make("fullggn", batch_size=3)) > 5e-4


def test_floor_guards_refuse_a_gradient_that_is_not_the_loss():
    """The guarded variant refuses a backward pass through more than the loss."""
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


def test_diag_ggn_approx_passes_split_attention_explicitly(monkeypatch):
    """The default DiagGGNApprox counts attention as its operations, the variant as one, both said explicitly."""
    import torch
    from curvhook import extensions

    from benchmarks import methods, problems

    one = methods.BY_NAME["curvhook:DiagGGNApprox-attention-as-one"]
    assert "MultiheadAttention" in one.skip_reason(problems.make("mlp", batch_size=2))
    pb = problems.make("transformer", batch_size=2)
    assert one.skip_reason(pb) is None
    seen = []

    class Spy(extensions.DiagGGNApprox):
        def __init__(self, **kwargs):
            seen.append(kwargs)
            super().__init__(**kwargs)

    monkeypatch.setattr(extensions, "DiagGGNApprox", Spy)
    for name, split in [("curvhook:DiagGGNApprox", True), ("curvhook:DiagGGNApprox-attention-as-one", False)]:
        seen.clear()
        runner = methods.BY_NAME[name].build(pb)
        try:
            runner.step()
            got, _ = runner.result()
        finally:
            runner.close()
        assert seen and all(kw == {"split_attention": split} for kw in seen)
        assert got.numel() == pb.num_params and bool(torch.isfinite(got).all())


def test_scaling_script_runs_at_small_sizes(capsys, monkeypatch):
    """``benchmarks/scaling.py`` builds resnet18 and BERT, times both methods and prints a row each."""
    pytest.importorskip("torchvision")
    pytest.importorskip("transformers")
    from benchmarks import scaling

    monkeypatch.setattr(sys, "argv", ["scaling", "--images", "16", "--berts", "64,1,8", "--batch", "2", "--seconds", "0.1"])
    scaling.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| resnet18") or line.startswith("| BERT")]
    assert [row.split(" | ")[0] for row in rows] == ["| resnet18, 16×16 images", "| BERT, hidden 64, 1 layers, 8 tokens"]
    for row in rows:
        plain, approx, ratio = (float(v) for v in row.strip("| ").split(" | ")[1:])
        assert plain > 0 and approx > 0 and ratio == pytest.approx(approx / plain, rel=0.1)


def test_real_models_script_times_each_step_after_one_of_its_kind(monkeypatch, tmp_path, capsys):
    """``benchmarks/real_models.py`` runs ``settle`` untimed steps of a method before each
    timed one, writes a row per model, and its ratio is the two medians' quotient."""
    pytest.importorskip("torchvision")
    from benchmarks import real_models

    calls = []
    original = real_models._step

    def counting_step(case, extension):
        step = original(case, extension)
        label = "plain" if extension is None else extension.__name__

        def run():
            calls.append(label)
            step()

        return run

    monkeypatch.setattr(real_models, "_step", counting_step)
    out = tmp_path / "real.md"
    monkeypatch.setattr(sys, "argv", ["real_models", "--models", "torchvision.resnet18", "--batch", "2", "--rounds", "2",
                                      "--methods", "DiagGGNApprox", "--settle", "2", "--markdown", str(out)])
    real_models.main()
    # two warm-up rounds and two timed ones, each method three steps in a row per round
    assert calls == (["plain"] * 3 + ["DiagGGNApprox"] * 3) * 4
    row = out.read_text().splitlines()[-1]
    assert row.startswith("| torchvision.resnet18 |")
    cells = row.strip("| ").split(" | ")
    plain, approx, ratio = float(cells[1]), float(cells[3]), float(cells[5])
    assert plain > 0 and approx > 0 and ratio == pytest.approx(approx / plain, rel=0.1)
    printed = capsys.readouterr().out
    if real_models.resource is not None:  # the page faults of the timed steps, per method
        assert "minor page faults per timed step (median): plain " in printed and ", DiagGGNApprox " in printed


def test_real_sizes_times_one_model_and_names_its_slow_paths(capsys):
    pytest.importorskip("torchvision")
    from benchmarks import real_sizes

    real_sizes.run("tv.resnet18", 32, 2)
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("tv.resnet18 (32×32, batch 2): plain ") and "DiagGGNApprox" in line


def test_real_sizes_builds_a_hugging_face_family_by_its_own_classes(capsys):
    """``hf.<name>`` builds the model by its transformers classes at a checkpoint's widths
    (electra-small: the cheapest of the 26) and runs both steps on its tokens."""
    pytest.importorskip("transformers")
    from benchmarks import real_sizes

    real_sizes.run("hf.electra", 0, 2)
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith(f"hf.electra ({real_sizes.TOKENS} tokens, batch 2): plain ") and "DiagGGNApprox " in line
