"""Paired comparison of two runs, or two sets of runs (seeds), evaluated on the same test set.

A side is one run directory, an embeddings.npz, a sweep folder holding the seeds of one configuration, or several of
these. Every run's per-query values (:mod:`dml_runner.evaluation.per_query`) are recomputed from its embeddings.npz,
and each metric's difference B - A gets a paired bootstrap interval over the test queries, resampling the seeds too
when a side has several (:mod:`dml_runner.evaluation.bootstrap`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dml_runner import DMLRunnerError
from dml_runner.evaluation.bootstrap import DEFAULT_LEVEL, DEFAULT_SAMPLES, Difference, paired_difference
from dml_runner.evaluation.per_query import PerQuery, per_query_values
from dml_runner.report.collect import ReportError, find_runs
from dml_runner.rundir import EMBEDDINGS, read_embeddings

DEFAULT_METRICS = ("recall@1", "map@r", "r_precision")
PER_QUERY_METRICS = "recall@K, map@r, r_precision, reciprocal_rank"


@dataclass
class Side:
    """The runs of one side: each run's embeddings file and its per-query values (filled by :func:`load_side`)."""

    spec: str
    files: list[Path]
    per_query: list[PerQuery] = field(default_factory=list)
    test_set: dict[str, np.ndarray] = field(default_factory=dict)


def _embeddings_files(spec: str) -> list[Path]:
    """The embeddings.npz files a side names: files, run folders, or a sweep folder of one configuration."""
    files: list[Path] = []
    for item in (s for s in spec.split(",") if s):
        path = Path(item)
        if not path.exists():
            raise ReportError(f"{item}: does not exist; give a run folder, an embeddings.npz or a sweep folder")
        if path.is_file():
            files.append(path)
        elif (path / EMBEDDINGS).is_file():
            files.append(path / EMBEDDINGS)
        else:
            found = sorted(path.rglob(EMBEDDINGS))
            if not found:
                raise ReportError(f"{item}: holds no {EMBEDDINGS} (a run writes it when trainer.save_embeddings=true)")
            _one_configuration(item, [f.parent for f in found])
            files.extend(found)
    if not files:
        raise ReportError(f"{spec!r}: names no run")
    return files


def _one_configuration(spec: str, run_dirs: list[Path]) -> None:
    """A sweep folder used as one side must hold the seeds of one configuration (runs a report puts in one row)."""
    from dml_runner.report.group import group_rows

    records = [r for r in find_runs(run_dirs) if r["status"] == "completed"]
    if not records:
        return
    rows = group_rows(records)
    if len(rows) > 1:
        names = "; ".join(r["name"] for r in rows[:4]) + ("; ..." if len(rows) > 4 else "")
        raise ReportError(f"{spec}: holds runs of {len(rows)} configurations ({names}); a side is one configuration: "
                          "name its run folders, comma-separated")


def check_output_file(option: str, value: str) -> None:
    """An output file whose folder exists and is writable, checked before any work."""
    import os

    out = Path(value).resolve()
    if out.is_dir():
        raise ReportError(f"{option} {value}: is a directory; give a file name")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise ReportError(f"{option} {value}: the folder {out.parent} does not exist or is not writable")


def _test_set(path: Path) -> dict[str, np.ndarray]:
    arrays = read_embeddings(path)  # an EmbeddingsFileError (a DMLRunnerError) says what a wrong file is
    keep = ("labels", "paths", "query_mask", "gallery_mask")
    return {k: arrays[k] for k in ("embeddings", *keep) if k in arrays}


def _same_test_set(first: tuple[Path, dict[str, np.ndarray]], other: tuple[Path, dict[str, np.ndarray]]) -> None:
    (path_a, a), (path_b, b) = first, other
    if a["labels"].shape != b["labels"].shape or not np.array_equal(a["labels"], b["labels"]):
        raise ReportError(f"{path_a} and {path_b} hold different test sets ({a['labels'].size} vs "
                          f"{b['labels'].size} items, or other labels); compare runs evaluated on the same test set")
    if "paths" in a and "paths" in b and not np.array_equal(a["paths"], b["paths"]):
        raise ReportError(f"{path_a} and {path_b} hold different test images (their paths differ); compare runs "
                          "evaluated on the same test set")
    for key in ("query_mask", "gallery_mask"):
        if (key in a) != (key in b) or (key in a and not np.array_equal(a[key], b[key])):
            raise ReportError(f"{path_a} and {path_b} use different query/gallery splits ({key}); compare runs "
                              "evaluated on the same test set")


