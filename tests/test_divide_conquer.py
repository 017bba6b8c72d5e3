"""Divide and Conquer (method=divide_conquer): slices, matching, schedule and phases, the official embedding, fixed
beta, K = 1 equivalence, the paper rows, short runs."""

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
from dml_runner.backbones.head import EmbeddingHead, init_sliced_xavier_normal_
from dml_runner.methods.divide_conquer import (
    DivideConquerMethod,
    drop_singleton_classes,
    full_embedding_epoch,
    learner_slices,
    match_clusters,
    recluster_epochs,
)
from dml_runner.methods.standard import StandardMethod
from dml_runner.samplers.class_balanced import ClassBalancedBatchSampler
from dml_runner.config import TrainerConfig
from dml_runner.reference import row_deviations
from dml_runner.training.trainer import Trainer


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


def _trainer(method, tmp_path, epochs: int = 3, seed: int = 0, batch_size: int = 20,
             loss: torch.nn.Module | None = None) -> Trainer:
    """A real Trainer (so the method gets the real TrainContext) on small digits data; the model and loss are
    built after seeding so two calls with the same seed start from the same parameters."""
    torch.manual_seed(seed)
    data = _small_digits()
    model = small_cnn(in_channels=1, width=8, embedding_dim=16)
    loss = MarginLoss() if loss is None else loss

    def make_sampler(labels, batch_size=None, seed=None):
        return ClassBalancedBatchSampler(labels, batch_size=20 if batch_size is None else batch_size,
                                         seed=0 if seed is None else seed, samples_per_class=4)

    settings = TrainerConfig(epochs=epochs, batch_size=batch_size, device="cpu", seed=seed, progress=False,
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


def test_full_embedding_epoch_follows_the_official_condition():
    """train.py trains the full embedding when the 0-based epoch e >= finetune_epoch * 8 / 19 (float division),
    finetune_epoch = the 0-based first conquer epoch; our epochs are 1-based."""
    assert full_embedding_epoch(200, 10, "official") == 81  # the README command: slices for epochs 0-79
    for epochs in range(1, 60):
        for finetune in range(0, epochs + 1):
            official = next((e for e in range(epochs) if e >= (epochs - finetune) * 8 / 19), epochs) + 1
            assert full_embedding_epoch(epochs, finetune, "official") == official, (epochs, finetune)
    assert full_embedding_epoch(200, 10, "conquer") == 191  # the paper: slices until the conquer phase
    assert full_embedding_epoch(200, 10, 5) == 5
    for bad in (0, -3, "never", 2.5):
        with pytest.raises(DMLRunnerError, match="full_embedding_from"):
            DivideConquerMethod(full_embedding_from=bad)


def test_method_phases_recluster_and_conquer(tmp_path, monkeypatch):
    """6 epochs, 2 conquer: F = 4 divide-side epochs, the full embedding from ceil(8 * 4 / 19) + 1 = 3."""
    method = DivideConquerMethod(num_clusters=2, recluster_every=2, finetune_epochs=2)
    trainer = _trainer(method, tmp_path, epochs=6)
    calls = []
    original = method.recluster
    monkeypatch.setattr(method, "recluster", lambda epoch: (calls.append(epoch), original(epoch)))
    phases = []
    for epoch in range(1, 7):
        batches = _train_steps(trainer, epoch, steps=2)
        assert all(len(b) == 3 for b in batches), epoch  # every batch carries its learner id
        row = method.on_epoch_end(epoch)
        phases.append(row["dc_phase"])
        assert ("cluster_sizes" in row) == (epoch in (1, 3)), (epoch, row)
        assert row["dc_learners"] == (2 if epoch <= 4 else 1)
        if epoch > 4:  # conquer: one cluster of all data, learner 0's loss
            assert {int(b[2]) for b in batches} == {0}
    assert phases == ["divide", "divide", "full", "full", "conquer", "conquer"]
    assert calls == [1, 3]  # re-clustering continues in the full-embedding phase


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


def test_full_embedding_phase_trains_every_slice_with_the_evaluated_embedding(tmp_path):
    """From full_embedding_from on, a cluster batch's loss is the learner's loss on model(x): the per-slice-normalised,
    then normalised embedding that evaluation uses, so every fc row gets gradient."""
    method = DivideConquerMethod(num_clusters=4, finetune_epochs=1, full_embedding_from=2)
    trainer = _trainer(method, tmp_path, epochs=3)
    assert [method.phase(e) for e in (1, 2, 3)] == ["divide", "full", "conquer"]
    images, _ = next(iter(torch.utils.data.DataLoader(trainer.data.train, batch_size=20, shuffle=False)))
    labels = torch.arange(20) % 5
    method.on_epoch_start(2)
    trainer.model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss = method.compute_loss((images, labels, 1))["loss"]
    torch.manual_seed(0)
    expected = method.learner_losses[1](trainer.model(images), labels)
    assert torch.allclose(loss, expected)
    loss.backward()
    assert (trainer.model.head.fc.weight.grad.abs().sum(dim=1) > 0).all()


def _brute_force_sliced(z: torch.Tensor, slices: list[slice], normalize: bool) -> torch.Tensor:
    parts = []
    for s in slices:
        part = z[:, s]
        parts.append(torch.stack([row / max(float(torch.sqrt((row ** 2).sum())), 1e-12) for row in part]))
    out = torch.cat(parts, dim=1)
    if normalize:
        out = torch.stack([row / max(float(torch.sqrt((row ** 2).sum())), 1e-12) for row in out])
    return out


@pytest.mark.parametrize("normalize", [True, False])
def test_per_slice_normalised_embedding_equals_brute_force(normalize):
    torch.manual_seed(0)
    head = EmbeddingHead(12, 10, normalize=normalize)
    features = torch.randn(7, 12)
    features[3] = 0.0  # a zero slice stays zero (F.normalize's eps), as in the official forward
    head.fc.bias.data.zero_()
    slices = learner_slices(10, 4)  # uneven: 3, 3, 3, 1
    head.set_slices(slices)
    z = head.fc(features).detach()
    torch.testing.assert_close(head(features).detach(), _brute_force_sliced(z, slices, normalize))
    if normalize:  # each slice of the normalised concatenation has norm 1/sqrt(K), except the zero row
        norms = torch.stack([head(features)[:, s].norm(dim=1) for s in slices], dim=1).detach()
        torch.testing.assert_close(norms[[0, 1, 2, 4, 5, 6]], torch.full((6, 4), 0.5))
    head.set_slices(None)
    torch.testing.assert_close(head(features).detach(), torch.nn.functional.normalize(z, dim=1) if normalize else z)
    with pytest.raises(ValueError, match="cover"):
        head.set_slices([slice(0, 5), slice(6, 10)])


@pytest.mark.parametrize("embedding", ["sliced", "whole"])
def test_method_sets_the_evaluated_embedding(tmp_path, embedding):
    method = DivideConquerMethod(num_clusters=4, finetune_epochs=1, embedding=embedding)
    trainer = _trainer(method, tmp_path)
    model = trainer.model.eval()
    images, _ = next(iter(torch.utils.data.DataLoader(trainer.data.test, batch_size=9, shuffle=False)))
    with torch.no_grad():
        z = model.head.fc(model.features(images))
        expected = _brute_force_sliced(z, learner_slices(16, 4), True) if embedding == "sliced" else \
            torch.nn.functional.normalize(z, dim=1)
        torch.testing.assert_close(model(images), expected)
    assert model.info["dc_embedding"].startswith(embedding)


def test_prepare_model_rebuilds_the_evaluated_embedding_without_training(tmp_path):
    """dml-embed's path: a model rebuilt from the config, changed by the method's prepare_model, takes the trained
    weights and embeds as the trained model; without the hook the slices would not be normalised on their own."""
    trainer = _trainer(DivideConquerMethod(num_clusters=4, finetune_epochs=1), tmp_path)
    images, _ = next(iter(torch.utils.data.DataLoader(trainer.data.test, batch_size=9, shuffle=False)))
    rebuilt, plain = (small_cnn(in_channels=1, width=8, embedding_dim=16) for _ in range(2))
    DivideConquerMethod(num_clusters=4).prepare_model(rebuilt)
    for model in (rebuilt, plain):
        model.load_state_dict(trainer.model.state_dict())
        model.eval()
    with torch.no_grad():
        want = trainer.model.eval()(images)
        torch.testing.assert_close(rebuilt(images), want)
        assert not torch.allclose(plain(images), want, atol=1e-4)


def test_official_sliced_fc_initialisation():
    """init_splitted: Xavier-normal per slice (std sqrt(2 / (in + width))), default Linear bias U(+-1/sqrt(in)) --
    told apart from the head's Xavier-uniform over the whole layer (std sqrt(2 / (in + d)), 2.7% smaller)."""
    torch.manual_seed(0)
    fc = torch.nn.Linear(2048, 128)
    torch.nn.init.zeros_(fc.bias)
    slices = learner_slices(128, 8)
    init_sliced_xavier_normal_(fc, slices)
    for s in slices:
        std = float(fc.weight[s].detach().std())
        assert abs(std / (2 / (2048 + 16)) ** 0.5 - 1) < 0.015, std
    assert fc.bias.abs().max() <= 2048 ** -0.5 and fc.bias.abs().min() > 0
    head = EmbeddingHead(2048, 128)
    assert abs(float(head.fc.weight.std()) / (2 / (2048 + 128)) ** 0.5 - 1) < 0.015  # what the test tells apart
    again = torch.nn.Linear(2048, 128)
    init_sliced_xavier_normal_(fc, slices, seed=1)
    init_sliced_xavier_normal_(again, slices, seed=1)  # seeded: the same values on every rank and device
    assert torch.equal(fc.weight, again.weight) and torch.equal(fc.bias, again.bias)


def _official_margin_loss(x: torch.Tensor, labels: torch.Tensor) -> float:
    """A loop port of the official lib/loss/sampler.py + margin_loss.py (beta 1.2, alpha 0.2, cutoff 0.5), with the
    PyTorch 0.4/1.0 semantics the code ran under (uint8 masks add up: 1 + 1 = 2)."""
    n = len(labels)
    sq = (x[:, None, :] - x[None, :, :]).pow(2).sum(-1)
    d = sq.clamp(min=1e-4).sqrt()
    pos = (labels[:, None] == labels[None, :]).float() - torch.eye(n)
    num_neg = int(pos.sum()) // n
    masked = d + 1e6 * ((pos > 0).float() + (d < 0.5).float())
    neg = torch.zeros(n, n)
    neg.scatter_(1, masked.topk(max(1, min(num_neg, n)), dim=1, largest=False)[1], 1.0)
    a_idx, p_idx, n_idx = [], [], []
    for i in range(n):
        a_idx += [i] * num_neg
        p_idx += [j for j in range(n) if pos[i, j] > 0]
        n_idx += [j for j in range(n) if neg[i, j] > 0]
        shortest = min(len(a_idx), len(p_idx), len(n_idx))
        a_idx, p_idx, n_idx = a_idx[:shortest], p_idx[:shortest], n_idx[:shortest]
    anchors, positives, negatives = x[a_idx], x[p_idx], x[n_idx]
    d_ap = ((positives - anchors) ** 2).sum(1).add(1e-8).sqrt()
    d_an = ((negatives - anchors) ** 2).sum(1).add(1e-8).sqrt()
    pos_loss, neg_loss = torch.relu(d_ap - 1.2 + 0.2), torch.relu(1.2 - d_an + 0.2)
    pair_cnt = int((pos_loss > 0).sum() + (neg_loss > 0).sum())
    total = float(pos_loss.sum() + neg_loss.sum())
    return total / pair_cnt if pair_cnt > 0 else total


@pytest.mark.parametrize("case", ["balanced", "uneven", "collapsed", "tight_clusters"])
def test_closest_exact_sampling_equals_the_official_sampler(case):
    torch.manual_seed(1)
    labels = torch.arange(20) // 4
    x = torch.randn(20, 16)
    if case == "uneven":  # duplicated classes (the official sampler draws small clusters' classes with replacement)
        labels = torch.tensor([0] * 8 + [1] * 4 + [2] * 4 + [3] * 2 + [4] * 2)
    if case == "collapsed":  # every distance < 0.5: the official sampler fills up with the anchor itself
        x = torch.ones(20, 16) + 1e-3 * torch.randn(20, 16)
    if case == "tight_clusters":  # 18 items within D < 0.5, two far: most anchors have 2 negatives at D >= 0.5, not 3
        x = torch.ones(20, 16) + 0.02 * torch.randn(20, 16)
        x[18:] = torch.randn(2, 16)
    x = torch.nn.functional.normalize(x, dim=1)
    ours = float(MarginLoss(learn_beta=False, sampling="closest_exact")(x, labels))
    assert ours == pytest.approx(_official_margin_loss(x, labels), abs=1e-4)
    simplified = float(MarginLoss(learn_beta=False, sampling="closest")(x, labels))
    assert (simplified == pytest.approx(ours, abs=1e-6)) == (case == "balanced")  # the cases tell the two apart
    if case == "collapsed":  # the simplified rule finds no triplet at all there, the official one pushes apart
        assert simplified == 0.0 and ours > 1.0


@pytest.mark.parametrize("learn_beta", [False, True])
def test_fixed_beta_is_not_optimised(tmp_path, learn_beta):
    method = DivideConquerMethod(num_clusters=2, finetune_epochs=0)
    trainer = _trainer(method, tmp_path, loss=MarginLoss(learn_beta=learn_beta, sampling="closest_exact"))
    optimised = {id(p) for g in method.optimizer.param_groups for p in g["params"]}
    betas = [loss.beta for loss in method.learner_losses]
    assert len(betas) == 2 and all(b.shape == (1,) for b in betas)  # one value per learner, not per class
    assert all((id(b) in optimised) == learn_beta for b in betas)
    assert ("loss" in {g["name"] for g in method.optimizer.param_groups}) == learn_beta
    _train_steps(trainer, 1, steps=3)
    assert all(torch.equal(b.detach(), torch.tensor([1.2])) for b in betas) == (not learn_beta)


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
    with pytest.raises(DMLRunnerError, match="method.kmeans_backend"):
        DivideConquerMethod(kmeans_backend="sklearn")


@pytest.mark.parametrize("num_clusters,cluster_on,backend", [(1, "embedding", "faiss"), (2, "embedding", "faiss"),
                                                             (4, "features", "faiss"), (4, "features", "torch")])
def test_short_hydra_runs(compose_cfg, tmp_path, num_clusters, cluster_on, backend):
    """Composed from the real conf/ tree: digits (5 train classes, class-balanced 5 x 4 batches), 2 epochs of at most
    3 steps, re-clustering every epoch (so the second clustering goes through the Hungarian matching)."""
    from dml_runner.run import run

    cfg = compose_cfg("method=divide_conquer", "loss=margin", "trainer=smoke", "trainer.epochs=2",
                      "trainer.eval_before_training=false", "trainer.save_checkpoints=false",
                      "trainer.save_embeddings=false", "eval.metrics=[recall]", "backbone.width=8",
                      f"method.num_clusters={num_clusters}", "method.recluster_every=1", "method.finetune_epochs=0",
                      f"method.cluster_on={cluster_on}", "method.niter=10", "method.nredo=1",
                      f"method.kmeans_backend={backend}")
    results = run(cfg, tmp_path)
    assert results["status"] == "completed" and 0 <= results["metrics"]["recall@1"] <= 1
    history = pd.read_csv(tmp_path / "history.csv")
    if num_clusters == 1:
        assert "cluster_sizes" not in history
    else:
        sizes = [[int(s) for s in str(row).split("|")] for row in history["cluster_sizes"]]
        assert all(len(s) == num_clusters and sum(s) <= results["dataset"]["train_images"] for s in sizes)
        assert (history["cluster_time_s"] >= 0).all()


DC_ROWS = ["cars196", "cub200", "inshop", "sop", "vehicleid_large", "vehicleid_medium", "vehicleid_small"]


@pytest.mark.parametrize("row", DC_ROWS)
def test_paper_rows_follow_the_official_code(compose_cfg, row):
    cfg = compose_cfg(f"+experiment=dc/{row}")
    m, loss, bb = cfg.method, cfg.loss, cfg.backbone
    assert m.full_embedding_from == "official" and m.embedding == "sliced" and m.fc_init == "sliced"
    assert m.cluster_on == "features" and m.niter == 100 and m.nredo == 1 and m.kmeans_seed == 1234
    assert m.kmeans_backend == "faiss"
    assert m.recluster_every == 2 and m.finetune_epochs == 10 and cfg.trainer.epochs == 200
    assert m.num_clusters == (4 if row == "cub200" else 8)
    assert loss._target_.endswith("MarginLoss") and loss.learn_beta is False and loss.num_classes is None
    assert loss.beta == pytest.approx(1.2) and loss.alpha == pytest.approx(0.2)
    # the repository's closest negatives; CUB/Cars: distance-weighted, which the author says the paper's CUB needs
    assert loss.sampling == ("distance_weighted" if row in ("cub200", "cars196") else "closest_exact")
    assert bb.arch == "resnet50" and bb.pretrained is True and bb.freeze == "bn" and bb.dropout == pytest.approx(0.01)
    assert bb.embedding_dim == 128 and bb.normalize is True
    assert cfg.trainer.batch_size == 80 and cfg.sampler.samples_per_class == 4 and cfg.transform.name == "rrc_224"
    assert cfg.optimizer.lr == pytest.approx(1e-5) and cfg.optimizer.weight_decay == pytest.approx(1e-4)
    deviations = " ".join(row_deviations(cfg.reference))
    assert "weights may differ" not in deviations and "final epoch" in deviations
    # official NMI: faiss k-means, 100 iterations; every In-shop query has a gallery positive (inshop.py asserts it)
    assert cfg.eval.kmeans_iters == 100 and "eval.kmeans_iters=100" in deviations
    assert "without a positive" not in deviations and cfg.eval.amp is False
    if row.startswith("vehicleid"):
        assert cfg.dataset.protocol == "original" and cfg.dataset.repeats == 10
        assert cfg.dataset.test_size == row.split("_")[1] and "leave-one-out" in deviations


@pytest.mark.parametrize("row", ["margin_cars196", "margin_cub200", "margin_sop", "mdl_cars196", "mdl_cub200",
                                 "mdl_sop"])
def test_mdl_rows_declare_their_own_protocol(compose_cfg, row):
    cfg = compose_cfg(f"+experiment=mdl/{row}")
    deviations = row_deviations(cfg.reference)
    assert "no published protocol; the training settings are dml-runner's choice" in deviations
    assert any("reconstructed from the abstract" in d for d in deviations) == row.startswith("mdl_")
    assert cfg.backbone.freeze == "bn" and cfg.method._target_.endswith("StandardMethod")
    assert cfg.loss._target_.endswith("MarginDiscriminateLoss" if row.startswith("mdl_") else "MarginLoss")


def test_end_to_end_run_goes_through_every_phase(compose_cfg, tmp_path):
    """dml-run's path on digits with the rows' loss and method settings: 4 epochs, conquer 1, the full embedding
    from epoch 2 (by option); the saved test embeddings are the per-slice-normalised, normalised ones."""
    from dml_runner.run import run

    cfg = compose_cfg("method=divide_conquer", "loss=margin", "loss.learn_beta=false", "loss.sampling=closest_exact",
                      "trainer=smoke", "trainer.epochs=4", "trainer.eval_every=4", "trainer.max_steps_per_epoch=2",
                      "trainer.eval_before_training=false", "trainer.save_checkpoints=false",
                      "eval.metrics=[recall]", "backbone.width=8", "backbone.embedding_dim=16",
                      "method.num_clusters=2", "method.recluster_every=1", "method.finetune_epochs=1",
                      "method.full_embedding_from=2", "method.niter=10")
    results = run(cfg, tmp_path)
    assert results["status"] == "completed" and results["model"]["dc_embedding"].startswith("sliced")
    history = pd.read_csv(tmp_path / "history.csv")
    assert history["dc_phase"].tolist() == ["divide", "full", "full", "conquer"]
    assert history["cluster_sizes"].notna().tolist() == [True, True, True, False]
    assert history["dc_learners"].tolist()[-1] == 1 and np.isfinite(history["train_loss"]).all()
    emb = np.load(tmp_path / "embeddings.npz")["embeddings"]
    np.testing.assert_allclose(np.linalg.norm(emb[:, :8], axis=1), 0.5 ** 0.5, rtol=1e-2)
    np.testing.assert_allclose(np.linalg.norm(emb[:, 8:], axis=1), 0.5 ** 0.5, rtol=1e-2)
    assert np.unique(emb.round(4), axis=0).shape[0] > 1


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


def test_clustering_of_a_cached_training_set_reads_its_own_exact_cache(tmp_path):
    """A training set served from the decoded cache is re-embedded through a cached view with the test transform:
    the same tensors as the uncached test transform of the loaded images, and one view (one cache) for every pass."""
    from types import SimpleNamespace

    from dml_runner.datasets.decoded_cache import CachedImageDataset, cached_dataset
    from dml_runner.datasets.fixtures import make_cub200
    from dml_runner.datasets.images import ImageListDataset
    from dml_runner.datasets.transforms import caffe_227

    root = make_cub200(tmp_path, classes=(1, 2), per_class=3)
    paths = sorted(str(p) for p in (root / "images").rglob("*.jpg"))
    labels = np.repeat(np.arange(2), 3)
    train = cached_dataset(ImageListDataset(paths, labels, transform=caffe_227(True, resize=40, crop=32)),
                           tmp_path / "cache", progress=False)
    method = DivideConquerMethod(num_clusters=2, finetune_epochs=0)
    test_transform = caffe_227(False, resize=40, crop=32)
    method.ctx = SimpleNamespace(train_set=train, eval_transform=test_transform, dist=SimpleNamespace(is_main=True))
    view = method._cluster_view()
    assert isinstance(view, CachedImageDataset) and view.cache_active and view.cache.path != train.cache.path
    assert method._cluster_view() is view
    for i in range(len(paths)):
        assert torch.equal(view[i][0], test_transform(train.load(i)))


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


def test_the_digits_demo_leaves_room_to_divide(compose_cfg):
    """`dml-run -m method=divide_conquer method.num_clusters=1,2,4,8` on the default digits: 10 epochs, the last 3
    conquer (conf/preset_method/digits_divide_conquer.yaml), so every K > 1 really divides; other datasets keep 10."""
    from dml_runner.config import validate_config

    cfg = compose_cfg("method=divide_conquer", "method.num_clusters=4")
    assert cfg.trainer.epochs == 10 and cfg.method.finetune_epochs == 3
    validate_config(cfg)  # accepted: the checks refuse a run that would never divide
    assert compose_cfg("method=divide_conquer", "dataset=cub200").method.finetune_epochs == 10


@pytest.mark.parametrize("dataset", ["cub200", "cars196"])
def test_author_recipe_presets_config(compose_cfg, dataset):
    """The first author's CUB/Cars advice (official issue 6) as a preset beside the table's row."""
    cfg = compose_cfg(f"+experiment=dc/author_recipe/{dataset}")
    row = compose_cfg(f"+experiment=dc/{dataset}")
    assert cfg.dataset._target_ == row.dataset._target_ and cfg.method.num_clusters == row.method.num_clusters
    assert cfg.loss.sampling == "distance_weighted" and cfg.backbone.embedding_dim == 256
    assert cfg.trainer.epochs - cfg.method.finetune_epochs == 60  # conquer from epoch 61 (official finetune_epoch 60)
    assert list(cfg.scheduler.milestones) == [30, 60, 90, 120, 150, 180] and cfg.scheduler.gamma == 0.5
    deviations = row_deviations(cfg.reference)
    assert any("author's recipe" in d for d in deviations) and "eval.kmeans_iters=100" in " ".join(deviations)
    assert not any("applies its SOP settings" in d for d in deviations)
    assert (cfg.reference.table, cfg.reference.row) == ("divide_conquer", dataset)
