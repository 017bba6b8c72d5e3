"""`dml-run -m ... trainer.resume=auto` after an interrupted sweep: every job ends in the first sweep directory."""

from __future__ import annotations

import pandas as pd

from conftest import run_dml


def test_a_resumed_sweep_completes_in_one_folder_with_one_summary(tmp_path):
    """Guards the split a resumed sweep made: the interrupted job finished in the old sweep folder, the others ran in
    a new one, and the new summary.csv left the interrupted job out."""
    out = tmp_path / "out"
    sweep_args = ["-m", "trainer=smoke", "trainer.seed=0,1", f"paths.output_dir={out}"]
    run_dml(sweep_args, cwd=tmp_path)
    (first,) = [p.parent for p in out.glob("multirun/*/*/multirun.yaml")]
    # the sweep as an interruption during job 0 leaves it: job 0 checkpointed but without results, job 1 not started
    (first / "0" / "results.json").unlink()
    for item in sorted((first / "1").rglob("*"), reverse=True):
        item.unlink() if item.is_file() else item.rmdir()
    (first / "1").rmdir()
    (first / "summary.csv").unlink()
    assert (first / "0" / "last.pt").is_file()

    proc = run_dml([*sweep_args, "trainer.resume=auto"], cwd=tmp_path)
    assert f"continuing the unfinished sweep in {first}" in proc.stdout
    assert [p.parent for p in out.glob("multirun/*/*/multirun.yaml")] == [first]
    summary = pd.read_csv(first / "summary.csv")
    assert list(summary["job"]) == [0, 1] and list(summary["status"]) == ["completed", "completed"]