def load_sides(spec_a: str, spec_b: str, recall_at: Sequence[int], device: str = "cpu") -> tuple[Side, Side]:
    """Both sides with their per-query values; every run of both sides must share the test set."""
    sides = (Side(spec_a, _embeddings_files(spec_a)), Side(spec_b, _embeddings_files(spec_b)))
    reference: tuple[Path, dict[str, np.ndarray]] | None = None
    for side in sides:
        for path in side.files:
            arrays = _test_set(path)
            if reference is None:
                reference = (path, arrays)
            else:
                _same_test_set(reference, (path, arrays))
            side.per_query.append(per_query_values(arrays["embeddings"], arrays["labels"], recall_at=recall_at,
                                                   query_mask=arrays.get("query_mask"),
                                                   gallery_mask=arrays.get("gallery_mask"), device=device))
    return sides


def parse_metrics(metrics: Sequence[str]) -> tuple[list[str], list[int]]:
    """The metric names and the K of each recall@K among them; unknown names are refused in one line."""
    ks = []
    for m in metrics:
        if m.startswith("recall@") and m[7:].isdigit() and int(m[7:]) >= 1:
            ks.append(int(m[7:]))
        elif m not in ("map@r", "r_precision", "reciprocal_rank"):
            raise ReportError(f"--metrics {m}: unknown per-query metric; use {PER_QUERY_METRICS}")
    return list(metrics), sorted(set(ks)) or [1]


def compare_sides(a: Side, b: Side, metrics: Sequence[str], *, samples: int = DEFAULT_SAMPLES,
                  level: float = DEFAULT_LEVEL, seed: int = 0) -> dict[str, Difference]:
    """B - A for each metric, with its paired (two-level when a side has several runs) bootstrap interval."""
    out = {}
    for m in metrics:
        values_a = np.stack([pq.values[m] for pq in a.per_query])
        values_b = np.stack([pq.values[m] for pq in b.per_query])
        out[m] = paired_difference(values_a, values_b, samples=samples, level=level, seed=seed)
    return out


