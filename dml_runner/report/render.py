"""Tables as Markdown, LaTeX, CSV and one self-contained HTML page (index.html)."""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from dml_runner.report.collect import FINGERPRINT
from dml_runner.report.group import CHECKPOINTS, READING_TITLES

DAGGER, DDAGGER, SECTION, PILCROW, LOZENGE = "†", "‡", "§", "¶", "◊"
METRIC_TITLES = {"nmi": "NMI", "f1": "F1", "map@r": "MAP@R", "r_precision": "R-Prec"}
INTRO = ("*ours* = mean ± sample std over seeds of dml-runner runs (percent); *paper* = the published number "
         "(dml_runner/reference/, never ours); Δ = ours − paper.")


def metric_title(m: str) -> str:
    return METRIC_TITLES.get(m, m.replace("recall@", "R@"))


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:+.1f}" if signed else f"{x:.1f}"


def _with_std(mean: float, std: float) -> str:
    text = _fmt(mean)
    return text + (f" ± {std:.1f}" if not math.isnan(mean) and not math.isnan(std) else "")


def has_paper_numbers(table: dict[str, Any]) -> bool:
    return any(not math.isnan(e[f"{m}_paper"]) for e in table["rows"] for m in table["metrics"])


def primary_metric(table: dict[str, Any]) -> str:
    """The metric of the extra best-epoch columns: the runs' selection metric when it is a column, else the first."""
    chosen = [e.get("select_metric") for e in table["rows"] if e["kind"] == "ours"]
    return chosen[0] if chosen and chosen[0] in table["metrics"] else table["metrics"][0]


def extra_readings(table: dict[str, Any]) -> list[str]:
    """Readings shown besides the main cells (for the primary metric), where some row has them."""
    main = {"metrics": "final", "best_val": "best_val", "best_test": "best_test"}.get(CHECKPOINTS[table["checkpoint"]])
    m = primary_metric(table)
    out = []
    for reading in ("final", "best_val", "best_test"):
        if reading != main and any(e.get(f"{m}_{reading}_n") for e in table["rows"]):
            out.append(reading)
    return out


def reading_title(reading: str, metric: str) -> str:
    title = f"{metric_title(metric)} {READING_TITLES[reading]}"
    return title + f" (test-set selection) {PILCROW}" if reading == "best_test" else title


def _deviation_list(entry: dict[str, Any]) -> list[str]:
    listed = entry.get("deviation_list")
    if listed is not None:
        return list(listed)
    return [entry["deviations"]] if entry.get("deviations") else []


def shared_deviations(rows: list[dict[str, Any]]) -> list[str]:
    """The deviations every one of ``rows`` (two or more) declares, in the first row's order: printed once per
    table, each row's footnote then lists only its own."""
    lists = [_deviation_list(e) for e in rows]
    if len(lists) < 2:
        return []
    return [d for d in lists[0] if all(d in other for other in lists[1:])]


