"""conf/experiment: every file composes with the paper's hyperparameters and points at a reference row (each row
trains on the real path in tests/test_real_path.py). Also the `logger` config group and its classes."""

from __future__ import annotations

import importlib.util

import pandas as pd
import pytest
from hydra.utils import instantiate

from dml_runner.config import conf_dir
from dml_runner.reference import load_reference, reference_tables

CONF = conf_dir()
# A path part starting with "_" marks a base that rows extend (conf/experiment/_base/), not a selectable row.
EXPERIMENTS = sorted(str(p.relative_to(CONF / "experiment").with_suffix("")) for p in
                     (CONF / "experiment").rglob("*.yaml")
                     if not any(part.startswith("_") for part in p.relative_to(CONF / "experiment").parts))


def test_every_table_target_has_experiments():
    papers = [e for e in EXPERIMENTS if e.split("/")[0] in ("hdml", "lifted", "dc", "mdl")]
    assert len(papers) == 27 + 9 + 7 + 6
    for prefix in ("hdml/table1_cub200/", "hdml/table2_cars196/", "hdml/table3_sop/"):
        rows = {e.split("/")[-1] for e in EXPERIMENTS if e.startswith(prefix)}
        assert rows == {"contrastive", "ddml", "lifted", "angular", "triplet", "triplet_hard", "hdml_triplet",
                        "npair", "hdml_npair"}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_names_its_reference(compose_cfg, name):
    cfg = compose_cfg(f"+experiment={name}")
    ref = cfg.reference
    assert ref.paper in ("hdml", "lifted", "dc", "mdl") and ref.table in reference_tables()
    assert list(ref.deviations), "every row states how it deviates from the paper"
    table = load_reference(ref.table)
    if ref.paper in ("hdml", "dc"):
        assert ref.row in set(table["row"]), f"{name}: row {ref.row} not in {ref.table}.csv"
    for group in ("dataset", "backbone", "loss", "sampler", "optimizer", "method"):
        assert cfg[group].get("_target_"), group
    assert cfg.trainer.epochs >= 1 and cfg.backbone.get("pretrained") is True


def test_every_trainable_reference_row_has_an_experiment():
    refs = set()
    for name in EXPERIMENTS:
        text = (CONF / "experiment" / f"{name}.yaml").read_text()
        table = text.split("  table: ")[1].split()[0]
        row = text.split("  row: ")[1].split()[0]
        refs.add((table, row))
    for table in reference_tables():
        frame = load_reference(table)
        for row in set(frame.loc[frame["trainable"], "row"]):
            assert (table, row) in refs, f"{table}/{row} has no conf/experiment file"


def test_paper_hyperparameters(compose_cfg):
    cub = compose_cfg("+experiment=hdml/table1_cub200/npair")
    assert cub.backbone.arch == "googlenet" and cub.backbone.embedding_dim == 512
    assert cub.transform.name == "caffe_227" and cub.sampler._target_.endswith("NPairBatchSampler")
    assert cub.optimizer.lr == pytest.approx(6e-5) and cub.loss.l2_reg == pytest.approx(1.5e-2)
    assert cub.trainer.batch_size == 128 and cub.trainer.epochs == 175  # 8000 x 128 / 5864
    assert list(cub.scheduler.milestones) == [123, 149]
    cars = compose_cfg("+experiment=hdml/table2_cars196/npair")
    assert cars.optimizer.lr == pytest.approx(7e-5) and cars.loss.l2_reg == pytest.approx(3e-3)
    lifted = compose_cfg("+experiment=lifted/lifted_cub200")
    assert lifted.optimizer._target_ == "torch.optim.SGD" and lifted.optimizer.lr == pytest.approx(1e-6)
    assert lifted.optimizer.momentum == 0.9 and lifted.optimizer.weight_decay == pytest.approx(2e-4)
    assert lifted.backbone.dropout == 0.4 and lifted.backbone.normalize is False
    assert lifted.trainer.head_lr_mult == 10 and lifted.loss.margin == 1.0
    assert compose_cfg("+experiment=lifted/lifted_sop").optimizer.lr == pytest.approx(1e-4)
    swept = compose_cfg("+experiment=lifted/lifted_cars196", "backbone.embedding_dim=64")
    assert swept.backbone.embedding_dim == 64  # the embedding size is an ordinary sweepable field
    mdl = compose_cfg("+experiment=mdl/mdl_cub200")
    assert mdl.loss._target_.endswith("MarginDiscriminateLoss") and "reconstructed" in mdl.reference.note


def test_hdml_and_divide_conquer_hyperparameters(compose_cfg):
    hdml = compose_cfg("+experiment=hdml/table2_cars196/hdml_npair")
    assert hdml.method._target_.endswith("HDMLMethod") and hdml.loss.beta == pytest.approx(1e4)
    assert hdml.loss.pulling_factor == 90 and hdml.loss.l2reg == pytest.approx(3e-3)
    assert compose_cfg("+experiment=hdml/table1_cub200/hdml_triplet").loss.pulling_factor == 7
    dc = compose_cfg("+experiment=dc/cub200")
    assert dc.method.num_clusters == 4 and dc.backbone.freeze == "bn" and dc.backbone.arch == "resnet50"
    assert dc.trainer.batch_size == 80 and dc.sampler.samples_per_class == 4 and dc.trainer.epochs == 200
    assert dc.optimizer.lr == pytest.approx(1e-5) and dc.transform.name == "rrc_224"
    assert compose_cfg("+experiment=dc/sop").method.num_clusters == 8
    vid = compose_cfg("+experiment=dc/vehicleid_small")
    assert vid.dataset.test_size == "small" and vid.dataset.protocol == "original"  # the paper table; loo = official code


# ----------------------------------------------------------------------------------------- logger group

def test_logger_options_compose_and_csv_logger_writes(compose_cfg, tmp_path):
    from dml_runner.loggers import CSVLogger

    cfg = compose_cfg("logger=csv")
    logger = instantiate(cfg.logger, out_dir=tmp_path)
    assert isinstance(logger, CSVLogger)
    logger.log_metrics(0, {"test/recall@1": 0.5, "split": "test", "flag": True})
    logger.log_metrics(1, {"test/recall@1": 0.75, "train/loss": 0.25})  # a new column: the file is rewritten
    logger.log_metrics(2, {"test/recall@1": 0.8, "train/loss": 0.2})
    logger.close()
    frame = pd.read_csv(tmp_path / "metrics.csv")
    assert frame.columns.tolist() == ["step", "test/recall@1", "train/loss"]
    assert frame["step"].tolist() == [0, 1, 2] and frame["train/loss"].iloc[2] == 0.2
    assert pd.isna(frame["train/loss"].iloc[0])
    with pytest.raises(RuntimeError):
        logger.log_metrics(3, {"x": 1.0})


def test_tensorboard_logger_writes_or_says_how_to_install(compose_cfg, tmp_path):
    from dml_runner import DMLRunnerError
    from dml_runner.loggers import TensorBoardLogger

    cfg = compose_cfg("logger=tensorboard")
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(DMLRunnerError, match="pip install tensorboard"):
            TensorBoardLogger(tmp_path)
        with pytest.raises(Exception, match="pip install tensorboard"):  # wrapped by Hydra; run.py unwraps it
            instantiate(cfg.logger, out_dir=tmp_path)
        return
    logger = instantiate(cfg.logger, out_dir=tmp_path)
    logger.log_metrics(1, {"test/recall@1": 0.5, "note": "skipped"})
    logger.close()
    assert any((tmp_path / "tensorboard").iterdir())
