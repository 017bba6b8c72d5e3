"""The official Lifted Structure batch stream (Song et al. 2016): shuffled positive and random negative pairs.

The official code (rksltnl/Deep-Metric-Learning-CVPR16, ``code/get_training_examples_multilabel.m`` and
``code/gen_caffe_dataset_multilabel_m128.m``) writes one list of image pairs into an LMDB, once, and Caffe's data
layer reads it in order, starting again from the top when it reaches the end:

1. positives: for every class, all C(n, 2) pairs of its n images **and** its n self-pairs (the same image twice);
2. negatives: k = ceil(#positives / #images) per image: for every class, k x n images drawn without replacement from
   the other classes, each image of the class paired with k of them;
3. a few random negatives are deleted so that the list is a multiple of ``batch_size / 2`` pairs, and the list is
   shuffled;
4. batch b takes pairs 64b .. 64b + 63 and lays them out as ``[left_1 .. left_64, right_1 .. right_64]``; the label
   of every image is its class, and the loss sees the full label matrix (pairs of different list entries whose
   labels collide are positives too).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from dml_runner import DMLRunnerError
from dml_runner.samplers.base import EpochBatchSampler


class PairStreamBatchSampler(EpochBatchSampler):
    """The official Lifted Structure pair stream, ``batch_size / 2`` pairs per batch (lefts first, then rights).

    The pair list is built once per ``seed`` and the stream cycles over it in the same order, as Caffe's LMDB data
    layer did (``redraw_each_pass: true`` draws new negatives and a new order for every pass instead).

    One epoch is ``batches_per_epoch`` consecutive batches of the stream; by default ``len(labels) // batch_size``,
    the length of an epoch of every other sampler here, so an epoch holds about as many images as the training set
    and ``trainer.epochs`` means the same number of iterations with ``sampler=npair``. Epochs count from 1, as the
    trainer's do: epoch e covers stream batches (e-1) * len .. e * len - 1 (``set_epoch(0)`` is epoch 1). One pass
    over the pair list spans several epochs; randomness depends only on ``(seed, pass)``.

    Differences from the official code, for data it could not handle: a class with one image contributes only its
    self-pair (the official code stops), and a class whose k x n negatives exceed the images of the other classes
    draws them with replacement (the official ``datasample`` call fails there).
    """

    def __init__(self, labels: np.ndarray, batch_size: int, seed: int = 0, batches_per_epoch: int | None = None,
                 redraw_each_pass: bool = False) -> None:
        super().__init__(labels, batch_size, seed)
        if self.batch_size % 2:
            raise DMLRunnerError(f"the pair_stream sampler needs an even trainer.batch_size (pairs of images), "
                                 f"got {batch_size}")
        if batches_per_epoch is not None and int(batches_per_epoch) <= 0:
            raise DMLRunnerError(f"sampler.batches_per_epoch must be positive or null, got {batches_per_epoch}")
        self.pairs_per_batch = self.batch_size // 2
        self.batches_per_epoch = None if batches_per_epoch is None else int(batches_per_epoch)
        self.redraw_each_pass = bool(redraw_each_pass)
        self.classes, inverse = np.unique(self.labels, return_inverse=True)
        if self.classes.size < 2:
            raise DMLRunnerError("the pair_stream sampler needs at least 2 training classes (negative pairs); "
                                 "use another sampler=... for this data")
        self.order = np.argsort(inverse, kind="stable")  # item indices grouped by class, ascending within a class
        self.sizes = np.bincount(inverse)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        n = self.labels.size
        self.num_positive = int((self.sizes * (self.sizes + 1) // 2).sum())
        self.negatives_per_image = math.ceil(self.num_positive / n)
        total = self.num_positive + self.negatives_per_image * n
        self.num_pairs = total - total % self.pairs_per_batch
        if self.num_pairs == 0:
            raise DMLRunnerError(
                f"the pair_stream sampler builds {total} pairs from this training set, fewer than the "
                f"{self.pairs_per_batch} pairs of one batch (trainer.batch_size={batch_size}); lower "
                "trainer.batch_size or use more images per class")
        self.batches_per_pass = self.num_pairs // self.pairs_per_batch
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        if self.batches_per_epoch is not None:
            return self.batches_per_epoch
        return max(1, len(self.labels) // self.batch_size)

    def positive_pairs(self) -> np.ndarray:
        """All (i, j) pairs of every class, i before j in the class (``nchoosek``), then its self-pairs; (P, 2)."""
        blocks, owners = [], []
        for size in np.unique(self.sizes):  # classes grouped by size: one vectorised step per distinct size
            cls = np.flatnonzero(self.sizes == size)
            members = self.order[self.starts[cls][:, None] + np.arange(size)]  # (classes, size)
            a, b = np.triu_indices(size, 1)
            pairs = np.stack([members[:, a], members[:, b]], axis=-1)  # (classes, C(size, 2), 2)
            selfs = np.stack([members, members], axis=-1)  # (classes, size, 2)
            both = np.concatenate([pairs, selfs], axis=1)
            blocks.append(both.reshape(-1, 2))
            owners.append(np.repeat(cls, both.shape[1]))
        # back to class order, as the official list is built class by class
        keep = np.argsort(np.concatenate(owners), kind="stable")
        return np.concatenate(blocks)[keep]

    def negative_pairs(self, rng: np.random.Generator) -> np.ndarray:
        """k pairs (image, image of another class) per image, drawn class by class; (k x #images, 2)."""
        n, k = self.labels.size, self.negatives_per_image
        blocks = []
        for c in range(self.classes.size):  # one draw per class, as the official negative_sampler
            start, size = self.starts[c], self.sizes[c]
            need, pool = k * size, n - size
            pos = rng.choice(pool, size=need, replace=need > pool)
            pos = pos + size * (pos >= start)  # skip the class's own block of the grouped order
            left = np.repeat(self.order[start:start + size], k)  # image 1 k times, then image 2 k times, ...
            blocks.append(np.stack([left, self.order[pos]], axis=1))
        return np.concatenate(blocks)

    def pair_list(self, pass_index: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The shuffled pair list of one pass: ``(pairs (num_pairs, 2), is_positive_entry (num_pairs,))``.

        ``is_positive_entry`` marks the entries of the positive list (same class by construction).
        """
        key = pass_index if self.redraw_each_pass else 0
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1], self._cache[2]
        rng = np.random.default_rng([self.seed, key])
        pos = self.positive_pairs()
        neg = self.negative_pairs(rng)
        extra = pos.shape[0] + neg.shape[0] - self.num_pairs
        neg = np.delete(neg, rng.choice(neg.shape[0], size=extra, replace=False), axis=0)
        pairs = np.concatenate([pos, neg])
        positive = np.arange(pairs.shape[0]) < pos.shape[0]
        perm = rng.permutation(pairs.shape[0])
        self._cache = (key, pairs[perm], positive[perm])
        return self._cache[1], self._cache[2]

    def __iter__(self) -> Iterator[list[int]]:
        first = max(self.epoch - 1, 0) * len(self)
        m = self.pairs_per_batch
        for b in range(first, first + len(self)):
            pass_index, within = divmod(b, self.batches_per_pass)
            pairs, _ = self.pair_list(pass_index)
            chunk = pairs[within * m:(within + 1) * m]
            yield np.concatenate([chunk[:, 0], chunk[:, 1]]).tolist()