def _cells(table: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, body cells and footnotes shared by every renderer."""
    ours = [e for e in table["rows"] if e["kind"] == "ours"]
    show_batch = len({e["batch"] for e in ours}) > 1
    header = ["Method"] + (["batch"] if show_batch else []) + ["seeds"]
    if table["mixed"]:
        header += list(FINGERPRINT)
    with_paper = has_paper_numbers(table)
    for m in table["metrics"]:
        header += [f"{metric_title(m)} ours", f"{metric_title(m)} paper", "Δ"] if with_paper else [metric_title(m)]
    primary, extras = primary_metric(table), extra_readings(table)
    header += [reading_title(r, primary) for r in extras]
    body, notes = [], []
    shared = shared_deviations(ours)
    if shared:
        notes.append(f"{DDAGGER} all rows: deviate from the paper's protocol or the official code: "
                     f"{'; '.join(shared)}.")
    for e in table["rows"]:
        name = e["method"] if e["method"] == e["row"] else f"{e['method']} [{e['row']}]"
        if e["kind"] == "paper only":
            name += " (paper only)"
        if e["deviations"]:
            name += " " + DDAGGER
            own = [d for d in _deviation_list(e) if d not in shared]
            if own:
                notes.append(f"{DDAGGER} {e['row']}: {'also ' if shared else ''}deviates from the paper's protocol "
                             f"or the official code: {'; '.join(own)}.")
        if e["note"] and e["kind"] == "ours":
            name += " " + SECTION
            notes.append(f"{SECTION} {e['row']}: {e['note']}.")
        if e.get("pooled"):
            name += " " + LOZENGE
            notes.append(f"{LOZENGE} {e['row']}: --group-by pooled runs that differ in {e['pooled']}.")
        cells = [name] + ([e["batch"] or "—"] if show_batch else []) + [str(e["n_seeds"]) if e["n_seeds"] else "—"]
        if table["mixed"]:
            cells += [str(e.get(f, "")) for f in FINGERPRINT]
        unverified = []
        for m in table["metrics"]:
            paper = _fmt(e[f"{m}_paper"])
            if e[f"{m}_paper_verified"] is False:
                paper += " " + DAGGER
                unverified.append(m)
            text = _with_std(e[m], e[f"{m}_std"])
            cells += [text, paper, _fmt(e[f"{m}_delta"], signed=True)] if with_paper else [text]
        for r in extras:
            text = _with_std(e[f"{primary}_{r}"], e[f"{primary}_{r}_std"])
            n = e.get(f"{primary}_{r}_n") or 0
            cells.append(text + (f" (n={n})" if n and n != e["n_seeds"] else ""))
        if unverified:
            sources = "; ".join(dict.fromkeys(e[f"{m}_paper_source"] for m in unverified))
            notes.append(f"{DAGGER} {e['row']} ({', '.join(metric_title(m) for m in unverified)}): unverified "
                         f"published number (no independent copy confirms it); source: {sources}" +
                         (f"; {e['note']}" if e["note"] and e["kind"] != "ours" else "") + ".")
        body.append(cells)
    if "best_test" in extras or table["checkpoint"] == "best-test":
        epochs = "; ".join(f"{e['row']}: {e['best_test_epochs']}" for e in ours if e.get("best_test_epochs"))
        notes.insert(0, f"{PILCROW} best-on-test = test-set selection: per run, the test metrics of the trained "
                        f"epoch with the highest test {metric_title(ours[0]['select_metric'])} among the evaluated "
                        "epochs (every trainer.eval_every). Optimistic; it is what the official Divide & Conquer "
                        "and HDML codes report." + (f" Epochs picked: {epochs}." if epochs else ""))
    return header, body, list(dict.fromkeys(notes))


def protocol_line(table: dict[str, Any]) -> str:
    ours = [e for e in table["rows"] if e["kind"] == "ours"]
    if not ours:
        return ""
    chosen = {
        "final": "final epoch",
        "best": "the run's selected checkpoint (chosen on " + "/".join(sorted({e["selected_on"] for e in ours})) + ")",
        "best-val": "best epoch on the validation split",
        "best-test": f"best epoch on the test split ({PILCROW} test-set selection, optimistic)",
    }[table["checkpoint"]]
    if table["mixed"]:
        return f"Protocols differ between rows (--allow-mixed-protocols): see the columns. Metrics: {chosen}."
    e = ours[0]
    return "Protocol of our rows: " + ", ".join(f"{f}={e[f]}" for f in FINGERPRINT) + f". Metrics: {chosen}."


def recipe_line(table: dict[str, Any]) -> str:
    keys = table.get("recipe_keys") or []
    if not keys:
        return ""
    shown = ", ".join(keys[:12]) + (f", ... ({len(keys)} keys)" if len(keys) > 12 else "")
    return f"Settings that differ between rows (per-row recipe, `recipe` column of the CSV): {shown}."


def title_line(table: dict[str, Any]) -> str:
    return table["title"] + (" [SMOKE: fixture data, a few steps: the numbers mean nothing]" if table["smoke"] else "")


def render_markdown(tables: list[dict[str, Any]], failed: list[dict[str, Any]]) -> str:
    out = ["# dml-report", "", INTRO, ""]
    for t in tables:
        header, body, notes = _cells(t)
        out += [f"## {title_line(t)}", ""]
        if t["description"]:
            out += [f"> {t['description']}", ""]
        out += [protocol_line(t), ""]
        if recipe_line(t):
            out += [recipe_line(t), ""]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
        out.append("")
        out += [f"- {n}" for n in notes]
        out.append("")
        if t.get("baseline"):
            from dml_runner.report.compare import baseline_caption, baseline_cells

            b_header, b_body = baseline_cells(t["baseline"])
            out += [baseline_caption(t["baseline"]), "", "| " + " | ".join(b_header) + " |",
                    "|" + "|".join(["---"] + ["---:"] * (len(b_header) - 1)) + "|"]
            out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in b_body]
            out += [f"- {name}: no interval ({why})" for name, why in t["baseline"]["skipped"].items()]
            out.append("")
    if failed:
        out += ["## Failed runs (not in the tables)", "", "| run dir | row | seed | error |", "|---|---|---|---|"]
        for r in failed:
            out.append(f"| {r['dir']} | {r.get('row', '')} | {r.get('seed', '')} | "
                       f"{_first_line(r.get('error')).replace('|', '/')} |")
        out.append("")
    return "\n".join(out)


def _first_line(error: Any) -> str:
    return str(error).splitlines()[0][:200] if error else ""


_TEX_ESCAPE = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
               "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}", "±": r"$\pm$", "Δ": r"$\Delta$",
               "†": r"$^\dagger$", "‡": r"$^\ddagger$", "§": r"\S{}", "¶": r"\P{}", "◊": r"$\diamond$",
               "—": "--", "−": "-", "∅": r"$\emptyset$"}


def tex_escape(text: str) -> str:
    return "".join(_TEX_ESCAPE.get(ch, ch) for ch in str(text))


def render_latex(table: dict[str, Any]) -> str:
    header, body, notes = _cells(table)
    lines = [f"% dml-report: {title_line(table)} (ours = mean +/- std over seeds; paper = published, never ours)",
             f"% {protocol_line(table)}",
             r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule",
             " & ".join(tex_escape(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(tex_escape(c) for c in row) + r" \\" for row in body]
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [f"% {n}" for n in notes]
    return "\n".join(lines) + "\n"


def table_frame(table: dict[str, Any]) -> pd.DataFrame:
    frame = pd.DataFrame([{k: v for k, v in e.items() if k not in ("dirs", "deviation_list")} for e in table["rows"]])
    frame.insert(0, "dataset", table["key"].get("dataset"))
    frame.insert(0, "table", table["key"].get("ref_table") or "runs")
    frame["checkpoint"] = table["checkpoint"]
    return frame


# --------------------------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1400px;padding:0 1em;
color:#222;line-height:1.4}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2.2em;border-bottom:1px solid #ccc;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.85em;margin:.8em 0;display:block;overflow-x:auto}
th,td{border:1px solid #ddd;padding:.3em .55em;text-align:right;white-space:nowrap}
th{background:#f3f3f3}th.metric{text-align:center}td:first-child,th:first-child{text-align:left}
tr.paper-only td{color:#888}td{background:#fff}tr:nth-child(even) td{background:#fafafa}
td:first-child{position:sticky;left:0;z-index:1}
.protocol,.recipe{font-size:.85em;color:#444}.description{font-size:.9em;color:#555;border-left:3px solid #ccc;
padding-left:.8em}.notes{font-size:.82em;color:#333}.smoke{color:#b00;font-weight:bold}
.files{font-size:.85em}.figures{display:flex;flex-wrap:wrap;gap:1em}
figure{margin:0;border:1px solid #ddd;padding:.4em;background:#fff}
figure img{max-width:min(600px,100%);height:auto;display:block}
figcaption{font-size:.8em;color:#555;margin-top:.3em}nav ul{font-size:.9em}
"""


def _html_header(table: dict[str, Any], header: list[str]) -> str:
    """Two header rows when paper numbers are shown (a metric over its ours / paper / Δ columns), else one."""
    esc = html.escape
    if not has_paper_numbers(table):
        return "<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead>"
    n_metric_cols = 3 * len(table["metrics"])
    first = header.index(f"{metric_title(table['metrics'][0])} ours")
    lead, tail = header[:first], header[first + n_metric_cols:]
    top = "".join(f'<th rowspan="2">{esc(h)}</th>' for h in lead)
    top += "".join(f'<th colspan="3" class="metric">{esc(metric_title(m))}</th>' for m in table["metrics"])
    top += "".join(f'<th rowspan="2">{esc(h)}</th>' for h in tail)
    sub = "".join("<th>ours</th><th>paper</th><th>Δ</th>" for _ in table["metrics"])
    return f"<thead><tr>{top}</tr><tr>{sub}</tr></thead>"


def render_html(tables: list[dict[str, Any]], failed: list[dict[str, Any]], out_dir: Path) -> str:
    """One page: every table with its protocol line, footnotes, files and figures (links relative to ``out_dir``)."""
    esc = html.escape
    out_dir = Path(out_dir)

    def link(path: Path | str) -> str:
        return esc(Path(os.path.relpath(Path(path), out_dir)).as_posix(), quote=True)

    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             "<title>dml-report</title>", f"<style>{_CSS}</style>", "</head>", "<body>", "<h1>dml-report</h1>",
             f"<p>{esc(INTRO.replace('*', ''))} Also: <a href=\"report.md\">report.md</a>, "
             f"<a href=\"runs.csv\">runs.csv</a>" +
             (', <a href="failed.csv">failed.csv</a>' if failed else "") + ".</p>"]
    parts += ["<nav><ul>"] + [f'<li><a href="#{esc(t["slug"], quote=True)}">{esc(t["title"])}</a></li>'
                              for t in tables] + ["</ul></nav>"]
    for t in tables:
        header, body, notes = _cells(t)
        parts.append(f'<section id="{esc(t["slug"], quote=True)}">')
        smoke = ' <span class="smoke">[SMOKE: fixture data, a few steps: the numbers mean nothing]</span>' \
            if t["smoke"] else ""
        parts.append(f"<h2>{esc(t['title'])}{smoke}</h2>")
        if t["description"]:
            parts.append(f'<p class="description">{esc(t["description"])}</p>')
        parts.append(f'<p class="protocol">{esc(protocol_line(t))}</p>')
        if recipe_line(t):
            parts.append(f'<p class="recipe">{esc(recipe_line(t).replace("`", ""))}</p>')
        parts.append("<table>")
        parts.append(_html_header(t, header))
        parts.append("<tbody>")
        for e, row in zip(t["rows"], body):
            cls = ' class="paper-only"' if e["kind"] == "paper only" else ""
            parts.append(f"<tr{cls}>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
        parts.append("</tbody></table>")
        if notes:
            parts.append('<ul class="notes">' + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
        if t.get("baseline"):
            from dml_runner.report.compare import baseline_caption, baseline_cells

            b_header, b_body = baseline_cells(t["baseline"])
            parts.append(f'<p class="baseline">{esc(baseline_caption(t["baseline"]).replace("`", ""))}</p>')
            parts.append("<table><thead><tr>" + "".join(f"<th>{esc(c)}</th>" for c in b_header) + "</tr></thead>"
                         "<tbody>" + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
                                             for row in b_body) + "</tbody></table>")
        files = [f for f in t.get("files", []) if Path(f).is_file()]
        if files:
            parts.append('<p class="files">Files: ' + ", ".join(
                f'<a href="{link(f)}">{esc(Path(f).name)}</a>' for f in files) + "</p>")
        figures = [(f, caption) for f, caption in t.get("figures", []) if Path(f).is_file()]
        if figures:
            parts.append('<div class="figures">')
            for f, caption in figures:
                parts.append(f'<figure><a href="{link(f)}"><img src="{link(f)}" alt="{esc(caption, quote=True)}" '
                             f'loading="lazy"></a><figcaption>{esc(caption)}</figcaption></figure>')
            parts.append("</div>")
        parts.append("</section>")
    if failed:
        parts += ["<section id=\"failed\">", "<h2>Failed runs (not in the tables)</h2>", "<table>",
                  "<thead><tr><th>run dir</th><th>row</th><th>seed</th><th>error</th></tr></thead><tbody>"]
        for r in failed:
            parts.append(f"<tr><td>{esc(str(r['dir']))}</td><td>{esc(str(r.get('row', '')))}</td>"
                         f"<td>{esc(str(r.get('seed', '')))}</td><td>{esc(_first_line(r.get('error')))}</td></tr>")
        parts += ["</tbody></table>", "</section>"]
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"
