"""dml-report on synthetic run directories with known numbers: mean/std/delta, fingerprints, failed runs, marks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dml_runner.reference import load_reference, reference_tables
from dml_runner.report import main, report


def write_run(run_dir: Path, *, table: str | None = "hdml_table1_cub200", row: str = "npair", seed: int = 0,
              metrics: dict | None = None, dataset: str = "cub200", embedding_dim: int = 512,
              backbone: str = "googlenet", status: str = "completed", deviations=(), note: str = "",
              selected_on: str = "test", batch: int = 128, sampler: str = "npair", extra_cfg: dict | None = None,
              overrides=None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ".hydra").mkdir(exist_ok=True)
    cfg = {"trainer": {"seed": seed, "batch_size": batch}, "backbone": {"arch": backbone, "embedding_dim": embedding_dim,
                                                                        "pretrained": True, "freeze": "none"},
           "sampler": {}, "transform": {"name": "caffe_227"}, "dataset": {}, "tags": []}
    if table:
        cfg["reference"] = {"paper": table.split("_")[0], "table": table, "row": row,
                            "deviations": list(deviations), "note": note}
    cfg.update(extra_cfg or {})
    res = {"status": status, "config": cfg, "choices": {"sampler": sampler, "loss": row},
           "overrides": overrides if overrides is not None else [f"trainer.seed={seed}"]}
    if status == "completed":
        res.update({"metrics": metrics or {}, "best": {"epoch": 1, "split": selected_on, "test_metrics": metrics or {}},
                    "checkpoint_selected_on": selected_on,
                    "dataset": {"name": dataset, "recall_at": [1, 2, 4, 8], "info": {"transform": "caffe_227"}},
                    "model": {"arch": backbone, "pretrained": True, "embedding_dim": embedding_dim, "freeze": "none"}})
    else:
        res["error"] = "RuntimeError: boom"
    (run_dir / "results.json").write_text(json.dumps(res))
    return run_dir


def read_table(out: Path, slug: str) -> pd.DataFrame:
    return pd.read_csv(out / f"{slug}.csv")


# ----------------------------------------------------------------------------------------- reference data

def test_reference_tables_hold_the_methods_md_numbers():
    assert set(reference_tables()) == {"hdml_table1_cub200", "hdml_table2_cars196", "hdml_table3_sop",
                                       "lifted_structure", "divide_conquer", "mdl"}
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
    assert ("cub200", "nmi") in unverified and ("inshop", "recall@40") in unverified
    assert ("vehicleid_large", "recall@5") in unverified and ("cub200", "recall@1") not in unverified
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
    assert "N-pair [npair] ‡" in md and "deviates from the paper's protocol: torchvision GoogLeNet" in md
    tex = (tmp_path / "out" / f"{result['tables'][0]['slug']}.tex").read_text()
    assert r"\begin{tabular}" in tex and r"$^\ddagger$" in tex and "daml\\_npair" in tex


def test_unverified_paper_numbers_get_a_dagger(tmp_path):
    write_run(tmp_path / "dc", table="divide_conquer", row="cub200", embedding_dim=128, backbone="resnet50",
              metrics={"recall@1": 0.6, "nmi": 0.65})
    result = report([tmp_path / "dc"], tmp_path / "out", figures=False)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "69.6 †" in md and "65.9 †" not in md
    assert "unverified published number" in md
    frame = read_table(tmp_path / "out", result["tables"][0]["slug"])
    row = frame[frame["row"] == "cub200"].iloc[0]
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
    write_run(tmp_path / "r1", row="triplet", metrics={"recall@1": 0.4}, selected_on="val", batch=120,
              sampler="class_balanced")
    assert main([str(tmp_path), "--out", str(tmp_path / "out"), "--no-figures"]) == 1
    err = capsys.readouterr().err
    assert "different protocols" in err and "selected_on" in err and "batch" in err
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


# ----------------------------------------------------------------------------------------- figures

@pytest.mark.slow
def test_figures_curves_tsne_and_retrieval_grid_from_digits(tmp_path):
    from sklearn.datasets import load_digits

    labels = load_digits().target
    test_labels = labels[np.isin(labels, [5, 6, 7, 8, 9])]
    rng = np.random.default_rng(0)
    digits_cfg = {"_target_": "dml_runner.datasets.digits.build", "train_classes": [0, 1, 2, 3, 4],
                  "test_classes": [5, 6, 7, 8, 9], "max_shift": 0, "val_fraction": 0.0, "seed": 0}
    for seed in (0, 1):
        run = write_run(tmp_path / "sweep" / str(seed), table=None, row="x", seed=seed, dataset="digits",
                        metrics={"recall@1": 0.9, "nmi": 0.5}, extra_cfg={"dataset": digits_cfg})
        emb = np.eye(5)[test_labels - 5] + 0.3 * rng.normal(size=(len(test_labels), 5))
        np.savez(run / "embeddings.npz", embeddings=emb.astype(np.float32), labels=test_labels)
        pd.DataFrame({"epoch": [0, 1, 2], "test/recall@1": [0.5, 0.8, 0.9], "test/nmi": [0.1, 0.4, 0.5]}) \
            .to_csv(run / "history.csv", index=False)
    result = report([tmp_path / "sweep"], tmp_path / "out", tsne_points=150)
    names = {Path(f).name for f in result["files"]}
    assert "runs_digits_curves.png" in names
    assert any(n.endswith("_tsne.png") for n in names) and any(n.endswith("_retrieval.png") for n in names)
    for f in result["files"]:
        if str(f).endswith(".png"):
            assert Path(f).stat().st_size > 1000
