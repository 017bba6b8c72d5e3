"""dml-report on synthetic run directories with known numbers: mean/std/delta, fingerprints, failed runs, marks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dml_runner.reference import load_reference, reference_tables
from dml_runner.cli.report import main
from dml_runner.report import ReportError, report


def write_run(run_dir: Path, *, table: str | None = "hdml_table1_cub200", row: str = "npair", seed: int = 0,
              metrics: dict | None = None, dataset: str = "cub200", embedding_dim: int = 512,
              backbone: str = "googlenet", status: str = "completed", deviations=(), note: str = "",
              selected_on: str = "test", batch: int = 128, sampler: str = "npair", extra_cfg: dict | None = None,
              overrides=None, history: dict | None = None, choices: dict | None = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ".hydra").mkdir(exist_ok=True)
    cfg = {"trainer": {"seed": seed, "batch_size": batch}, "backbone": {"arch": backbone, "embedding_dim": embedding_dim,
                                                                        "pretrained": True, "freeze": "none"},
           "sampler": {}, "transform": {"name": "caffe_227"}, "dataset": {}, "tags": []}
    if table:
        cfg["reference"] = {"paper": table.split("_")[0], "table": table, "row": row,
                            "deviations": list(deviations), "note": note}
    _merge(cfg, extra_cfg or {})
    res = {"status": status, "config": cfg, "choices": {"sampler": sampler, "loss": row, **(choices or {})},
           "overrides": overrides if overrides is not None else [f"trainer.seed={seed}"]}
    if status == "completed":
        res.update({"metrics": metrics or {}, "best": {"epoch": 1, "split": selected_on, "test_metrics": metrics or {}},
                    "checkpoint_selected_on": selected_on,
                    "dataset": {"name": dataset, "recall_at": [1, 2, 4, 8], "info": {"transform": "caffe_227"}},
                    "model": {"arch": backbone, "pretrained": True, "embedding_dim": embedding_dim, "freeze": "none"}})
    else:
        res["error"] = "RuntimeError: boom"
    (run_dir / "results.json").write_text(json.dumps(res))
    if history is not None:
        pd.DataFrame(history).to_csv(run_dir / "history.csv", index=False)
    return run_dir


def _merge(into: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def read_table(out: Path, slug: str) -> pd.DataFrame:
    return pd.read_csv(out / f"{slug}.csv")


# ----------------------------------------------------------------------------------------- reference data

def test_reference_tables_hold_the_methods_md_numbers():
    assert set(reference_tables()) == {"hdml_table1_cub200", "hdml_table2_cars196", "hdml_table3_sop",
                                       "lifted_structure", "divide_conquer", "mdl", "modern"}
    t2 = load_reference("hdml_table2_cars196").set_index(["row", "metric"])["value"]
    assert t2[("hdml_npair", "recall@1")] == 79.1 and t2[("contrastive", "nmi")] == 42.3
    assert t2[("daml_npair", "f1")] == 36.4
    t3 = load_reference("hdml_table3_sop")
    assert set(t3["metric"]) == {"nmi", "f1", "recall@1", "recall@10", "recall@100"} and len(t3) == 55
    daml = load_reference("hdml_table1_cub200").query("row.str.startswith('daml')")
    assert not daml["trainable"].any() and len(daml) == 12


def test_reference_flags_follow_methods_md():
    dc = load_reference("divide_conquer")
    unverified = set(map(tuple, dc.loc[~dc["verified"], ["row", "metric"]].values))
    assert ("cars196", "nmi") in unverified and ("inshop", "recall@40") in unverified
    assert ("vehicleid_large", "recall@5") in unverified and ("cub200", "recall@1") not in unverified
    # CUB's NMI: quoted in the official repository's issue #6, the second copy that verifies it
    assert ("cub200", "nmi") not in unverified
    assert "issues/6" in dc.set_index(["row", "metric"]).loc[("cub200", "nmi"), "checked_against"]
    assert (dc["verified"] == dc["checked_against"].fillna("").ne("")).all()  # verified = a named second copy
    for table in ("hdml_table1_cub200", "hdml_table2_cars196", "hdml_table3_sop"):
        hdml = load_reference(table)
        checked = hdml["row"].eq("hdml_npair") & hdml["metric"].str.startswith("recall@")
        assert hdml["verified"].eq(checked).all() and hdml.loc[checked, "checked_against"].str.len().gt(0).all()
    lifted = load_reference("lifted_structure")
    rerun = lifted[lifted["embedding_dim"] == 64]
    assert len(rerun) == 10 and not rerun["verified"].any()
    assert rerun["source"].str.contains("Facility Location").all()
    assert (lifted[lifted["embedding_dim"] == 512]["dataset"] != "cars196").all()  # none published at 512-d
    assert load_reference("mdl").empty  # no published numbers: nothing fabricated


# ----------------------------------------------------------------------------------------- numbers

def test_mean_std_and_delta_are_exact(tmp_path):
    for seed, r1 in enumerate([0.50, 0.52, 0.54]):
        write_run(tmp_path / "sweep" / str(seed), seed=seed, metrics={"recall@1": r1, "nmi": 0.6, "f1": 0.3})
    result = report([tmp_path / "sweep"], tmp_path / "out", figures=False)
    (table,) = result["tables"]
    frame = read_table(tmp_path / "out", table["slug"])
    ours = frame[frame["kind"] == "ours"].iloc[0]
    assert ours["n_seeds"] == 3 and ours["seeds"] == "0 1 2"
    assert ours["recall@1"] == pytest.approx(52.0)
    assert ours["recall@1_std"] == pytest.approx(2.0)  # sample std (ddof = 1) of 50, 52, 54
    assert ours["recall@1_paper"] == pytest.approx(51.9)
    assert ours["recall@1_delta"] == pytest.approx(0.1)
    assert ours["nmi"] == pytest.approx(60.0) and ours["nmi_std"] == pytest.approx(0.0)
    assert ours["nmi_delta"] == pytest.approx(60.0 - 60.2)
    assert math.isnan(ours["recall@2"])  # we have no R@2: no mean, no delta
    md = (tmp_path / "out" / "report.md").read_text()
    assert "52.0 ± 2.0" in md and "+0.1" in md and "never ours" in md


def test_paper_only_rows_and_marks(tmp_path):
    write_run(tmp_path / "a", row="npair", metrics={"recall@1": 0.5}, deviations=["torchvision GoogLeNet"])
    result = report([tmp_path / "a"], tmp_path / "out", figures=False)
    frame = read_table(tmp_path / "out", result["tables"][0]["slug"])
    paper_only = frame[frame["kind"] == "paper only"]
    assert {"daml_npair", "hdml_npair", "contrastive"} <= set(paper_only["row"])
    assert paper_only["n_seeds"].eq(0).all()
    md = (tmp_path / "out" / "report.md").read_text()
    assert "DAML (N-pair) [daml_npair] (paper only)" in md
    assert "N-pair [npair] ‡" in md and "deviates from the paper's protocol or the official code: torchvision" in md
    tex = (tmp_path / "out" / f"{result['tables'][0]['slug']}.tex").read_text()
    assert r"\begin{tabular}" in tex and r"$^\ddagger$" in tex and "daml\\_npair" in tex


def test_a_deviation_shared_by_every_row_is_printed_once_per_table(tmp_path):
    """A table base's ``reference.table_deviations`` and the rows' own ``reference.deviations``: the report prints
    the deviations common to all rows once, and each row's footnote only its own; the CSV keeps every row's set."""
    shared = ["GoogLeNet with BatchNorm", "reported at the final step"]
    write_run(tmp_path / "a", row="npair", metrics={"recall@1": 0.5},
              extra_cfg={"reference": {"table_deviations": shared}}, deviations=["no weight decay"])
    write_run(tmp_path / "b", row="triplet", metrics={"recall@1": 0.4},
              extra_cfg={"reference": {"table_deviations": shared}}, deviations=["semi-hard mining; batch 120"])
    write_run(tmp_path / "c", row="lifted", metrics={"recall@1": 0.45}, deviations=[*shared])  # all in the row
    result = report([tmp_path / "a", tmp_path / "b", tmp_path / "c"], tmp_path / "out", figures=False)
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.count("GoogLeNet with BatchNorm") == 1 and md.count("reported at the final step") == 1
    assert "all rows: deviate from the paper's protocol or the official code: GoogLeNet with BatchNorm; " \
           "reported at the final step." in md
    assert "npair: also deviates from the paper's protocol or the official code: no weight decay." in md
    assert "triplet: also deviates from the paper's protocol or the official code: semi-hard mining; batch 120." in md
    assert "‡ lifted" not in md and "Lifted [lifted] ‡" in md  # nothing of its own: marked, no footnote of its own
    frame = read_table(tmp_path / "out", result["tables"][0]["slug"]).set_index("row")
    assert frame.loc["npair", "deviations"] == "GoogLeNet with BatchNorm; reported at the final step; no weight decay"
    assert frame.loc["lifted", "deviations"] == "GoogLeNet with BatchNorm; reported at the final step"
    # one row alone: no "all rows" paragraph, its footnote lists everything
    write_run(tmp_path / "d" / "x", row="npair", metrics={"recall@1": 0.5},
              extra_cfg={"reference": {"table_deviations": shared}}, deviations=["no weight decay"])
    report([tmp_path / "d"], tmp_path / "out1", figures=False)
    md = (tmp_path / "out1" / "report.md").read_text()
    assert "all rows" not in md and "code: GoogLeNet with BatchNorm; reported at the final step; no weight decay." in md


def test_unverified_paper_numbers_get_a_dagger(tmp_path):
    write_run(tmp_path / "dc", table="divide_conquer", row="cars196", embedding_dim=128, backbone="resnet50",
              metrics={"recall@1": 0.6, "nmi": 0.65}, dataset="cars196")
    result = report([tmp_path / "dc"], tmp_path / "out", figures=False)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "70.3 †" in md and "84.6 †" not in md
    assert "unverified published number" in md
    frame = read_table(tmp_path / "out", result["tables"][0]["slug"])
    row = frame[frame["row"] == "cars196"].iloc[0]
    assert not row["nmi_paper_verified"] and row["recall@1_paper_verified"]


def test_embedding_size_is_matched_and_rerun_source_flagged(tmp_path):
    for dim in (64, 512):
        write_run(tmp_path / f"d{dim}", table="lifted_structure", row="lifted_cub200", embedding_dim=dim,
                  metrics={"recall@1": 0.4}, batch=128)
    assert main([str(tmp_path), "--out", str(tmp_path / "mixed"), "--no-figures"]) == 1  # 64 and 512 in one table
    assert main([str(tmp_path), "--out", str(tmp_path / "out"), "--no-figures", "--split-by", "embedding_dim"]) == 0
    f64 = read_table(tmp_path / "out", "lifted_structure_cub200_embedding_dim64")
    f512 = read_table(tmp_path / "out", "lifted_structure_cub200_embedding_dim512")
    assert f64.set_index("row").loc["lifted_cub200", "recall@1_paper"] == pytest.approx(43.57)
    assert f512.set_index("row").loc["lifted_cub200", "recall@1_paper"] == pytest.approx(47.2)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "43.6 †" in md and "Facility Location" in md


def test_different_fingerprints_are_refused_unless_allowed(tmp_path, capsys):
    write_run(tmp_path / "r0", row="npair", metrics={"recall@1": 0.5}, selected_on="test")
    write_run(tmp_path / "r1", row="triplet", metrics={"recall@1": 0.4}, selected_on="val", embedding_dim=128)
    assert main([str(tmp_path), "--out", str(tmp_path / "out"), "--no-figures"]) == 1
    err = capsys.readouterr().err
    assert "different protocols" in err and "selected_on" in err and "embedding_dim" in err
    assert "--allow-mixed-protocols" in err
    assert not (tmp_path / "out" / "report.md").exists()
    assert main([str(tmp_path), "--out", str(tmp_path / "out"), "--no-figures", "--allow-mixed-protocols"]) == 0
    frame = pd.read_csv(tmp_path / "out" / "hdml_table1_cub200_cub200.csv")
    assert set(frame.loc[frame["kind"] == "ours", "selected_on"]) == {"test", "val"}


def test_same_row_with_two_protocols_gives_two_rows(tmp_path):
    write_run(tmp_path / "a", row="npair", seed=0, metrics={"recall@1": 0.5})
    write_run(tmp_path / "b", row="npair", seed=0, metrics={"recall@1": 0.6}, embedding_dim=128)
    result = report([tmp_path], tmp_path / "out", allow_mixed=True, figures=False)
    ours = [r for r in result["tables"][0]["rows"] if r["kind"] == "ours"]
    assert sorted(r["embedding_dim"] for r in ours) == [128, 512]
    assert all(r["n_seeds"] == 1 for r in ours)


def test_failed_runs_are_listed_separately(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    (sweep).mkdir()
    (sweep / "multirun.yaml").write_text("{}")
    write_run(sweep / "0", seed=0, metrics={"recall@1": 0.5})
    write_run(sweep / "1", seed=1, status="failed")
    (sweep / "2" / ".hydra").mkdir(parents=True)  # crashed before results.json
    assert main([str(sweep), "--out", str(tmp_path / "out"), "--no-figures"]) == 0
    failed = pd.read_csv(tmp_path / "out" / "failed.csv")
    assert len(failed) == 2 and "boom" in " ".join(failed["error"].astype(str))
    assert "no results.json" in " ".join(failed["error"].astype(str))
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Failed runs" in md
    frame = pd.read_csv(tmp_path / "out" / "hdml_table1_cub200_cub200.csv")
    assert frame.loc[frame["kind"] == "ours", "n_seeds"].tolist() == [1]  # the failed seed is not averaged
    assert "2 failed run(s)" in capsys.readouterr().out


def test_nothing_to_report_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    assert "no results.json" in capsys.readouterr().err
    write_run(tmp_path / "x", status="failed")
    assert main([str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    assert "no completed run" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


def test_plain_runs_without_reference_are_named_by_their_overrides(tmp_path):
    for seed in (0, 1):
        for loss in ("contrastive", "triplet"):
            write_run(tmp_path / f"{loss}{seed}", table=None, row=loss, seed=seed, dataset="digits",
                      metrics={"recall@1": 0.9, "nmi": 0.2, "f1": 0.3, "map@r": 0.25},
                      overrides=["trainer=smoke", f"trainer.seed={seed}", f"loss.margin={0.1 if loss == 'triplet' else 1.0}"])
    result = report([tmp_path], tmp_path / "out", figures=False)
    rows = {r["row"] for r in result["tables"][0]["rows"]}
    assert rows == {"loss=contrastive loss.margin=1.0", "loss=triplet loss.margin=0.1"} or \
        rows == {"loss=contrastive", "loss=triplet"}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "paper" not in md.split("## runs / digits")[1].split("\n\n")[2]  # no paper columns without paper numbers


# ----------------------------------------------------------------------------------------- grouping rule

def ours_rows(result: dict, table: int = 0) -> dict[str, dict]:
    return {e["row"]: e for e in result["tables"][table]["rows"] if e["kind"] == "ours"}


def test_rows_of_one_paper_table_may_use_different_batches(tmp_path):
    """N-pair batches for N-pair-style rows and class-balanced batches for triplets share one table."""
    write_run(tmp_path / "npair", row="npair", metrics={"recall@1": 0.5}, sampler="npair", batch=128)
    write_run(tmp_path / "triplet", row="triplet", metrics={"recall@1": 0.4}, sampler="class_balanced", batch=120,
              extra_cfg={"sampler": {"samples_per_class": 3}, "loss": {"margin": 1.0}})
    result = report([tmp_path], tmp_path / "out", figures=False)
    (table,) = result["tables"]
    assert not table["mixed"]
    rows = ours_rows(result)
    assert rows["npair"]["batch"] == "npair 128 (2/class)"
    assert rows["triplet"]["batch"] == "class_balanced 120 (3/class)"
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| Method | batch | seeds |" in md and "class_balanced 120 (3/class)" in md
    assert "trainer.batch_size" in rows["triplet"]["recipe"]


def test_overrides_under_loss_method_dataset_make_separate_rows(tmp_path):
    """A method.num_clusters sweep, two dataset.root trees and two folders: one row each, named by the key."""
    for seed in (0, 1):
        for k in (16, 2, 4):
            write_run(tmp_path / "dc" / f"k{k}s{seed}", table=None, seed=seed, dataset="cub200",
                      metrics={"recall@1": 0.1 * k + 0.01 * seed},
                      extra_cfg={"method": {"_target_": "DivideConquer", "num_clusters": k}},
                      overrides=[f"method.num_clusters={k}", f"trainer.seed={seed}"])
    result = report([tmp_path / "dc"], tmp_path / "out", figures=False)
    rows = ours_rows(result)
    assert list(rows) == ["num_clusters=2", "num_clusters=4", "num_clusters=16"]  # ordered by value
    assert rows["num_clusters=2"]["n_seeds"] == 2 and rows["num_clusters=4"]["recall@1"] == pytest.approx(40.5)
    for root in ("/data/a/CUB_200_2011", "/data/b/CUB_200_2011"):
        write_run(tmp_path / "roots" / root.split("/")[2], table=None, dataset="cub200", metrics={"recall@1": 0.3},
                  extra_cfg={"dataset": {"root": root}})
    rows = ours_rows(report([tmp_path / "roots"], tmp_path / "out2", figures=False))
    assert set(rows) == {"root=/data/a/CUB_200_2011", "root=/data/b/CUB_200_2011"}
    assert all(e["n_seeds"] == 1 for e in rows.values())
    # --split-by and --group-by take any dotted config key
    result = report([tmp_path / "dc"], tmp_path / "out3", figures=False, split_by=["method.num_clusters"])
    assert [t["slug"] for t in result["tables"]] == ["runs_cub200_method.num_clusters2",
                                                     "runs_cub200_method.num_clusters4",
                                                     "runs_cub200_method.num_clusters16"]
    with pytest.raises(ReportError, match="--split-by method.num_cluster: no run has this config key"):
        report([tmp_path / "dc"], tmp_path / "out4", figures=False, split_by=["method.num_cluster"])


def test_experiment_rows_split_by_what_differs_and_keep_their_paper_number(tmp_path):
    for pf in (0, 90):
        write_run(tmp_path / f"pf{pf}", row="hdml_npair", metrics={"recall@1": 0.5 + pf / 1000},
                  extra_cfg={"loss": {"pulling_factor": pf}}, overrides=[f"loss.pulling_factor={pf}"])
    result = report([tmp_path], tmp_path / "out", figures=False)
    rows = ours_rows(result)
    assert set(rows) == {"hdml_npair pulling_factor=0", "hdml_npair pulling_factor=90"}
    paper = load_reference("hdml_table1_cub200").query("row == 'hdml_npair' and metric == 'recall@1'")["value"]
    assert rows["hdml_npair pulling_factor=90"]["recall@1_paper"] == pytest.approx(float(paper.iloc[0]))
    assert rows["hdml_npair pulling_factor=90"]["recall@1"] == pytest.approx(59.0)
    assert "hdml_npair" not in {e["row"] for e in result["tables"][0]["rows"] if e["kind"] == "paper only"}


def test_a_row_holding_a_seed_twice_is_an_error(tmp_path, capsys):
    write_run(tmp_path / "a", row="npair", seed=0, metrics={"recall@1": 0.5})
    write_run(tmp_path / "b", row="npair", seed=0, metrics={"recall@1": 0.6})
    assert main([str(tmp_path), "--out", str(tmp_path / "out"), "--no-figures"]) == 1
    err = capsys.readouterr().err
    assert "holds seed 0 twice" in err and str(tmp_path / "a") in err and str(tmp_path / "b") in err


def test_neutral_settings_and_seed_copies_share_a_row(tmp_path):
    for seed, workers in ((0, 0), (1, 4)):
        write_run(tmp_path / str(seed), row="npair", seed=seed, metrics={"recall@1": 0.5},
                  extra_cfg={"trainer": {"num_workers": workers, "progress": bool(seed)},
                             "dataset": {"seed": seed, "root": "/data/CUB_200_2011"}, "logger": {"x": seed}})
    rows = ours_rows(report([tmp_path], tmp_path / "out", figures=False))
    assert list(rows) == ["npair"] and rows["npair"]["n_seeds"] == 2 and rows["npair"]["seeds"] == "0 1"


def test_group_by_pools_other_settings_and_names_them(tmp_path):
    for seed, every in ((0, 5), (1, 10)):
        write_run(tmp_path / str(seed), table=None, seed=seed, metrics={"recall@1": 0.5},
                  extra_cfg={"trainer": {"eval_every": every}, "loss": {"margin": 0.2}})
    assert len(ours_rows(report([tmp_path], tmp_path / "out", figures=False))) == 2  # eval_every can change a number
    result = report([tmp_path], tmp_path / "out", figures=False, group_by=["loss.margin"])
    (row,) = ours_rows(result).values()
    assert row["n_seeds"] == 2 and row["pooled"] == "trainer.eval_every=5/10"
    assert "pooled runs that differ in trainer.eval_every=5/10" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.slow
def test_pulling_factor_sweep_of_dml_run_gives_one_row_per_value(tmp_path, capsys):
    """The path a user runs: `dml-run -m loss=hdml_npair loss.pulling_factor=0,90`, then `dml-report <sweep>`."""
    from conftest import run_dml

    sweep = tmp_path / "sweep"
    run_dml(["-m", "loss=hdml_npair", "loss.pulling_factor=0,90", "trainer.epochs=2", "trainer.eval_every=1",
             "trainer.max_steps_per_epoch=4", "trainer.progress=false", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    out = tmp_path / "tables"
    assert main([str(sweep), "--out", str(out)]) == 0
    frame = pd.read_csv(out / "runs_digits.csv").set_index("row")
    assert sorted(frame.index) == ["pulling_factor=0", "pulling_factor=90"]
    for pf, job in ((0, "0"), (90, "1")):
        row = frame.loc[f"pulling_factor={pf}"]
        results = json.loads((sweep / job / "results.json").read_text())
        assert results["config"]["loss"]["pulling_factor"] == pf and row["n_seeds"] == 1
        assert row["recall@1"] == pytest.approx(100 * results["metrics"]["recall@1"])
        history = pd.read_csv(sweep / job / "history.csv")
        trained = history[history["epoch"] > 0]
        assert row["recall@1_best_test"] == pytest.approx(100 * trained["test/recall@1"].max())
        assert row["recipe"] == f"loss.pulling_factor={pf}"
    md = capsys.readouterr().out
    assert "| pulling_factor=0 | 1 |" in md and "R@1 best-on-test (test-set selection) ¶" in md
    linked = assert_html_well_formed_and_linked(out / "index.html")
    assert {"runs_digits_tsne.png", "runs_digits_pulling_factor=90_retrieval.png", "runs_digits.csv"} <= linked


# ----------------------------------------------------------------------------------------- best epochs

def test_best_on_validation_and_on_test_from_history(tmp_path):
    """Final by default; best-on-test = test metrics of the trained epoch with the best test R@1 (ties: earliest,
    epoch 0 never), best-on-val likewise from val/recall@1."""
    histories = [
        {"epoch": [0, 1, 2, 3], "val/recall@1": [0.9, 0.3, 0.5, 0.4], "test/recall@1": [0.99, 0.60, 0.55, 0.60],
         "test/nmi": [0.9, 0.40, 0.50, 0.45]},
        {"epoch": [0, 1, 2, 3], "val/recall@1": [0.1, 0.6, 0.2, 0.6], "test/recall@1": [0.10, 0.50, 0.70, 0.65],
         "test/nmi": [0.1, 0.30, 0.20, 0.35]},
    ]
    for seed, h in enumerate(histories):
        write_run(tmp_path / str(seed), row="npair", seed=seed, selected_on="val", history=h,
                  metrics={"recall@1": h["test/recall@1"][-1], "nmi": h["test/nmi"][-1]})
    frame_of = {}
    for checkpoint in ("final", "best-test", "best-val"):
        result = report([tmp_path], tmp_path / checkpoint, figures=False, checkpoint=checkpoint)
        frame_of[checkpoint] = read_table(tmp_path / checkpoint, result["tables"][0]["slug"]).set_index("row")
    row = frame_of["final"].loc["npair"]
    # expected values computed here from the histories, independently of the report code
    def pick(h, split):
        trained = [i for i, e in enumerate(h["epoch"]) if e > 0]
        best = max(trained, key=lambda i: (h[f"{split}/recall@1"][i], -i))
        return h["epoch"][best], h["test/recall@1"][best], h["test/nmi"][best]
    test_picks = [pick(h, "test") for h in histories]
    val_picks = [pick(h, "val") for h in histories]
    assert [p[0] for p in test_picks] == [1, 2] and [p[0] for p in val_picks] == [2, 1]
    assert row["recall@1"] == pytest.approx(100 * np.mean([0.60, 0.65]))
    assert row["recall@1_best_test"] == pytest.approx(100 * np.mean([p[1] for p in test_picks]))
    assert row["nmi_best_test"] == pytest.approx(100 * np.mean([p[2] for p in test_picks]))
    assert row["recall@1_best_val"] == pytest.approx(100 * np.mean([p[1] for p in val_picks]))
    assert row["best_test_epochs"] == "1 2"
    best_test = frame_of["best-test"].loc["npair"]
    assert best_test["recall@1"] == pytest.approx(row["recall@1_best_test"])
    assert best_test["recall@1_delta"] == pytest.approx(best_test["recall@1"] - 51.9)
    assert frame_of["best-val"].loc["npair", "recall@1"] == pytest.approx(row["recall@1_best_val"])
    md = (tmp_path / "final" / "report.md").read_text()
    assert "R@1 best-on-val" in md and "R@1 best-on-test (test-set selection) ¶" in md and "test-set selection" in md
    assert "Metrics: final epoch." in md
    assert "Metrics: best epoch on the test split" in (tmp_path / "best-test" / "report.md").read_text()
    # the official HDML code kept the epoch with the best test NMI: --select-metric nmi
    assert main([str(tmp_path / "0"), str(tmp_path / "1"), "--out", str(tmp_path / "nmi"), "--no-figures",
                 "--select-metric", "nmi"]) == 0
    by_nmi = pd.read_csv(tmp_path / "nmi" / "hdml_table1_cub200_cub200.csv").set_index("row").loc["npair"]
    nmi_epochs = [1 + int(np.argmax(h["test/nmi"][1:])) for h in histories]
    assert by_nmi["best_test_epochs"] == " ".join(map(str, nmi_epochs)) == "2 3"
    assert by_nmi["recall@1_best_test"] == pytest.approx(
        100 * np.mean([h["test/recall@1"][e] for h, e in zip(histories, nmi_epochs)]))
    assert "NMI best-on-test (test-set selection) ¶" in (tmp_path / "nmi" / "report.md").read_text()


def test_runs_without_history_have_no_best_columns(tmp_path):
    write_run(tmp_path / "a", row="npair", selected_on="val", metrics={"recall@1": 0.5})
    result = report([tmp_path], tmp_path / "out", figures=False)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "best-on-test" not in md
    # results.json's best (chosen on val, no history.csv) still gives the best-on-val reading
    assert ours_rows(result)["npair"]["recall@1_best_val"] == pytest.approx(50.0)


# ----------------------------------------------------------------------------------------- html

def assert_html_well_formed_and_linked(index: Path) -> set[str]:
    """Balanced tags (html.parser) and every href/src a file that exists; returns the linked names."""
    from html.parser import HTMLParser

    void = {"meta", "img", "br", "hr", "link", "input"}

    class Checker(HTMLParser):
        def __init__(self):
            super().__init__()
            self.stack, self.links, self.errors = [], [], []

        def handle_starttag(self, tag, attrs):
            if tag not in void:
                self.stack.append(tag)
            self.links += [v for k, v in attrs if k in ("href", "src") and v and not v.startswith("#")]

        def handle_endtag(self, tag):
            if not self.stack or self.stack[-1] != tag:
                self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            else:
                self.stack.pop()

    checker = Checker()
    text = index.read_text(encoding="utf-8")
    checker.feed(text)
    checker.close()
    assert text.startswith("<!DOCTYPE html>") and not checker.errors and not checker.stack, checker.errors
    for link in checker.links:
        assert "://" not in link and not link.startswith("/"), link  # relative: readable without a server
        assert (index.parent / link).is_file(), link
    return {Path(link).name for link in checker.links}


def test_html_page_has_every_table_and_only_existing_links(tmp_path):
    write_run(tmp_path / "a", row="npair", metrics={"recall@1": 0.5}, deviations=["a <b> & c"])
    write_run(tmp_path / "b", table="divide_conquer", row="cub200", embedding_dim=128, backbone="resnet50",
              metrics={"recall@1": 0.6})
    (tmp_path / "c" / ".hydra").mkdir(parents=True)  # a failed job
    result = report([tmp_path], tmp_path / "out", figures=False)
    index = tmp_path / "out" / "index.html"
    linked = assert_html_well_formed_and_linked(index)
    text = index.read_text(encoding="utf-8")
    for t in result["tables"]:
        assert f'id="{t["slug"]}"' in text and f"{t['slug']}.csv" in linked and f"{t['slug']}.tex" in linked
    assert "a &lt;b&gt; &amp; c" in text and "Protocol of our rows" in text and "Failed runs" in text
    assert report([tmp_path], tmp_path / "plain", figures=False, html=False)
    assert not (tmp_path / "plain" / "index.html").exists()


# ----------------------------------------------------------------------------------------- figures

def digits_runs(root: Path, n_runs: int) -> list[Path]:
    """``n_runs`` run directories on the digits test set with class-structured embeddings and a history."""
    from sklearn.datasets import load_digits

    labels = load_digits().target
    test_labels = labels[np.isin(labels, [5, 6, 7, 8, 9])]
    rng = np.random.default_rng(0)
    digits_cfg = {"_target_": "dml_runner.datasets.digits.build", "train_classes": [0, 1, 2, 3, 4],
                  "test_classes": [5, 6, 7, 8, 9], "max_shift": 0, "val_fraction": 0.0, "seed": 0}
    runs = []
    for i in range(n_runs):
        run = write_run(root / str(i), table=None, seed=0, dataset="digits", metrics={"recall@1": 0.9, "nmi": 0.5},
                        extra_cfg={"dataset": digits_cfg, "loss": {"margin": round(0.1 * i, 2)}},
                        overrides=[f"loss.margin={round(0.1 * i, 2)}"],
                        history={"epoch": [0, 1, 2], "test/recall@1": [0.5, 0.8, 0.9], "test/nmi": [0.1, 0.4, 0.5]})
        emb = np.eye(5)[test_labels - 5] + 0.3 * rng.normal(size=(len(test_labels), 5))
        np.savez(run / "embeddings.npz", embeddings=np.hstack([emb, 0.1 * rng.normal(size=(len(emb), 59))])
                 .astype(np.float32), labels=test_labels)
        runs.append(run)
    return runs


def test_retrieval_queries_come_from_different_classes():
    from dml_runner.report.figures import query_per_class

    labels = np.repeat(np.arange(12), 7)
    queries = query_per_class(labels, np.arange(len(labels)), 5, seed=3)
    assert len(queries) == 5 and len(set(labels[queries])) == 5
    assert labels[queries].min() == 0 and labels[queries].max() == 11  # spread over the classes, not the first five
    few = query_per_class(np.array([0, 0, 0, 1, 1]), np.arange(5), 4)
    assert len(set(few)) == 4 and set(np.array([0, 0, 0, 1, 1])[few]) == {0, 1}  # round-robin, no repeats


def test_tsne_keeps_neighbourhoods():
    """Classes keep their neighbourhoods in 2-D about as well as in the input space; labels that do not follow the
    input (shuffled) get chance agreement."""
    from dml_runner.plots import tsne_2d

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 40)
    x = rng.normal(size=(240, 32)) + 4 * np.eye(32)[labels]
    def knn_agreement(y, lab):
        d = ((y[:, None] - y[None]) ** 2).sum(-1)
        np.fill_diagonal(d, np.inf)
        return (lab[np.argsort(d, 1)[:, :5]] == lab[:, None]).mean()
    y = tsne_2d(x)
    assert y.shape == (240, 2) and np.isfinite(y).all()
    assert knn_agreement(y, labels) > knn_agreement(x, labels) - 0.05 > 0.8
    assert knn_agreement(y, rng.permutation(labels)) < 0.35


@pytest.mark.slow
def test_figures_for_ten_rows_titled_by_row_and_fast(tmp_path):
    import time

    from dml_runner.report.figures import write_figures

    digits_runs(tmp_path / "sweep", 10)
    result = report([tmp_path / "sweep"], tmp_path / "out", figures=False)
    (table,) = result["tables"]
    start = time.perf_counter()
    figures = write_figures(table, tmp_path / "out")
    elapsed = time.perf_counter() - start
    names = {Path(f).name for f, _ in figures}
    rows = [e["row"] for e in table["rows"]]
    assert rows[1] == "margin=0.1" and len(rows) == 10
    assert "runs_digits_curves.png" in names and "runs_digits_tsne.png" in names
    assert {f"runs_digits_{r}_retrieval.png" for r in rows} <= names  # one grid per row, named by the row
    assert all(Path(f).stat().st_size > 1000 for f, _ in figures)
    # the budget is 10 s on a free core; this machine's tests share 2 cores with other jobs
    assert elapsed < 30, f"figures of 10 small runs took {elapsed:.1f} s"


def test_a_retrieval_grid_without_a_readable_results_json_is_skipped_with_the_reason(tmp_path, caplog):
    from dml_runner.report.figures import retrieval_grid

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "embeddings.npz", embeddings=rng.normal(size=(20, 4)), labels=np.arange(20) % 4)
    with caplog.at_level("WARNING"):
        assert retrieval_grid(tmp_path, tmp_path / "grid.png") is None
    assert "no results.json" in caplog.text
    (tmp_path / "results.json").write_text("{not json")
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert retrieval_grid(tmp_path, tmp_path / "grid.png") is None
    assert "unreadable results.json" in caplog.text and not (tmp_path / "grid.png").exists()


def test_settings_flagged_neutral_in_the_schema_never_split_a_row():
    """Where files live and how fast a run goes (config.NEUTRAL fields) cannot change a number; the seed is a
    repeat; a learning rate is a recipe."""
    from dml_runner.report.collect import recipe_config

    def res(**over):
        cfg = {"trainer": {"seed": 0, "num_workers": 0, "batch_size": 32}, "optimizer": {"lr": 0.1},
               "paths": {"output_dir": "outputs", "data_dir": "data"}}
        for key, value in over.items():
            group, leaf = key.split("__")
            cfg[group] = {**cfg[group], leaf: value}
        return {"config": cfg, "choices": {"loss": "triplet"}}

    base = recipe_config(res())
    assert recipe_config(res(paths__output_dir="/scratch/o", paths__data_dir="/d", trainer__num_workers=8,
                             trainer__seed=3)) == base
    assert recipe_config(res(optimizer__lr=0.01)) != base
    assert recipe_config(res(trainer__batch_size=64)) != base


def test_a_second_report_into_the_same_folder_leaves_no_stale_files(tmp_path, capsys):
    """Guards dml-report into one --out folder: the PNGs and tables of an earlier report whose rows are gone stayed
    behind; now a report removes the files the previous one wrote and it does not, and never a file of the user's."""
    out = tmp_path / "report"
    a = write_run(tmp_path / "a" / "r0", table=None, row="triplet", overrides=["loss=triplet"],
                  metrics={"recall@1": 0.5})
    b = write_run(tmp_path / "b" / "r0", table=None, row="contrastive", overrides=["loss=contrastive"],
                  choices={"loss": "contrastive"}, metrics={"recall@1": 0.6})
    assert main([str(a), "--out", str(out), "--no-figures"]) == 0
    first = {p.name for p in out.iterdir()}
    (out / "mine.png").write_bytes(b"user file")
    stale = out / "old_rows.png"
    stale.write_bytes(b"png")
    (out / ".dml-report-files").write_text((out / ".dml-report-files").read_text() + "old_rows.png\n")
    assert main([str(b), "--out", str(out), "--no-figures"]) == 0
    assert "removed 1 file(s)" in capsys.readouterr().out
    assert not stale.exists() and (out / "mine.png").read_bytes() == b"user file"
    assert first - {"old_rows.png"} <= {p.name for p in out.iterdir()}


