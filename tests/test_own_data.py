"""Your own data: a folder (one tree, train/ + test/ folders, a split file) or a CSV table fits the run to its images
(crop size, batch), states its class split, and refuses a test split whose metrics would be trivial; settings that
would silently do nothing are refused before any work."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_dml
from dml_runner import DMLRunnerError
from dml_runner.config import validate_config
from dml_runner.datasets import csv_table, folder
from dml_runner.datasets.fit import choose_batch, fit_run_config, warn_thin_classes
from dml_runner.datasets.images import check_test_split


def grey_folder(root: Path, n_classes: int = 10, per_class: int = 8, side: int = 28) -> Path:
    """``root/c<k>/<i>.png``: 8-bit grey squares whose brightness depends on the class (seeded noise)."""
    rng = np.random.default_rng(0)
    for c in range(n_classes):
        for i in range(per_class):
            path = root / f"c{c}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(c * 25 + rng.normal(0, 10, (side, side)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(path)
    return root


def fitted(compose_cfg, *overrides: str) -> tuple[object, dict | None]:
    """The config after the fit, with ``overrides`` as the command line's."""
    cfg = compose_cfg(*overrides)
    return cfg, fit_run_config(cfg, {"overrides": list(overrides)})


# ---------------------------------------------------------------- the fit

@pytest.mark.slow
def test_small_grey_folder_trains_with_no_other_override(tmp_path):
    root = grey_folder(tmp_path / "digits28")
    out = tmp_path / "run"
    proc = run_dml(["dataset=folder", f"dataset.root={root}", "trainer=smoke", f"hydra.run.dir={out}"], cwd=tmp_path)
    results = json.loads((out / "results.json").read_text())
    fit = results["dataset"]["info"]["fit"]
    assert results["status"] == "completed"
    assert (fit["image_size"], fit["grey"], fit["batch_size"], fit["samples_per_class"]) == (28, True, 20, 4)
    assert results["config"]["trainer"]["batch_size"] == 20 and results["config"]["dataset"]["image_size"] == 28
    assert results["dataset"]["info"]["transform"] == "rrc_224 at 28 px (dataset.image_size=28)"
    log = proc.stdout + proc.stderr
    assert log.count("dataset fitted to 40 training images of 5 classes") == 1 and "dataset.fit=false" in log
    assert "dataset.split_seed=0" in results["dataset"]["info"]["split"]


def test_fit_chooses_from_the_images_and_your_settings_win(compose_cfg, tmp_path):
    root = grey_folder(tmp_path / "g", n_classes=10, per_class=3)  # 5 training classes of 3 images
    cfg, chosen = fitted(compose_cfg, "dataset=folder", f"dataset.root={root}")
    assert (cfg.dataset.image_size, cfg.trainer.batch_size, cfg.sampler.samples_per_class) == (28, 15, 3)
    assert chosen["fewest_images_per_class"] == 3 and chosen["batch_by"] == "fit" and cfg.dataset.fitted.grey
    validate_config(cfg)  # what the fit chose passes every check
    cfg, _ = fitted(compose_cfg, "dataset=folder", f"dataset.root={root}", "trainer.batch_size=12")
    assert (cfg.trainer.batch_size, cfg.sampler.samples_per_class) == (12, 3)
    cfg, _ = fitted(compose_cfg, "dataset=folder", f"dataset.root={root}", "sampler.samples_per_class=2")
    assert (cfg.trainer.batch_size, cfg.sampler.samples_per_class) == (10, 2)
    cfg, chosen = fitted(compose_cfg, "dataset=folder", f"dataset.root={root}", "dataset.image_size=20")
    assert cfg.dataset.image_size == 20 and chosen["image_size_by"] == "you"
    cfg, chosen = fitted(compose_cfg, "dataset=folder", f"dataset.root={root}", "transform=rrc_224")
    assert cfg.dataset.image_size is None and chosen["image_size_by"] == "transform"
    cfg, chosen = fitted(compose_cfg, "dataset=folder", f"dataset.root={root}", "dataset.fit=false")
    assert chosen is None and cfg.trainer.batch_size == 64 and cfg.dataset.image_size is None
    cfg, chosen = fitted(compose_cfg, "dataset=digits")
    assert chosen is None and cfg.trainer.batch_size == 20  # a dataset without a fit keeps its preset


def test_large_images_keep_the_default_crop(compose_cfg, tmp_path):
    root = folder.make_folder(tmp_path, n_classes=4, per_class=2, size=(300, 260))
    cfg, chosen = fitted(compose_cfg, "dataset=folder", f"dataset.root={root}")
    assert chosen["image_size"] == 224 and cfg.dataset.image_size is None and not chosen["grey"]


