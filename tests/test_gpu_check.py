"""scripts/gpu_check.py: its CPU dry run goes through the same checks (training through the project's own run,
every evaluation backend against the certified CPU result, torchrun); a difference between devices fails its row, a
check that raises or cannot run (faiss missing) is its own row and the others stand. The offline path
(scripts/wheelhouse.py --from-installed, scripts/gpu_check.sh) runs end to end in a fresh interpreter environment
that has torch and its neighbours but not hydra, omegaconf, antlr4, faiss or pytorch-metric-learning."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
# what an offline GPU node's Python lacks (and this checkout's own install, which the node does not have either)
NODE_LACKS = ("hydra", "omegaconf", "antlr4", "pytorch_metric_learning", "faiss", "dml_runner", "__editable__")


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(out_dir: Path) -> list[dict]:
    return json.loads((out_dir / "gpu_check.json").read_text())["rows"]


@pytest.mark.slow  # trains 4 + 8 small runs for 2 x 2 steps, evaluates, and starts two torchrun jobs (2-5 minutes)
def test_dry_run_passes_every_check(gpu_check, tmp_path, capsys):
    out = tmp_path / "out"
    assert gpu_check.main(["--dry-run", "--train", "googlenet", "resnet18", "hdml", "hdml_cache", "--out",
                           str(out)]) == 0
    rows = _rows(out)
    sections = [r["section"] for r in rows]
    assert sections.count("eval") == 5 and sections.count("kmeans") == 3  # certified reference + 4 backends
    assert sections.count("train") == 4 and sections.count("torchrun") == 2
    assert all(r["ok"] for r in rows)
    train = {r["what"].split(",")[0]: r for r in rows if r["section"] == "train"}
    assert "transform_input" in train["googlenet"]["what"] and "img/s" in train["googlenet"]["result"]
    assert "HDML N-pair on cached features" in train and "HDML N-pair" in train
    evals = [r for r in rows if r["section"] == "eval"][1:]
    assert all(r["differing_queries"] == 0 for r in evals if r["what"].startswith(("torch_screened",
                                                                                    "torch_symmetric")))
    # the paper rows' backbone / transform / crop, each trained with the decoded cache and without it
    paper = [r for r in rows if r["section"] == "paper"]
    assert paper[0]["what"].startswith("rows of make reproduce-*") and "52 rows in 7 targets" in paper[0]["result"]
    measured = paper[1:]
    found = {r["combo"] for r in measured}
    assert {"googlenet caffe_227 227px", "googlenet lifted_227 227px", "resnet50 rrc_224 224px"} <= found
    assert any(c.startswith("vit_small_patch16_224") and c.endswith("timm 224px") for c in found)
    assert sorted((r["combo"], r["cache"]) for r in measured) == sorted((c, m) for c in found for m in ("auto", "none"))
    for r in measured:
        assert r["images_per_s"] > 0 and r["data_time_s"] >= 0 and r["step_time_s"] > 0, r
        assert "img/s" in r["result"] and "data " in r["result"] and "step " in r["result"]
    by = {(r["combo"], r["cache"]): r["result"] for r in measured}
    assert "train split cached" in by[("googlenet caffe_227 227px", "auto")]  # an exact prefix: the 256 warp
    assert "train split not cached (cache off)" in by[("googlenet caffe_227 227px", "none")]
    assert "first step is random" in by[("resnet50 rrc_224 224px", "auto")]
    # the estimate: one line per make reproduce-* target, a positive finite time from the cached rows' rates
    estimate = json.loads((out / "gpu_check.json").read_text())["estimate"]
    targets = ["reproduce-table1", "reproduce-table2", "reproduce-table3", "reproduce-lifted", "reproduce-dc",
               "reproduce-mdl", "reproduce-modern"]
    assert [e["target"] for e in estimate] == targets
    assert all(e["seconds"] is not None and 0 < e["seconds"] < float("inf") and not e["missing"] for e in estimate)
    table = (out / "gpu_check.md").read_text()
    # header, rule, one line per check; then the estimate's header, rule and one line per target
    assert table.count("\n| ") == len(rows) + 2 + 2 + len(targets) and "| ok |" in table
    assert all(sum(line.startswith(f"| {t} |") for line in table.splitlines()) == 1 for t in targets)
    printed = capsys.readouterr().out
    assert "generated weights" in printed and "torchrun" in printed and "| ok" in printed
    assert "Estimated time per make reproduce-* target" in printed and "evaluation" in printed
    assert all(f"| {t} |" in printed for t in targets)


def _skew_torch_fp32(gpu_check, monkeypatch):
    """The 'GPU' side (the CPU in a dry run) of torch_fp32 returns other ranks for 3 queries."""
    real = gpu_check.backend_stats

    def skewed(backend, *args, **kwargs):
        stats = real(backend, *args, **kwargs)
        if backend == "torch_fp32":
            stats.first_rank[:3] += 1
        return stats

    monkeypatch.setattr(gpu_check, "backend_stats", skewed)


def test_a_device_difference_fails_its_row(gpu_check, tmp_path, monkeypatch, capsys):
    _skew_torch_fp32(gpu_check, monkeypatch)
    out = tmp_path / "out"
    code = gpu_check.main(["--dry-run", "--skip", "train", "kmeans", "paper", "torchrun", "--n-eval", "300", "--out",
                           str(out)])
    by = {r["what"].split(" ")[0]: r for r in _rows(out) if r["section"] == "eval"}
    assert code == 1 and not by["torch_fp32"]["ok"] and by["torch_fp32"]["differing_queries"] == 3
    assert by["torch_screened"]["ok"] and by["torch_symmetric"]["ok"] and by["faiss"]["status"] in ("ok", "skipped")
    assert "FAIL" in capsys.readouterr().out


def test_missing_faiss_and_a_failing_check_keep_every_other_row(gpu_check, tmp_path, monkeypatch, capsys):
    """faiss missing: its rows are skipped, saying so, and do not fail the run; a check that raises is one FAILED
    row; the rows before and after it stand (each is written as soon as it is measured)."""
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError, find_spec finds nothing
    real = gpu_check.check_kmeans

    def broken(backend, precision, *args):
        if precision == "bf16":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(backend, precision, *args)

    monkeypatch.setattr(gpu_check, "check_kmeans", broken)
    out = tmp_path / "out"
    code = gpu_check.main(["--dry-run", "--skip", "train", "paper", "torchrun", "--n-eval", "300", "--out", str(out)])
    rows = _rows(out)
    status = {(r["section"], r["what"].split(" ")[0], r["what"].split(" ")[1] if " " in r["what"] else ""): r
              for r in rows}
    assert status[("eval", "faiss", "")]["status"] == "skipped"
    assert "faiss is not installed" in status[("eval", "faiss", "")]["result"]
    assert status[("kmeans", "faiss", "fp32")]["status"] == "skipped"
    assert status[("kmeans", "torch", "bf16")]["status"] == "FAIL"
    assert "illegal memory access" in status[("kmeans", "torch", "bf16")]["result"]
    assert [r["status"] for r in rows if r["section"] == "eval"][:4] == ["ok"] * 4
    assert any(r["what"].startswith("torch fp32") and r["ok"] for r in rows)
    assert code == 1  # the failed row, not the skipped ones
    assert "no faiss" in capsys.readouterr().out


def test_spent_time_budget_skips_the_remaining_checks(gpu_check, tmp_path):
    out = tmp_path / "out"
    assert gpu_check.main(["--dry-run", "--skip", "train", "torchrun", "--n-eval", "200", "--budget-s", "0",
                           "--out", str(out)]) == 0
    rows = _rows(out)
    assert rows and all(r["status"] == "skipped" and "time budget" in r["result"] for r in rows)


def test_no_gpu_without_dry_run_is_a_clear_error(gpu_check, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu_check.main([]) == 2
    assert "--dry-run" in capsys.readouterr().err


def test_the_script_finds_the_checkout_without_an_install(tmp_path):
    """Run as a file with a bare interpreter environment (no dml_runner installed): it puts the checkout on sys.path
    itself before importing anything of the project."""
    env = _node_environment(tmp_path)
    p = subprocess.run([str(env), str(SCRIPT), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 0 and "--dry-run" in p.stdout, p.stderr[-2000:]
    p = subprocess.run([str(env), "-c", "import dml_runner"], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120)
    assert p.returncode != 0  # nothing else would have found it


def _node_environment(tmp_path: Path) -> Path:
    """A fresh virtual environment that sees this interpreter's site-packages except NODE_LACKS (and every .pth
    file, such as an editable install's finder): the Python of an offline GPU node. Returns its interpreter."""
    site = tmp_path / "node_site"
    site.mkdir()
    dirs = [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]
    for d in dirs:
        for entry in os.scandir(d):
            name = entry.name.lower().replace("-", "_")
            if name.startswith(NODE_LACKS) or name.endswith((".pth", ".egg-link")) or (site / entry.name).exists():
                continue
            (site / entry.name).symlink_to(entry.path)
    venv = tmp_path / "node_venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site_packages = next((venv / "lib").glob("python3*/site-packages"))
    (site_packages / "node_packages.pth").write_text(f"{site}\n")
    return venv / "bin" / "python"


