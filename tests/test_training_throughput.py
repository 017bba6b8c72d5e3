"""Where an epoch's time goes (data_time_s, step_time_s, the data-bound warning), the decoded-image cache inside
dml-run (dataset.cache, paths.cache_dir), and the loader / compile options of the trainer."""

from __future__ import annotations

import json
import logging
import time
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch

from dml_runner import DMLRunnerError

# --------------------------------------------------------------------------------------------------- the checks


@pytest.mark.parametrize("override,option", [
    ("dataset.cache=sometimes", "dataset.cache"),
    ("trainer.prefetch_factor=0", "trainer.prefetch_factor"),
    ("paths.cache_dir=''", "paths.cache_dir"),
])
def test_bad_throughput_options_are_one_line_naming_the_option(compose_cfg, override, option):
    from dml_runner.config import validate_config

    cfg = compose_cfg("dataset=cub200", override)
    with pytest.raises(DMLRunnerError) as err:
        validate_config(cfg)
    assert str(err.value).startswith(option) and "\n" not in str(err.value)


def test_the_new_options_compose_with_their_defaults(compose_cfg, monkeypatch):
    from dml_runner.config import trainer_settings, validate_config

    monkeypatch.delenv("DML_CACHE", raising=False)
    cfg = compose_cfg("dataset=cub200", "paths.data_dir=/d")
    validate_config(cfg)
    assert cfg.dataset.cache == "auto" and cfg.paths.cache_dir == "/d/.dml_cache"
    s = trainer_settings(cfg)
    assert s.compile is False and s.prefetch_factor is None
    validate_config(compose_cfg("dataset=cub200", "dataset.cache=none", "trainer.compile=true",
                                "trainer.prefetch_factor=4"))
    monkeypatch.setenv("DML_CACHE", "/scratch/c")
    assert compose_cfg("dataset=cub200").paths.cache_dir == "/scratch/c"


# ------------------------------------------------------------------------------------------- the loop's timing

def _tiny(out_dir, train=None, **settings):
    from dml_runner.backbones import small_cnn
    from dml_runner.config import TrainerConfig
    from dml_runner.datasets.base import DatasetSplits, TensorLabelledDataset
    from dml_runner.devices import seed_everything
    from dml_runner.evaluation import evaluate
    from dml_runner.losses.triplet import TripletLoss
    from dml_runner.methods import StandardMethod
    from dml_runner.samplers import ClassBalancedBatchSampler
    from dml_runner.training.trainer import Trainer

    seed_everything(0)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(60, 1, 8, 8, generator=g)
    labels = np.repeat(np.arange(6), 10)
    data = DatasetSplits(name="tiny", train=train or TensorLabelledDataset(images[:40], labels[:40]),
                         test=TensorLabelledDataset(images[40:], labels[40:]))
    cfg = TrainerConfig(**{"epochs": 2, "batch_size": 8, "eval_every": 1, "progress": False,
                           "eval_before_training": False, "device": "cpu", **settings})
    return Trainer(cfg, data, small_cnn(in_channels=1, width=4, embedding_dim=8), TripletLoss(), StandardMethod(),
                   partial(torch.optim.Adam, lr=0.01), None,
                   lambda labels, batch_size=None, seed=None: ClassBalancedBatchSampler(
                       labels, batch_size or 8, 0 if seed is None else seed, samples_per_class=2),
                   partial(evaluate, recall_at=(1,), metrics=("recall",), device="cpu"), out_dir)


class SlowImages(torch.utils.data.Dataset):
    """In-memory images whose every read sleeps ``delay`` seconds: a loader that sets the pace."""

    def __init__(self, delay: float) -> None:
        g = torch.Generator().manual_seed(1)
        self.images = torch.rand(40, 1, 8, 8, generator=g)
        self.labels = np.repeat(np.arange(4), 10)
        self.delay = delay
        self.in_channels = 1

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        time.sleep(self.delay)
        return self.images[i], int(self.labels[i])


def test_history_and_results_record_data_and_step_time_and_a_slow_loader_warns(tmp_path, caplog):
    # 8 reads of 30 ms per batch (240 ms) against a step of a 4-channel CNN on 8x8 images (about 5 ms here): the
    # loader takes > 90% of the loop, far above the warning's 50%
    trainer = _tiny(tmp_path, train=SlowImages(0.03), max_steps_per_epoch=2)
    with caplog.at_level(logging.INFO, logger="dml_runner.training.trainer"):
        out = trainer.fit()
    history = pd.read_csv(tmp_path / "history.csv")
    assert {"data_time_s", "step_time_s"} <= set(history.columns)
    assert (history["data_time_s"] >= 2 * 8 * 0.03).all()  # two batches of 8 sleeping reads, at least
    assert (history["step_time_s"] > 0).all()
    lines = [r.getMessage() for r in caplog.records]
    assert any("waiting for data" in m and m.startswith("epoch 1/2") for m in lines)
    warnings = [m for m in lines if "trainer.num_workers" in m]
    assert len(warnings) == 1 and "dataset.cache" in warnings[0]  # once a run
    timing = out["timing"]
    assert [r["epoch"] for r in timing["per_epoch"]] == [1, 2]
    assert timing["data_time_s"] == pytest.approx(history["data_time_s"].sum(), abs=1e-3)
    assert timing["data_share"] > 0.5


