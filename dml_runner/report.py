"""`dml-report`: paper tables from run and sweep directories, ours next to theirs.

    dml-report outputs/multirun/2025-01-01/12-00-00 [more dirs ...] [--out outputs/tables] [--checkpoint final|best]

Every ``results.json`` under the given directories is one run. Runs are grouped into table rows by their experiment
row (``reference.row`` of a ``conf/experiment`` file, else the group choices and overrides without the seed) and by
their *protocol fingerprint* (:data:`FINGERPRINT`); a row shows the mean +/- sample std (ddof = 1) over its seeds, in
percent, the paper's number (``dml_runner/reference/<table>.csv``) and our delta (ours - paper). One table per
reference table and dataset (``--split-by`` splits further). Rows with different fingerprints are never put in one
table unless ``--allow-mixed-protocols`` (then each row shows its fingerprint). Failed runs are listed separately.

Marks: a dagger on a paper number that METHODS.md marks unverified (footnote: its source), a double dagger on a row
whose experiment deviates from the paper's protocol (footnote: the deviations), a section sign on rows with a note
(e.g. "reconstructed from the abstract"). Writes ``report.md``, one ``<table>.csv`` and ``<table>.tex`` per table,
``runs.csv``, ``failed.csv`` (if any) and PNG figures into ``--out`` (default ``outputs/tables``).
Exit status: 0 = tables written; 1 = refused (mixed protocols) or nothing to report; 2 = usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from dml_runner import DMLRunnerError

log = logging.getLogger(__name__)

FINGERPRINT = ("backbone", "pretrained", "embedding_dim", "transform", "batch", "frozen", "selected_on")
DEFAULT_METRICS = ("nmi", "f1", "map@r")
DAGGER, DDAGGER, SECTION = "†", "‡", "§"


class ReportError(DMLRunnerError):
    """A report that cannot be built as asked (the message says why and what to do)."""


# --------------------------------------------------------------------------------------------- collecting runs

def find_runs(paths: Sequence[Path | str]) -> list[dict[str, Any]]:
    """One record per run directory under ``paths`` (completed and failed; job dirs without results.json = failed)."""
    seen: set[Path] = set()
    records = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ReportError(f"{path} does not exist")
        if path.is_file():
            candidates = [path]
            job_dirs: list[Path] = []
        else:
            candidates = sorted(path.rglob("results.json"))
            job_dirs = sorted(p.parent for p in path.rglob(".hydra") if p.is_dir())
        for res_path in candidates:
            run_dir = res_path.parent.resolve()
            if run_dir not in seen:
                seen.add(run_dir)
                records.append(load_run(res_path))
        for job_dir in job_dirs:  # a Hydra job that crashed before writing results.json
            if job_dir.resolve() not in seen and not (job_dir / "multirun.yaml").exists():
                seen.add(job_dir.resolve())
                records.append({"dir": str(job_dir), "status": "failed", "row": job_dir.name, "seed": None,
                                "error": "no results.json (the job crashed or was killed)"})
    _name_unlabelled_rows(records)
    return records


def _name_unlabelled_rows(records: list[dict[str, Any]]) -> None:
    """Runs without an experiment row are named by their overrides, minus those every such run shares."""
    plain = [r for r in records if r.get("label_parts") is not None]
    common = set.intersection(*(set(r["label_parts"]) for r in plain)) if len(plain) > 1 else set()
    for r in plain:
        r["row"] = " ".join(p for p in r["label_parts"] if p not in common) or r["row"]


def load_run(results_path: Path | str) -> dict[str, Any]:
    """The fields of one results.json that a report needs: row key, seed, fingerprint, metrics, paths."""
    results_path = Path(results_path)
    res = json.loads(results_path.read_text())
    cfg = res.get("config") or {}
    choices = res.get("choices") or {}
    ref = cfg.get("reference") or {}
    trainer = cfg.get("trainer") or {}
    rec: dict[str, Any] = {
        "dir": str(results_path.parent), "status": res.get("status", "unknown"), "error": res.get("error"),
        "experiment": choices.get("experiment"), "seed": trainer.get("seed"),
        "ref_paper": ref.get("paper"), "ref_table": ref.get("table"), "row": ref.get("row") or run_label(res),
        "label_parts": None if ref.get("row") or choices.get("experiment") else run_label(res).split(" "),
        "deviations": [str(d) for d in ref.get("deviations") or []], "note": ref.get("note") or "",
        "dataset": dataset_label(res), "overrides": list(res.get("overrides") or []),
        "smoke": "smoke" in (cfg.get("tags") or []),
    }
    rec.update(fingerprint(res))
    rec["metrics"] = res.get("metrics") or {}
    rec["best_metrics"] = (res.get("best") or {}).get("test_metrics") or {}
    rec["recall_at"] = list((res.get("dataset") or {}).get("recall_at") or [])
    return rec


def run_label(res: dict[str, Any]) -> str:
    """A row name for a run without an experiment file: its group choices and overrides, seed left out."""
    choices = res.get("choices") or {}
    if choices.get("experiment"):
        return str(choices["experiment"])
    parts = [f"{g}={choices[g]}" for g in ("loss", "method") if choices.get(g) and choices[g] != "standard"]
    for item in res.get("overrides") or []:
        key = item.partition("=")[0].lstrip("+~")
        if key.endswith("seed") or key.startswith("hydra") or key.split(".")[0] in ("loss", "method", "dataset"):
            continue
        parts.append(item)
    return " ".join(parts) or "default"


def dataset_label(res: dict[str, Any]) -> str:
    cfg_ds = (res.get("config") or {}).get("dataset") or {}
    name = (res.get("dataset") or {}).get("name") or (res.get("choices") or {}).get("dataset") or "?"
    if cfg_ds.get("test_size"):  # VehicleID small/medium/large are separate tables in the papers
        name = f"{name}_{cfg_ds['test_size']}"
    return str(name)


def fingerprint(res: dict[str, Any]) -> dict[str, Any]:
    """The protocol of a run: what must be equal before two numbers can share a table."""
    cfg = res.get("config") or {}
    model = res.get("model") or {}
    backbone = cfg.get("backbone") or {}
    sampler = cfg.get("sampler") or {}
    trainer = cfg.get("trainer") or {}
    choices = res.get("choices") or {}
    sampler_name = choices.get("sampler") or str(sampler.get("_target_", "?")).rsplit(".", 1)[-1]
    per_class = sampler.get("samples_per_class")
    if per_class is None and sampler_name == "npair":
        per_class = 2
    batch = f"{sampler_name} {trainer.get('batch_size', '?')}"
    if per_class:
        batch += f" ({per_class}/class)"
    transform = ((res.get("dataset") or {}).get("info") or {}).get("transform") or \
        (cfg.get("transform") or {}).get("name") or choices.get("transform")
    embedding_dim = model.get("embedding_dim", backbone.get("embedding_dim"))
    return {
        "backbone": model.get("arch") or backbone.get("arch") or choices.get("backbone"),
        "pretrained": bool(model.get("pretrained", backbone.get("pretrained", False))),
        "embedding_dim": int(embedding_dim) if embedding_dim is not None else None,
        "transform": transform or "none",
        "batch": batch,
        "frozen": model.get("freeze") or backbone.get("freeze") or "none",
        "selected_on": res.get("checkpoint_selected_on") or "?",
    }


# --------------------------------------------------------------------------------------------- building tables

def _reference(table: str | None) -> pd.DataFrame | None:
    if not table:
        return None
    from dml_runner.reference import load_reference

    try:
        return load_reference(table)
    except FileNotFoundError as err:
        raise ReportError(f"{err} (the `reference.table` of an experiment file must name "
                          "dml_runner/reference/<table>.csv)") from None


def build_tables(records: list[dict[str, Any]], checkpoint: str = "final", split_by: Sequence[str] = (),
                 allow_mixed: bool = False, metrics: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Group completed runs into tables; raises :class:`ReportError` for mixed protocols unless allowed."""
    done = [r for r in records if r["status"] == "completed"]
    if not done:
        raise ReportError("no completed run found (failed runs: "
                          f"{sum(r['status'] != 'completed' for r in records)}); nothing to tabulate")
    key_fields = ["ref_table", "dataset", *split_by]
    tables: dict[tuple, list[dict[str, Any]]] = {}
    for r in done:
        tables.setdefault(tuple(r.get(k) for k in key_fields), []).append(r)
    out = []
    for key, runs in sorted(tables.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        table = dict(zip(key_fields, key))
        prints = sorted({tuple(r[f] for f in FINGERPRINT) for r in runs}, key=str)
        mixed = len(prints) > 1
        if mixed and not allow_mixed:
            differing = [f for i, f in enumerate(FINGERPRINT) if len({p[i] for p in prints}) > 1]
            lines = []
            for p in prints:
                rows = sorted({r["row"] for r in runs if tuple(r[f] for f in FINGERPRINT) == p})
                lines.append("  " + ", ".join(f"{f}={p[FINGERPRINT.index(f)]}" for f in differing) +
                             f": rows {', '.join(rows)}")
            raise ReportError(
                f"table {table_title(table)}: runs with different protocols would share one table "
                f"(they differ in {', '.join(differing)}):\n" + "\n".join(lines) +
                "\nreport them separately (pass fewer directories, or --split-by "
                f"{' --split-by '.join(differing)}) or pass --allow-mixed-protocols to show each row's protocol")
        out.append(_make_table(table, runs, checkpoint, mixed, metrics))
    return out


def table_title(table: dict[str, Any]) -> str:
    parts = [table.get("ref_table") or "runs", str(table.get("dataset"))]
    parts += [f"{k}={v}" for k, v in table.items() if k not in ("ref_table", "dataset")]
    return " / ".join(parts)


def table_slug(table: dict[str, Any]) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", "_".join(
        [table.get("ref_table") or "runs", str(table.get("dataset"))] +
        [f"{k}{v}" for k, v in table.items() if k not in ("ref_table", "dataset")])).strip("_")


