"""The extension examples of docs/EXTENDING.md (examples/my_dml): run from outside the package, as a user runs them.

The plug-in's folder goes on PYTHONPATH and its conf/ on Hydra's search path; nothing in dml_runner/ or conf/
knows about it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO, dml_run_cmd

PLUGIN = REPO / "examples" / "my_dml"
sys.path.insert(0, str(PLUGIN))


def plugin_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PLUGIN)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(extra)
    return env


def run_plugin(args: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(dml_run_cmd() + [f"hydra.searchpath=[file://{PLUGIN / 'conf'}]"] + args, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"dml-run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def write_image_list(folder: Path, classes: int = 6, per_class: int = 8, side: int = 40) -> Path:
    """PNG images of scikit-learn's digits (upscaled, RGB) and a path,class,split list: half the classes train."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rows = ["path,class,split"]
    for c in range(classes):
        (folder / "img" / str(c)).mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(digits.target == c)[:per_class]:
            pixels = (digits.images[i] / 16 * 255).astype(np.uint8)
            rel = f"img/{c}/{i}.png"
            Image.fromarray(pixels).resize((side, side)).convert("RGB").save(folder / rel)
            rows.append(f"{rel},digit{c},{'train' if c < classes // 2 else 'test'}")
    (folder / "list.csv").write_text("\n".join(rows) + "\n")
    return folder / "list.csv"


def test_binomial_deviance_matches_a_pair_by_pair_sum():
    from my_dml.losses import BinomialDevianceLoss

    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(10, 6, generator=gen)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3])
    alpha, beta, cost = 2.0, 0.5, 25.0
    x = emb / emb.norm(dim=1, keepdim=True)
    pos, neg = [], []
    for i in range(10):
        for j in range(10):
            if i == j:
                continue
            s = float(x[i] @ x[j])
            if labels[i] == labels[j]:
                pos.append(np.log1p(np.exp(-alpha * (s - beta))))
            else:
                neg.append(np.log1p(np.exp(alpha * (s - beta) * cost)))
    expected = np.mean(pos) + np.mean(neg)
    got = BinomialDevianceLoss(alpha, beta, cost)(emb, labels)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    emb.requires_grad_(True)
    BinomialDevianceLoss()(emb, labels).backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0


def test_csv_list_dataset_refuses_a_split_that_shares_classes(tmp_path):
    from dml_runner import DMLRunnerError
    from my_dml.datasets import build

    listing = write_image_list(tmp_path, classes=4, per_class=2)
    lines = listing.read_text().splitlines()
    lines.append(lines[1].replace(",train", ",test"))  # a train class appears in test too
    listing.write_text("\n".join(lines) + "\n")
    with pytest.raises(DMLRunnerError, match="both train and test"):
        build(str(listing))
    with pytest.raises(DMLRunnerError, match="missing.csv"):
        build(str(tmp_path / "missing.csv"))


def compose_with_plugin(*overrides: str):
    """The run config composed as `dml-run 'hydra.searchpath=[file://examples/my_dml/conf]' ...` composes it."""
    from hydra import compose, initialize_config_dir

    from dml_runner.config import conf_dir, register_configs

    register_configs()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("config", overrides=[f"hydra.searchpath=[file://{PLUGIN / 'conf'}]", *overrides],
                       return_hydra_config=False)


def test_every_plugin_kind_is_built_by_the_builder_from_outside_the_package(tmp_path):
    """Each plug-in kind (dataset, backbone, loss, method, sampler) of examples/my_dml goes through the config checks
    and dml_runner.build (the group contracts), as dml-run builds it, and the built objects work together."""
    from dml_runner.build import build_loss, build_model, instantiate, sampler_factory
    from dml_runner.config import validate_config
    from my_dml.backbones import MobileNetTrunk
    from my_dml.datasets import build
    from my_dml.losses import BinomialDevianceLoss
    from my_dml.methods import AccumulatedMethod
    from my_dml.samplers import ClassBlocksBatchSampler

    listing = write_image_list(tmp_path, classes=6, per_class=4)
    cfg = compose_with_plugin("dataset=csv_list", f"dataset.csv_file={listing}", "backbone=mobilenet_v3_small",
                              "loss=binomial_deviance", "method=accumulated", "sampler=class_blocks",
                              "transform=rrc_224", "transform.train.crop=32", "transform.test.crop=32",
                              "transform.test.resize=36", "trainer.batch_size=4")
    validate_config(cfg)
    data = instantiate(cfg.dataset, "dataset")
    model = build_model(cfg, data.train.in_channels)
    loss = build_loss(cfg, data.train.labels)
    method = instantiate(cfg.method, "method")
    sampler = sampler_factory(cfg.sampler, cfg.trainer.batch_size, cfg.trainer.seed)(data.train.labels)
    assert data.info and len(data.train) == 12 and len(data.test) == 12  # build() of my_dml.datasets: 3 + 3 classes
    assert isinstance(model.trunk, MobileNetTrunk) and model.info["arch"] == "mobilenet_v3_small"
    assert isinstance(loss, BinomialDevianceLoss) and isinstance(method, AccumulatedMethod)
    assert isinstance(sampler, ClassBlocksBatchSampler) and method.accumulate == 2
    assert cfg.dataset._target_ == f"{build.__module__}.{build.__name__}"
    batch = next(iter(sampler))
    images = torch.stack([data.train[i][0] for i in batch])
    labels = torch.as_tensor(data.train.labels[batch])
    model.eval()
    with torch.no_grad():
        emb = model(images)
    assert emb.shape == (4, 128) and torch.isfinite(loss(emb, labels))