def test_prefetch_factor_and_persistent_evaluation_workers(tmp_path):
    trainer = _tiny(tmp_path, num_workers=1, prefetch_factor=3, max_steps_per_epoch=2)
    out = trainer.fit()
    assert np.isfinite(out["final"]["metrics"]["recall@1"])
    (dataset, loader), = trainer._eval_loaders.values()  # one loader for the test split, kept across evaluations
    assert dataset is trainer.data.test and loader.persistent_workers and loader.prefetch_factor == 3
    assert trainer.eval_loader(trainer.data.test) is loader
    from dml_runner.training.trainer import KEPT_EVAL_LOADERS

    views = [trainer.data.test.__class__(trainer.data.test.images, trainer.data.test.labels) for _ in range(5)]
    for view in views:  # ever new datasets: the oldest loaders are let go, the number kept stays bounded
        trainer.eval_loader(view)
    assert len(trainer._eval_loaders) == KEPT_EVAL_LOADERS and trainer.eval_loader(views[-1]) is \
        trainer._eval_loaders[id(views[-1])][1]
    trainer.release()
    assert not trainer._eval_loaders


def test_compile_trains_a_tiny_model_on_the_cpu_with_unchanged_checkpoint_keys(tmp_path):
    plain = _tiny(tmp_path / "plain", epochs=1, max_steps_per_epoch=2)
    compiled = _tiny(tmp_path / "compiled", epochs=1, max_steps_per_epoch=2, compile=True)
    assert compiled.model.trunk._compiled_call_impl is not None and plain.model.trunk._compiled_call_impl is None
    try:
        out = compiled.fit()
    finally:
        torch._dynamo.reset()  # as dml-run does after a compiled run: later in-process tests trace nothing of it
    assert np.isfinite(out["final"]["metrics"]["recall@1"])
    saved = torch.load(tmp_path / "compiled" / "last.pt", weights_only=True)["model"]
    assert set(saved) == set(plain.model.state_dict())  # no _orig_mod. prefix: checkpoints load either way


# --------------------------------------------------------------------------------------- the cache inside dml-run

def test_caffe_227_run_with_the_cache_embeds_as_the_uncached_run(tmp_path):
    """Same seed, cache on (default) and off: the same test embeddings, bit for bit; data_time_s recorded."""
    from dml_runner.datasets.fixtures import make_cub200

    from conftest import run_dml

    make_cub200(tmp_path / "data", classes=(1, 2, 3, 4, 101, 102, 103), per_class=4)
    common = ["dataset=cub200", f"paths.data_dir={tmp_path / 'data'}", f"paths.cache_dir={tmp_path / 'cache'}",
              "transform=caffe_227", "transform.train.resize=40", "transform.train.crop=32",
              "transform.test.resize=40", "transform.test.crop=32", "backbone=small_cnn",
              "trainer=smoke", "trainer.batch_size=8", "sampler=class_balanced", "sampler.samples_per_class=2",
              "trainer.epochs=2", "trainer.eval_before_training=false", "trainer.save_checkpoints=false",
              "trainer.num_workers=0", "trainer.device=cpu"]
    runs = {}
    for mode in ("auto", "none"):
        out = tmp_path / mode
        run_dml(common + [f"dataset.cache={mode}", f"hydra.run.dir={out}"], cwd=tmp_path)
        runs[mode] = (json.loads((out / "results.json").read_text()), np.load(out / "embeddings.npz"),
                      pd.read_csv(out / "history.csv"))
    (res_on, emb_on, hist_on), (res_off, emb_off, hist_off) = runs["auto"], runs["none"]
    record = res_on["dataset"]["info"]["decoded_cache"]
    assert record["train"]["cached"] and record["train"]["exact"] and record["test"]["cached"]
    assert record["bytes"] > 0 and list((tmp_path / "cache").glob("*.dcache"))
    assert res_off["dataset"]["info"]["decoded_cache"] == {"mode": "none"}
    assert emb_on["embeddings"].shape == emb_off["embeddings"].shape
    assert np.array_equal(emb_on["embeddings"], emb_off["embeddings"])
    assert np.array_equal(hist_on["train_loss"], hist_off["train_loss"])
    for res, hist in ((res_on, hist_on), (res_off, hist_off)):
        assert (hist["data_time_s"] > 0).all() and res["timing"]["data_time_s"] > 0


