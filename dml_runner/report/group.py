"""Runs -> tables -> rows.

Tables: one per reference table (``reference.table``) and dataset, split further by ``--split-by <key>`` (a fingerprint
field or any dotted config key). Inside a table every run must have the same protocol fingerprint
(:data:`~dml_runner.report.collect.FINGERPRINT`), else the table is refused (``--allow-mixed-protocols`` shows each
row's protocol instead).

Rows: runs share a row only when their configs differ in nothing but the seed and neutral settings
(:data:`~dml_runner.report.collect.NEUTRAL_KEYS`). ``--group-by <key>`` makes only the named keys (and the experiment
row) tell rows apart; the settings that still differ inside a row are then listed in its footnote. A row name is the
experiment row (``reference.row``) or, for plain runs, nothing; then the keys whose values differ between the rows of
the same name, e.g. ``pulling_factor=90``. A row holding one seed twice is an error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import pandas as pd

from dml_runner.report.collect import FINGERPRINT, MISSING, ReportError, is_neutral

# --checkpoint choice -> the record field its metrics come from; "best" is the run's best.pt (chosen on its
# checkpoint_selected_on split), "best-val"/"best-test" the best epoch on validation/test from history.csv.
CHECKPOINTS = {"final": "metrics", "best": "best_checkpoint", "best-val": "best_val", "best-test": "best_test"}
READINGS = {"final": "metrics", "best_val": "best_val", "best_test": "best_test"}  # per-row readings (columns)
READING_TITLES = {"final": "final", "best_val": "best-on-val", "best_test": "best-on-test"}


def split_value(run: dict[str, Any], key: str) -> Any:
    if key in FINGERPRINT or key in ("dataset", "batch", "frozen"):
        return run.get(key)
    if key in run["config"]:
        return run["config"][key]
    if key == "trainer.seed":
        return run["seed"]
    return MISSING


def check_keys(records: list[dict[str, Any]], keys: Sequence[str], option: str) -> None:
    """A --split-by/--group-by key must name a fingerprint field or a config key of at least one run."""
    known = set(FINGERPRINT) | {"dataset", "batch", "frozen", "trainer.seed"}
    for r in records:
        known |= set(r.get("config") or {})
    for key in keys:
        if key not in known:
            close = sorted(k for k in known if k.endswith(key.split(".")[-1]))[:5]
            raise ReportError(f"{option} {key}: no run has this config key (fingerprint fields: "
                              f"{', '.join(FINGERPRINT)}; dotted config keys such as loss.margin"
                              + (f"; did you mean {', '.join(close)}?" if close else "") + ")")


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
                 allow_mixed: bool = False, metrics: Sequence[str] | None = None,
                 group_by: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Group completed runs into tables of rows; raises :class:`ReportError` for mixed protocols unless allowed."""
    if checkpoint not in CHECKPOINTS:
        raise ReportError(f"--checkpoint {checkpoint}: choose from {', '.join(CHECKPOINTS)}")
    done = [r for r in records if r["status"] == "completed"]
    if not done:
        raise ReportError("no completed run found (failed runs: "
                          f"{sum(r['status'] != 'completed' for r in records)}); nothing to tabulate")
    _drop_seed_copies(done)
    check_keys(done, split_by, "--split-by")
    check_keys(done, group_by, "--group-by")
    tables: dict[tuple, list[dict[str, Any]]] = {}
    for r in done:
        key = (r.get("ref_table"), r.get("dataset"), *(split_value(r, k) for k in split_by))
        tables.setdefault(key, []).append(r)
    out = []
    for key, runs in sorted(tables.items(), key=lambda kv: tuple(natural_key(str(x)) for x in kv[0])):
        table = dict(zip(["ref_table", "dataset", *split_by], key))
        prints = sorted({tuple(r[f] for f in FINGERPRINT) for r in runs}, key=str)
        mixed = len(prints) > 1
        if mixed and not allow_mixed:
            raise ReportError(_mixed_message(table, runs, prints))
        out.append(_make_table(table, runs, checkpoint, mixed, metrics, group_by))
    return out