@pytest.mark.slow  # builds the wheelhouse, installs it offline and runs a dry run end to end (1-2 minutes)
def test_offline_node_path_end_to_end(tmp_path):
    """What an offline node does: the wheelhouse (here packed from this environment's installed copies, no network)
    installed with pip --no-index into an empty temporary target by scripts/gpu_check.sh, then the dry run with the
    environment's own torch; the table lands as JSON and Markdown in the folder given."""
    python = _node_environment(tmp_path)
    probe = subprocess.run([str(python), "-c", "import torch, torchvision, timm, PIL, yaml\n"
                            "import importlib.util as u\n"
                            "print([m for m in ('hydra', 'omegaconf', 'antlr4', 'faiss', 'dml_runner') "
                            "if u.find_spec(m)])"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert probe.returncode == 0 and probe.stdout.strip() == "[]", probe.stderr[-2000:]

    wheelhouse = tmp_path / "wheelhouse"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "wheelhouse.py"), str(wheelhouse), "--from-installed"],
                   check=True, capture_output=True, timeout=300)
    wheels = sorted(p.name.split("-")[0] for p in wheelhouse.glob("*.whl"))
    assert wheels == ["antlr4_python3_runtime", "hydra_core", "omegaconf", "pytorch_metric_learning"]

    out = tmp_path / "table"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env.update(PYTHON=str(python), WHEELHOUSE=str(wheelhouse), PIP_NO_INDEX="1", OMP_NUM_THREADS="1",
               TMPDIR=str(scratch))
    p = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out), "--dry-run", "--train", "resnet18",
                        "dc", "--skip", "paper", "--n-eval", "300"], capture_output=True, text=True, cwd=tmp_path,
                       env=env, timeout=900)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    data = json.loads((out / "gpu_check.json").read_text())
    rows = data["rows"]
    assert str(ROOT / "dml_runner") in data["header"] and "no faiss" in data["header"]
    assert [r["section"] for r in rows].count("train") == 2 and [r["section"] for r in rows].count("torchrun") == 2
    assert all(r["ok"] for r in rows)
    skipped = [r["what"] for r in rows if r["status"] == "skipped"]
    assert skipped == ["faiss", "faiss fp32"]  # the node has no faiss: said, not failed
    assert "faiss is not installed, so the clusterings use dml-runner's torch k-means" in p.stdout + p.stderr
    assert (out / "gpu_check.md").read_text().startswith("# dml-runner GPU check")
    assert not list(scratch.glob("dml-gpu-check.*"))  # the temporary install target is removed afterwards


