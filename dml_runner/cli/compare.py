"""dml-compare: is B better than A, beyond the noise of the test queries and the seeds?"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from dml_runner import DMLRunnerError
from dml_runner.evaluation.bootstrap import DEFAULT_LEVEL, DEFAULT_SAMPLES
from dml_runner.report.compare import (DEFAULT_METRICS, PER_QUERY_METRICS, check_output_file, compare,
                                       format_comparison)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dml-compare",
        description="Compare two runs (or two sets of seeds) on the same test set: A, B, B - A and its paired "
                    "bootstrap interval over the test queries (and the seeds, when a side has several).")
    p.add_argument("a", metavar="RUN_A", help="run folder, embeddings.npz, or a sweep folder of one configuration; "
                                              "several, comma-separated")
    p.add_argument("b", metavar="RUN_B", help="the same, for B")
    p.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), metavar="M",
                   help=f"per-query metrics: {PER_QUERY_METRICS} (default: %(default)s)")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="bootstrap samples (default: %(default)s)")
    p.add_argument("--level", type=float, default=DEFAULT_LEVEL, help="interval level (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="device of the search (cpu, cuda)")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON: one object per metric")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.samples < 100:
            raise DMLRunnerError(f"--samples {args.samples}: use at least 100 bootstrap samples (default "
                                 f"{DEFAULT_SAMPLES})")
        if not 0.5 <= args.level < 1.0:
            raise DMLRunnerError(f"--level {args.level}: give a level in [0.5, 1), e.g. 0.95")
        if args.json:
            check_output_file("--json", args.json)
        result = compare(args.a, args.b, args.metrics, samples=args.samples, level=args.level, seed=args.seed,
                         device=args.device)
    except DMLRunnerError as err:
        print(f"dml-compare: error: {err}", file=sys.stderr)
        return 2
    print(format_comparison(result))
    if args.json:
        from dml_runner.rundir import write_json_atomic

        write_json_atomic(result["metrics"], args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
