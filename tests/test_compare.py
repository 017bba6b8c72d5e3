"""dml-compare on real digits runs: two configurations x two seeds, compared through the installed command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import run_dml


def dml_compare(args, cwd) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("dml-compare")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "dml_runner.cli.compare"]
    return subprocess.run(cmd + [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """One multirun: trainer.epochs=1,4 x trainer.seed=0,1 on digits (trainer=smoke otherwise)."""
    base = tmp_path_factory.mktemp("compare")
    run_dml(["-m", "trainer=smoke", "trainer.epochs=1,4", "trainer.seed=0,1", f"hydra.sweep.dir={base / 'sweep'}"],
            cwd=base)
    return base / "sweep"


def jobs(sweep: Path, epochs: int) -> list[Path]:
    out = []
    for results in sorted(sweep.glob("*/results.json")):
        res = json.loads(results.read_text())
        if res["config"]["trainer"]["epochs"] == epochs:
            out.append(results.parent)
    assert len(out) == 2, out
    return out


@pytest.mark.slow
def test_two_sets_of_seeds_compared_with_intervals(sweep, tmp_path):
    a, b = jobs(sweep, 1), jobs(sweep, 4)
    out = tmp_path / "cmp.json"
    proc = dml_compare([",".join(map(str, a)), ",".join(map(str, b)), "--json", out, "--samples", 1000], tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert set(result) == {"recall@1", "map@r", "r_precision"}
    for metric, d in result.items():
        assert {"a", "b", "difference", "ci_low", "ci_high"} <= set(d)
        # each side's value is the mean of its runs' reported test metric (digits uses the exact float32 search)
        for side, dirs in (("a", a), ("b", b)):
            reported = [json.loads((r / "results.json").read_text())["metrics"][metric] for r in dirs]
            assert d[side] == pytest.approx(np.mean(reported), abs=1e-9), (metric, side)
        assert d["difference"] == pytest.approx(d["b"] - d["a"], abs=1e-12)
        assert d["ci_low"] <= d["ci_high"] and d["runs_a"] == d["runs_b"] == 2
    assert "two-level" not in proc.stdout and "and the seeds" in proc.stdout.splitlines()[0]


@pytest.mark.slow
def test_a_run_against_itself_is_noise(sweep, tmp_path):
    run = jobs(sweep, 4)[0]
    proc = dml_compare([run, run, "--json", tmp_path / "same.json", "--samples", 200], tmp_path)
    assert proc.returncode == 0, proc.stderr
    for d in json.loads((tmp_path / "same.json").read_text()).values():
        assert d["difference"] == 0 and d["ci_low"] == d["ci_high"] == 0 and d["contains_zero"]
    assert "contains 0" in proc.stdout


@pytest.mark.slow
def test_refusals_are_one_line(sweep, tmp_path):
    run = jobs(sweep, 1)[0]
    data = dict(np.load(run / "embeddings.npz"))
    other = tmp_path / "other.npz"
    np.savez(other, embeddings=data["embeddings"][:-5], labels=data["labels"][:-5])
    cases = [
        ([run, other], "different test sets"),
        ([sweep, run], "configurations"),  # the sweep folder holds epochs=1 and epochs=4
        ([run, tmp_path / "missing"], "does not exist"),
        ([run, run, "--metrics", "recall@0"], "unknown per-query metric"),
        ([run, run, "--json", tmp_path], "is a directory"),
    ]
    for args, message in cases:
        proc = dml_compare(args, tmp_path)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def row_named(table, needle):
    names = [r["row"] for r in table["rows"] if r.get("kind") == "ours"]
    matches = [n for n in names if needle in n]
    assert len(matches) == 1, names
    return matches[0]


@pytest.mark.slow
def test_report_baseline_intervals_are_dml_compares(sweep, tmp_path):
    """dml-report --baseline: each row's difference from the baseline row, the same numbers dml-compare gives for
    the same runs, with the interval's meaning in the table's header."""
    from dml_runner.cli.report import main as report_main
    from dml_runner.report import report

    table = report([sweep], tmp_path / "probe", figures=False, html=False)["tables"][0]
    base, other = row_named(table, "epochs=1"), row_named(table, "epochs=4")
    result = report([sweep], tmp_path / "rep", figures=False, baseline=base, samples=500)
    diffs = result["tables"][0]["baseline"]
    assert set(diffs["rows"]) == {other} and "recall@1" in diffs["metrics"] and "nmi" not in diffs["metrics"]
    proc = dml_compare([",".join(map(str, jobs(sweep, 1))), ",".join(map(str, jobs(sweep, 4))), "--samples", 500,
                        "--metrics", *diffs["metrics"], "--json", tmp_path / "c.json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    direct = json.loads((tmp_path / "c.json").read_text())
    for m, d in diffs["rows"][other].items():
        assert (d.difference, d.ci_low, d.ci_high) == pytest.approx(
            (direct[m]["difference"], direct[m]["ci_low"], direct[m]["ci_high"]), abs=1e-12), m
    md = (tmp_path / "rep" / "report.md").read_text()
    assert f"Difference from the baseline row `{base}`" in md and "paired bootstrap interval" in md
    assert "95%" in (tmp_path / "rep" / "index.html").read_text()
    assert report_main([str(sweep), "--out", str(tmp_path / "x"), "--no-figures", "--baseline", "no such row"]) == 1


@pytest.mark.slow
def test_report_marks_a_difference_that_is_noise(tmp_path):
    """Two rows that differ only in an evaluation setting that cannot move retrieval (k-means iterations): their
    embeddings are the same, the difference is 0 and the report marks its interval as containing 0."""
    from dml_runner.report import report

    run_dml(["-m", "trainer=smoke", "eval.kmeans_iters=10,20", f"hydra.sweep.dir={tmp_path / 'sw'}"], cwd=tmp_path)
    table = report([tmp_path / "sw"], tmp_path / "probe", figures=False, html=False)["tables"][0]
    base = row_named(table, "kmeans_iters=10")
    t = report([tmp_path / "sw"], tmp_path / "rep", figures=False, html=False, baseline=base,
               samples=200)["tables"][0]
    (other,) = t["baseline"]["rows"]
    for d in t["baseline"]["rows"][other].values():
        assert d.difference == 0 and d.contains_zero
    assert "†" in (tmp_path / "rep" / "report.md").read_text()
