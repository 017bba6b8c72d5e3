"""Paper tables from run and sweep directories, ours next to theirs (the command is :mod:`dml_runner.cli.report`).

    dml-report outputs/multirun/2025-01-01/12-00-00 [more dirs ...] [--out outputs/tables]
               [--checkpoint final|best|best-val|best-test] [--split-by KEY] [--group-by KEY]

Every ``results.json`` under the given directories is one run. Tables: one per reference table and dataset
(``--split-by`` splits further by a fingerprint field or any dotted config key). Rows: runs whose configs differ only
in the seed and in settings that cannot change a number share a row (mean +/- sample std over seeds, in percent);
every other difference makes a separate row named by the differing keys (``pulling_factor=90``). Each row shows the
paper's number (``dml_runner/reference/<table>.csv``) and our delta, the final epoch by default and, labelled, the
best-on-validation and best-on-test (test-set selection) values from ``history.csv``. Rows of one table must share
the protocol fingerprint (dataset split, test transform, embedding size, backbone and weights, evaluation,
checkpoint choice); batches, losses and methods are per-row recipe. Writes ``report.md``, ``index.html``, one
``<table>.csv`` and ``<table>.tex`` per table, ``runs.csv``, ``failed.csv`` (if any) and PNG figures into ``--out``.
Exit status: 0 = tables written; 1 = refused (mixed protocols, a repeated seed) or nothing to report; 2 = usage error.
See docs/REPORT.md.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from dml_runner.config import PathsConfig
from dml_runner.report.collect import FINGERPRINT, ReportError, find_runs, load_run
from dml_runner.report.group import build_tables
from dml_runner.report.render import render_html, render_latex, render_markdown, table_frame

__all__ = ["DEFAULT_OUT", "FINGERPRINT", "ReportError", "build_tables", "find_runs", "load_run", "report"]

log = logging.getLogger(__name__)


# dml-report runs outside Hydra: its tables go under the default of paths.output_dir (conf/paths/default.yaml).
DEFAULT_OUT = str(Path(PathsConfig.output_dir) / "tables")


def report(paths: Sequence[Path | str], out: Path | str = DEFAULT_OUT, checkpoint: str = "final",
           split_by: Sequence[str] = (), allow_mixed: bool = False, metrics: Sequence[str] | None = None,
           figures: bool = True, tsne_points: int = 300, group_by: Sequence[str] = (),
           html: bool = True, select_metric: str | None = None, baseline: str | None = None,
           samples: int | None = None) -> dict[str, Any]:
    """Build and write every table; returns ``{"tables": [...], "failed": [...], "files": [...]}``. ``baseline``
    names a row: every table holding it gets each other row's difference from it, with its paired bootstrap
    interval (``samples`` draws, :mod:`dml_runner.report.compare`)."""
    records = find_runs(paths, select_metric)
    if not records:
        raise ReportError(f"no results.json found under {', '.join(map(str, paths))}")
    failed = [r for r in records if r["status"] != "completed"]
    tables = build_tables(records, checkpoint, split_by, allow_mixed, metrics, group_by)
    if baseline is not None:
        _attach_baseline(tables, baseline, samples)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "report.md"]
    for t in tables:
        table_frame(t).to_csv(out / f"{t['slug']}.csv", index=False)
        (out / f"{t['slug']}.tex").write_text(render_latex(t))
        t["files"] = [out / f"{t['slug']}.csv", out / f"{t['slug']}.tex"]
        files += t["files"]
    (out / "report.md").write_text(render_markdown(tables, failed))
    runs = pd.DataFrame([{k: v for k, v in r.items() if k not in ("metrics", "config", "best_val", "best_test",
                                                                  "best_checkpoint", "override_keys")} |
                         dict(r.get("metrics") or {}) for r in records])
    runs.to_csv(out / "runs.csv", index=False)
    files.append(out / "runs.csv")
    if failed:
        pd.DataFrame(failed).reindex(columns=["dir", "row", "seed", "error"]).to_csv(out / "failed.csv", index=False)
        files.append(out / "failed.csv")
    if figures:
        from dml_runner.report.figures import write_figures

        for t in tables:
            try:
                t["figures"] = write_figures(t, out, tsne_points=tsne_points)
            except Exception as err:  # noqa: BLE001 - the tables are written; a figure must not undo that
                log.warning("figures of %s failed: %s", t["title"], err)
                t["figures"] = []
            files += [f for f, _ in t["figures"]]
    if html:
        (out / "index.html").write_text(render_html(tables, failed, out), encoding="utf-8")
        files.append(out / "index.html")
    return {"tables": tables, "failed": failed, "files": files}


def _attach_baseline(tables: list[dict[str, Any]], baseline: str, samples: int | None) -> None:
    """``table["baseline"]`` for every table with a row named ``baseline``; no such row anywhere is refused."""
    from dml_runner.report.compare import DEFAULT_SAMPLES, baseline_differences

    found = False
    for t in tables:
        diffs = baseline_differences(t, baseline, samples=samples or DEFAULT_SAMPLES)
        if diffs is not None:
            t["baseline"] = diffs
            found = True
    if not found:
        names = sorted({r["row"] for t in tables for r in t["rows"] if r.get("kind") == "ours"})
        shown = "; ".join(names[:6]) + ("; ..." if len(names) > 6 else "")
        raise ReportError(f"--baseline {baseline!r}: no row of that name; the rows are: {shown}")
