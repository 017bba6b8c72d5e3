"""Class-disjoint folds of the training classes: a partition, seeded, recorded, and refused when impossible."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dml_runner import DMLRunnerError
from dml_runner.datasets.base import DatasetSplits, TensorLabelledDataset
from dml_runner.datasets.folds import check_folds, class_folds, with_validation_fold


def splits(train_classes=range(20), test_classes=range(100, 110), per_class=3) -> DatasetSplits:
    def part(classes, name):
        labels = np.repeat(np.array(list(classes)), per_class)
        return TensorLabelledDataset(torch.zeros(labels.size, 1, 2, 2), labels, name=name,
                                     class_names={int(c): f"class_{c}" for c in classes})
    return DatasetSplits(name="toy", train=part(train_classes, "train"), test=part(test_classes, "test"))


@pytest.mark.parametrize("k", [2, 3, 4, 7])
def test_folds_partition_the_training_classes(k):
    data = splits()
    folds = class_folds(data.train.labels, k, seed=5)
    every = np.concatenate(folds)
    assert sorted(every.tolist()) == list(range(20))  # each class in exactly one fold
    assert max(f.size for f in folds) - min(f.size for f in folds) <= 1
    seen = []
    for i in range(k):
        s = with_validation_fold(splits(), k, i, seed=5)
        val, train = set(np.unique(s.val.labels)), set(np.unique(s.train.labels))
        assert val == set(folds[i].tolist()) and not (val & train) and val | train == set(range(20))
        assert not val & set(range(100, 110))  # no test class in any fold
        assert s.info["val_classes"] == [f"class_{c}" for c in folds[i]]
        assert s.info["val_images"] == len(s.val) == 3 * folds[i].size and s.info["fold"] == i
        seen.extend(sorted(val))
    assert sorted(seen) == list(range(20))


def test_folds_are_seeded_by_the_fold_seed_only():
    labels = splits().train.labels
    same = [np.concatenate(class_folds(labels, 4, seed=1)) for _ in range(2)]
    np.testing.assert_array_equal(*same)
    assert not np.array_equal(same[0], np.concatenate(class_folds(labels, 4, seed=2)))


@pytest.mark.parametrize("folds,fold,classes,fraction,message", [
    (1, 0, 20, 0.0, "K >= 2"),
    (4, 4, 20, 0.0, "0 to 3"),
    (4, -1, 20, 0.0, "0 to 3"),
    (4, 0, 20, 0.2, "val_fraction"),
    (6, 0, 10, 0.0, "at least 2"),
])
def test_impossible_folds_are_refused_in_one_line(folds, fold, classes, fraction, message):
    with pytest.raises(DMLRunnerError, match=message) as err:
        check_folds(folds, fold, classes, fraction)
    assert "\n" not in str(err.value)


def test_an_existing_validation_split_is_not_silently_replaced():
    data = splits()
    with_validation_fold(data, 2, 0, seed=0)
    with pytest.raises(DMLRunnerError, match="already has a validation split"):
        with_validation_fold(data, 2, 1, seed=0)


@pytest.mark.slow
def test_dml_run_holds_out_a_fold_and_records_it(tmp_path):
    """The path a user runs: dml-run with dataset.folds/fold on digits' class-disjoint protocol."""
    import json

    from conftest import run_dml

    run_dml(["dataset.protocol=classes", "dataset.folds=2", "dataset.fold=1", "trainer=smoke", "trainer.batch_size=8",
             f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    ds = res["dataset"]
    want = class_folds(np.arange(5), 2, seed=0)[1]  # digits 0-4 train under protocol=classes
    assert ds["info"]["val_classes"] == [str(c) for c in want] and ds["val_classes"] == want.size
    assert ds["info"]["fold"] == 1 and ds["info"]["folds"] == 2 and ds["train_classes"] == 5 - want.size
    assert res["best"]["split"] == "val"  # the held-out fold chose the checkpoint


@pytest.mark.parametrize("overrides,message", [
    (["dataset.folds=3", "dataset.fold=3"], "dataset.fold=3: with dataset.folds=3 the fold is 0 to 2"),
    (["dataset.folds=2", "dataset.val_fraction=0.2"], "set dataset.val_fraction=0 when using folds"),
    (["dataset.folds=-1"], "dataset.folds"),
    (["dataset.fold_seed=x"], "dataset.fold_seed"),
])
def test_dml_run_refuses_impossible_folds_in_one_line(compose_cfg, overrides, message):
    from dml_runner.config import validate_config

    with pytest.raises(DMLRunnerError, match=message) as err:
        validate_config(compose_cfg(*overrides))
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_a_folder_dataset_takes_folds_with_no_other_override(tmp_path):
    """dataset=folder fits its batch to the classes a fold model trains on (the training classes less the held-out
    fold), so folds need no batch override; the sampler's own refusal stays one line."""
    from PIL import Image

    from conftest import run_dml

    rng = np.random.default_rng(0)
    for c in range(10):
        d = tmp_path / "data" / f"class{c}"
        d.mkdir(parents=True)
        base = rng.integers(0, 255, (28, 28))
        for i in range(6):
            Image.fromarray(np.clip(base + rng.normal(0, 30, (28, 28)), 0, 255).astype(np.uint8)).save(d / f"{i}.png")
    run_dml(["dataset=folder", f"dataset.root={tmp_path / 'data'}", "dataset.folds=2", "dataset.fold=0",
             "trainer=smoke", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    proc = run_dml(["dataset=folder", f"dataset.root={tmp_path / 'data'}", "trainer=smoke", "trainer.batch_size=40",
                    "sampler.samples_per_class=4", f"hydra.run.dir={tmp_path / 'too_big'}"], cwd=tmp_path, check=False)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("dml-run: error: could not build "
                                                                                    "`sampler`: a batch needs 10")
