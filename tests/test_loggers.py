"""The logger group: history.csv (every run), several trackers at once, MLflow's local store and W&B's offline mode.

The end-to-end run trains digits with `logger=[csv,mlflow,wandb]` through the installed dml-run and reads the
trackers back with their own readers: MLflow's client on the run directory's store, and W&B's record protobuf on the
offline run file (W&B ships no Python reader for it; the framing is LevelDB's log format). W&B runs offline with its
cache, config and data directories in the test's temporary directory: nothing touches the network or the home folder.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import dml_run_cmd

from dml_runner import DMLRunnerError
from dml_runner.loggers import CSVLogger, LoggerSet, build_loggers, flatten, mlflow_key


@pytest.fixture
def tracker_env(tmp_path, monkeypatch) -> dict[str, str]:
    """W&B offline, its files under tmp_path; returned as the environment for a dml-run subprocess too."""
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb_dir"),
           "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"), "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
           "WANDB_DATA_DIR": str(tmp_path / "wandb_data"), "WANDB_SILENT": "true"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return {**os.environ, **env}


# ----------------------------------------------------------------------------------------------- config group
def test_logger_choices_compose_to_a_mapping_of_loggers(compose_cfg):
    assert list(compose_cfg().logger) == ["csv"]  # the default
    both = compose_cfg("logger=[csv,mlflow]", "logger.mlflow.experiment_name=mine")
    assert list(both.logger) == ["csv", "mlflow"] and both.logger.mlflow.experiment_name == "mine"
    assert both.logger.mlflow.tracking_uri is None  # the store inside the run directory
    assert list(compose_cfg("logger=wandb").logger) == ["wandb"]
    assert compose_cfg("logger=wandb").logger.wandb.mode == "offline"
    assert list(compose_cfg("logger=tensorboard").logger) == ["tensorboard"]
    assert "logger" not in compose_cfg("logger=[]") and "logger" not in compose_cfg("~logger")


def test_a_misspelt_logger_option_is_refused_with_the_known_ones(compose_cfg):
    from dml_runner.config import validate_config

    validate_config(compose_cfg("logger=[csv,mlflow,wandb]"))
    with pytest.raises(DMLRunnerError, match=r"logger\.mlflow\.experiment: .*experiment_name"):
        validate_config(compose_cfg("logger=mlflow", "+logger.mlflow.experiment=x"))


def test_csv_builds_no_second_writer_and_no_loggers_build_an_empty_set(compose_cfg, tmp_path):
    loggers = build_loggers(compose_cfg("logger=csv").logger, tmp_path, {"a": 1})
    assert isinstance(loggers, LoggerSet) and not loggers.loggers
    loggers.log_metrics(0, {"x": 1.0})
    loggers.finish({"metrics": {}}, out_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # history.csv is the trainer's; nothing else is written
    assert not build_loggers(compose_cfg("logger=[]").get("logger"), tmp_path).loggers


# ----------------------------------------------------------------------------------------------- history.csv
def test_history_csv_keeps_every_column_and_value_and_rewrites_on_resume(tmp_path):
    history = CSVLogger(tmp_path)
    history.log_metrics(0, {"epoch": 0, "train_loss": float("nan"), "test/recall@1": 0.5, "phase": "divide"})
    history.log_metrics(1, {"epoch": 1, "train_loss": 0.25, "test/recall@1": 0.75, "lr": 1e-4})  # a new column
    frame = pd.read_csv(tmp_path / "history.csv")
    assert frame.columns.tolist() == ["epoch", "train_loss", "test/recall@1", "phase", "lr"]
    assert frame["epoch"].tolist() == [0, 1] and frame.loc[0, "phase"] == "divide"
    assert pd.isna(frame.loc[0, "lr"]) and frame.loc[1, "lr"] == 1e-4
    history.log_metrics(7, {"loss": 1.0})  # a row without its own epoch takes the step
    assert pd.read_csv(tmp_path / "history.csv")["epoch"].tolist() == [0, 1, 7]
    history.write_rows([{"epoch": 0, "test/recall@1": 0.5}])  # a resumed run starts from its checkpoint's rows
    assert pd.read_csv(tmp_path / "history.csv").to_dict("records") == [{"epoch": 0, "test/recall@1": 0.5}]
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "metrics.csv").exists()
    history.close()
    with pytest.raises(RuntimeError):
        history.log_metrics(2, {"x": 1.0})


def test_params_are_the_flattened_config_and_metric_names_suit_mlflow():
    assert flatten({"trainer": {"epochs": 2, "amp": True}, "eval": {"recall_at": [1, 2]}, "tags": [], "x": {}}) == \
        {"trainer.epochs": 2, "trainer.amp": True, "eval.recall_at": "[1, 2]", "tags": "[]", "x": "{}"}
    assert mlflow_key("test/recall@1") == "test/recall_at_1" and mlflow_key("map@r") == "map_at_r"
    assert mlflow_key("val/nmi") == "val/nmi"


def test_resume_the_trackers_and_the_report_flatten_a_config_alike():
    from dml_runner.report.collect import recipe_config
    from dml_runner.rundir import config_mismatches, flatten_config

    cfg = {"trainer": {"epochs": 2, "lr": [1, 2]}, "aug": {}, "x": {"y": {"z": None}}}
    keys = {"trainer.epochs", "trainer.lr", "aug", "x.y.z"}
    assert flatten_config(cfg) == {"trainer.epochs": 2, "trainer.lr": [1, 2], "aug": {}, "x.y.z": None}
    assert set(flatten(cfg)) == keys and set(recipe_config({"config": cfg})) == keys
    assert recipe_config({"config": cfg})["trainer.lr"] == (1, 2) and flatten(cfg)["trainer.lr"] == "[1, 2]"
    changed = {**cfg, "x": {"y": {"z": 3}}}
    assert config_mismatches(cfg, changed, free=()) == ["x.y.z: None -> 3"]


# ----------------------------------------------------------------------------------------------- missing packages
@pytest.mark.parametrize("name", ["mlflow", "wandb"])
def test_a_missing_tracker_package_names_the_extra_to_install(compose_cfg, tmp_path, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # `import <name>` raises ImportError
    with pytest.raises(DMLRunnerError) as err:
        build_loggers(compose_cfg(f"logger=[csv,{name}]").logger, tmp_path, {})
    assert str(err.value).startswith(f"logger={name} needs {name}: pip install dml-runner[{name}]")
    assert "\n" not in str(err.value) and not list(tmp_path.iterdir())


def test_the_default_mlflow_store_says_what_a_skinny_install_lacks(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "alembic", None)  # find_spec("alembic") is None: not installed
    with pytest.raises(DMLRunnerError, match=r"\(SQLite\) needs alembic: pip install sqlalchemy alembic"):
        build_loggers(compose_cfg("logger=mlflow").logger, tmp_path, {})


def test_tensorboard_writes_or_says_how_to_install(compose_cfg, tmp_path):
    import importlib.util

    node = compose_cfg("logger=tensorboard").logger
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(DMLRunnerError, match="logger=tensorboard needs tensorboard: pip install tensorboard"):
            build_loggers(node, tmp_path, {})
        return
    loggers = build_loggers(node, tmp_path, {"trainer": {"epochs": 1}})
    loggers.log_metrics(1, {"test/recall@1": 0.5, "note": "skipped"})
    loggers.finish({"metrics": {"recall@1": 0.5}, "final_epoch": 1}, out_dir=tmp_path)
    assert any((tmp_path / "tensorboard").iterdir())


@pytest.mark.slow
def test_dml_run_stops_before_training_when_the_tracker_package_is_missing(tmp_path, tracker_env):
    """The path a user runs: `dml-run logger=[csv,mlflow]` without mlflow installed (an import that fails)."""
    stub = tmp_path / "stub"
    (stub / "mlflow").mkdir(parents=True)
    (stub / "mlflow" / "__init__.py").write_text("raise ImportError('No module named mlflow')\n")
    env = {**tracker_env, "PYTHONPATH": os.pathsep.join([str(stub), tracker_env.get("PYTHONPATH", "")])}
    out = tmp_path / "run"
    proc = subprocess.run(dml_run_cmd() + ["trainer=smoke", "logger=[csv,mlflow]", f"hydra.run.dir={out}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "logger=mlflow needs mlflow: pip install dml-runner[mlflow]" in proc.stderr
    assert not (out / "history.csv").exists() and not (out / "last.pt").exists()  # no epoch was trained


# ----------------------------------------------------------------------------------------------- end to end
def read_wandb_records(path: Path) -> list:
    """Every record of a W&B run file (``run-<id>.wandb``): a 7-byte header, then LevelDB log blocks of protobufs."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B", raw[:7]
    block, pos, pieces, records = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero padding up to the block's end
            pos += (block - pos % block) % block
            continue
        pieces = data if kind in (1, 2) else pieces + data  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            records.append(record)
    return records


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