def test_the_reproduce_plan_counts_official_steps(gpu_check):
    """A row's images per seed: epochs x (the dataset's official training images // batch) x batch, composed as
    scripts/reproduce.py composes it; the HDML CUB rows' own comment states 45 steps of 128 (5864 // 128)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import reproduce

    cfgs, broken = reproduce.resolve_rows(["hdml/table1_cub200/npair", "dc/cub200"], [])
    assert not broken
    npair = gpu_check.plan_row("hdml/table1_cub200/npair", cfgs["hdml/table1_cub200/npair"])
    assert (npair["combo"], npair["batch"], npair["epochs"]) == ("googlenet caffe_227 227px", 128, 178)
    assert npair["steps_per_epoch"] == 45 and npair["images"] == 178 * 45 * 128
    assert "transform.train.resize_mode=warp_cv2" in npair["overrides"]  # the row's own transform settings
    dc = gpu_check.plan_row("dc/cub200", cfgs["dc/cub200"])
    assert dc["combo"] == "resnet50 rrc_224 224px" and dc["steps_per_epoch"] == 5864 // 80


def test_the_estimate_divides_images_by_the_cached_rate(gpu_check):
    plan = {"a": [dict(combo="x", images=1000), dict(combo="y", images=500)], "b": [dict(combo="z", images=10)]}
    rows = [gpu_check.row("paper", "x auto", "", combo="x", cache="auto", images_per_s=100.0),
            gpu_check.row("paper", "x none", "", combo="x", cache="none", images_per_s=10.0),
            gpu_check.row("paper", "y auto", "", combo="y", cache="auto", images_per_s=50.0)]
    est = {e["target"]: e for e in gpu_check.estimate(plan, rows, seeds=3)}
    assert est["reproduce-a"]["seconds"] == pytest.approx(3 * (1000 / 100 + 500 / 50))  # the cached rate, x seeds
    assert est["reproduce-a"]["images_per_seed"] == 1500 and est["reproduce-b"]["seconds"] is None
    assert est["reproduce-b"]["missing"] == ["z"]
    lines = gpu_check.estimate_lines(list(est.values()), "a GPU")
    assert len(lines) == 3 + 2 and "| reproduce-b | 1 | 10 | not measured |" in lines[-1]
