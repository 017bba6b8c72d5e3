"""dml_runner.build: every built-in option honours its group's contract; a plug-in that does not is refused
with one line naming the option."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from dml_runner import DMLRunnerError
from dml_runner.config import conf_dir
from dml_runner.build import check
from dml_runner.build import instantiate as build_instantiate


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


@pytest.mark.parametrize("name", options("loss"))
def test_every_loss_option_honours_the_contract(compose_cfg, name):
    cfg = compose_cfg(f"loss={name}")
    loss = check("loss", instantiate(cfg.loss), name)
    assert isinstance(loss, nn.Module)


@pytest.mark.parametrize("name", options("sampler"))
def test_every_sampler_option_honours_the_contract(compose_cfg, name):
    cfg = compose_cfg(f"sampler={name}")
    labels = np.repeat(np.arange(20), 6)  # 120 images, 20 classes; batch 24 suits every sampler
    sampler = check("sampler", instantiate(cfg.sampler, labels=labels, batch_size=24, seed=0), name)
    sampler.set_epoch(1)
    assert len(sampler) > 0 and all(0 <= i < len(labels) for batch in sampler for i in batch)


@pytest.mark.parametrize("name", options("method"))
def test_every_method_option_honours_the_contract(compose_cfg, name):
    cfg = compose_cfg(f"method={name}")
    check("method", instantiate(cfg.method), name)


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "googlenet"])
def test_backbones_honour_the_contract(compose_cfg, name):
    cfg = compose_cfg(f"backbone={name}")
    model = check("backbone", instantiate(cfg.backbone, in_channels=1 if name == "small_cnn" else 3), name)
    assert model(torch.zeros(2, 1 if name == "small_cnn" else 3, 64, 64)).shape == (2, model.embedding_dim)


def test_the_digits_dataset_honours_the_contract(compose_cfg):
    check("dataset", build_instantiate(compose_cfg().dataset, "dataset"), "digits")


class NoLabels(nn.Module):
    def forward(self, embeddings):
        return embeddings.sum()


@pytest.mark.parametrize("group,obj,message", [
    ("loss", lambda e, l: 0.0, "not a torch.nn.Module"),
    ("loss", NoLabels(), "cannot be called as forward"),
    ("backbone", nn.Linear(3, 3), "has no trunk, head, features, feature_dim, embedding_dim"),
    ("method", object(), "has no setup"),
    ("sampler", [[0, 1]], "has no set_epoch"),
    ("dataset", {"train": []}, "not a dml_runner.datasets.base.DatasetSplits"),
])
def test_a_broken_plugin_is_refused_naming_the_option(group, obj, message):
    with pytest.raises(DMLRunnerError, match=f"^{group}=my.thing breaks the {group} contract.*{message}"):
        check(group, obj, "my.thing")


def test_dataset_labels_must_match_the_split(compose_cfg):
    splits = build_instantiate(compose_cfg().dataset, "dataset")
    splits.test.labels = splits.test.labels.astype(np.float32)  # not class ids
    with pytest.raises(DMLRunnerError, match="test: labels must be a 1-D integer array"):
        check("dataset", splits, "digits")


def test_dml_run_refuses_a_loss_that_breaks_the_contract(tmp_path):
    """The check runs on what `dml-run` builds: a loss target that returns a dict stops the run in one line."""
    from conftest import run_dml

    proc = run_dml(["loss._target_=builtins.dict", "trainer=smoke", f"hydra.run.dir={tmp_path / 'run'}"],
                   cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "loss=builtins.dict breaks the loss contract (docs/ARCHITECTURE.md): returned dict, not a torch.nn.Module" \
        in proc.stderr + proc.stdout
    assert not (tmp_path / "run" / "last.pt").exists()