def _metric_columns(ref: pd.DataFrame | None, runs: list[dict[str, Any]], metrics: Sequence[str] | None) -> list[str]:
    if metrics:
        return list(metrics)
    if ref is not None and not ref.empty:
        return list(dict.fromkeys(ref["metric"]))
    ks = sorted({k for r in runs for k in r["recall_at"]}) or [1, 2, 4, 8]
    cols = [f"recall@{k}" for k in ks] + list(DEFAULT_METRICS)
    return [c for c in cols if any(c in r["metrics"] for r in runs)]


def _make_table(table: dict[str, Any], runs: list[dict[str, Any]], checkpoint: str, mixed: bool,
                metrics: Sequence[str] | None) -> dict[str, Any]:
    ref_all = _reference(table.get("ref_table"))
    ref = None
    dims = {r["embedding_dim"] for r in runs}
    if ref_all is not None:
        ref = ref_all[ref_all["dataset"] == table["dataset"]]
    at_dim = ref[ref["embedding_dim"].isin(dims)] if ref is not None and len(dims) == 1 else ref
    cols = _metric_columns(at_dim if at_dim is not None and not at_dim.empty else ref, runs, metrics)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["row"], tuple(r[f] for f in FINGERPRINT)), []).append(r)
    rows = []
    for (row_key, fp), members in groups.items():
        members = sorted(members, key=lambda r: (r["seed"] is None, r["seed"]))
        first = members[0]
        paper = _paper_values(ref, row_key, first["embedding_dim"])
        method = paper["method"] or row_key
        entry: dict[str, Any] = {"row": row_key, "method": method, "kind": "ours", "n_seeds": len(members),
                                 "seeds": " ".join(str(m["seed"]) for m in members),
                                 **dict(zip(FINGERPRINT, fp)), "deviations": "; ".join(first["deviations"]),
                                 "note": first["note"], "dirs": [m["dir"] for m in members],
                                 "experiment": first["experiment"]}
        for m in cols:
            values = [100.0 * _metric(r, m, checkpoint) for r in members if _metric(r, m, checkpoint) is not None]
            mean = sum(values) / len(values) if values else math.nan
            std = pd.Series(values, dtype=float).std(ddof=1) if len(values) > 1 else math.nan
            p = paper["values"].get(m)
            entry[m] = mean
            entry[f"{m}_std"] = std
            entry[f"{m}_paper"] = p["value"] if p else math.nan
            entry[f"{m}_delta"] = mean - p["value"] if p and values else math.nan
            entry[f"{m}_paper_verified"] = p["verified"] if p else None
            entry[f"{m}_paper_source"] = p["source"] if p else ""
        rows.append(entry)
    rows.sort(key=lambda e: _row_order(ref, e["row"]))
    # paper-only rows: published numbers of this table that none of our rows matches (e.g. DAML, not implemented)
    if ref is not None and not ref.empty:
        ours = {(e["row"], e["embedding_dim"]) for e in rows}
        for (row_key, dim), part in ref.groupby(["row", "embedding_dim"], sort=False):
            if (row_key, dim) in ours or (len(dims) == 1 and dim not in dims):
                continue
            paper = _paper_values(ref, row_key, dim)
            entry = {"row": row_key, "method": paper["method"], "kind": "paper only", "n_seeds": 0, "seeds": "",
                     "embedding_dim": int(dim), "deviations": "", "note": paper["note"], "dirs": [], "experiment": None}
            for m in cols:
                p = paper["values"].get(m)
                entry.update({m: math.nan, f"{m}_std": math.nan, f"{m}_paper": p["value"] if p else math.nan,
                              f"{m}_delta": math.nan, f"{m}_paper_verified": p["verified"] if p else None,
                              f"{m}_paper_source": p["source"] if p else ""})
            rows.append(entry)
        rows.sort(key=lambda e: (_row_order(ref, e["row"]), e["kind"] != "ours"))
    description = ""
    if table.get("ref_table"):
        from dml_runner.reference import table_description

        description = table_description(table["ref_table"])
    title = table_title(table)
    if any(r.get("smoke") for r in runs):
        title += " [SMOKE: fixture data, tiny backbone, a few steps: the numbers mean nothing]"
    return {"key": table, "title": title, "slug": table_slug(table), "metrics": cols, "rows": rows,
            "mixed": mixed, "checkpoint": checkpoint, "runs": runs, "description": description}