@pytest.mark.slow
def test_one_run_logs_to_history_mlflow_and_wandb_at_once(tmp_path, tracker_env):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    proc = subprocess.run(dml_run_cmd() + ["trainer=smoke", "trainer.epochs=2", "logger=[csv,mlflow,wandb]",
                                           "logger.mlflow.experiment_name=digits-test", f"hydra.run.dir={out}"],
                          cwd=tmp_path, env=tracker_env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].tolist() == [0, 1, 2] and not (out / "metrics.csv").exists()
    assert (out / "learning_curves.png").is_file()

    # MLflow: the store inside the run directory, read with MLflow's own client
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("digits-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["dml_runner.run_dir"] == str(out.resolve())
    assert run.data.params["trainer.epochs"] == "2" and run.data.params["loss._target_"].endswith("TripletLoss")
    assert run.data.tags["choice.loss"] == "triplet" and run.info.run_name.startswith("digits-triplet-")
    recall = client.get_metric_history(run.info.run_id, "test/recall_at_1")
    assert [m.step for m in recall] == [0, 1, 2]
    assert [m.value for m in recall] == pytest.approx(history["test/recall@1"].tolist())
    losses = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train_loss")}
    assert sorted(losses) == [1, 2] and losses[2] == pytest.approx(history.loc[2, "train_loss"])  # epoch 0: NaN
    assert run.data.metrics["final/recall_at_1"] == pytest.approx(results["metrics"]["recall@1"])
    assert run.data.metrics["final/map_at_r"] == pytest.approx(results["metrics"]["map@r"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.json", "history.csv", "config.json", "figures"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "figures")] == ["figures/learning_curves.png"]
    local = Path(client.download_artifacts(run.info.run_id, "figures/learning_curves.png", str(tmp_path)))
    assert local.read_bytes() == (out / "learning_curves.png").read_bytes()

    # W&B: the offline run in <run dir>/wandb
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    records = read_wandb_records(next(run_dir.glob("run-*.wandb")))
    (start,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = _items(start.config.update)
    assert config["trainer"]["epochs"] == 2 and config["loss"]["_target_"].endswith("TripletLoss")
    assert start.project == "dml-runner" and start.display_name.startswith("digits-triplet-")
    rows = [_items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    logged = {row["_step"]: row for row in rows if "test/recall@1" in row}
    assert sorted(logged) == [0, 1, 2]
    assert [logged[e]["test/recall@1"] for e in (0, 1, 2)] == pytest.approx(history["test/recall@1"].tolist())
    summary: dict = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update(_items(r.summary.update))
    assert summary["final/recall@1"] == pytest.approx(results["metrics"]["recall@1"])
    image = [row for row in rows if "figures/learning_curves/path" in row]
    assert image and (run_dir / "files" / image[0]["figures/learning_curves/path"]).is_file()
    exits = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert exits and exits[-1].exit_code == 0
    assert not list((tmp_path / "wandb_dir").glob("**/*.wandb"))  # the run's files are in the run directory


def test_an_unfinished_mlflow_run_is_closed_as_failed_when_the_next_run_starts(compose_cfg, tmp_path):
    """A sweep job that fails leaves its tracker run open; the next job of the same process closes it as failed."""
    from mlflow.tracking import MlflowClient

    store = tmp_path / "store"
    uri = f"sqlite:///{store}/mlflow.db"
    store.mkdir()
    node = compose_cfg("logger=mlflow", f"logger.mlflow.tracking_uri={uri}",
                       f"logger.mlflow.artifact_location={(tmp_path / 'art').as_uri()}").logger
    first = build_loggers(node, tmp_path / "job0", {"trainer": {"epochs": 1, "resume": None}}, {"dataset": "digits"})
    first.log_metrics(0, {"test/recall@1": 0.5})
    first.close()  # the trainer's close: training ended (here: failed); the run stays open for finish()
    second = build_loggers(node, tmp_path / "job1", {"trainer": {"epochs": 1}})
    second.finish({"metrics": {"recall@1": 0.75}, "final_epoch": 1}, out_dir=tmp_path / "job1")
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("dml-runner").experiment_id])
    status = {Path(r.data.tags["dml_runner.run_dir"]).name: r.info.status for r in runs}
    assert status == {"job0": "FAILED", "job1": "FINISHED"}
    finished = next(r for r in runs if r.info.status == "FINISHED")
    assert finished.data.metrics == {"final/recall_at_1": 0.75}
    # the same run directory again (a resumed run): the same MLflow run continues, its params kept
    again = build_loggers(node, tmp_path / "job0", {"trainer": {"epochs": 1, "resume": "auto"}})
    again.log_metrics(1, {"test/recall@1": 0.6})
    again.finish({"metrics": {"recall@1": 0.6}, "final_epoch": 1}, out_dir=tmp_path / "job0")
    runs = client.search_runs([client.get_experiment_by_name("dml-runner").experiment_id])
    assert len(runs) == 2
    resumed = next(r for r in runs if r.data.tags["dml_runner.run_dir"].endswith("job0"))
    assert resumed.info.status == "FINISHED" and resumed.data.tags["dml_runner.resumed"] == "true"
    assert [m.step for m in client.get_metric_history(resumed.info.run_id, "test/recall_at_1")] == [0, 1]
    assert resumed.data.params["trainer.resume"] == "None"  # MLflow keeps a param's first value


def test_a_failed_wandb_run_exits_nonzero_and_its_resume_continues_the_same_run(compose_cfg, tmp_path, tracker_env):
    import wandb

    node = compose_cfg("logger=wandb", "logger.wandb.project=resume-test").logger
    out = tmp_path / "run"
    first = build_loggers(node, out, {"trainer": {"epochs": 2}}, {"dataset": "digits", "loss": "triplet"})
    first.log_metrics(0, {"epoch": 0, "test/recall@1": 0.5})
    first.close_all()  # what the next run of the process (or interpreter exit) does to an unfinished one
    again = build_loggers(node, out, {"trainer": {"epochs": 2, "resume": "auto"}})
    again.log_metrics(1, {"epoch": 1, "test/recall@1": 0.75})
    again.finish({"metrics": {"recall@1": 0.75}, "final_epoch": 1}, out_dir=out)
    wandb.teardown()  # what the end of dml-run's process does: W&B's service writes out the last run file
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1  # one W&B run id
    starts, codes = [], []
    for run_dir in runs:
        records = read_wandb_records(next(run_dir.glob("run-*.wandb")))
        codes += [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
        starts += [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert codes == [1, 0] and [s.project for s in starts] == ["resume-test"] * 2
    assert starts[0].display_name == "digits-triplet-run"
