"""The Lifted Structure rows against the official code (rksltnl/Deep-Metric-Learning-CVPR16).

- ``sampler=pair_stream`` against a brute-force reading of ``get_training_examples_multilabel.m`` and
  ``gen_caffe_dataset_multilabel_m128.m`` (every positive pair incl. self-pairs once per pass, k negatives per image,
  the list cut to a multiple of 64 pairs, batches of lefts then rights, label-collision positives);
- ``transform=lifted_227`` against a hand computation of ``load_cropped_images.m`` on generated images;
- the rows compose with that sampler and transform, and the other readings stay one option away.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dml_runner import DMLRunnerError
from dml_runner.reference import row_deviations
from dml_runner.datasets.transforms import (IMAGENET_MEAN, IMAGENET_STD, CropToContent, LongerSidePad, caffe_227,
                                            resolve_transforms)
from dml_runner.losses.lifted import LiftedStructureLoss
from dml_runner.samplers.pair_stream import PairStreamBatchSampler

ROWS = [f"lifted/{loss}_{ds}" for loss in ("lifted", "contrastive", "triplet") for ds in ("sop", "cub200", "cars196")]
TRAIN_IMAGES = {"sop": 59551, "cub200": 5864, "cars196": 8054}  # the official training splits
CONF = Path(__file__).resolve().parent.parent / "conf"


def _labels(sizes: list[int], seed: int = 0) -> np.ndarray:
    """Class c has sizes[c] images; class ids are not 0..C-1 and items are shuffled (as a real train list)."""
    labels = np.concatenate([np.full(n, 10 + 3 * c) for c, n in enumerate(sizes)])
    return np.random.default_rng(seed).permutation(labels)


# --- brute-force reading of the official list construction --------------------------------------------------------

def official_positive_pairs(labels: np.ndarray) -> Counter:
    """nchoosek(image_ids, 2) and the self-pairs of every class, as unordered pairs (loops, no vectorisation)."""
    out: Counter = Counter()
    for c in sorted(set(labels.tolist())):
        ids = [i for i in range(len(labels)) if labels[i] == c]
        for a in range(len(ids)):
            for b in range(a + 1, len(ids)):
                out[(ids[a], ids[b])] += 1
            out[(ids[a], ids[a])] += 1
    return out


def official_counts(labels: np.ndarray, pairs_per_batch: int) -> tuple[int, int, int]:
    """(#positive pairs, negatives per image k, #pairs after the cut to a multiple of pairs_per_batch)."""
    num_pos = sum(1 for _ in official_positive_pairs(labels).elements())
    k = math.ceil(num_pos / len(labels))
    total = num_pos + k * len(labels)
    return num_pos, k, total - total % pairs_per_batch


def unordered(a: int, b: int) -> tuple[int, int]:
    return (a, b) if a <= b else (b, a)


def stream_pairs(sampler: PairStreamBatchSampler, epochs: range) -> list[tuple[int, int]]:
    """The (left, right) pairs the sampler yields over ``epochs``, read back from the batch layout."""
    m = sampler.pairs_per_batch
    out = []
    for e in epochs:
        sampler.set_epoch(e)
        for batch in sampler:
            assert len(batch) == sampler.batch_size
            out += list(zip(batch[:m], batch[m:]))
    return out


# --- the pair stream -----------------------------------------------------------------------------------------------

SIZES = [2, 3, 4, 5, 6, 7, 9, 12]  # 48 images, 8 classes (a CUB/Cars-like label mix, at small scale)


def test_pair_list_matches_the_official_construction():
    labels = _labels(SIZES)
    sampler = PairStreamBatchSampler(labels, batch_size=128, seed=3)
    num_pos, k, num_pairs = official_counts(labels, 64)
    pairs, positive = sampler.pair_list(0)
    assert pairs.shape == (num_pairs, 2) and num_pairs % 64 == 0 and num_pairs > 0
    assert sampler.batches_per_pass == num_pairs // 64
    # every positive pair of every class, self-pairs included, exactly once
    got = Counter(unordered(a, b) for a, b in pairs[positive].tolist())
    assert got == official_positive_pairs(labels)
    assert sum(1 for a, b in pairs[positive] if a == b) == len(labels)
    # negatives: different classes, k per image before the cut, the cut removes only negatives
    neg = pairs[~positive]
    assert (labels[neg[:, 0]] != labels[neg[:, 1]]).all()
    assert neg.shape[0] == num_pairs - num_pos
    deleted = k * len(labels) - neg.shape[0]
    assert 0 <= deleted < 64
    lefts = np.bincount(neg[:, 0], minlength=len(labels))
    assert lefts.max() == k and (k - lefts).sum() == deleted
    # one draw without replacement per class (where the other classes hold enough images; the official datasample
    # call fails otherwise, the sampler then draws with replacement): the class's right images are distinct
    checked = 0
    for c in np.unique(labels):
        n = int((labels == c).sum())
        if k * n <= len(labels) - n:
            rights = neg[labels[neg[:, 0]] == c, 1]
            assert len(set(rights.tolist())) == rights.size
            checked += 1
    assert checked >= 4
    # shuffled: positives are spread through the list, not first
    assert 0.2 < positive[: num_pairs // 2].mean() / max(positive.mean(), 1e-9) < 1.8
    assert not positive[:num_pos].all()


def test_stream_batches_lefts_then_rights_and_every_pair_once_per_pass():
    labels = _labels(SIZES)
    sampler = PairStreamBatchSampler(labels, batch_size=128, seed=1, batches_per_epoch=2)
    passes = sampler.batches_per_pass
    epochs = math.ceil(2 * passes / 2)
    got = stream_pairs(sampler, range(1, epochs + 1))
    pairs, positive = sampler.pair_list(0)
    listed = [tuple(p) for p in pairs.tolist()]
    # the stream reads the list in order and starts again at the top (Caffe's LMDB reader), same order each pass
    assert got[:len(listed)] == listed and got[len(listed):2 * len(listed)] == listed
    first_pass = Counter(unordered(a, b) for (a, b), pos in zip(got[:len(listed)], positive) if pos)
    assert first_pass == official_positive_pairs(labels)


def test_epochs_are_consecutive_windows_of_the_stream_and_deterministic():
    labels = _labels(SIZES)
    a = PairStreamBatchSampler(labels, batch_size=32, seed=5)
    b = PairStreamBatchSampler(labels, batch_size=32, seed=5)
    assert len(a) == len(labels) // 32
    for e in (1, 2, 7):
        a.set_epoch(e)
        b.set_epoch(e)
        assert list(a) == list(b)
    a.set_epoch(1)
    one = list(a)
    a.set_epoch(2)
    two = list(a)
    whole = PairStreamBatchSampler(labels, batch_size=32, seed=5, batches_per_epoch=2 * len(a))
    whole.set_epoch(1)
    assert list(whole) == one + two
    a.set_epoch(1)
    assert list(a) == one  # the same epoch again: the same batches
    c = PairStreamBatchSampler(labels, batch_size=32, seed=6)
    c.set_epoch(1)
    assert list(c) != one


def test_redraw_each_pass_draws_new_negatives_and_order():
    labels = _labels(SIZES)
    fixed = PairStreamBatchSampler(labels, batch_size=64, seed=2)
    redraw = PairStreamBatchSampler(labels, batch_size=64, seed=2, redraw_each_pass=True)
    assert np.array_equal(fixed.pair_list(0)[0], fixed.pair_list(1)[0])
    p0, pos0 = redraw.pair_list(0)
    p1, pos1 = redraw.pair_list(1)
    assert not np.array_equal(p0, p1)
    assert Counter(map(tuple, np.sort(p0[pos0], 1).tolist())) == Counter(map(tuple, np.sort(p1[pos1], 1).tolist()))


def caffe_lifted_loss(x: np.ndarray, y: np.ndarray, margin: float = 1.0) -> float:
    """A port of the Caffe loop (lifted_struct_similarity_softmax_layer.cpp, Forward_cpu) in float64."""
    sq = (x * x).sum(1)
    dist = np.sqrt(np.abs(sq[:, None] + sq[None, :] - 2 * x @ x.T))
    total, count = 0.0, 0
    n = len(y)
    for i in range(n):
        for j in range(i + 1, n):
            if y[i] != y[j]:
                continue
            negs = np.concatenate([margin - dist[i, y != y[i]], margin - dist[j, y != y[j]]])
            top = negs.max()
            j_ij = math.log(np.exp(negs - top).sum()) + top + dist[i, j]
            total += max(j_ij, 0.0) ** 2
            count += 1
    return total / count / 2


def test_label_collisions_add_positives_the_loss_sees():
    labels = _labels(SIZES)
    sampler = PairStreamBatchSampler(labels, batch_size=128, seed=0)
    sampler.set_epoch(1)
    batch = next(iter(sampler))
    y = labels[batch]
    pairs, positive = sampler.pair_list(0)
    listed_pos = int(positive[:64].sum())
    same = (y[:, None] == y[None, :])
    in_batch = int(np.triu(same, 1).sum())
    assert in_batch > listed_pos  # pairs of different list entries with the same label are positives too
    x = np.random.default_rng(0).normal(size=(128, 8))
    ours = LiftedStructureLoss(margin=1.0)(torch.tensor(x, dtype=torch.float64), torch.tensor(y)).item()
    assert ours == pytest.approx(caffe_lifted_loss(x, y), rel=1e-5)  # distances in float32


def test_small_fixture_data_and_singleton_and_small_pools():
    labels = _labels([5, 5, 5, 5])  # 4 classes x 5 images: 60 positives, 3 negatives per image, 120 pairs
    sampler = PairStreamBatchSampler(labels, batch_size=128, seed=0)
    assert sampler.num_pairs == 64 and len(sampler) == 1
    for e in (1, 2):
        sampler.set_epoch(e)
        (batch,) = list(sampler)
        assert len(batch) == 128 and set(batch) <= set(range(20))
    # a singleton class gives its self-pair; a class whose negatives exceed the other images draws with replacement
    labels = np.array([0] * 6 + [1] * 2 + [2])
    sampler = PairStreamBatchSampler(labels, batch_size=4, seed=0)
    pairs, positive = sampler.pair_list(0)
    assert (8, 8) in set(map(tuple, pairs[positive].tolist()))
    neg = pairs[~positive]
    assert (labels[neg[:, 0]] != labels[neg[:, 1]]).all()


@pytest.mark.parametrize("labels, batch, option", [
    (np.repeat([0, 1, 2], 2), 128, "trainer.batch_size"),  # 6 pairs + 6 negatives < 64 pairs
    (np.repeat([0, 1], 8), 7, "trainer.batch_size"),
    (np.zeros(10, dtype=int), 4, "sampler=..."),
])
def test_data_that_cannot_fill_a_batch_is_refused_in_one_line(labels, batch, option):
    with pytest.raises(DMLRunnerError) as err:
        PairStreamBatchSampler(labels, batch_size=batch, seed=0)
    assert option in str(err.value) and "\n" not in str(err.value)


# --- the official preprocessing ----------------------------------------------------------------------------------

def _object_image(size=(400, 300), box=(50, 100, 250, 150), colour=(200, 30, 30)) -> Image.Image:
    """White background, a coloured rectangle at columns box[0]..box[2]-1, rows box[1]..box[3]-1."""
    a = np.full((size[1], size[0], 3), 255, dtype=np.uint8)
    a[box[1]:box[3], box[0]:box[2]] = colour
    return Image.fromarray(a)


def _content_box(a: np.ndarray, threshold: int = 250) -> tuple[int, int, int, int]:
    """(first col, first row, last col, last row) of the non-white pixels of an HxWx3 uint8 array."""
    grey = a.astype(np.float64) @ np.array([0.298936021293775, 0.587043074451121, 0.114020904255103])
    rows, cols = np.flatnonzero((grey < threshold).any(1)), np.flatnonzero((grey < threshold).any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def test_crop_to_content_keeps_the_official_margin():
    img = _object_image()
    # load_cropped_images.m: xmin = min(col) - 15, xmax = max(col) + 15 (1-based), imcrop([xmin ymin w h]) with
    # w = xmax - xmin + 1 returns columns xmin .. xmax + 1: 15 px before, 16 px after the content (0-based below)
    assert CropToContent(15).box(img) == (50 - 15, 100 - 15, 249 + 16 + 1, 149 + 16 + 1)
    crop = np.asarray(CropToContent(15)(img))
    assert crop.shape == (50 + 31, 200 + 31, 3)
    assert _content_box(crop) == (15, 15, 15 + 199, 15 + 49)
    # clipped at the image border; an image without content is left alone; grey 249 is content, 250 is not
    near = _object_image(box=(5, 0, 395, 40))
    assert CropToContent(15).box(near) == (0, 0, 400, 40 + 16)
    blank = Image.new("RGB", (64, 48), (255, 255, 255))
    assert CropToContent(15)(blank) is blank
    assert CropToContent(15).box(_object_image(colour=(250, 250, 250))) is None
    assert CropToContent(15).box(_object_image(colour=(249, 249, 249))) is not None


@pytest.mark.parametrize("size, box", [((400, 300), (50, 100, 250, 150)), ((300, 500), (120, 40, 161, 441))])
def test_longer_side_to_256_with_white_padding(size, box):
    img = CropToContent(15)(_object_image(size, box))
    w, h = img.size
    out = LongerSidePad(256)(img)
    assert out.size == (256, 256)
    a = np.asarray(out)
    long_, short = max(w, h), min(w, h)
    side = math.ceil(256 * short / long_)  # MATLAB imresize(img, [256 NaN]) rounds the free side up
    pre = (256 - side) // 2
    post = 256 - side - pre
    white = np.full(3, 255)
    if w > h:  # padding above and below
        assert (a[:pre] == white).all() and (a[256 - post:] == white).all()
    else:  # padding left and right
        assert (a[:, :pre] == white).all() and (a[:, 256 - post:] == white).all()
    # the object keeps its aspect ratio and sits where the hand computation puts it (+-2 px of bicubic ringing)
    scale = 256 / long_
    c0, r0, c1, r1 = _content_box(a)
    ox, oy = (0, pre) if w > h else (pre, 0)
    exp = (15 * scale + ox, 15 * scale + oy, (15 + box[2] - box[0]) * scale + ox, (15 + box[3] - box[1]) * scale + oy)
    assert np.allclose((c0, r0, c1, r1), exp, atol=2.0)  # one scale on both axes: the aspect ratio is kept


def _denormalise(t: torch.Tensor) -> np.ndarray:
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((t * std + mean) * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def test_caffe_227_content_pad_test_and_train_views():
    img = _object_image()
    square = np.asarray(LongerSidePad(256)(CropToContent(15)(img)))
    test = caffe_227(train=False, resize_mode="content_pad")(img)
    assert test.shape == (3, 227, 227)
    # Caffe's test crop offset (256 - 227) / 2 = 14 (integer division) on both axes
    assert np.abs(_denormalise(test).astype(int) - square[14:241, 14:241].astype(int)).max() <= 1
    torch.manual_seed(0)
    train = caffe_227(train=True, resize_mode="content_pad")
    for _ in range(4):
        view = _denormalise(train(img))
        assert view.shape == (227, 227, 3)
        # the white padding above the object (rows 0..82 of the square) survives any random 227 crop (offset <= 29)
        assert (view[:83 - 29] >= 254).all()
    with pytest.raises(ValueError, match="resize_mode"):
        caffe_227(resize_mode="pad")


# --- the rows ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("row", ROWS)
def test_rows_compose_with_the_official_stream_and_preprocessing(compose_cfg, row):
    from hydra.utils import instantiate

    cfg = compose_cfg(f"+experiment={row}")
    ds = row.rsplit("_", 1)[1]
    assert cfg.sampler._target_.endswith("PairStreamBatchSampler") and cfg.trainer.batch_size == 128
    assert cfg.transform.name == "lifted_227"
    for side in ("train", "test"):
        spec = cfg.transform[side]
        assert (spec.resize_mode, spec.resize, spec.crop, spec.crop_padding, spec.white_threshold) == \
            ("content_pad", 256, 227, 15, 250)
    train, test, _ = resolve_transforms(cfg.transform, default="caffe_227")
    assert test(_object_image()).shape == (3, 227, 227)
    assert cfg.backbone.dropout == 0.4 and cfg.trainer.head_lr_mult == 10 and cfg.trainer.amp is False
    assert cfg.optimizer.momentum == 0.9 and cfg.optimizer.weight_decay == pytest.approx(2e-4)
    iterations = cfg.trainer.epochs * (TRAIN_IMAGES[ds] // 128)
    if ds == "cub200":  # the author's CUB solver: 40k iterations at 1e-6, "step" lr x0.96 at 32k
        assert cfg.optimizer.lr == pytest.approx(1e-6) and abs(iterations - 40000) <= 45
        assert list(cfg.scheduler.milestones) == [711] and cfg.scheduler.gamma == pytest.approx(0.96)
        assert abs(711 * (TRAIN_IMAGES[ds] // 128) - 32000) <= 45
    else:
        assert cfg.optimizer.lr == pytest.approx(1e-4) and abs(iterations - 20000) <= TRAIN_IMAGES[ds] // 128
        assert not cfg.scheduler.get("_target_")
    devs = " ".join(row_deviations(cfg.reference))
    assert f"{iterations:,}" in devs  # the declared length is the configured one
    assert "default init" not in devs and "iterations converted" not in devs and "Xavier-uniform" in devs
    assert ("not published" in devs) == (not row.startswith("lifted/lifted"))
    # the released crop-and-pad pipeline is SOP's; the posted CUB solver is the 64-d model's
    assert ("written for SOP" in devs) == (ds != "sop") and ("embed64" in devs) == (ds == "cub200")
    sampler = instantiate(cfg.sampler, labels=_labels(SIZES), batch_size=cfg.trainer.batch_size, seed=0)
    assert isinstance(sampler, PairStreamBatchSampler) and len(next(iter(sampler))) == 128


def test_the_other_readings_are_one_option_away(compose_cfg):
    cfg = compose_cfg("+experiment=lifted/lifted_sop", "sampler=npair", "transform=caffe_227", "trainer.amp=true")
    assert cfg.sampler._target_.endswith("NPairBatchSampler") and set(cfg.sampler) == {"_target_"}
    assert cfg.transform.train.resize_mode == "warp" and cfg.trainer.amp is True


def test_no_row_or_doc_claims_64_positive_pairs():
    for path in list((CONF / "experiment" / "lifted").glob("*.yaml")) + [CONF / "loss" / "lifted.yaml"]:
        text = path.read_text()
        assert "64 positive pairs" not in text and "No deviation" not in text, path