def compare(spec_a: str, spec_b: str, metrics: Sequence[str] = DEFAULT_METRICS, *, samples: int = DEFAULT_SAMPLES,
            level: float = DEFAULT_LEVEL, seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """What dml-compare prints: both sides' runs and, per metric, A, B, B - A, the interval and P(B better)."""
    names, ks = parse_metrics(metrics)
    side_a, side_b = load_sides(spec_a, spec_b, ks, device=device)
    diffs = compare_sides(side_a, side_b, names, samples=samples, level=level, seed=seed)
    return {"a": [str(p) for p in side_a.files], "b": [str(p) for p in side_b.files],
            "queries": int(side_a.per_query[0].queries.size), "metrics": {m: d.as_dict() for m, d in diffs.items()}}


def format_comparison(result: dict[str, Any]) -> str:
    """A text table, one line per metric, in percent."""
    first = next(iter(result["metrics"].values()))
    level = round(100 * first["level"])
    lines = [f"A: {len(result['a'])} run(s), B: {len(result['b'])} run(s), {result['queries']} test queries; "
             f"{level}% paired bootstrap interval of B - A over the queries"
             + (" and the seeds" if max(len(result["a"]), len(result["b"])) > 1 else "")
             + f" ({first['samples']} samples)"]
    width = max(len(m) for m in result["metrics"])
    lines.append(f"{'metric':<{width}}  {'A':>7}  {'B':>7}  {'B - A':>7}  {f'{level}% interval':>18}  P(B > A)")
    for m, d in result["metrics"].items():
        interval = f"[{100 * d['ci_low']:+.2f}, {100 * d['ci_high']:+.2f}]"
        note = "  (contains 0: not distinguishable from noise)" if d["contains_zero"] else ""
        lines.append(f"{m:<{width}}  {100 * d['a']:>7.2f}  {100 * d['b']:>7.2f}  {100 * d['difference']:>+7.2f}  "
                     f"{interval:>18}  {d['p_b_better']:>8.3f}{note}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- dml-report --baseline
def per_query_metric(metric: str) -> bool:
    """Whether a report column has per-query values (Recall@K, MAP@R, R-Precision, MRR), so an interval."""
    return (metric.startswith("recall@") and metric[7:].isdigit()) or metric in ("map@r", "r_precision", "mrr")


def baseline_differences(table: dict[str, Any], baseline: str, *, samples: int = DEFAULT_SAMPLES,
                         level: float = DEFAULT_LEVEL, seed: int = 0) -> dict[str, Any] | None:
    """Each row's difference from the ``baseline`` row of ``table`` (a dml-report table), per metric with per-query
    values: ``{"baseline", "level", "samples", "metrics", "rows": {row: {metric: Difference}}, "skipped": {row:
    why}}``; None when the table has no row of that name."""
    rows = {r["row"]: r for r in table["rows"] if r.get("kind") == "ours"}
    if baseline not in rows:
        return None
    metrics = [m for m in table["metrics"] if per_query_metric(m)]
    ks = sorted({int(m[7:]) for m in metrics if m.startswith("recall@")}) or [1]
    cache: dict[Path, tuple[dict[str, np.ndarray], PerQuery]] = {}

    def values(row: dict[str, Any]) -> tuple[list[dict[str, np.ndarray]], list[PerQuery]]:
        arrays, pqs = [], []
        for run_dir in row["dirs"]:
            path = Path(run_dir) / EMBEDDINGS
            if path not in cache:
                if not path.is_file():
                    raise ReportError(f"{run_dir} has no {EMBEDDINGS}")
                data = _test_set(path)
                cache[path] = (data, per_query_values(data["embeddings"], data["labels"], recall_at=ks,
                                                      query_mask=data.get("query_mask"),
                                                      gallery_mask=data.get("gallery_mask")))
            arrays.append(cache[path][0])
            pqs.append(cache[path][1])
        return arrays, pqs

    out: dict[str, Any] = {"baseline": baseline, "level": level, "samples": samples, "metrics": metrics, "rows": {},
                           "skipped": {}}
    base_arrays, base = values(rows[baseline])
    for name, row in rows.items():
        if name == baseline:
            continue
        try:
            arrays, pqs = values(row)
            for a in arrays:
                _same_test_set((Path(rows[baseline]["dirs"][0]), base_arrays[0]), (Path(row["dirs"][0]), a))
        except DMLRunnerError as err:
            out["skipped"][name] = str(err)
            continue
        key = {"mrr": "reciprocal_rank"}
        out["rows"][name] = {m: paired_difference(np.stack([p.values[key.get(m, m)] for p in base]),
                                                  np.stack([p.values[key.get(m, m)] for p in pqs]),
                                                  samples=samples, level=level, seed=seed) for m in metrics}
    return out


def baseline_caption(diffs: dict[str, Any]) -> str:
    """What the difference table's intervals mean (its header)."""
    return (f"Difference from the baseline row `{diffs['baseline']}` (row - baseline, in points): the "
            f"{round(100 * diffs['level'])}% paired bootstrap interval over the test queries and, for rows with "
            f"several seeds, the seeds ({diffs['samples']} samples; the same query draw for both rows). "
            "† marks an interval that contains 0: that difference is not distinguishable from noise. "
            "NMI and F1 have no per-query values and get no interval.")


def baseline_cells(diffs: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and body of the difference table."""
    header = ["row", *diffs["metrics"]]
    body = []
    for name, by_metric in diffs["rows"].items():
        cells = []
        for m in diffs["metrics"]:
            d = by_metric[m]
            cells.append(f"{100 * d.difference:+.2f} [{100 * d.ci_low:+.2f}, {100 * d.ci_high:+.2f}]"
                         + (" †" if d.contains_zero else ""))
        body.append([name, *cells])
    for name, why in diffs["skipped"].items():
        body.append([name, *(["n/a"] * len(diffs["metrics"]))])
    return header, body
