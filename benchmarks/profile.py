"""Profile one step of one method with torch.profiler: the top operators by self CPU time.

Example::

    python -m benchmarks.profile --problem 3c3d --method curvhook:DiagGGN backpack:DiagGGNExact
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import methods as M
from benchmarks import problems as P


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile")
    ap.add_argument("--problem", default="3c3d")
    ap.add_argument("--method", nargs="+", default=["curvhook:DiagGGN", "backpack:DiagGGNExact"])
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps (after one warm-up step)")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in args.method:
        pb = P.make(args.problem, args.batch_size)
        runner = M.BY_NAME[name].build(pb)
        try:
            runner.step()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.steps):
                    runner.step()
        finally:
            runner.close()
        print(f"== {name} on {args.problem} (N={pb.batch_size}), {args.steps} steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40))


if __name__ == "__main__":
    main()