@pytest.mark.parametrize("counts,batch,k,by_user,k_by_user,npair,want", [
    ([8] * 5, 64, 4, False, False, False, (20, 4)),     # 5 classes x 4
    ([2, 3, 9], 64, 4, False, False, False, (6, 2)),     # the poorest class holds 2: K = 2
    ([30] * 40, 64, 4, False, False, False, (64, 4)),    # many classes: the default 16 x 4
    ([5] * 6, 18, 4, True, False, False, (18, 3)),       # your batch: the largest fitting K dividing it
    ([5] * 6, 18, 6, True, True, False, (18, 6)),        # both yours
    ([5] * 6, 64, None, False, False, True, (12, None)),  # N-pair: N classes x 2
])
def test_choose_batch(counts, batch, k, by_user, k_by_user, npair, want):
    assert choose_batch(np.array(counts), batch, k, by_user, k_by_user, npair) == want


def test_samples_per_class_above_a_class_warns(compose_cfg, caplog):
    cfg = compose_cfg("sampler.samples_per_class=4")
    with caplog.at_level(logging.WARNING):
        message = warn_thin_classes(np.array([0, 0, 0, 1, 1, 1, 1, 1, 2, 2]), cfg)
    assert "above the images of 2 of 3 training classes (fewest: 2)" in message and message in caplog.text
    assert warn_thin_classes(np.repeat(np.arange(3), 4), cfg) is None


# ---------------------------------------------------------------- layouts and the class split

def test_train_and_test_folders_are_the_split(tmp_path):
    grey_folder(tmp_path / "tree" / "train", n_classes=3, per_class=2)
    for c in range(3, 5):
        for i in range(2):
            folder.write_jpeg(tmp_path / "tree" / "test" / f"t{c}" / f"{i}.jpg", c, i)
    splits = folder.build(str(tmp_path / "tree"))
    assert splits.train.item_class_names().tolist() == ["c0", "c0", "c1", "c1", "c2", "c2"]
    assert set(splits.test.item_class_names()) == {"t3", "t4"} and "folders" in splits.info["split"]
    assert sorted(folder.listed_images(tmp_path / "tree")) == sorted(splits.train.paths + splits.test.paths)
    with pytest.raises(DMLRunnerError, match="dataset.split_file=x.txt: .* already split"):
        folder.build(str(tmp_path / "tree"), split_file="x.txt")


def test_class_split_is_seeded_and_stated(tmp_path):
    root = folder.make_folder(tmp_path, n_classes=10, per_class=2)
    split = {seed: sorted(set(folder.build(str(root), split_seed=seed).train.item_class_names()))
             for seed in (0, 1)}
    assert split[0] == sorted(set(folder.build(str(root), split_seed=0).train.item_class_names()))
    assert split[0] != split[1] and len(split[0]) == len(split[1]) == 5
    info = folder.build(str(root), split_seed=1).info
    assert "dataset.split_seed=1" in info["split"] and info["train_class_names"] == split[1]
    # a config without the key (a run's config.json written before it) rebuilds the split it trained on
    old = folder.build(str(root))
    assert old.info["train_class_names"] == [f"class_{c:02d}" for c in range(5)]


# ---------------------------------------------------------------- the CSV table

def test_csv_table_query_gallery_boxes_and_relative_paths(tmp_path):
    root = csv_table.write_table(tmp_path / "data", n_train=3, n_test=3, per_class=3, size=(40, 32))
    table = tmp_path / "elsewhere" / "mine.csv"
    table.parent.mkdir()
    table.write_text((root / "df.csv").read_text())
    splits = csv_table.build(root=str(root), file=str(table))
    assert splits.eval_mode == "query_gallery" and all(Path(p).is_file() for p in splits.train.paths)
    # per validation class: image 0 gallery only, image 1 query only, image 2 both
    assert splits.query_mask.tolist() == [False, True, True] * 3
    assert splits.gallery_mask.tolist() == [True, False, True] * 3
    assert splits.train.load(0).size == (18, 18) and splits.train.load(1).size == (40, 32)  # box x 2..20, y 2..20
    assert splits.info["bounding_boxes"] == 3


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.replace(",validation,", ",test,", 1), r"df\.csv:\d+: split must be train or validation"),
    (lambda t: t.replace("path,label", "file,label", 1), "lacks the column"),
    (lambda t: t.replace(",train,,,2,20,2,20", ",train,,,20,2,2,20", 1), r"df\.csv:2: the box needs x_1 < x_2"),
    (lambda t: t.replace(",1,0,,,,", ",maybe,0,,,,", 1), r"is_query must be 1/0"),
])
def test_csv_table_errors_name_the_line(tmp_path, edit, match):
    root = csv_table.write_table(tmp_path / "data", n_train=2, n_test=2, per_class=3)
    (root / "df.csv").write_text(edit((root / "df.csv").read_text()))
    with pytest.raises(DMLRunnerError, match=match):
        csv_table.build(str(root))


