"""Divide and Conquer (method=divide_conquer, issue 7): slices, matching, schedule, K = 1 equivalence, short runs."""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest
import torch

from dml_runner import DMLRunnerError
from dml_runner.backbones.small_cnn import small_cnn
from dml_runner.datasets.base import DatasetSplits, SubsetLabelledDataset
from dml_runner.datasets.digits import build as build_digits
from dml_runner.losses.margin import MarginLoss
from dml_runner.methods.divide_conquer import (
    DivideConquerMethod,
    drop_singleton_classes,
    learner_slices,
    match_clusters,
    recluster_epochs,
)
from dml_runner.methods.standard import StandardMethod
from dml_runner.samplers.class_balanced import ClassBalancedBatchSampler
from dml_runner.trainer import FitSettings, Trainer


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny CNN batches: intra-op threads only add contention on a shared CPU (seconds per step under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=1)
def _digits() -> DatasetSplits:
    return build_digits(max_shift=1)


def _small_digits(per_class: int = 40) -> DatasetSplits:
    """40 training images of each of the 5 training classes (fast), the digits test split untouched."""
    full = _digits()
    keep = np.concatenate([np.flatnonzero(full.train.labels == c)[:per_class] for c in np.unique(full.train.labels)])
    return DatasetSplits(name="digits", train=SubsetLabelledDataset(full.train, keep), test=full.test)


def _trainer(method, tmp_path, epochs: int = 3, seed: int = 0, batch_size: int = 20) -> Trainer:
    """A real Trainer (so the method gets the real TrainContext) on small digits data; the model and loss are
    built after seeding so two calls with the same seed start from the same parameters."""
    torch.manual_seed(seed)
    data = _small_digits()
    model = small_cnn(in_channels=1, width=8, embedding_dim=16)
    loss = MarginLoss()

    def make_sampler(labels, batch_size=None, seed=None):
        return ClassBalancedBatchSampler(labels, batch_size=20 if batch_size is None else batch_size,
                                         seed=0 if seed is None else seed, samples_per_class=4)

    settings = FitSettings(epochs=epochs, batch_size=batch_size, device="cpu", seed=seed, progress=False,
                           save_checkpoints=False, save_embeddings=False, eval_before_training=False)
    return Trainer(settings, data, model, loss, method, functools.partial(torch.optim.Adam, lr=1e-3), None,
                   make_sampler, evaluate=lambda *a, **k: {"recall@1": 0.0}, out_dir=tmp_path)


def _train_steps(trainer: Trainer, epoch: int, steps: int) -> list[tuple]:
    trainer.model.train()
    trainer.method.on_epoch_start(epoch)
    seen = []
    for step, batch in enumerate(trainer.method.batches(epoch)):
        if step == steps:
            break
        seen.append(batch)
        trainer.method.backward_and_step(trainer.method.compute_loss(trainer.to_device(batch)))
    return seen


# ------------------------------------------------------------------------------------------------ pure helpers
def test_learner_slices_follow_the_official_split():
    assert learner_slices(128, 8) == [slice(16 * k, 16 * (k + 1)) for k in range(8)]
    assert learner_slices(10, 4) == [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 10)]
    assert learner_slices(64, 1) == [slice(0, 64)]
    with pytest.raises(DMLRunnerError, match="without embedding neurons"):
        learner_slices(8, 5)  # ceil(8/5) = 2: the fifth learner would own [8, 8)