def _drop_seed_copies(runs: list[dict[str, Any]]) -> None:
    """Leave out ``*.seed`` keys that equal the run's trainer.seed in every run (``dataset.seed: ${trainer.seed}``):
    they vary with the seed, not with the recipe. A seed key fixed to one value stays a setting."""
    keys = {k for r in runs for k in r["config"] if k.split(".")[-1] == "seed"}
    coupled = {k for k in keys if all(r["config"].get(k, r["seed"]) == r["seed"] for r in runs)}
    for r in runs:
        r["config"] = {k: v for k, v in r["config"].items() if k not in coupled}


def _mixed_message(table: dict[str, Any], runs: list[dict[str, Any]], prints: list[tuple]) -> str:
    differing = [f for i, f in enumerate(FINGERPRINT) if len({p[i] for p in prints}) > 1]
    lines = []
    for p in prints:
        rows = sorted({r["row"] for r in runs if tuple(r[f] for f in FINGERPRINT) == p})
        lines.append("  " + ", ".join(f"{f}={p[FINGERPRINT.index(f)]}" for f in differing) +
                     f": rows {', '.join(rows)}")
    return (f"table {table_title(table)}: runs with different protocols would share one table "
            f"(they differ in {', '.join(differing)}):\n" + "\n".join(lines) +
            "\nreport them separately (pass fewer directories, or --split-by "
            f"{' --split-by '.join(differing)}) or pass --allow-mixed-protocols to show each row's protocol")


def table_title(table: dict[str, Any]) -> str:
    parts = [table.get("ref_table") or "runs", str(table.get("dataset"))]
    parts += [f"{k}={v}" for k, v in table.items() if k not in ("ref_table", "dataset")]
    return " / ".join(parts)


def table_slug(table: dict[str, Any]) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", "_".join(
        [table.get("ref_table") or "runs", str(table.get("dataset"))] +
        [f"{k}{v}" for k, v in table.items() if k not in ("ref_table", "dataset")])).strip("_")


# --------------------------------------------------------------------------------------------- rows

def _format_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    return str(value)


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Shortest dotted suffix of each key that no other key of ``keys`` ends with (``loss.pulling_factor`` ->
    ``pulling_factor``); group choices keep their name."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(other != key and (other == suffix or other.endswith("." + suffix)) for other in keys):
                out[key] = suffix
                break
        else:
            out[key] = key
    return out


def _differing(configs: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for c in configs for k in c})
    return [k for k in keys if len({_format_value(c.get(k, MISSING)) for c in configs}) > 1]


def _name_parts(config: dict[str, Any], keys: list[str], explicit: set[str], short: dict[str, str]) -> list[str]:
    """``key=value`` for the differing ``keys``; a key under a group whose choice also differs is left out (the
    choice names it) unless the run set it on the command line."""
    groups = [k for k in keys if "." not in k]
    parts = [f"{g}={_format_value(config.get(g, MISSING))}" for g in groups]
    for k in keys:
        if "." in k and (k.split(".")[0] not in groups or k in explicit):
            parts.append(f"{short[k]}={_format_value(config.get(k, MISSING))}")
    return parts


