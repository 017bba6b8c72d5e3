"""The decoded-image cache (dml_runner.datasets.decoded_cache): exactness, invalidation, concurrency, damage.

The images are photo-like JPEGs of the two sizes scripts/bench_train.py benchmarks (500x375 and 800x533, some on a
white background so that lifted_227's crop to content crops), generated with a fixed seed.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dml_runner import DMLRunnerError
from dml_runner.datasets.base import DatasetSplits, SubsetLabelledDataset
from dml_runner.datasets.decoded_cache import (SUFFIX, CachedImageDataset, DamagedCacheWarning, DecodedCache,
                                               CacheDamaged, Prefix, apply_decoded_cache, cache_size_bytes,
                                               cached_dataset, open_or_build, split_transform)
from dml_runner.datasets.images import ImageListDataset
from dml_runner.datasets.transforms import caffe_227, rrc_224

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """6 photo-like JPEGs (3 of 500x375, 3 of 800x533; 2 on white) in a CUB-shaped tree."""
    paths, labels = _bench().make_tree(tmp_path_factory.mktemp("photos"), images=6, seed=0, classes=3)
    return paths, labels


def lifted_227(train: bool):
    return caffe_227(train, resize_mode="content_pad")


def timm_eval():
    from timm.data import create_transform

    # what transform=timm builds for testing (timm's own eval transform), with a typical pretrained config
    return create_transform(input_size=(3, 224, 224), crop_pct=0.875, interpolation="bicubic",
                            mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), is_training=False)


def batches(dataset, seed: int, workers: int = 0, batch_size: int = 3) -> list[torch.Tensor]:
    """Every batch of one shuffled epoch, with the random tail drawn from ``seed``."""
    torch.manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(seed))
    return [images for images, _ in loader]


def assert_same_batches(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        assert x.shape == y.shape
        assert torch.equal(x, y), f"max |diff| {float((x - y).abs().max())}"


# ------------------------------------------------------------------------------------------------- splitting

def test_split_of_each_paper_transform():
    prefix_of = {name: split_transform(tf) for name, tf in {
        "caffe_227 train": caffe_227(True), "caffe_227 test": caffe_227(False),
        "lifted_227 train": lifted_227(True), "lifted_227 test": lifted_227(False),
        "rrc_224 train": rrc_224(True), "rrc_224 test": rrc_224(False), "timm test": timm_eval()}.items()}
    desc = {k: (s.prefix.description if s.prefix else None) for k, s in prefix_of.items()}
    assert desc["caffe_227 train"].startswith("Resize(size=(256, 256)")
    assert "CenterCrop" not in desc["caffe_227 train"]
    assert desc["caffe_227 test"].endswith("CenterCrop(size=(227, 227))")
    assert desc["lifted_227 train"] == "CropToContent(margin=15, threshold=250) -> LongerSidePad(size=256, fill=255)"
    assert desc["lifted_227 test"].endswith("LongerSidePad(size=256, fill=255) -> CenterCrop(size=(227, 227))")
    assert desc["rrc_224 test"].startswith("Resize(size=256,") and desc["rrc_224 test"].endswith("(224, 224))")
    assert desc["timm test"].startswith("Resize(size=256, interpolation=bicubic")
    # random first step: no prefix, and a reason; nothing approximate unless asked for
    assert desc["rrc_224 train"] is None and "RandomResizedCrop" in prefix_of["rrc_224 train"].reason
    assert all(s.exact and s.approximation is None for s in prefix_of.values())
    approx = split_transform(rrc_224(True), approximate="fixed_scale")
    assert approx.prefix is not None and not approx.exact and "RandomResizedCrop" in approx.approximation
    assert approx.record()["exact"] is False and "approximation" in approx.record()


def test_a_step_can_declare_itself_deterministic():
    from torchvision import transforms as T

    class Warp:
        cache_deterministic = True

        def __call__(self, image):
            return image.resize((64, 64))

        def __repr__(self):
            return "Warp(64)"

    split = split_transform(T.Compose([Warp(), T.RandomCrop(60), T.ToTensor()]))
    assert split.prefix.description == "Warp(64)" and len(split.tail.steps) == 2


# ------------------------------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("name,make", [
    ("caffe_227 train", lambda: caffe_227(True)), ("lifted_227 train", lambda: lifted_227(True)),
    ("caffe_227 test", lambda: caffe_227(False)), ("lifted_227 test", lambda: lifted_227(False)),
    ("rrc_224 test", lambda: rrc_224(False)), ("timm test", timm_eval)])
def test_cached_batches_are_bit_identical(tree, tmp_path, name, make):
    paths, labels = tree
    plain = ImageListDataset(paths, labels, transform=make(), name="cub")
    cached = cached_dataset(ImageListDataset(paths, labels, transform=make(), name="cub"), tmp_path, progress=False)
    assert isinstance(cached, CachedImageDataset) and cached.cache_active
    assert cached.decoded_cache_record["exact"] is True
    for seed in (0, 1):
        assert_same_batches(batches(cached, seed), batches(plain, seed))
    # the comparison can fail: the same pipeline with another seed of the random tail differs for training
    if "train" in name:
        assert not all(torch.equal(x, y) for x, y in zip(batches(cached, 0), batches(plain, 1)))


def test_fixed_scale_is_an_approximation_and_says_so(tree, tmp_path):
    paths, labels = tree
    plain = ImageListDataset(paths, labels, transform=rrc_224(True), name="cub")
    assert cached_dataset(plain, tmp_path, progress=False) is plain  # auto: nothing cached
    assert plain.decoded_cache_record["cached"] is False
    approx = cached_dataset(plain, tmp_path, approximate="fixed_scale", progress=False)
    assert approx.decoded_cache_record["exact"] is False and approx.decoded_cache_record["approximation"]
    assert approx.cache.array(1).shape[0] == 256 or approx.cache.array(1).shape[1] == 256
    different = [not torch.equal(x, y) for x, y in zip(batches(approx, 0), batches(plain, 0))]
    assert any(different)


def test_dataloader_with_two_workers_reads_the_cache(tree, tmp_path):
    paths, labels = tree
    plain = ImageListDataset(paths, labels, transform=caffe_227(True), name="cub")
    cached = cached_dataset(ImageListDataset(paths, labels, transform=caffe_227(True), name="cub"), tmp_path,
                            progress=False)
    assert_same_batches(batches(cached, 3, workers=2, batch_size=2), batches(plain, 3, workers=2, batch_size=2))


def test_views_with_another_transform_stay_correct(tree, tmp_path):
    """A view through the test transform (validation split, Divide & Conquer's re-embedding) loads the original
    image, not the training prefix; with_transform gives that view its own exact cache."""
    paths, labels = tree
    cached = cached_dataset(ImageListDataset(paths, labels, transform=lifted_227(True), name="cub"), tmp_path,
                            progress=False)
    plain_test = ImageListDataset(paths, labels, transform=lifted_227(False), name="cub")
    view = SubsetLabelledDataset(cached, np.arange(len(cached)), transform=lifted_227(False))
    assert_same_batches(batches(view, 0), batches(plain_test, 0))
    retransformed = cached.with_transform(lifted_227(False), progress=False)
    assert isinstance(retransformed, CachedImageDataset)
    assert_same_batches(batches(retransformed, 0), batches(plain_test, 0))
    cached.transform = lifted_227(False)  # assigning another transform stops serving the training prefix
    assert not cached.cache_active
    assert_same_batches(batches(cached, 0), batches(plain_test, 0))


# ------------------------------------------------------------------------------------------- life of the file

def _rewrite(path: str, seed: int) -> None:
    from PIL import Image

    with Image.open(path) as im:
        size = im.size
    _bench().photo_like(*size, np.random.default_rng(seed)).save(path, format="JPEG", quality=90)


def test_changed_files_invalidate_the_cache(tree, tmp_path):
    paths, labels = tree
    paths = [str(tmp_path / f"{i}.jpg") for i in range(3)]
    for src, dst in zip(tree[0][:3], paths):
        Path(dst).write_bytes(Path(src).read_bytes())
    labels = labels[:3]
    make = lambda: ImageListDataset(paths, labels, transform=caffe_227(False), name="cub")  # noqa: E731
    first = cached_dataset(make(), tmp_path / "cache", progress=False)
    assert first.cache.built
    again = cached_dataset(make(), tmp_path / "cache", progress=False)
    assert not again.cache.built  # reused, same file
    _rewrite(paths[1], seed=99)
    rebuilt = cached_dataset(make(), tmp_path / "cache", progress=False)
    assert rebuilt.cache.built and rebuilt.cache.fingerprint != first.cache.fingerprint
    assert rebuilt.cache.path == first.cache.path  # rebuilt in place: no stale copy left behind
    assert len(list((tmp_path / "cache").glob(f"*{SUFFIX}"))) == 1
    assert_same_batches(batches(rebuilt, 0, batch_size=1), batches(make(), 0, batch_size=1))
    # and another prefix is another cache file
    cached_dataset(ImageListDataset(paths, labels, transform=caffe_227(True), name="cub"), tmp_path / "cache",
                   progress=False)
    assert len(list((tmp_path / "cache").glob(f"*{SUFFIX}"))) == 2


def _build_in_child(cache_dir: str, paths: list[str], barrier, out) -> None:
    from dml_runner.datasets.transforms import caffe_227 as make

    steps = make(True).transforms[:1]
    barrier.wait()
    cache = open_or_build(cache_dir, paths, _load_rgb(paths), Prefix(steps), progress=False, threads=1)
    out.put((cache.built, cache.fingerprint, str(cache.path)))


class _load_rgb:
    def __init__(self, paths):
        self.paths = paths

    def __call__(self, i):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return im.convert("RGB")


def test_two_concurrent_builders_make_one_valid_cache(tree, tmp_path):
    paths = list(tree[0])
    ctx = multiprocessing.get_context("fork")  # as DataLoader workers on Linux
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(str(tmp_path), paths, barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    results = [out.get(timeout=10) for _ in procs]
    built = [r[0] for r in results]
    assert sorted(built) == [False, True]  # one built it, the other waited and reused it
    assert results[0][1:] == results[1][1:]
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [Path(results[0][2]).name]
    cache = DecodedCache.open(results[0][2])
    cache.verify(full=True)
    assert len(cache) == len(paths)


def test_damaged_cache_is_detected_and_rebuilt(tree, tmp_path):
    paths, labels = tree
    make = lambda: ImageListDataset(paths, labels, transform=caffe_227(True), name="cub")  # noqa: E731
    good = cached_dataset(make(), tmp_path, progress=False)
    path, size = good.cache.path, good.cache.nbytes
    os.truncate(path, size - 1000)  # an interrupted copy, a full disk
    with pytest.raises(CacheDamaged, match="truncated"):
        DecodedCache.open(path)
    with pytest.warns(DamagedCacheWarning, match="damaged"):
        rebuilt = cached_dataset(make(), tmp_path, progress=False)
    assert rebuilt.cache.built and rebuilt.cache.nbytes == size
    assert_same_batches(batches(rebuilt, 0), batches(make(), 0))
    # a flipped byte in the pixels of the first item: caught by the sampled check when opened
    offset = int(rebuilt.cache.index[0]["offset"]) + 1234
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CacheDamaged, match="item 0"):
        DecodedCache.open(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = cached_dataset(make(), tmp_path, progress=False)
    assert again.cache.built and any(issubclass(w.category, DamagedCacheWarning) for w in caught)
    assert_same_batches(batches(again, 0), batches(make(), 0))


class _CountingImages(ImageListDataset):
    reads = 0

    def load(self, index):
        type(self).reads += 1
        return super().load(index)


def test_unwritable_cache_dir_is_one_line_naming_the_option_before_any_work(tree, tmp_path):
    paths, labels = tree
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    _CountingImages.reads = 0
    splits = DatasetSplits(name="cub", train=_CountingImages(paths, labels, transform=caffe_227(True), name="cub"),
                           test=_CountingImages(paths, labels, transform=caffe_227(False), name="cub"))
    with pytest.raises(DMLRunnerError) as err:
        apply_decoded_cache(splits, "auto", blocker / "cache", progress=False)
    message = str(err.value)
    assert "\n" not in message and "paths.cache_dir" in message and "dataset.cache=none" in message
    assert str(blocker / "cache") in message
    assert _CountingImages.reads == 0
    if os.geteuid() != 0:  # root writes into a read-only directory anyway
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(DMLRunnerError, match="paths.cache_dir"):
            apply_decoded_cache(splits, "auto", ro, progress=False)


def test_apply_decoded_cache_records_what_it_did(tree, tmp_path):
    paths, labels = tree

    def splits(tf):
        return DatasetSplits(name="cub", train=ImageListDataset(paths, labels, transform=tf(True), name="cub"),
                             test=ImageListDataset(paths, labels, transform=tf(False), name="cub"))

    off = apply_decoded_cache(splits(caffe_227), "none", tmp_path)
    assert off.info["decoded_cache"] == {"mode": "none"} and not isinstance(off.train, CachedImageDataset)
    assert not list(tmp_path.iterdir())
    on = apply_decoded_cache(splits(caffe_227), "auto", tmp_path, progress=False)
    rec = on.info["decoded_cache"]
    assert isinstance(on.train, CachedImageDataset) and isinstance(on.test, CachedImageDataset)
    assert rec["train"]["exact"] and rec["test"]["exact"]
    assert rec["bytes"] == cache_size_bytes(tmp_path) == rec["train"]["bytes"] + rec["test"]["bytes"]
    # 256x256 RGB per training image, 227x227 per test image, plus header/index
    assert 6 * (256 * 256 + 227 * 227) * 3 < rec["bytes"] < 6 * (256 * 256 + 227 * 227) * 3 + 4096
    rrc = apply_decoded_cache(splits(rrc_224), "auto", tmp_path, progress=False)
    assert rrc.info["decoded_cache"]["train"]["cached"] is False and rrc.info["decoded_cache"]["test"]["cached"]
    with pytest.raises(DMLRunnerError, match="dataset.cache"):
        apply_decoded_cache(splits(caffe_227), "always", tmp_path)