def test_hdml_cv2_resize_is_a_cached_prefix_with_identical_batches(tmp_path):
    """resize_mode=warp_cv2 (the HDML rows) declares itself deterministic: its warp is cached, batches unchanged."""
    from dml_runner.datasets.decoded_cache import CachedImageDataset, cached_dataset, split_transform
    from dml_runner.datasets.fixtures import make_cub200
    from dml_runner.datasets.images import ImageListDataset
    from dml_runner.datasets.transforms import caffe_227

    assert split_transform(caffe_227(True, resize_mode="warp_cv2")).prefix.description == "Cv2LinearResize(size=256)"
    assert split_transform(caffe_227(False, resize_mode="warp_cv2")).prefix.description == \
        "Cv2LinearResize(size=256) -> CenterCrop(size=(227, 227))"
    root = make_cub200(tmp_path, classes=(1, 2), per_class=3)
    paths = sorted(str(p) for p in (root / "images").rglob("*.jpg"))
    labels = np.repeat(np.arange(2), 3)

    def make():
        return ImageListDataset(paths, labels, transform=caffe_227(True, resize=40, crop=32, resize_mode="warp_cv2"))

    cached = cached_dataset(make(), tmp_path / "cache", progress=False)
    assert isinstance(cached, CachedImageDataset)
    for seed in (0, 1):
        torch.manual_seed(seed)
        a = [cached[i][0] for i in range(len(paths))]
        torch.manual_seed(seed)
        plain = make()
        b = [plain[i][0] for i in range(len(paths))]
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_dml_prepare_cache_builds_what_the_run_then_opens(tmp_path, capsys, monkeypatch, compose_cfg):
    from dml_runner.build import instantiate
    from dml_runner.cli import prepare
    from dml_runner.datasets import cub200, decoded_cache
    from dml_runner.datasets.fixtures import make_cub200

    root = make_cub200(tmp_path)
    monkeypatch.setattr(cub200, "OFFICIAL_COUNTS", {"train_images": 9, "train_classes": 3, "test_images": 9,
                                                    "test_classes": 3})
    cache = tmp_path / "cache"
    assert prepare.main(["cub200", str(root), "--quick", "--cache", "transform=lifted_227",
                         f"paths.cache_dir={cache}"]) == 0
    out = capsys.readouterr().out
    assert "train: 9 images" in out and "test: 9 images" in out and len(list(cache.glob("*.dcache"))) == 2

    def no_build(*args, **kwargs):
        raise AssertionError("the cache was built again")

    monkeypatch.setattr(decoded_cache, "_write_cache", no_build)  # what dml-run does at its start: open, not build
    cfg = compose_cfg("dataset=cub200", f"dataset.root={root}", "transform=lifted_227", f"paths.cache_dir={cache}")
    data = decoded_cache.apply_decoded_cache(instantiate(cfg.dataset, "dataset"), cfg.dataset.cache,
                                             cfg.paths.cache_dir, progress=False)  # as dml-run's start
    assert data.info["decoded_cache"]["train"]["cached"] and data.info["decoded_cache"]["test"]["cached"]
    # a typo'd option or the cache turned off is one line, exit 1
    assert prepare.main(["cub200", str(root), "--quick", "--cache", "dataset.cache=none"]) == 1
    assert "dataset.cache=none" in capsys.readouterr().err
    assert prepare.main(["cub200", str(root), "transform=lifted_227"]) == 2  # overrides without --cache


def test_dml_run_with_an_unwritable_cache_dir_stops_in_one_line_naming_it(tmp_path):
    from dml_runner.datasets.fixtures import make_cub200

    from conftest import run_dml

    make_cub200(tmp_path / "data", classes=(1, 2, 101, 102), per_class=2)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc = run_dml(["dataset=cub200", f"paths.data_dir={tmp_path / 'data'}", f"paths.cache_dir={blocker / 'cache'}",
                    "backbone=small_cnn", "trainer=smoke", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                   check=False)
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "paths.cache_dir=" in line]
    assert lines and "dataset.cache=none" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "last.pt").exists()


# ------------------------------------------------------------------------------------------ scripts/bench_train.py

def test_bench_train_step_and_run_parts_at_a_tiny_size(tmp_path):
    """The benchmark behind docs/PERFORMANCE.md's step-overhead and data-time figures runs as documented (tiny sizes):
    (b) pairs every timed round and gives a mean inside its own interval; (d) runs dml-run twice, cache on and off,
    and finds the two runs' test embeddings identical."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(script), "--images", "12", "--data", str(tmp_path / "tree"),
                           "--skip-loader", "--skip-embedding", "--steps", "1", "--step-rounds", "3", "--step-px", "32",
                           "--run-images", "48", "--run-rounds", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    step, run = result["training_step"], result["run_data_time"]
    assert len(step["overhead_per_round"]) == 3
    assert step["overhead_low"] <= step["overhead_mean"] <= step["overhead_high"]
    assert step["overhead_mean"] == pytest.approx(np.mean(step["overhead_per_round"]))
    assert run["images"] == 48 and run["same_embeddings"] is True
    assert run["data_time_s_cache_on"] > 0 and run["data_time_s_cache_off"] > 0
    assert "| caffe_227 dml-run (48 images" in proc.stdout and "mean [95% interval]" in proc.stdout