def _metric(run: dict[str, Any], metric: str, checkpoint: str) -> float | None:
    source = run["best_metrics"] if checkpoint == "best" else run["metrics"]
    value = source.get(metric)
    return None if value is None else float(value)


def _paper_values(ref: pd.DataFrame | None, row_key: str, dim: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {"method": None, "values": {}, "note": ""}
    if ref is None or ref.empty:
        return out
    part = ref[ref["row"] == row_key]
    if part.empty:
        return out
    out["method"] = str(part["method"].iloc[0])
    if dim is not None:
        part = part[part["embedding_dim"] == dim]  # a 64-d run is never compared with a 512-d number
    out["note"] = "; ".join(dict.fromkeys(n for n in part["note"] if n))
    for _, r in part.iterrows():
        out["values"][r["metric"]] = {"value": float(r["value"]), "verified": bool(r["verified"]),
                                      "source": str(r["source"])}
    return out


def _row_order(ref: pd.DataFrame | None, row_key: str) -> tuple:
    if ref is not None and not ref.empty:
        order = list(dict.fromkeys(ref["row"]))
        if row_key in order:
            return (0, order.index(row_key), "")
    return (1, 0, row_key)


# --------------------------------------------------------------------------------------------- rendering

METRIC_TITLES = {"nmi": "NMI", "f1": "F1", "map@r": "MAP@R", "r_precision": "R-Prec"}


def metric_title(m: str) -> str:
    return METRIC_TITLES.get(m, m.replace("recall@", "R@"))


def _fmt(x: float, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:+.1f}" if signed else f"{x:.1f}"


def _cells(table: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, body cells and footnotes shared by the Markdown and LaTeX renderers."""
    header = ["Method", "seeds"]
    if table["mixed"]:
        header += list(FINGERPRINT)
    with_paper = has_paper_numbers(table)
    for m in table["metrics"]:
        header += [f"{metric_title(m)} ours", f"{metric_title(m)} paper", "Δ"] if with_paper else [metric_title(m)]
    body, notes = [], []
    for e in table["rows"]:
        name = e["method"] if e["method"] == e["row"] else f"{e['method']} [{e['row']}]"
        if e["kind"] == "paper only":
            name += " (paper only)"
        if e["deviations"]:
            name += " " + DDAGGER
            notes.append(f"{DDAGGER} {e['row']}: deviates from the paper's protocol: {e['deviations']}.")
        if e["note"] and e["kind"] == "ours":
            name += " " + SECTION
            notes.append(f"{SECTION} {e['row']}: {e['note']}.")
        cells = [name, str(e["n_seeds"]) if e["n_seeds"] else "—"]
        if table["mixed"]:
            cells += [str(e.get(f, "")) for f in FINGERPRINT]
        unverified = []
        for m in table["metrics"]:
            ours = e[m]
            text = _fmt(ours)
            if not math.isnan(ours) and not math.isnan(e[f"{m}_std"]):
                text += f" ± {e[f'{m}_std']:.1f}"
            paper = _fmt(e[f"{m}_paper"])
            if e[f"{m}_paper_verified"] is False:
                paper += " " + DAGGER
                unverified.append(m)
            cells += [text, paper, _fmt(e[f"{m}_delta"], signed=True)] if with_paper else [text]
        if unverified:
            sources = "; ".join(dict.fromkeys(e[f"{m}_paper_source"] for m in unverified))
            notes.append(f"{DAGGER} {e['row']} ({', '.join(metric_title(m) for m in unverified)}): unverified "
                         f"published number (METHODS.md); source: {sources}" +
                         (f"; {e['note']}" if e["note"] and e["kind"] != "ours" else "") + ".")
        body.append(cells)
    return header, body, list(dict.fromkeys(notes))


def has_paper_numbers(table: dict[str, Any]) -> bool:
    return any(not math.isnan(e[f"{m}_paper"]) for e in table["rows"] for m in table["metrics"])


def _protocol_line(table: dict[str, Any]) -> str:
    ours = [e for e in table["rows"] if e["kind"] == "ours"]
    if not ours:
        return ""
    sel = {e["selected_on"] for e in ours}
    chosen = "final epoch" if table["checkpoint"] == "final" else \
        f"best checkpoint (chosen on {'/'.join(sorted(sel))}{'; optimistic' if 'test' in sel else ''})"
    if table["mixed"]:
        return f"Protocols differ between rows (--allow-mixed-protocols): see the columns. Metrics: {chosen}."
    e = ours[0]
    return ("Protocol of our rows: " + ", ".join(f"{f}={e[f]}" for f in FINGERPRINT) + f". Metrics: {chosen}.")


def render_markdown(tables: list[dict[str, Any]], failed: list[dict[str, Any]]) -> str:
    out = ["# dml-report", "",
           "*ours* = mean ± sample std over seeds of dml-runner runs (percent); *paper* = the published number "
           "(dml_runner/reference/, never ours); Δ = ours − paper.", ""]
    for t in tables:
        header, body, notes = _cells(t)
        out += [f"## {t['title']}", ""]
        if t["description"]:
            out += [f"> {t['description']}", ""]
        out += [_protocol_line(t), ""]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
        out.append("")
        out += [f"- {n}" for n in notes]
        out.append("")
    if failed:
        out += ["## Failed runs (not in the tables)", "", "| run dir | row | seed | error |", "|---|---|---|---|"]
        for r in failed:
            error = str(r.get("error") or "").splitlines()[0][:200] if r.get("error") else ""
            out.append(f"| {r['dir']} | {r.get('row', '')} | {r.get('seed', '')} | {error.replace('|', '/')} |")
        out.append("")
    return "\n".join(out)


_TEX_ESCAPE = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
               "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}", "±": r"$\pm$", "Δ": r"$\Delta$",
               "†": r"$^\dagger$", "‡": r"$^\ddagger$", "§": r"\S{}", "—": "--", "−": "-"}


def tex_escape(text: str) -> str:
    return "".join(_TEX_ESCAPE.get(ch, ch) for ch in str(text))


def render_latex(table: dict[str, Any]) -> str:
    header, body, notes = _cells(table)
    lines = [f"% dml-report: {table['title']} (ours = mean +/- std over seeds; paper = published, never ours)",
             r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule",
             " & ".join(tex_escape(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(tex_escape(c) for c in row) + r" \\" for row in body]
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [f"% {n}" for n in notes]
    return "\n".join(lines) + "\n"


def table_frame(table: dict[str, Any]) -> pd.DataFrame:
    frame = pd.DataFrame([{k: v for k, v in e.items() if k != "dirs"} for e in table["rows"]])
    frame.insert(0, "dataset", table["key"].get("dataset"))
    frame.insert(0, "table", table["key"].get("ref_table") or "runs")
    return frame


# --------------------------------------------------------------------------------------------- figures

def write_figures(table: dict[str, Any], out: Path, tsne_points: int = 1000, grid_queries: int = 5,
                  grid_k: int = 5) -> list[Path]:
    """Learning curves per row, sweep curves, t-SNE and a retrieval grid of each row's first run."""
    import numpy as np

    from dml_runner.plots import plot_curves_by_group, plot_sweep, plot_tsne

    written: list[Path] = []
    ours = [e for e in table["rows"] if e["kind"] == "ours"]
    histories = {}
    for e in ours:
        frames = [pd.read_csv(Path(d) / "history.csv") for d in e["dirs"] if (Path(d) / "history.csv").is_file()]
        if frames:
            histories[e["row"]] = frames
    metric = "recall@1" if "recall@1" in table["metrics"] else table["metrics"][0]
    png = plot_curves_by_group(histories, out / f"{table['slug']}_curves.png", metrics=(metric, "nmi"),
                               title=table["title"]) if histories else None
    written += [png] if png else []
    frame = pd.DataFrame([{**{f: r[f] for f in FINGERPRINT}, "row": r["row"], "status": "completed",
                           **{m: _metric(r, m, table["checkpoint"]) for m in table["metrics"]}}
                          for r in table["runs"]])
    if frame["embedding_dim"].nunique() > 1:  # e.g. the Lifted Structure embedding-size sweep
        png = plot_sweep(frame, "embedding_dim", out / f"{table['slug']}_sweep_embedding_dim.png",
                         metrics=[m for m in (metric, "nmi") if m in frame], group_by="row")
        written += [png] if png else []
    for e in ours:
        run_dir = Path(e["dirs"][0])
        npz = run_dir / "embeddings.npz"
        if not npz.is_file():
            continue
        data = np.load(npz)
        slug = f"{table['slug']}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', e['row'])}"
        try:
            written.append(plot_tsne(data["embeddings"], data["labels"], out / f"{slug}_tsne.png",
                                     max_points=tsne_points, title=f"t-SNE: {e['method']} ({table['title']})"))
        except Exception as err:  # noqa: BLE001 - a figure never fails the report
            log.warning("t-SNE of %s failed: %s", run_dir, err)
        grid = retrieval_grid(run_dir, out / f"{slug}_retrieval.png", n_queries=grid_queries, k=grid_k)
        written += [grid] if grid else []
    return written


def retrieval_grid(run_dir: Path, out_png: Path, n_queries: int = 5, k: int = 5, seed: int = 0) -> Path | None:
    """Queries and their top-k neighbours from a run's embeddings.npz; images from the run's dataset config."""
    import numpy as np

    from dml_runner.plots import plot_retrieval_grid

    data = np.load(Path(run_dir) / "embeddings.npz")
    emb, labels = data["embeddings"].astype(np.float32), data["labels"]
    loader = _test_image_loader(Path(run_dir))
    if loader is None:
        return None
    n = len(labels)
    query_pool = np.flatnonzero(data["query_mask"]) if "query_mask" in data else np.arange(n)
    gallery = np.flatnonzero(data["gallery_mask"]) if "gallery_mask" in data else np.arange(n)
    rng = np.random.default_rng(seed)
    queries = np.sort(rng.choice(query_pool, min(n_queries, len(query_pool)), replace=False))
    k = min(k, len(gallery) - 1)
    if k < 1:
        return None
    neighbours = []
    for q in queries:
        d = ((emb[gallery] - emb[q]) ** 2).sum(axis=1)
        d[gallery == q] = np.inf  # the query itself is never its own neighbour
        neighbours.append(gallery[np.argsort(d, kind="stable")[:k]])
    try:
        return plot_retrieval_grid(list(queries), np.stack(neighbours), labels, loader, out_png,
                                   title=f"retrieval: {Path(run_dir).name} (green = same class, red = wrong)")
    except Exception as err:  # noqa: BLE001
        log.warning("retrieval grid of %s failed: %s", run_dir, err)
        return None


def _test_image_loader(run_dir: Path):
    """index -> image array of the run's test set, rebuilt from the dataset config in results.json (or None)."""
    import numpy as np
    from hydra.utils import instantiate

    try:
        cfg = json.loads((run_dir / "results.json").read_text())["config"]
        data = instantiate(cfg["dataset"], _convert_="all")
    except Exception as err:  # noqa: BLE001 - data moved or unavailable: skip the figure
        log.warning("no retrieval grid for %s: cannot rebuild its test set (%s)", run_dir, err)
        return None
    test = data.test

    def load(index: int):
        img = test.load(index)
        if hasattr(img, "convert"):  # PIL image from an image-list dataset
            img = img.convert("RGB")
            img.thumbnail((128, 128))
            return np.asarray(img)
        arr = np.asarray(img.detach().cpu() if hasattr(img, "detach") else img, dtype=np.float32)
        if arr.ndim == 3:  # C x H x W tensor
            arr = arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0))
        return arr

    return load