def group_rows(runs: list[dict[str, Any]], group_by: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Rows of one table: ``{"name", "paper_row", "runs", "variant", "pooled"}``; raises on a repeated seed."""
    rows: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        if group_by:
            ident = tuple(_format_value(split_value(r, k)) for k in group_by)
        else:
            ident = tuple(sorted((k, _format_value(v)) for k, v in r["config"].items()))
        rows.setdefault((r.get("paper_row") or "", ident), []).append(r)
    by_base: dict[str, list[tuple]] = {}
    for key in rows:
        by_base.setdefault(key[0], []).append(key)
    out = []
    for base, keys in by_base.items():
        configs = [rows[k][0]["config"] for k in keys]
        if group_by:
            differing = [k for i, k in enumerate(group_by) if len({ident[i] for _, ident in keys}) > 1]
        else:
            differing = _differing(configs) if len(keys) > 1 else []
        short = short_keys(differing)
        for key in keys:
            members = sorted(rows[key], key=lambda r: (r["seed"] is None, str(r["seed"])))
            first = members[0]
            if group_by:
                config = {k: split_value(first, k) for k in group_by}
                parts = [f"{short[k]}={_format_value(config[k])}" for k in differing]
            else:
                explicit = set().union(*(m["override_keys"] for m in members))
                parts = _name_parts(first["config"], differing, explicit, short)
            variant = " ".join(parts)
            if base:
                name = f"{base} {variant}".strip()
            else:
                name = variant or (first["row"] if len(keys) == 1 else "default")
            _check_seeds(name, members)
            pooled = _differing([m["config"] for m in members]) if group_by else []
            out.append({"name": name, "paper_row": base or None, "runs": members, "variant": variant,
                        "pooled": [f"{k}=" + "/".join(dict.fromkeys(_format_value(m['config'].get(k, MISSING))
                                                                      for m in members)) for k in pooled]})
    return out


def natural_key(name: str) -> tuple:
    """Sort key that orders numbers by value: ``pulling_factor=30`` before ``pulling_factor=120``."""
    parts = re.split(r"(-?\d+(?:\.\d+)?(?:e-?\d+)?)", name)
    return tuple((0, float(p), "") if i % 2 else (1, 0.0, p) for i, p in enumerate(parts) if p)


def _check_seeds(name: str, members: list[dict[str, Any]]) -> None:
    seen: dict[Any, str] = {}
    for m in members:
        if m["seed"] in seen:
            raise ReportError(
                f"row {name!r} holds seed {m['seed']} twice ({seen[m['seed']]} and {m['dir']}): their configs differ "
                "in nothing that changes a number, so they are the same run; pass only one of them (or give one "
                "another trainer.seed)")
        seen[m["seed"]] = m["dir"]


def recipe_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Config keys whose values differ between the rows of a table: the per-row recipe. A ``_target_`` is left out
    when its group's choice differs too (the choice names it), and so is the experiment file (the row names it)."""
    keys = [k for k in _differing([r["runs"][0]["config"] for r in rows]) if not is_neutral(k)]
    return [k for k in keys if k != "experiment" and not (k.endswith("._target_") and k.split(".")[0] in keys)]


# --------------------------------------------------------------------------------------------- numbers

def metric_values(run: dict[str, Any], metric: str, source: str) -> float | None:
    value = (run.get(source) or {}).get(metric)
    return None if value is None else float(value)


def _stats(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values) if values else math.nan
    std = float(pd.Series(values, dtype=float).std(ddof=1)) if len(values) > 1 else math.nan
    return mean, std


def _metric_columns(ref: pd.DataFrame | None, runs: list[dict[str, Any]], metrics: Sequence[str] | None) -> list[str]:
    if metrics:
        return list(metrics)
    if ref is not None and not ref.empty:
        return list(dict.fromkeys(ref["metric"]))
    ks = sorted({k for r in runs for k in r["recall_at"]}) or [1, 2, 4, 8]
    cols = [f"recall@{k}" for k in ks] + ["nmi", "f1", "map@r"]
    # the metrics a run computed on request (eval.precision_at / map_at / mrr)
    cols += sorted({m for r in runs for m in r["metrics"] if m == "mrr" or m.startswith(("precision@", "map@"))} -
                   {"map@r"}, key=lambda m: (m.split("@")[0], int(m.split("@")[1]) if "@" in m else 0))
    return [c for c in cols if any(c in r["metrics"] for r in runs)]


def _paper_values(ref: pd.DataFrame | None, row_key: str | None, dim: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {"method": None, "values": {}, "note": ""}
    if ref is None or ref.empty or not row_key:
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


def _row_order(ref: pd.DataFrame | None, row_key: str | None) -> tuple:
    if ref is not None and not ref.empty and row_key:
        order = list(dict.fromkeys(ref["row"]))
        if row_key in order:
            return (0, order.index(row_key))
    return (1, 0)


def _paper_cells(entry: dict[str, Any], m: str, p: dict[str, Any] | None) -> None:
    entry[f"{m}_paper"] = p["value"] if p else math.nan
    entry[f"{m}_delta"] = entry[m] - p["value"] if p and not math.isnan(entry[m]) else math.nan
    entry[f"{m}_paper_verified"] = p["verified"] if p else None
    entry[f"{m}_paper_source"] = p["source"] if p else ""


def _make_table(table: dict[str, Any], runs: list[dict[str, Any]], checkpoint: str, mixed: bool,
                metrics: Sequence[str] | None, group_by: Sequence[str]) -> dict[str, Any]:
    ref_all = _reference(table.get("ref_table"))
    ref = ref_all[ref_all["dataset"] == table["dataset"]] if ref_all is not None else None
    dims = {r["embedding_dim"] for r in runs}
    at_dim = ref[ref["embedding_dim"].isin(dims)] if ref is not None and len(dims) == 1 else ref
    cols = _metric_columns(at_dim if at_dim is not None and not at_dim.empty else ref, runs, metrics)
    source = CHECKPOINTS[checkpoint]
    groups = group_rows(runs, group_by)
    recipe = recipe_keys(groups)
    rows = []
    for g in groups:
        members, first = g["runs"], g["runs"][0]
        paper = _paper_values(ref, g["paper_row"], first["embedding_dim"])
        method = paper["method"] or g["paper_row"] or g["name"]
        if paper["method"] and g["variant"]:
            method = f"{method} {g['variant']}"
        entry: dict[str, Any] = {
            "row": g["name"], "paper_row": g["paper_row"], "method": method, "kind": "ours",
            "n_seeds": len({m["seed"] for m in members}), "seeds": " ".join(str(m["seed"]) for m in members),
            **{f: first[f] for f in FINGERPRINT}, "batch": first["batch"], "frozen": first["frozen"],
            "recipe": "; ".join(f"{k}={_format_value(first['config'].get(k, MISSING))}" for k in recipe),
            "deviations": "; ".join(first["deviations"]), "deviation_list": list(first["deviations"]),
            "note": first["note"], "pooled": "; ".join(g["pooled"]),
            "dirs": [m["dir"] for m in members], "experiment": first["experiment"],
            "select_metric": first["select_metric"],
        }
        for m in cols:
            entry[m], entry[f"{m}_std"] = _stats([v for r in members if (v := metric_values(r, m, source)) is not None])
            entry[m], entry[f"{m}_std"] = 100 * entry[m], 100 * entry[f"{m}_std"]
            _paper_cells(entry, m, paper["values"].get(m))
            for reading, field in READINGS.items():
                mean, std = _stats([v for r in members if (v := metric_values(r, m, field)) is not None])
                entry[f"{m}_{reading}"], entry[f"{m}_{reading}_std"] = 100 * mean, 100 * std
                entry[f"{m}_{reading}_n"] = sum(metric_values(r, m, field) is not None for r in members)
        for reading in ("best_val", "best_test"):
            entry[f"{reading}_epochs"] = " ".join(str(r.get(f"{reading}_epoch")) for r in members
                                                  if r.get(f"{reading}_epoch") is not None)
        rows.append(entry)
    rows.sort(key=lambda e: (_row_order(ref, e["paper_row"]), natural_key(e["row"])))
    if ref is not None and not ref.empty:  # paper-only rows: published numbers none of our rows matches (e.g. DAML)
        ours = {(e["paper_row"], e["embedding_dim"]) for e in rows}
        for (row_key, dim), _part in ref.groupby(["row", "embedding_dim"], sort=False):
            if (row_key, dim) in ours or (len(dims) == 1 and dim not in dims):
                continue
            paper = _paper_values(ref, row_key, dim)
            entry = {"row": row_key, "paper_row": row_key, "method": paper["method"], "kind": "paper only",
                     "n_seeds": 0, "seeds": "", "embedding_dim": int(dim), "deviations": "", "deviation_list": [],
                     "note": paper["note"],
                     "dirs": [], "experiment": None, "batch": "", "recipe": "", "pooled": ""}
            for m in cols:
                entry.update({m: math.nan, f"{m}_std": math.nan})
                for reading in READINGS:
                    entry.update({f"{m}_{reading}": math.nan, f"{m}_{reading}_std": math.nan,
                                  f"{m}_{reading}_n": 0})
                _paper_cells(entry, m, paper["values"].get(m))
            rows.append(entry)
        rows.sort(key=lambda e: (_row_order(ref, e["paper_row"]), e["kind"] != "ours", natural_key(e["row"])))
    description = ""
    if table.get("ref_table"):
        from dml_runner.reference import table_description

        description = table_description(table["ref_table"])
    title = table_title(table)
    smoke = any(r.get("smoke") for r in runs)
    return {"key": table, "title": title, "slug": table_slug(table), "metrics": cols, "rows": rows, "mixed": mixed,
            "checkpoint": checkpoint, "runs": runs, "description": description, "recipe_keys": recipe,
            "smoke": smoke}
