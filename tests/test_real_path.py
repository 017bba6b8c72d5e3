"""Every paper row (conf/experiment/**.yaml) trains on the path a user runs, with ImageNet weights loaded by
torchvision's own code from an offline hub cache (the ``hub_cache`` fixture: random weights under torchvision's file
names and shapes).

- Per row: ``scripts/reproduce.py <target> --smoke`` (fixture trees in the official layouts, a step or two, fewer
  classes per batch, 64-px crops; the row's backbone and weights, transform, sampler, loss and method unchanged)
  runs each target once per session (tests/smoke_runs.py; tests/test_reproduce_smoke.py checks its tables). Each
  row's run directory is checked: completed, the components are the row's, results.json names the weights file
  loaded, the parameters the row freezes are bit-identical to that file and the ones it trains moved, the loss is
  finite, the test embeddings did not collapse, and a Divide and Conquer row went through clustering, per-learner
  batches, the full-embedding phase and the conquer phase.
- Per distinct backbone x transform x method: one step of its first row at the row's full image size and batch.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from dml_runner.config import group_options
from smoke_runs import TARGET_DIRS, TargetRun, run_target, target_of

# The paper rows: the experiments a reproduce target runs, the files directly in its directory
# (conf/experiment/modern/ holds recipes, not table rows; dc/author_recipe/ holds presets outside the table).
EXPERIMENTS = [e for e in group_options("experiment")
               if any(e.startswith(d) and "/" not in e[len(d):] for d in TARGET_DIRS.values())]
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
# What each backbone.freeze option keeps at the loaded values: BatchNorm statistics, BatchNorm affine, the rest.
FROZEN = {"none": (False, False, False), "bn": (True, False, False), "bn_all": (True, True, False),
          "all": (True, True, True)}
# Transform arguments in pixels (the smoke run scales them); every other argument must be the row's.
SIZE_KEYS = {"crop", "resize", "size"}


def plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if cfg is not None else None


def without_sizes(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    return {k: without_sizes(v) for k, v in node.items() if k not in SIZE_KEYS}


def test_every_experiment_file_is_covered():
    assert len(EXPERIMENTS) == 49
    assert {target_of(e) for e in EXPERIMENTS} == {"table1", "table2", "table3", "lifted", "dc", "mdl"}


def check_components(row: str, composed: Any, used: dict[str, Any], run: TargetRun) -> None:
    """The smoke run used the row's config except for sizes, steps, epochs and the data: same backbone and weights,
    transform type, sampler and batch layout, loss, optimizer, method, evaluation and reference."""
    shrinkable = {"trainer", "tags", "dataset", "transform", "method", "paths"}  # paths: the fixture data
    for group in composed:
        if group not in shrinkable:
            assert used.get(group) == plain(composed.get(group)), f"{row}: {group} differs from the row's"
    assert used["backbone"]["pretrained"] is True, f"{row}: the hub cache is there, the weights must be loaded"
    assert without_sizes(used["transform"]) == without_sizes(plain(composed.transform)), f"{row}: transform"
    dataset = {k: v for k, v in plain(composed.dataset).items() if k not in ("root", "transform")}
    assert {k: used["dataset"][k] for k in dataset} == dataset, f"{row}: dataset settings"
    method = dict(plain(composed.method))
    if method["_target_"].endswith("DivideConquerMethod"):  # its epoch counts shrink with the epochs
        for key in ("finetune_epochs", "full_embedding_from"):
            method.pop(key, None)
            used["method"].pop(key, None)
    assert used["method"] == method, f"{row}: method differs from the row's"
    unit = composed.sampler.get("samples_per_class") or {"NPairBatchSampler": 2, "PairStreamBatchSampler": 2,
                                                         "HDMLTripletBatchSampler": 3}.get(
        composed.sampler._target_.rsplit(".", 1)[-1], 1)
    batch = used["trainer"]["batch_size"]
    assert batch <= composed.trainer.batch_size and batch % unit == 0 and batch // unit >= 2, (row, batch, unit)
    assert used["trainer"]["head_lr_mult"] == composed.trainer.head_lr_mult, f"{row}: head_lr_mult"
    assert f"SMOKE {row}:" in run.stdout, "reproduce.py prints what it shrank per row"


def check_weights(row: str, model: dict[str, Any], hub_cache: Path) -> Path:
    """results.json names the hub-cache file torchvision loaded, with its sha256."""
    from hub_cache import checkpoint_name

    path = Path(hub_cache) / "hub" / "checkpoints" / checkpoint_name(model["arch"])
    assert model["pretrained"] is True and model["weights"].endswith("IMAGENET1K_V1"), (row, model)
    assert Path(model["weights_file"]) == path, (row, model["weights_file"])
    assert hashlib.sha256(path.read_bytes()).hexdigest().startswith(model["weights_sha256"]), row
    assert model["weights_match_torchvision"] is False  # the random test files, told apart from the real ones
    return path


def check_frozen_and_trained(row: str, run_dir: Path, weights: Path, freeze: str, lr: float) -> None:
    """Compare the trained checkpoint's trunk with the loaded file, tensor by tensor.

    Every frozen tensor is bit-identical and every trained one moved, with one exception: at a learning rate below
    1e-5 (the Lifted rows' SGD at 1e-6) one step moves a BatchNorm scale (~1.0) by less than float32 resolves there
    (6e-8), so those may stay; the BatchNorm shifts (~0) of the same layers must still move.
    """
    import torch

    assert freeze in FROZEN, f"{row}: backbone.freeze={freeze} has no expectation in this test"
    loaded = torch.load(weights, map_location="cpu", weights_only=True)
    trained = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["model"]
    bn = {k.rsplit(".", 1)[0] for k in loaded if k.endswith("running_mean")}
    frozen_stats, frozen_affine, frozen_rest = FROZEN[freeze]
    compared, wrong = 0, []
    for key, value in loaded.items():
        ours = trained.get(f"trunk.net.{key}")
        if ours is None:  # the classifier and GoogLeNet's auxiliary heads are dropped
            assert key.startswith(("fc.", "aux1.", "aux2.")), f"{row}: {key} of the weights file is not in the model"
            continue
        module = key.rsplit(".", 1)[0]
        frozen = (frozen_stats if key.endswith(BN_STATS) else frozen_affine if module in bn else frozen_rest)
        same = torch.equal(ours, value)
        if not frozen and same and lr < 1e-5 and module in bn and key.endswith(".weight"):
            continue
        if frozen != same:
            wrong.append(f"{key} ({'should be frozen' if frozen else 'should have trained'})")
        compared += 1
    assert compared > 50, f"{row}: only {compared} trunk tensors matched the weights file's names"
    assert not wrong, f"{row} (freeze={freeze}): {len(wrong)} of {compared} trunk tensors: {wrong[:8]}"


def check_embeddings(row: str, run_dir: Path) -> None:
    """Test embeddings stay distinct: a collapsed model maps every image to one direction (all cosines ~1)."""
    emb = np.load(run_dir / "embeddings.npz")["embeddings"].astype(np.float64)
    assert np.isfinite(emb).all() and len(emb) >= 6
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cos = (unit @ unit.T)[~np.eye(len(emb), dtype=bool)]
    assert np.median(cos) < 0.99 and np.mean(cos > 0.999) < 0.5, \
        f"{row}: test embeddings collapsed (median cosine {np.median(cos):.4f}, max {cos.max():.4f})"


def check_divide_conquer(row: str, history: pd.DataFrame, composed: Any) -> None:
    """history.csv: a divide epoch with clustering and several learners' batches, the full-embedding phase (where
    the row has one) and the conquer phase."""
    assert "dc_phase" in history, f"{row}: history.csv has no dc_phase column"
    phases = history["dc_phase"].tolist()
    if composed.method.get("full_embedding_from", "conquer") == "conquer":
        assert phases[0] == "divide" and phases[-1] == "conquer" and "full" not in phases, f"{row}: {phases}"
    else:
        assert phases == ["divide", "full", "conquer"], f"{row}: phases {phases}"
    first = history.iloc[0]
    sizes = [int(s) for s in str(first["cluster_sizes"]).split("|")]
    assert len(sizes) == composed.method.num_clusters and sum(s > 0 for s in sizes) >= 2, (row, sizes)
    assert first["dc_learners"] >= 2 and first["cluster_time_s"] >= 0, (row, first.to_dict())
    assert history.iloc[-1]["dc_learners"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("row", EXPERIMENTS)
def test_row_trains_on_the_real_path(row, hub_cache, smoke_base, compose_cfg):
    run = run_target(target_of(row), smoke_base)
    results = run.results(row)
    assert results["status"] == "completed", f"{row}: {results.get('error')}"
    composed = compose_cfg(f"+experiment={row}")
    check_components(row, composed, results["config"], run)
    weights = check_weights(row, results["model"], hub_cache)
    run_dir = run.jobs[row]
    check_frozen_and_trained(row, run_dir, weights, results["model"]["freeze"], float(composed.optimizer.lr))
    history = pd.read_csv(run_dir / "history.csv")
    assert len(history) == results["config"]["trainer"]["epochs"] and (history["epoch"] >= 1).all()
    assert all(math.isfinite(v) for v in history["train_loss"]), f"{row}: loss {history['train_loss'].tolist()}"
    check_embeddings(row, run_dir)
    if composed.method._target_.endswith("DivideConquerMethod"):
        check_divide_conquer(row, history, composed)


# ------------------------------------------------------------------------------ one step at the full size

def combinations() -> dict[str, str]:
    """``{backbone-transform-method: the first row that uses it}``, from each row's composed group choices (a row
    file names only what it changes from its bases)."""
    from hydra import compose, initialize_config_dir

    from dml_runner.config import conf_dir, register_configs

    register_configs()
    out: dict[str, str] = {}
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        for row in EXPERIMENTS:
            cfg = compose("config", overrides=[f"+experiment={row}"], return_hydra_config=True)
            chosen = cfg.hydra.runtime.choices
            out.setdefault(f"{chosen['backbone']}-{chosen['transform']}-{chosen['method']}", row)
    return out


COMBINATIONS = combinations()


@pytest.mark.slow
@pytest.mark.parametrize("combo", sorted(COMBINATIONS))
def test_one_step_at_the_rows_full_image_size_and_batch(combo, hub_cache, tmp_path, compose_cfg):
    """One training step of the row as configured (batch, crop, weights), on a fixture tree big enough for its
    batch. A Divide and Conquer row takes two: a divide epoch (clustering at the full image size, one cluster
    batch: its classes x 4, fewer than 20 classes in a cluster of this small tree) and a conquer epoch (the full
    20 x 4 batch)."""
    from conftest import run_dml
    from dml_runner.datasets.fixtures import FULL_BATCH_SIZE, FULL_DC_SIZE, make_tree

    row = COMBINATIONS[combo]
    composed = compose_cfg(f"+experiment={row}")
    dataset = str(composed.dataset._target_).split(".")[-2]
    divide_conquer = composed.method._target_.endswith("DivideConquerMethod")
    root = make_tree(dataset, tmp_path / "data", FULL_DC_SIZE if divide_conquer else FULL_BATCH_SIZE)
    epochs = 2 if divide_conquer else 1
    extra = ["method.finetune_epochs=1"] if divide_conquer else []
    run_dml([f"+experiment={row}", f"dataset.root={root}", f"trainer.epochs={epochs}", "trainer.max_steps_per_epoch=1",
             "trainer.eval_before_training=false", "trainer.save_checkpoints=false", "trainer.progress=false",
             "trainer.num_workers=0", "trainer.amp=false", "trainer.num_threads=2", f"hydra.run.dir={tmp_path / 'run'}",
             *extra],
            cwd=tmp_path)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "completed"
    used = results["config"]
    assert used["trainer"]["batch_size"] == composed.trainer.batch_size
    assert used["transform"] == plain(composed.transform) and used["backbone"] == plain(composed.backbone)
    assert results["model"]["pretrained"] is True and Path(results["model"]["weights_file"]).parent == \
        Path(hub_cache) / "hub" / "checkpoints"
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert len(history) == epochs and all(math.isfinite(v) for v in history["train_loss"])
    if divide_conquer:
        assert history["dc_phase"].tolist() == ["divide", "conquer"], history.to_dict("list")