# --------------------------------------------------------------------------------------------- entry point

def report(paths: Sequence[Path | str], out: Path | str = "outputs/tables", checkpoint: str = "final",
           split_by: Sequence[str] = (), allow_mixed: bool = False, metrics: Sequence[str] | None = None,
           figures: bool = True, tsne_points: int = 1000) -> dict[str, Any]:
    """Build and write every table; returns ``{"tables": [...], "failed": [...], "files": [...]}``."""
    bad = [f for f in split_by if f not in FINGERPRINT + ("dataset",)]
    if bad:
        raise ReportError(f"--split-by {bad[0]}: not a fingerprint field (choose from {', '.join(FINGERPRINT)})")
    records = find_runs(paths)
    if not records:
        raise ReportError(f"no results.json found under {', '.join(map(str, paths))}")
    failed = [r for r in records if r["status"] != "completed"]
    tables = build_tables(records, checkpoint, split_by, allow_mixed, metrics)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "report.md"]
    (out / "report.md").write_text(render_markdown(tables, failed))
    for t in tables:
        table_frame(t).to_csv(out / f"{t['slug']}.csv", index=False)
        (out / f"{t['slug']}.tex").write_text(render_latex(t))
        files += [out / f"{t['slug']}.csv", out / f"{t['slug']}.tex"]
    runs = pd.DataFrame([{k: v for k, v in r.items() if k not in ("metrics", "best_metrics")} |
                         {m: v for m, v in (r.get("metrics") or {}).items()} for r in records])
    runs.to_csv(out / "runs.csv", index=False)
    files.append(out / "runs.csv")
    if failed:
        pd.DataFrame(failed)[["dir", "row", "seed", "error"]].to_csv(out / "failed.csv", index=False)
        files.append(out / "failed.csv")
    if figures:
        for t in tables:
            try:
                files += write_figures(t, out, tsne_points=tsne_points)
            except Exception as err:  # noqa: BLE001 - the tables are written; a figure must not undo that
                log.warning("figures of %s failed: %s", t["title"], err)
    return {"tables": tables, "failed": failed, "files": files}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dml-report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="run or sweep directories (searched recursively for results.json)")
    p.add_argument("--out", default="outputs/tables", help="output directory (default: outputs/tables)")
    p.add_argument("--checkpoint", choices=("final", "best"), default="final",
                   help="final-epoch metrics (default) or the best checkpoint's test metrics")
    p.add_argument("--split-by", action="append", default=[], metavar="FIELD",
                   help=f"one table per value of a fingerprint field ({', '.join(FINGERPRINT)})")
    p.add_argument("--allow-mixed-protocols", action="store_true",
                   help="put rows with different protocol fingerprints in one table (each row shows its protocol)")
    p.add_argument("--metrics", nargs="+", help="metric columns (default: the paper table's, else R@K, NMI, F1, MAP@R)")
    p.add_argument("--no-figures", action="store_true", help="tables only (no learning curves, t-SNE, grids)")
    p.add_argument("--tsne-points", type=int, default=1000, help="t-SNE subsample size (default 1000)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="dml-report: %(message)s")
    try:
        result = report(args.paths, args.out, args.checkpoint, args.split_by, args.allow_mixed_protocols,
                        args.metrics, figures=not args.no_figures, tsne_points=args.tsne_points)
    except ReportError as err:
        print(f"dml-report: error: {err}", file=sys.stderr)
        return 1
    print(render_markdown(result["tables"], result["failed"]))
    print(f"dml-report: wrote {len(result['files'])} files to {Path(args.out)}"
          + (f"; {len(result['failed'])} failed run(s) listed separately" if result["failed"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
