"""NPairBatchSampler: N distinct classes x 2 images per batch, deterministic per (seed, epoch)."""

from __future__ import annotations

import numpy as np
import pytest

from dml_runner.samplers.npair import NPairBatchSampler


def labels_with_singletons() -> np.ndarray:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(30), rng.integers(2, 9, size=30))
    return np.concatenate([labels, [100, 101, 102]])  # three classes with a single image


def test_batches_are_n_classes_times_two():
    labels = labels_with_singletons()
    sampler = NPairBatchSampler(labels, batch_size=16, seed=1)
    assert len(sampler) == len(labels) // 16
    batches = list(sampler)
    assert len(batches) == len(sampler)
    for batch in batches:
        assert len(batch) == 16
        batch_labels = labels[batch]
        assert np.array_equal(batch_labels[0::2], batch_labels[1::2])  # [a1, p1, a2, p2, ...]
        assert len(set(batch_labels[0::2].tolist())) == 8  # distinct classes
        for a, p in zip(batch[0::2], batch[1::2]):
            if (labels == labels[a]).sum() > 1:
                assert a != p  # two different images when the class has them


def test_single_image_classes_are_sampled_with_replacement():
    labels = np.array([0, 0, 1, 2, 2, 3])
    sampler = NPairBatchSampler(labels, batch_size=8, seed=0)
    batch = next(iter(sampler))
    assert sorted(set(labels[batch].tolist())) == [0, 1, 2, 3]
    assert batch[batch.index(2):].count(2) >= 2  # index 2 is the only image of class 1


def test_set_epoch_is_deterministic_and_changes_batches():
    labels = labels_with_singletons()
    a, b = NPairBatchSampler(labels, 16, seed=3), NPairBatchSampler(labels, 16, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b) == list(a)
    b.set_epoch(3)
    assert list(a) != list(b)
    assert list(NPairBatchSampler(labels, 16, seed=4)) != list(NPairBatchSampler(labels, 16, seed=3))


def test_odd_batch_size_and_too_few_classes_are_rejected():
    with pytest.raises(ValueError):
        NPairBatchSampler(np.arange(10).repeat(2), batch_size=7, seed=0)
    with pytest.raises(ValueError, match="lower trainer.batch_size") as err:
        NPairBatchSampler(np.arange(3).repeat(4), batch_size=8, seed=0)
    assert "raise sampler.samples_per_class" not in str(err.value)  # fixed at 2 here: not a fix to offer


def test_config_instantiates():
    hydra_utils = pytest.importorskip("hydra.utils")
    from pathlib import Path

    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "sampler" / "npair.yaml")
    sampler = hydra_utils.instantiate(cfg, labels=np.arange(20).repeat(3), batch_size=8, seed=0)
    assert isinstance(sampler, NPairBatchSampler) and len(next(iter(sampler))) == 8
