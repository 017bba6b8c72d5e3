import numpy as np
import pytest

from dml_runner.samplers import ClassBalancedBatchSampler, RandomBatchSampler


def _labels():
    # 12 classes: sizes 1..12 (class c has c+1 images), shuffled order
    labels = np.concatenate([np.full(c + 1, c) for c in range(12)])
    return np.random.default_rng(0).permutation(labels)


def test_class_balanced_exact_composition():
    labels = _labels()
    sampler = ClassBalancedBatchSampler(labels, batch_size=12, seed=3, samples_per_class=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(labels) // 12
    for batch in batches:
        assert len(batch) == 12
        classes, counts = np.unique(labels[batch], return_counts=True)
        assert len(classes) == 4 and (counts == 3).all()


def test_class_balanced_replacement_only_for_small_classes():
    labels = _labels()
    sampler = ClassBalancedBatchSampler(labels, batch_size=16, seed=1, samples_per_class=4)
    sizes = np.bincount(labels)
    seen_small_duplicate = False
    for epoch in range(20):
        sampler.set_epoch(epoch)
        for batch in sampler:
            batch = np.asarray(batch)
            for c in np.unique(labels[batch]):
                items = batch[labels[batch] == c]
                if sizes[c] >= 4:
                    assert len(set(items.tolist())) == 4, "a class with >= K images must give K distinct images"
                else:
                    assert set(items.tolist()) <= set(np.flatnonzero(labels == c).tolist())
                    seen_small_duplicate |= len(set(items.tolist())) < 4
    assert seen_small_duplicate


def test_class_balanced_visits_classes_evenly_and_is_deterministic():
    labels = _labels()
    a = ClassBalancedBatchSampler(labels, batch_size=8, seed=7, samples_per_class=2)
    b = ClassBalancedBatchSampler(labels, batch_size=8, seed=7, samples_per_class=2)
    for epoch in (0, 1, 5):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert list(a) == list(b)
    a.set_epoch(0)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    a.set_epoch(0)
    assert list(a) == first  # same epoch, same batches
    # classes are used without repetition until all have been used: the first 3 batches (12 classes) cover all
    used = [c for batch in first[:3] for c in np.unique(labels[batch])]
    assert sorted(used) == list(range(12))
    c = ClassBalancedBatchSampler(labels, batch_size=8, seed=8, samples_per_class=2)
    assert list(c) != first


def test_class_balanced_bad_settings():
    labels = _labels()
    with pytest.raises(ValueError, match="multiple of"):
        ClassBalancedBatchSampler(labels, batch_size=10, samples_per_class=4)
    with pytest.raises(ValueError, match="needs 16 classes"):
        ClassBalancedBatchSampler(labels, batch_size=64, samples_per_class=4)


def test_random_sampler_is_a_permutation_prefix():
    labels = _labels()
    sampler = RandomBatchSampler(labels, batch_size=10, seed=0)
    items = [i for batch in sampler for i in batch]
    assert len(items) == len(set(items)) == 10 * (len(labels) // 10)
    assert all(len(b) == 10 for b in sampler)
    sampler.set_epoch(1)
    assert [i for batch in sampler for i in batch] != items