def test_hungarian_matching_keeps_each_learner_on_its_data():
    previous = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, -1])
    # the same partition with permuted ids (0->2, 1->0, 2->1) and one item moved from old 0 to old 1
    current = np.array([2, 2, 2, 0, 0, 0, 0, 1, 1, 1, 1])
    matched = match_clusters(previous, current, 3)
    np.testing.assert_array_equal(matched, [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    # an ambiguous majority: the assignment maximises the *total* overlap, not each cluster greedily
    previous = np.array([0] * 5 + [1] * 5)
    current = np.array([0] * 3 + [1] * 2 + [1] * 5)  # new 1 overlaps old 0 (2) and old 1 (5)
    np.testing.assert_array_equal(match_clusters(previous, current, 2), current)
    current = np.array([1] * 3 + [0] * 2 + [0] * 5)
    np.testing.assert_array_equal(match_clusters(previous, current, 2), [0] * 3 + [1] * 7)


def test_singleton_classes_are_dropped_per_cluster():
    assign = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    labels = np.array([5, 5, 7, 7, 9, 9, 8, 3])
    # cluster 0: class 5 x2 (kept), 7 x1, 3 x1 (dropped); cluster 1: 7 x1, 8 x1 (dropped), 9 x2 (kept)
    np.testing.assert_array_equal(drop_singleton_classes(assign, labels), [0, 0, -1, -1, 1, 1, -1, -1])


def test_recluster_schedule():
    assert recluster_epochs(10, 4, 2, 3) == [1, 3, 5, 7]  # divide epochs 1-7, conquer 8-10
    assert recluster_epochs(7, 4, 3, 0) == [1, 4, 7]
    assert recluster_epochs(200, 8, 2, 10)[-3:] == [185, 187, 189]  # the paper: conquer from epoch 191
    assert recluster_epochs(10, 1, 2, 3) == []  # K = 1 never clusters
    assert recluster_epochs(5, 4, 2, 5) == []  # all conquer


def test_method_reclusters_on_schedule_and_conquers_at_the_end(tmp_path, monkeypatch):
    method = DivideConquerMethod(num_clusters=2, recluster_every=2, finetune_epochs=2)
    trainer = _trainer(method, tmp_path, epochs=6)
    calls = []
    original = method.recluster
    monkeypatch.setattr(method, "recluster", lambda epoch: (calls.append(epoch), original(epoch)))
    for epoch in range(1, 7):
        batches = _train_steps(trainer, epoch, steps=2)
        divide = epoch <= 4
        assert all((len(b) == 3) == divide for b in batches), epoch  # divide batches carry the learner id
        row = method.on_epoch_end(epoch)
        assert ("cluster_sizes" in row) == (epoch in (1, 3)), (epoch, row)
        assert row["dc_learners"] == (2 if divide else 1)
    assert calls == [1, 3]


# ------------------------------------------------------------------------------------------------ training
def test_gradients_only_reach_the_learners_slice(tmp_path):
    method = DivideConquerMethod(num_clusters=4, finetune_epochs=0)
    trainer = _trainer(method, tmp_path)
    images, labels = next(iter(torch.utils.data.DataLoader(trainer.data.train, batch_size=20, shuffle=False)))
    labels = torch.arange(20) % 5  # any labels with positives and negatives
    fc = trainer.model.head.fc
    for k, owned in enumerate(learner_slices(16, 4)):
        trainer.model.zero_grad(set_to_none=True)
        torch.manual_seed(k)
        method.compute_loss((images, labels, k))["loss"].backward()
        rows = torch.zeros(16, dtype=torch.bool)
        rows[owned] = True
        assert fc.weight.grad[~rows].abs().max() == 0 and fc.bias.grad[~rows].abs().max() == 0, k
        assert fc.weight.grad[rows].abs().max() > 0, k
        # the trunk is shared by all learners
        assert any(p.grad is not None and p.grad.abs().max() > 0 for p in trainer.model.trunk.parameters())


def test_k1_equals_standard_training(tmp_path):
    standard = _trainer(StandardMethod(), tmp_path / "standard", seed=3)
    dc = _trainer(DivideConquerMethod(num_clusters=1, finetune_epochs=0), tmp_path / "dc", seed=3)
    for epoch in (1, 2):
        torch.manual_seed(100 + epoch)  # the margin loss's distance-weighted sampling draws from the torch RNG
        a = _train_steps(standard, epoch, steps=4)
        torch.manual_seed(100 + epoch)
        b = _train_steps(dc, epoch, steps=4)
        assert all(torch.equal(x[1], y[1]) for x, y in zip(a, b))
    for (name, p), q in zip(standard.model.named_parameters(), dc.model.parameters()):
        assert torch.equal(p, q), name


def test_too_many_clusters_for_the_data_is_an_error(tmp_path):
    with pytest.raises(DMLRunnerError, match="embedding neurons"):
        _trainer(DivideConquerMethod(num_clusters=17), tmp_path)  # d = 16
    with pytest.raises(DMLRunnerError, match="num_clusters"):
        DivideConquerMethod(num_clusters=0)
    with pytest.raises(DMLRunnerError, match="cluster_on"):
        DivideConquerMethod(cluster_on="pixels")


@pytest.mark.parametrize("num_clusters,cluster_on", [(1, "embedding"), (2, "embedding"), (4, "features")])
def test_short_hydra_runs(compose_cfg, tmp_path, num_clusters, cluster_on):
    """Composed from the real conf/ tree: digits (5 train classes, class-balanced 5 x 4 batches), 2 epochs of at most
    3 steps, re-clustering every epoch (so the second clustering goes through the Hungarian matching)."""
    from dml_runner.run import run

    cfg = compose_cfg("method=divide_conquer", "loss=margin", "trainer=smoke", "trainer.epochs=2",
                      "trainer.eval_before_training=false", "trainer.save_checkpoints=false",
                      "trainer.save_embeddings=false", "eval.metrics=[recall]", "backbone.width=8",
                      f"method.num_clusters={num_clusters}", "method.recluster_every=1", "method.finetune_epochs=0",
                      f"method.cluster_on={cluster_on}", "method.niter=10", "method.nredo=1")
    results = run(cfg, tmp_path)
    assert results["status"] == "completed" and 0 <= results["metrics"]["recall@1"] <= 1
    history = pd.read_csv(tmp_path / "history.csv")
    if num_clusters == 1:
        assert "cluster_sizes" not in history
    else:
        sizes = [[int(s) for s in str(row).split("|")] for row in history["cluster_sizes"]]
        assert all(len(s) == num_clusters and sum(s) <= results["dataset"]["train_images"] for s in sizes)
        assert (history["cluster_time_s"] >= 0).all()


@pytest.mark.parametrize("policy", ["shrink", "skip"])
def test_clusters_with_too_few_classes(tmp_path, policy):
    """Batches are 5 classes x 4 images; clusters of 2 classes shrink to 2 x 4 (or are skipped), a 1-class cluster
    is always skipped, and a clustering that leaves no trainable learner stops the run."""
    method = DivideConquerMethod(num_clusters=3, finetune_epochs=0, small_cluster=policy)
    trainer = _trainer(method, tmp_path)
    labels = trainer.data.train.labels
    method.assignments = np.select([labels <= 1, labels == 2], [0, 1], 2)  # {0, 1}, {2}, {3, 4}
    if policy == "skip":
        with pytest.raises(DMLRunnerError, match="lower method.num_clusters"):
            method._build_cluster_sampler(1)
        return
    method._build_cluster_sampler(1)
    assert method.active_learners == 2
    method.divide_sampler.set_epoch(1)
    plan = method.divide_sampler.plan
    assert {k for k, _ in plan} == {0, 2} and all(len(b) == 8 for _, b in plan)
    assert all(set(labels[b]) <= ({0, 1} if k == 0 else {3, 4}) for k, b in plan)
    # round-robin: learners alternate, each cluster (80 images, batch 8) has 10 batches
    assert [k for k, _ in plan[:4]] == [0, 2, 0, 2] and len(plan) == 20


def test_clustering_sees_the_training_set_without_augmentation(tmp_path):
    method = DivideConquerMethod(num_clusters=2, finetune_epochs=0)
    trainer = _trainer(method, tmp_path)
    view = method._cluster_view()
    train = trainer.data.train
    assert train.transform is not None and view.transform is trainer.data.test.transform  # digits: RandomShift / None
    assert len(view) == len(train) and np.array_equal(view.labels, train.labels)
    for i in (0, 57, len(train) - 1):
        assert torch.equal(view[i][0], train.load(i))


@pytest.mark.slow
def test_sweep_over_k_writes_summary_and_plot(tmp_path):
    """`dml-run -m method=divide_conquer method.num_clusters=...` out of the box: one job per K, the generic
    multirun callback writes summary.csv and the metric-vs-K plot."""
    import subprocess

    from conftest import dml_run_cmd

    sweep = tmp_path / "sweep"
    proc = subprocess.run(dml_run_cmd() + [
        "-m", "method=divide_conquer", "loss=margin", "method.num_clusters=1,2", "trainer=smoke", "trainer.epochs=2",
        "method.finetune_epochs=1", "trainer.eval_before_training=false", "trainer.save_checkpoints=false",
        f"hydra.sweep.dir={sweep}"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = pd.read_csv(sweep / "summary.csv")
    assert summary["status"].tolist() == ["completed", "completed"]
    assert summary["method.num_clusters"].tolist() == [1, 2]
    assert (sweep / "sweep_method.num_clusters.png").is_file()
    assert pd.read_csv(sweep / "1" / "history.csv")["cluster_sizes"].notna().sum() == 1
