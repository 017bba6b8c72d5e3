"""`dml-report`: paper tables from run and sweep directories, ours next to theirs.

The work is the report library's (:func:`dml_runner.report.report`, whose docstring describes the tables). Exit
status: 0 = tables written; 1 = refused (mixed protocols, a repeated seed) or nothing to report; 2 = usage error.
See docs/REPORT.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from dml_runner.report import DEFAULT_OUT, FINGERPRINT, ReportError, report
from dml_runner.report.group import CHECKPOINTS
from dml_runner.report.render import render_markdown


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dml-report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="run or sweep directories (searched recursively for results.json)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    p.add_argument("--checkpoint", choices=tuple(CHECKPOINTS), default="final",
                   help="metrics in the main columns: final epoch (default); best = the run's best.pt; best-val = "
                        "best epoch on the validation split; best-test = best epoch on the test split (test-set "
                        "selection, what the official D&C and HDML codes report)")
    p.add_argument("--split-by", action="append", default=[], metavar="KEY",
                   help=f"one table per value of KEY: a fingerprint field ({', '.join(FINGERPRINT)}) or any dotted "
                        "config key (e.g. method.num_clusters)")
    p.add_argument("--group-by", action="append", default=[], metavar="KEY",
                   help="rows by the values of these dotted config keys only (and the experiment row); runs that "
                        "differ in other settings are pooled and the row's footnote lists them")
    p.add_argument("--select-metric", metavar="METRIC",
                   help="metric that picks the best-on-val/best-on-test epoch (default: each run's "
                        "trainer.select_metric, recall@1; the official HDML code kept the best test nmi)")
    p.add_argument("--allow-mixed-protocols", action="store_true",
                   help="put rows with different protocol fingerprints in one table (each row shows its protocol)")
    p.add_argument("--metrics", nargs="+", help="metric columns (default: the paper table's, else R@K, NMI, F1, MAP@R)")
    p.add_argument("--no-figures", action="store_true", help="tables only (no learning curves, t-SNE, grids)")
    p.add_argument("--html", dest="html", action="store_true", default=True,
                   help="write index.html next to the tables (the default)")
    p.add_argument("--no-html", dest="html", action="store_false", help="no index.html")
    p.add_argument("--tsne-points", type=int, default=300, help="t-SNE subsample per row (default 300)")
    p.add_argument("--baseline", metavar="ROW",
                   help="a row's name: each other row of its table gets its difference from it with a 95%% paired "
                        "bootstrap interval over the test queries and seeds (from the runs' embeddings.npz); "
                        "intervals containing 0 are marked")
    p.add_argument("--bootstrap-samples", type=int, default=None, metavar="N",
                   help="bootstrap samples of --baseline (default 2000)")
    return p


# The files the last dml-report wrote into its --out folder, one relative path a line: the next report into the same
# folder removes those it does not write again (figures of rows that are gone), and nothing else.
MANIFEST = ".dml-report-files"


def clear_stale_files(out: Path, written: Sequence[Path]) -> int:
    """Remove the files an earlier report listed in ``out``'s manifest that this one did not write; record this
    report's files. Returns how many were removed; files the reports never wrote are never touched."""
    manifest = out / MANIFEST
    now = {Path(f).resolve().relative_to(out.resolve()).as_posix() for f in written
           if Path(f).resolve().is_relative_to(out.resolve())}
    removed = 0
    earlier = manifest.read_text().split("\n") if manifest.is_file() else []
    for name in earlier:
        path = out / name
        if name and name not in now and ".." not in Path(name).parts and path.is_file():
            path.unlink()
            removed += 1
            parent = path.parent
            while parent != out and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
    manifest.write_text("\n".join(sorted(now)) + "\n")
    return removed


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="dml-report: %(message)s")
    if args.bootstrap_samples is not None and args.bootstrap_samples < 100:
        print(f"dml-report: error: --bootstrap-samples {args.bootstrap_samples}: use at least 100", file=sys.stderr)
        return 2
    try:
        result = report(args.paths, args.out, args.checkpoint, args.split_by, args.allow_mixed_protocols,
                        args.metrics, figures=not args.no_figures, tsne_points=args.tsne_points,
                        group_by=args.group_by, html=args.html, select_metric=args.select_metric,
                        baseline=args.baseline, samples=args.bootstrap_samples)
    except ReportError as err:
        print(f"dml-report: error: {err}", file=sys.stderr)
        return 1
    stale = clear_stale_files(Path(args.out), result["files"])
    print(render_markdown(result["tables"], result["failed"]))
    print(f"dml-report: wrote {len(result['files'])} files to {Path(args.out)}"
          + (f" (open {Path(args.out) / 'index.html'})" if args.html else "")
          + (f"; {len(result['failed'])} failed run(s) listed separately" if result["failed"] else "")
          + (f"; removed {stale} file(s) an earlier report wrote there" if stale else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
