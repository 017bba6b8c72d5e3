"""MLflow with sweeps and dml-report: the copies MLflow keeps are not runs, a sweep has one store, the UI starts."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, run_dml
from test_report import write_run


def test_a_trackers_copy_of_results_json_is_not_a_run(tmp_path):
    """Guards dml-report on a logger=mlflow run: MLflow's artifact copy of results.json (inside the run's mlruns/)
    once counted as a second run with the same seed ("holds seed 0 twice")."""
    from dml_runner.report.collect import find_runs

    run = write_run(tmp_path / "runs" / "a", metrics={"recall@1": 0.5})
    copy = run / "mlruns" / "artifacts" / "0123abcd" / "artifacts"
    copy.mkdir(parents=True)
    shutil.copy(run / "results.json", copy / "results.json")
    sweep_store = tmp_path / "runs" / "mlruns" / "artifacts" / "4567" / "artifacts"  # a sweep's shared store
    sweep_store.mkdir(parents=True)
    shutil.copy(run / "results.json", sweep_store / "results.json")
    records = find_runs([tmp_path / "runs"])
    assert [Path(r["dir"]) for r in records] == [run.resolve()]


def test_a_logger_mlflow_sweep_logs_to_one_store_and_reports(tmp_path):
    """Guards two things of a real `dml-run -m ... logger=mlflow` sweep: its jobs share the sweep directory's MLflow
    store (one UI compares them; each job once had its own database), and dml-report reads the sweep."""
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    sweep = tmp_path / "sweep"
    run_dml(["-m", "trainer=smoke", "logger=mlflow", "trainer.seed=0,1", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert not (sweep / "0" / "mlruns").exists() and not (sweep / "1" / "mlruns").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{sweep / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("dml-runner")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(Path(r.data.tags["dml_runner.run_dir"]).name for r in runs) == ["0", "1"]
    assert all(r.info.status == "FINISHED" for r in runs)

    proc = subprocess.run([str(Path(sys.executable).with_name("dml-report")), str(sweep), "--out",
                           str(tmp_path / "report"), "--no-figures"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    from dml_runner.report.collect import find_runs

    assert sorted(Path(r["dir"]).name for r in find_runs([sweep])) == ["0", "1"]


def test_the_mlflow_extra_installs_the_ui():
    """Guards `pip install dml-runner[mlflow]` giving a working `mlflow ui`: mlflow-skinny has no flask and no web
    page, so the extra must name the full package."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = [req.split(">")[0].split("=")[0].split("[")[0].strip() for req in extras["mlflow"]]
    assert "mlflow" in names and "mlflow-skinny" not in names


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_mlflow_ui_starts_on_a_run_store(tmp_path):
    """Guards docs/LOGGING.md's `mlflow ui --backend-store-uri sqlite:///...`: the installed MLflow serves its page.
    Skipped where only mlflow-skinny is installed (no web page to serve; the extra installs the full package)."""
    mlflow = pytest.importorskip("mlflow")
    if not (Path(mlflow.__file__).parent / "server" / "js" / "build" / "index.html").is_file():
        pytest.skip("mlflow-skinny: no UI installed (pip install dml-runner[mlflow] installs it)")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
                             f"sqlite:///{tmp_path / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        page = ""
        deadline = time.monotonic() + 120  # bounded wait for the server to come up, not a timing assertion
        while time.monotonic() < deadline and proc.poll() is None and not page:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
            except OSError:
                time.sleep(1)
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert "<html" in page.lower() and "not found" not in page
    finally:
        proc.terminate()
        proc.wait(timeout=30)