def _drawn_figures(monkeypatch) -> list:
    """The matplotlib figures the plotting code closes (kept open for inspection)."""
    import matplotlib.pyplot as plt

    figures: list = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    return figures


def _text_boxes(fig) -> list:
    """The figure's titles, axis labels and legend entries with their extents in pixels (tick labels left out:
    matplotlib keeps undrawn ones for ticks outside the view)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [fig._suptitle] if fig._suptitle is not None else []
    for legend in fig.legends:
        texts += list(legend.get_texts())
    for ax in fig.axes:
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label]
        if ax.get_legend() is not None:
            texts += list(ax.get_legend().get_texts())
    return [(t, t.get_window_extent(renderer)) for t in texts if t.get_visible() and t.get_text()]


LONG = ("loss=hdml_npair method=hdml trainer.epochs=10 trainer.batch_size=20 optimizer.lr=0.0003 "
        "loss.pulling_factor={} loss.softmax_factor=50 sampler.samples_per_class=2")


def test_long_row_names_stay_inside_their_figures(tmp_path, monkeypatch):
    """Guards figures with long row names: the curve legends were clipped at the figure's edge and the t-SNE panel
    titles overlapped one another. Every text (legend entry, title) must lie inside the saved figure, and no two
    panel titles may overlap."""
    import matplotlib.transforms as mtransforms

    from dml_runner.plots import plot_curves_by_group, plot_tsne_panels

    rng = np.random.default_rng(0)
    history = pd.DataFrame({"epoch": [0, 1, 2], "test/recall@1": [0.3, 0.5, 0.6], "test/nmi": [0.1, 0.2, 0.3]})
    names = [LONG.format(p) for p in (0, 30, 60, 90)]
    figures = _drawn_figures(monkeypatch)
    plot_curves_by_group({n: [history] for n in names}, tmp_path / "curves.png", metrics=("recall@1", "nmi"),
                         title="runs / digits: " + names[0])
    labels = np.repeat(np.arange(5), 12)
    panels = [(n, rng.normal(size=(60, 8)).astype(np.float32), labels) for n in names]
    plot_tsne_panels(panels, tmp_path / "tsne.png", max_points=60)
    assert len(figures) == 2
    from PIL import Image

    for fig, png in zip(figures, ("curves.png", "tsne.png")):
        boxes = [box for _, box in _text_boxes(fig)]
        union = mtransforms.Bbox.union(boxes)  # every title, label and legend entry, in pixels at fig.dpi
        with Image.open(tmp_path / png) as img:
            width, height = img.size
        scale = round(img.info["dpi"][0]) / fig.dpi  # the PNG's resolution over the figure's
        # the PNG holds all of it: nothing was cut at the figure's edge (2 px of rounding allowed)
        assert union.width * scale <= width + 2 and union.height * scale <= height + 2, (png, union, img.size)
    titles = [box for ax in figures[1].axes if ax.get_title() for box in [ax.title.get_window_extent()]]
    assert len(titles) == 4
    for i, a in enumerate(titles):
        for b in titles[i + 1:]:
            assert not a.overlaps(b)


def test_row_names_hold_what_differs_and_never_an_automatic_preset(tmp_path):
    """Guards row names that listed a preset choice Hydra records even when no such file exists
    (preset_method=digits_hdml): the automatic presets never name a row; the names hold what differs."""
    for loss, method in (("triplet", "standard"), ("hdml_npair", "hdml")):
        write_run(tmp_path / loss, table=None, row=loss, dataset="digits", metrics={"recall@1": 0.5},
                  overrides=[f"loss={loss}"], choices={"loss": loss, "method": method,
                                                       "preset_method": f"digits_{method}",
                                                       "preset_trainer": "digits_default"})
    result = report([tmp_path], tmp_path / "out", figures=False)
    rows = sorted(r["row"] for r in result["tables"][0]["rows"])
    assert rows == ["loss=hdml_npair method=hdml", "loss=triplet method=standard"]