@pytest.mark.slow
def test_csv_runs_a_query_gallery_protocol(tmp_path):
    root = csv_table.write_table(tmp_path / "data", n_train=5, n_test=4, per_class=4, size=(30, 30))
    out = tmp_path / "run"
    run_dml(["dataset=csv", f"dataset.file={root / 'df.csv'}", "trainer=smoke", f"hydra.run.dir={out}"],
            cwd=tmp_path)
    results = json.loads((out / "results.json").read_text())
    info = results["dataset"]["info"]
    assert results["status"] == "completed" and info["eval_protocol"].startswith("query -> gallery")
    # per class: image 0 gallery only, 1 and 2 queries only, 3 both: every query has a positive besides itself
    assert results["dataset"]["query_images"] == 12 and results["dataset"]["gallery_images"] == 8
    assert results["metrics"]["num_queries"] == 12 and results["metrics"]["num_queries_without_positive"] == 0
    assert info["fit"]["image_size"] == 30


# ---------------------------------------------------------------- trivial test splits

def test_two_class_folder_is_refused_before_training(tmp_path):
    root = folder.make_folder(tmp_path, n_classes=2, per_class=4)
    with pytest.raises(DMLRunnerError, match="test split holds 1 class.*100%"):
        folder.build(str(root))


def test_test_split_without_a_positive_is_refused():
    with pytest.raises(DMLRunnerError, match="no test query has a positive"):
        check_test_split("x", np.array([0, 1, 2]))  # leave-one-out, one image per class
    labels = np.array([0, 0, 1, 1])
    with pytest.raises(DMLRunnerError, match="no test query has a positive"):  # no gallery item of the queries' class
        check_test_split("x", labels, np.array([True, True, False, False]), np.array([False, False, True, True]))
    with pytest.raises(DMLRunnerError, match="no test query has a positive"):  # the only one is the query itself
        check_test_split("x", labels, np.array([True, False, False, False]), np.array([True, False, True, True]))
    check_test_split("x", labels, np.array([True, False, True, False]), np.array([False, True, False, True]))
    check_test_split("x", labels)


# ---------------------------------------------------------------- settings that would do nothing

@pytest.mark.parametrize("overrides,match", [
    (["transform=rrc_224"], "transform=rrc_224: dataset dml_runner.datasets.digits.build does not read"),
    (["loss=npair", "sampler=class_balanced"], "sampler.samples_per_class=4: loss NPairLoss reads each class's first 2 "
                                              "images"),
    (["optimizer.lr=1e12"], "optimizer.lr=1000000000000.0: above 1"),
])
def test_silent_no_ops_are_refused(compose_cfg, overrides, match):
    """loss=npair alone selects the N-pair sampler (tests/test_experiments.py); with the class-balanced sampler named,
    half of each batch would be ignored, and that is refused."""
    with pytest.raises(DMLRunnerError, match=match):
        validate_config(compose_cfg(*overrides))


def test_their_working_forms_pass(compose_cfg):
    validate_config(compose_cfg("loss=npair", "sampler=npair"))
    validate_config(compose_cfg("optimizer.lr=1e-2"))


def test_a_run_refuses_a_one_class_test_split_of_any_dataset(tmp_path):
    """The check runs on every built dataset before training (digits here, which builds its own splits)."""
    out = tmp_path / "run"
    proc = run_dml(["dataset.protocol=classes", "dataset.test_classes=[5]", "trainer=smoke",
                    f"hydra.run.dir={out}"], cwd=tmp_path, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("dml-run: error:")]
    assert proc.returncode != 0 and len(lines) == 1 and "test split holds 1 class" in lines[0]
    assert not (out / "last.pt").exists()


def test_image_size_with_a_chosen_transform_is_refused(tmp_path):
    root = folder.make_folder(tmp_path)
    with pytest.raises(DMLRunnerError, match="dataset.image_size=32 sets the size of the default transform, but "
                                             "transform=rrc_224 is chosen"):
        folder.build(str(root), image_size=32, transform={"name": "rrc_224", "train": "rrc_224", "test": "rrc_224"})
    assert folder.build(str(root), image_size=32).test[0][0].shape == (3, 32, 32)