def test_help_lists_the_plugin_options_given_its_search_path(monkeypatch, capsys):
    """`dml-run 'hydra.searchpath=[file://<plug-in>/conf]' --help` lists each plug-in option in its group's line;
    without the search path only the repository's options are listed."""
    from dml_runner.cli import run as cli_run

    def group_lines(argv: list[str]) -> dict[str, str]:
        monkeypatch.setattr(sys, "argv", ["dml-run", *argv])
        cli_run.main()
        lines = capsys.readouterr().out.splitlines()
        return {line.split()[0]: line for line in lines if line.startswith("  ") and line.split()}

    plain = group_lines(["--help"])
    with_plugin = group_lines([f"hydra.searchpath=[file://{PLUGIN / 'conf'}]", "--help"])
    for group, option in (("loss", "binomial_deviance"), ("dataset", "csv_list"), ("backbone", "mobilenet_v3_small"),
                          ("method", "accumulated"), ("sampler", "class_blocks")):
        assert option not in plain[group]
        assert option in with_plugin[group] and str(PLUGIN / "conf") in with_plugin[group]
        assert with_plugin[group].startswith(plain[group])  # the built-in options first, as they were


def test_plugin_sampler_cuts_class_blocks_and_is_seeded_by_epoch():
    """ClassBlocksBatchSampler: every batch spans at most two consecutive classes (4 images per class, batches of 4
    or 2), each epoch is a permutation of whole classes, and (seed, epoch) alone decides the order."""
    from my_dml.samplers import ClassBlocksBatchSampler

    labels = np.repeat(np.arange(6), 4)
    for batch_size in (2, 4):
        sampler = ClassBlocksBatchSampler(labels, batch_size, seed=0)
        batches = list(sampler)
        assert len(batches) == 24 // batch_size and sorted(sum(batches, [])) == list(range(24))
        assert all(len(set(labels[b])) == 1 for b in batches)  # 4 images per class: blocks align with batches
    sampler = ClassBlocksBatchSampler(np.repeat(np.arange(6), 3), 4, seed=0)
    assert all(len(set(np.repeat(np.arange(6), 3)[b])) <= 2 for b in sampler)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first


@pytest.mark.slow
def test_plugin_loss_dataset_and_backbone_train_with_pretrained_weights(tmp_path):
    """dml-run with the plug-in's loss, dataset and backbone; backbone.pretrained=true loads the file through
    torchvision's own code from a TORCH_HOME hub cache (random values, the exact file name and shapes)."""
    import torchvision

    listing = write_image_list(tmp_path / "data")
    weights = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    torch_home = tmp_path / "torch_home"
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(123)
    state = torchvision.models.mobilenet_v3_small().state_dict()
    torch.save(state, torch_home / "hub" / "checkpoints" / Path(weights.url).name)

    out = tmp_path / "run"
    run_plugin(["dataset=csv_list", f"dataset.csv_file={listing}", "loss=binomial_deviance",
                "backbone=mobilenet_v3_small", "backbone.pretrained=true", "transform=rrc_224",
                "transform.train.crop=32", "transform.test.crop=32", "transform.test.resize=36", "trainer=smoke",
                "trainer.batch_size=12", "optimizer.lr=1e-7", f"hydra.run.dir={out}"],
               cwd=tmp_path, env=plugin_env(TORCH_HOME=str(torch_home)))
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed"
    assert results["config"]["loss"]["_target_"] == "my_dml.losses.BinomialDevianceLoss"
    assert results["config"]["dataset"]["_target_"] == "my_dml.datasets.build"
    assert results["model"]["arch"] == "mobilenet_v3_small" and results["model"]["pretrained"] is True
    assert results["dataset"]["test_images"] == 24 and np.isfinite(results["metrics"]["recall@1"])
    # the trunk started from the file: at lr 1e-7 three Adam steps move a weight by at most ~3e-7, while another
    # random init differs by ~0.1 (the first convolution's init scale)
    saved = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["model"]
    for key in ("features.0.0.weight", "features.12.0.weight"):
        moved = (saved[f"trunk.{key}"] - state[key]).abs().max().item()
        assert 0 < moved < 1e-5, (key, moved)


@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [1, 2])
def test_plugin_method_accumulates_batches_before_each_step(tmp_path, accumulate):
    """method=accumulated: 4 batches per epoch make 4 / accumulate optimiser steps (Adam's step count)."""
    out = tmp_path / "run"
    run_plugin(["method=accumulated", f"method.accumulate={accumulate}", "trainer=smoke", "trainer.epochs=2",
                "trainer.max_steps_per_epoch=4", "trainer.batch_size=20", f"hydra.run.dir={out}"],
               cwd=tmp_path, env=plugin_env())
    history = pd.read_csv(out / "history.csv")
    assert list(history["optimizer_steps"].dropna()) == [4 // accumulate, 8 // accumulate]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed" and np.isfinite(results["metrics"]["recall@1"])
