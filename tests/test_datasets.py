"""The image-file datasets on fixture trees in the official layouts (each dataset module's ``make_<name>``), and the
registry that declares them (dml_runner/datasets/registry.py)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dml_runner.datasets.fixtures import (
    make_cars196, make_cub200, make_folder, make_inshop, make_sop, make_vehicleid, write_cars_annos,
    write_inshop_partition,
)
from dml_runner import DMLRunnerError
from dml_runner.build import instantiate as build_instantiate
from dml_runner.datasets import cars196, cub200, folder, inshop, sop, vehicleid
from dml_runner.datasets.images import DatasetCountWarning
from dml_runner.datasets.registry import SPECS
from dml_runner.datasets.spec import TreeSize
from dml_runner.datasets.transforms import caffe_227, resolve_transforms, rrc_224
from dml_runner.datasets.vehicleid import vehicleid_gallery_draws

pytestmark = pytest.mark.filterwarnings("ignore::dml_runner.datasets.images.DatasetCountWarning")

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    """Every registered dataset's fixture tree (its spec's ``make_fixture``), under one parent."""
    parent = tmp_path_factory.mktemp("trees")
    return {name: spec.make_fixture(parent) for name, spec in SPECS.items()}


def from_config(name: str, root: Path, transform: str = "none", **overrides):
    """What `dml-run dataset=<name> transform=<transform> dataset.root=<root>` instantiates (composed by Hydra)."""
    from hydra import compose, initialize_config_dir

    from dml_runner.config import register_configs

    register_configs()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"dataset={name}", f"transform={transform}", "trainer.seed=0"])
    cfg.dataset.root = str(root)
    for key, value in overrides.items():
        cfg.dataset[key] = value
    try:
        return build_instantiate(cfg.dataset, "dataset")
    except InstantiationException as err:  # Hydra wraps the builder's exception; the CLI unwraps it the same way
        if isinstance(err.__cause__, DMLRunnerError):
            raise err.__cause__ from None
        raise


# ---------------------------------------------------------------- the registry

def test_every_image_file_config_is_registered():
    configs = {p.stem for p in (CONF / "dataset").glob("*.yaml")}
    assert set(SPECS) <= configs, "a registered dataset without conf/dataset/<name>.yaml"
    assert configs - set(SPECS) == {"digits"}, "only the embedded digits (nothing to fetch or check) has no spec"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_registered_dataset_is_complete_and_its_fixture_loads(trees, tmp_path, name):
    """Config, counts, sources and fixture of each spec agree with each other and with the real loader."""
    spec = SPECS[name]
    config = OmegaConf.to_container(OmegaConf.load(CONF / "dataset" / f"{name}.yaml"), resolve=False)
    # the module is named after the dataset, except where the name would shadow the standard library (csv)
    module = {"csv": "csv_table"}.get(name, name)
    assert config["_target_"] == f"{spec.build.__module__}.{spec.build.__name__}" == f"dml_runner.datasets.{module}.build"
    assert spec.name == name and spec.title and spec.layout and spec.variants
    if spec.own_images:
        assert spec.archive is None and all(v.official_counts is None for v in spec.variants)
    else:
        assert config["root"] == f"${{paths.data_dir}}/{spec.dir}" and spec.url.startswith("https://")
        for variant in spec.variants:
            assert {"train_images", "train_classes", "test_images", "test_classes"} <= set(variant.official_counts)
            assert min(variant.official_counts.values()) > 0
    if spec.archive is not None:
        assert spec.archive.top == spec.dir and len(spec.archive.md5) == 32 and spec.archive.file in spec.archive.url
    root = trees[name]
    assert root.name == spec.fixture_dir and root.is_dir()
    listed = spec.listed_images(root)
    assert listed and all(Path(p).is_file() for p in listed) and len(set(listed)) == len(listed)
    for variant in spec.variants:  # what `dml-run dataset=<name>` builds, with the settings dml-prepare checks
        splits = from_config(name, root, **variant.settings)
        assert splits.info.get("official_counts") == (None if variant.official_counts is None
                                                      else dict(variant.official_counts))
        assert set(splits.train.paths) | set(splits.test.paths) <= set(listed)
        image, label = splits.test[0]
        assert image.ndim == 3 and label == int(splits.test.labels[0])
    sized = spec.fixture_tree(tmp_path, TreeSize(train_classes=2, per_class=2, test_classes=3))
    counts = spec.build(str(sized)).info["counts"]
    assert (counts["train_classes"], counts["train_images"], counts["test_classes"]) == (2, 4, 3)


# ---------------------------------------------------------------- loaders on their fixtures

EXPECTED = {  # name: (train images, train classes, test images, test classes, recall_at, eval_mode)
    "cub200": (9, 3, 9, 3, [1, 2, 4, 8], "loo"),
    "cars196": (9, 3, 9, 3, [1, 2, 4, 8], "loo"),
    "sop": (8, 4, 6, 3, [1, 10, 100, 1000], "loo"),
    "inshop": (6, 3, 9, 3, [1, 10, 20, 30, 40, 50], "query_gallery"),
    "vehicleid": (12, 4, 16, 6, [1, 5], "query_gallery"),
    "folder": (9, 3, 9, 3, [1, 2, 4, 8], "loo"),
    "csv": (9, 3, 9, 3, [1, 2, 4, 8], "query_gallery"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loader_counts_split_and_eval_settings(trees, name):
    splits = from_config(name, trees[name])
    n_train, c_train, n_test, c_test, recall_at, mode = EXPECTED[name]
    counts = splits.counts()
    assert (counts["train_images"], counts["train_classes"], counts["test_images"], counts["test_classes"]) == \
        (n_train, c_train, n_test, c_test)
    assert not set(splits.train.labels) & set(splits.test.labels), "class-disjoint split"
    assert splits.eval_recall_at == recall_at and splits.eval_mode == mode
    assert splits.info["counts"]["train_images"] == n_train
    assert splits.train.labels.dtype == np.int64 and splits.train.in_channels == 3


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("transform,size", [("none", None), ("caffe_227", 227), ("rrc_224", 224)])
def test_sample_tensor_through_each_transform(trees, name, transform, size):
    splits = from_config(name, trees[name], transform=transform)
    default = {"cub200": 227, "cars196": 227, "sop": 227}.get(name, 224)
    side = size or default
    for dataset in (splits.train, splits.test):
        image, label = dataset[0]
        assert image.shape == (3, side, side) and image.dtype == torch.float32
        assert label == int(dataset.labels[0])
    assert ("dataset default" in splits.info["transform"]) == (transform == "none")


def test_cub_uses_class_ids_not_train_test_split(trees):
    splits = from_config("cub200", trees["cub200"])
    assert set(splits.train.labels) == {1, 2, 3} and set(splits.test.labels) == {101, 102, 103}
    assert all("/images/" in p for p in splits.train.paths)


def test_cars_ignores_test_flag_and_reads_the_mat_struct(trees):
    paths, labels = cars196.read_cars_annos(trees["cars196"])
    assert len(paths) == 18 and paths[0].endswith("car_ims/000001.jpg")
    splits = from_config("cars196", trees["cars196"])
    assert set(splits.train.labels) == {1, 2, 3} and set(splits.test.labels) == {99, 100, 101}


def test_sop_paths_relative_to_root(trees):
    splits = from_config("sop", trees["sop"])
    assert splits.train.paths[0] == str(trees["sop"] / "cabinet_final/1001_0.JPG")


def test_inshop_query_gallery_masks(trees):
    splits = from_config("inshop", trees["inshop"])
    q, g = splits.query_mask, splits.gallery_mask
    assert q.dtype == bool and q.shape == g.shape == (len(splits.test),)
    assert not (q & g).any() and (q | g).all()
    assert (q.sum(), g.sum()) == (6, 3)
    assert set(splits.test.labels[q]) == set(splits.test.labels[g]) == {7, 8, 9}
    assert set(splits.train.labels) == {2, 3, 4}  # item ids id_00000002 -> 2
    assert splits.info["queries_without_gallery_match"] == 0


@pytest.mark.parametrize("test_size,ids", [("small", 2), ("medium", 4), ("large", 6)])
def test_vehicleid_test_sizes(trees, test_size, ids):
    splits = from_config("vehicleid", trees["vehicleid"], test_size=test_size, protocol="loo")
    assert splits.test.num_classes == ids and splits.eval_mode == "loo"
    assert splits.query_mask is None and splits.info["split"].endswith(
        f"test_list_{vehicleid.TEST_LISTS[test_size]}.txt")


def test_vehicleid_original_protocol_one_gallery_image_per_id(trees):
    splits = from_config("vehicleid", trees["vehicleid"], protocol="original", repeats=5)
    labels, q, g = splits.test.labels, splits.query_mask, splits.gallery_mask
    assert splits.eval_mode == "query_gallery" and splits.info["protocol_repeats"] == 5
    assert not (q & g).any() and (q | g).all()
    ids, per_id = np.unique(labels[g], return_counts=True)
    assert set(ids) == set(labels) and (per_id == 1).all()
    # id 16 has a single image: it can only be a gallery distractor, never a query
    assert 16 not in set(labels[q]) and splits.info["singleton_test_classes"] == 1
    draws = vehicleid_gallery_draws(labels, repeats=5, seed=0)
    assert len(draws) == 5
    assert np.array_equal(draws[0][0], q) and np.array_equal(draws[0][1], g)
    assert any(not np.array_equal(d[1], g) for d in draws[1:]), "draws differ"
    again = vehicleid_gallery_draws(labels, repeats=5, seed=0)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(draws, again)), "deterministic in the seed"


def test_vehicleid_loo_counts_singletons(trees):
    splits = from_config("vehicleid", trees["vehicleid"], protocol="loo")
    assert splits.info["singleton_test_classes"] == 1 and "query_images" not in splits.info["counts"]


def test_vehicleid_rejects_unknown_options(trees):
    with pytest.raises(DMLRunnerError, match="test_size"):
        from_config("vehicleid", trees["vehicleid"], test_size="huge")
    with pytest.raises(DMLRunnerError, match="protocol"):
        from_config("vehicleid", trees["vehicleid"], protocol="cmc")


def test_folder_first_half_and_split_file(trees, tmp_path):
    splits = from_config("folder", trees["folder"], split_seed=None)
    assert splits.info["class_names"][:3] == ["class_00", "class_01", "class_02"]
    assert set(splits.train.labels) == {0, 1, 2} and set(splits.test.labels) == {3, 4, 5}
    assert any(p.endswith(".png") for p in splits.train.paths)
    split_file = tmp_path / "train_classes.txt"
    split_file.write_text("# my split\nclass_01\nclass_04\n\n")
    splits = from_config("folder", trees["folder"], split_file=str(split_file))
    assert set(splits.train.labels) == {1, 4} and set(splits.test.labels) == {0, 2, 3, 5}


def test_folder_split_file_errors(trees, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("class_01\nno_such_class\n")
    with pytest.raises(DMLRunnerError, match=r"bad\.txt:2"):
        from_config("folder", trees["folder"], split_file=str(bad))
    with pytest.raises(DMLRunnerError, match="missing.txt"):
        from_config("folder", trees["folder"], split_file=str(tmp_path / "missing.txt"))
    empty = tmp_path / "one_class"
    make_folder(empty, n_classes=1)
    with pytest.raises(DMLRunnerError, match="at least two"):
        from_config("folder", empty / "my_images")


def test_validation_split_needs_two_classes_on_each_side(trees):
    # the CUB fixture has 3 training classes: a validation split would leave one class on one side
    with pytest.raises(Exception, match="cannot hold out 2 of 3 classes"):
        from_config("cub200", trees["cub200"], transform="caffe_227", val_fraction=0.5)


@pytest.mark.parametrize("name", ["sop", "vehicleid"])
def test_validation_split_is_class_disjoint_and_uses_test_transform(trees, name):
    splits = from_config(name, trees[name], transform="caffe_227", val_fraction=0.5)
    assert splits.val is not None and splits.info["val_fraction"] == 0.5
    train, val, test = set(splits.train.labels), set(splits.val.labels), set(splits.test.labels)
    assert train and val and not train & val and not val & test
    assert splits.val.transform is splits.test.transform
    assert splits.val[0][0].shape == (3, 227, 227)
    assert splits.info["counts"]["train_classes"] == len(train | val)  # counted before the hold-out


def test_loaders_work_with_worker_processes(trees):
    splits = from_config("cub200", trees["cub200"], transform="rrc_224")
    loader = torch.utils.data.DataLoader(splits.train, batch_size=4, num_workers=2, persistent_workers=True)
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 224, 224) and labels.tolist() == [1, 1, 1, 2]


# ---------------------------------------------------------------- counts against the official ones

def test_partial_download_warns_loudly(trees):
    with pytest.warns(DatasetCountWarning, match="NOT comparable"):
        splits = from_config("cub200", trees["cub200"])
    assert "train_images 9 (official 5864)" in splits.info["count_warning"]
    assert splits.info["official_counts"] == cub200.OFFICIAL_COUNTS


def test_matching_counts_do_not_warn(trees, monkeypatch):
    monkeypatch.setattr(cub200, "OFFICIAL_COUNTS", {"train_images": 9, "train_classes": 3, "test_images": 9,
                                                    "test_classes": 3})
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetCountWarning)
        splits = cub200.build(str(trees["cub200"]))
    assert "count_warning" not in splits.info


def test_query_gallery_counts_are_compared(trees):
    with pytest.warns(DatasetCountWarning, match="query_images 6 \\(official 14218\\)"):
        inshop.build(str(trees["inshop"]))
    splits = vehicleid.build(str(trees["vehicleid"]), test_size="small")
    assert splits.info["official_counts"]["gallery_images"] == 800
    assert splits.info["official_counts"]["query_images"] == 7332 - 800


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("name", sorted(SPECS))
def test_missing_root_names_path_and_source(tmp_path, name):
    missing, spec = tmp_path / "nowhere", SPECS[name]
    with pytest.raises(DMLRunnerError) as err:
        spec.build(str(missing))
    message = str(err.value)
    assert str(missing) in message and f"dml-prepare {name} {missing}" in message
    if spec.own_images:  # nothing to download: the message says how to lay out your own images
        assert "Download" not in message and spec.layout in message
    else:
        assert "http" in message and spec.url in message and spec.layout in message
    # a stable archive exists (CUB, SOP): the message offers the download
    assert (f"dml-prepare {name} {missing} --download" in message) == (spec.archive is not None)


SPLIT_FILES = {"cub200": "images.txt", "cars196": "cars_annos.mat", "sop": "Ebay_test.txt",
               "inshop": "Eval/list_eval_partition.txt", "vehicleid": "train_test_split/test_list_2400.txt"}


@pytest.mark.parametrize("name", sorted(SPLIT_FILES))
def test_missing_split_file_names_path_and_source(tmp_path, name):
    root = SPECS[name].make_fixture(tmp_path)
    (root / SPLIT_FILES[name]).unlink()
    with pytest.raises(DMLRunnerError) as err:
        SPECS[name].build(str(root))
    assert str(root / SPLIT_FILES[name]) in str(err.value) and "http" in str(err.value)
    assert f"dml-prepare {name}" in str(err.value)


def test_missing_image_is_an_error_naming_it_or_skipped_and_counted(tmp_path):
    root = make_cub200(tmp_path)
    victim = next((root / "images").rglob("*.jpg"))
    victim.unlink()
    with pytest.raises(DMLRunnerError, match=victim.name):
        cub200.build(str(root))
    splits = cub200.build(str(root), skip_bad_images=True)
    assert splits.info["skipped_images"] == {"train": 1}
    assert len(splits.train) == 8 and str(victim) not in splits.train.paths


def test_corrupt_image_names_file_at_load_time_or_up_front(tmp_path):
    root = make_sop(tmp_path)
    victim = root / "bicycle_final" / "1003_0.JPG"  # class 3 -> super class 1 (bicycle)
    splits = sop.build(str(root))
    victim.write_bytes(b"not a jpeg at all")  # broken after the up-front check: found when it is read
    index = splits.train.paths.index(str(victim))
    with pytest.raises(DMLRunnerError, match="missing or cut short"):  # the cheap check: no end marker, no decode
        sop.build(str(root))
    with pytest.raises(DMLRunnerError, match="1003_0.JPG"):
        splits.train[index]
    with pytest.raises(DMLRunnerError, match="missing or unreadable"):
        sop.build(str(root), verify_images=True)
    splits = sop.build(str(root), verify_images=True, skip_bad_images=True)
    assert splits.info["skipped_images"] == {"train": 1} and str(victim) not in splits.train.paths


def test_truncated_jpeg_is_caught_before_training(tmp_path, caplog):
    """A JPEG cut short is found by the up-front check (no decoding needed), with a message naming the file, the
    command that lists them all and the two settings; skip_bad_images leaves it out with a warning naming it."""
    root = make_folder(tmp_path)
    victim = root / "class_05" / "2.jpg"
    victim.write_bytes(victim.read_bytes()[:300])
    with pytest.raises(DMLRunnerError) as err:
        folder.build(str(root))
    message = str(err.value)
    assert str(victim) in message and f"dml-prepare folder {root}" in message and "<root>" not in message
    assert "dataset.skip_bad_images=true" in message and "dataset.verify_images=true" in message
    with caplog.at_level("WARNING"):
        splits = folder.build(str(root), skip_bad_images=True)
    assert str(victim) not in splits.train.paths + splits.test.paths
    assert str(victim) in caplog.text and sum(splits.info["skipped_images"].values()) == 1


def test_image_broken_during_training_names_the_fix(tmp_path):
    """A file that breaks after the check: the error names it, the command with the real root and the settings."""
    root = make_folder(tmp_path)
    splits = folder.build(str(root))
    victim = Path(splits.test.paths[-1])
    victim.write_bytes(victim.read_bytes()[:300])
    with pytest.raises(DMLRunnerError) as err:
        splits.test[len(splits.test) - 1]
    message = str(err.value)
    assert str(victim) in message and f"dml-prepare folder {root}" in message and "<dataset>" not in message
    assert "dataset.skip_bad_images=true" in message and "dataset.verify_images=true" in message


def _rewrite_line(path: Path, lineno: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("name,file,lineno,text,match", [
    ("cub200", "images.txt", 3, "3", r"images\.txt:3: expected 2 fields"),
    ("cub200", "image_class_labels.txt", 2, "2 two", r"image_class_labels\.txt:2: class_id must be an integer"),
    ("cub200", "image_class_labels.txt", 4, "4 201", r"image_class_labels\.txt:4: class_id 201"),
    ("sop", "Ebay_train.txt", 3, "2 1 2", r"Ebay_train\.txt:3: expected 4 fields"),
    ("sop", "Ebay_test.txt", 1, "id class super path", r"Ebay_test\.txt:1: expected the header"),
    ("inshop", "Eval/list_eval_partition.txt", 5, "img/x.jpg id_00000002 validation",
     r"list_eval_partition\.txt:5: evaluation_status"),
    ("inshop", "Eval/list_eval_partition.txt", 4, "img/x.jpg 00000002 train", r"list_eval_partition\.txt:4: item_id"),
    ("inshop", "Eval/list_eval_partition.txt", 1, "52712", r"declares 52712 images"),
    ("vehicleid", "train_test_split/train_list.txt", 2, "0000002 car", r"train_list\.txt:2: vehicle_id"),
])
def test_malformed_lines_name_file_and_line(tmp_path, name, file, lineno, text, match):
    root = SPECS[name].make_fixture(tmp_path)
    _rewrite_line(root / file, lineno, text)
    with pytest.raises(DMLRunnerError, match=match):
        SPECS[name].build(str(root))


def test_cars_malformed_annotations(tmp_path):
    root = make_cars196(tmp_path)
    write_cars_annos(root / "cars_annos.mat", [("car_ims/000001.jpg", 1, 0), ("car_ims/000002.jpg", 197, 0)])
    with pytest.raises(DMLRunnerError, match="entry 2 .*class 197"):
        cars196.build(str(root))
    (root / "cars_annos.mat").write_bytes(b"garbage")
    with pytest.raises(DMLRunnerError, match="cars_annos.mat"):
        cars196.build(str(root))
    import scipy.io
    scipy.io.savemat(str(root / "cars_annos.mat"), {"something_else": np.zeros(3)})
    with pytest.raises(DMLRunnerError, match="no variable 'annotations'"):
        cars196.build(str(root))


def test_overlapping_official_splits_are_rejected(tmp_path):
    root = make_sop(tmp_path, train_classes=(1, 2), test_classes=(2, 3))
    with pytest.raises(DMLRunnerError, match="share 1 class"):
        sop.build(str(root))
    root = make_inshop(tmp_path / "x")
    rows = [("img/a.jpg", "id_00000001", "train"), ("img/b.jpg", "id_00000001", "query")]
    write_inshop_partition(root / "Eval" / "list_eval_partition.txt", rows)
    with pytest.raises(DMLRunnerError, match="item-disjoint"):
        inshop.build(str(root))


# ---------------------------------------------------------------- transforms

def test_transform_shapes_and_normalisation():
    from PIL import Image
    image = Image.new("RGB", (300, 200), (124, 116, 104))  # ~ the ImageNet mean
    for tf, side in ((caffe_227(train=True), 227), (caffe_227(train=False), 227),
                     (caffe_227(train=False, resize_mode="shorter"), 227), (rrc_224(train=True), 224),
                     (rrc_224(train=False), 224)):
        out = tf(image)
        assert out.shape == (3, side, side) and out.abs().max() < 0.05


def test_resolve_transforms_accepts_names_specs_and_none():
    train, test, name = resolve_transforms(None, "rrc_224")
    assert name == "rrc_224 (dataset default)"
    train, test, name = resolve_transforms("caffe_227", "rrc_224")
    assert name == "caffe_227"
    spec = {"_target_": "dml_runner.datasets.transforms.rrc_224", "train": False}
    train, test, name = resolve_transforms({"train": spec, "test": None, "name": "mine"}, "caffe_227")
    assert "mine" in name and "dataset default" in name
    with pytest.raises(ValueError, match="unknown transform"):
        resolve_transforms("blur", "rrc_224")


def test_digits_image_protocol_holds_out_the_same_images_of_every_digit():
    from dml_runner.datasets.digits import build as build_digits

    a, b = build_digits(protocol="images", seed=0), build_digits(protocol="images", seed=7)
    train_labels, test_labels = np.asarray(a.train.labels), np.asarray(a.test.labels)
    assert set(train_labels.tolist()) == set(test_labels.tolist()) == set(range(10))
    counts = np.bincount(test_labels) / (np.bincount(test_labels) + np.bincount(train_labels))
    assert np.all(np.abs(counts - 0.3) < 0.01)  # a stratified 30% of each digit
    assert len(a.train) + len(a.test) == 1797
    assert torch.equal(torch.stack([a.test[i][0] for i in range(len(a.test))]),
                       torch.stack([b.test[i][0] for i in range(len(b.test))]))  # the same test set for every seed
    test_images = {a.test[i][0].numpy().tobytes() for i in range(len(a.test))}
    a.train.transform = None
    assert not any(a.train[i][0].numpy().tobytes() in test_images for i in range(0, len(a.train), 7))
    assert a.info["protocol"] == "images"
    v = build_digits(protocol="images", val_fraction=0.2, seed=3)
    val_labels, train_labels = np.asarray(v.val.labels), np.asarray(v.train.labels)
    assert set(val_labels.tolist()) == set(range(10)) and len(v.val) + len(v.train) == len(a.train)
    assert abs(len(v.val) / len(a.train) - 0.2) < 0.01 and v.val.transform is None  # test-time view, no shift


def test_digits_protocol_errors_name_the_option():
    from dml_runner.datasets.digits import build as build_digits

    with pytest.raises(ValueError, match="dataset.protocol='writers'"):
        build_digits(protocol="writers")
    with pytest.raises(ValueError, match="dataset.val_fraction"):
        build_digits(protocol="images", val_fraction=1.2)
    with pytest.raises(ValueError, match="dataset.test_fraction"):
        build_digits(protocol="images", test_fraction=1.5)
    with pytest.raises(ValueError, match="protocol=images"):
        build_digits(protocol="classes", train_classes=(0, 1), test_classes=(1, 2))


def test_items_are_named_by_path_and_class(trees):
    """paths and class names (what embeddings.npz records) follow each dataset's own files."""
    from dml_runner.datasets import SubsetLabelledDataset

    cub = from_config("cub200", trees["cub200"])
    names = dict(zip(cub.test.labels.tolist(), cub.test.item_class_names().tolist()))
    assert names == {101: "101.Bird_101", 102: "102.Bird_102", 103: "103.Bird_103"}
    assert [Path(p).parent.name for p in cub.test.paths] == cub.test.item_class_names().tolist()
    # a subset view (the validation split is one) keeps its items' paths and class names
    view = SubsetLabelledDataset(cub.test, np.array([7, 0]))
    assert view.item_paths().tolist() == [cub.test.paths[7], cub.test.paths[0]]
    assert view.item_class_names().tolist() == ["103.Bird_103", "101.Bird_101"]
    cars = from_config("cars196", trees["cars196"])
    assert set(cars.test.item_class_names()) == {"Make Model 99", "Make Model 100", "Make Model 101"}
    sop = from_config("sop", trees["sop"])
    assert sop.test.item_class_names()[0] == f"{Path(sop.test.paths[0]).parent.name}/{sop.test.labels[0]}"
    inshop = from_config("inshop", trees["inshop"])
    assert set(inshop.test.item_class_names()) == {"id_00000007", "id_00000008", "id_00000009"}
    folder_splits = from_config("folder", trees["folder"], split_seed=None)
    assert set(folder_splits.test.item_class_names()) == {"class_03", "class_04", "class_05"}
    vehicle = from_config("vehicleid", trees["vehicleid"], protocol="loo")
    assert vehicle.test.item_class_names().tolist() == [str(c) for c in vehicle.test.labels]
    assert vehicle.test.item_paths().tolist() == vehicle.test.paths


def test_digits_items_point_at_their_row_of_load_digits():
    from sklearn.datasets import load_digits

    from dml_runner.datasets import digits

    bunch = load_digits()
    splits = digits.build(protocol="images", val_fraction=0.2)
    for part in (splits.train, splits.val, splits.test):
        rows = np.array([int(p.split("#")[1]) for p in part.item_paths()])
        assert all(p.startswith("sklearn.datasets.load_digits#") for p in part.item_paths())
        assert np.array_equal(bunch.target[rows], part.labels)
        assert torch.equal(part.load(3), torch.from_numpy(bunch.images[rows[3]].astype(np.float32) / 16)[None])
    assert splits.test.item_class_names().tolist() == [str(c) for c in splits.test.labels]
