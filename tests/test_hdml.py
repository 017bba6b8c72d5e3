"""HDML: augmentor formula, objectives against small numpy ports of the official TF code, optimiser ownership,
the official triplet sampler, NaN handling, evaluation normalisation, feature cache, the paper rows' configs."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import dml_run_cmd
from dml_runner import DMLRunnerError
from dml_runner.reference import row_deviations
from dml_runner.losses.hdml import HDMLLoss, RunningLossMean, hardness_aware_negatives
from dml_runner.methods.feature_cache import FeatureCache, SeededView, trunk_is_frozen

NPAIR = ("loss=hdml_npair", "method=hdml", "sampler=npair", "trainer.batch_size=10")
TRIPLET = ("loss=hdml_triplet", "method=hdml")  # sampler=hdml_triplets, batch 6 on digits (preset_sampler)
MINED = ("sampler=class_balanced", "trainer.batch_size=12")  # in-batch mining (loss.mining=all|semihard|hard)
QUIET = ("trainer.progress=false", "trainer.num_workers=0")


# ------------------------------------------------------------------------------------------------ helpers
def build_trainer(compose_cfg, out_dir, *overrides):
    """A Trainer (method set up, nothing trained) from the real configs, as dml_runner.run.run builds it."""
    from dml_runner.build import instantiate as _instantiate
    from dml_runner.config import trainer_settings
    from dml_runner.devices import seed_everything
    from dml_runner.training.trainer import Trainer

    cfg = compose_cfg(*QUIET, *overrides)
    settings = trainer_settings(cfg)
    seed_everything(settings.seed)
    data = _instantiate(cfg.dataset, "dataset")
    model = _instantiate(cfg.backbone, "backbone", in_channels=data.train.in_channels)
    loss = _instantiate(cfg.loss, "loss")
    method = _instantiate(cfg.method, "method")

    def make_sampler(labels, batch_size=None, seed=None):
        return _instantiate(cfg.sampler, "sampler", labels=labels, batch_size=batch_size or settings.batch_size,
                            seed=settings.seed if seed is None else seed)

    return Trainer(settings, data, model, loss, method, _instantiate(cfg.optimizer, "optimizer"), None,
                   make_sampler, lambda *a, **k: {}, out_dir)


def train_steps(trainer, steps):
    """Run ``steps`` optimisation steps of epoch 1; returns the per-step training losses."""
    trainer.model.train()
    values = []
    for batch in trainer.method.batches(1):
        losses = trainer.method.compute_loss(trainer.to_device(batch))
        values.append(float(losses["loss"].detach()))
        trainer.method.backward_and_step(losses)
        if len(values) == steps:
            break
    return values


def toy_hdml(metric="npair", **kwargs):
    """An HDMLLoss on 6-d features, 4-d embeddings, classes 3, 5, 7, 9 and a linear + L2-norm head."""
    torch.manual_seed(0)
    loss = HDMLLoss(metric=metric, **kwargs)
    loss.build(feature_dim=6, embedding_dim=4, class_ids=torch.tensor([9, 3, 7, 5]))
    head = torch.nn.Sequential(torch.nn.Linear(6, 4))
    return loss, (lambda y: torch.nn.functional.normalize(head(y), dim=1)), head


def npair_batch():
    torch.manual_seed(1)
    labels = torch.tensor([3, 3, 5, 5, 7, 7, 9, 9])
    return torch.randn(8, 6), labels


# ------------------------------------------------------------------------------------------------ augmentor
def test_augmentor_hand_computed_cases():
    z = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    zp = torch.tensor([[1.0, 0.0], [3.0, 0.0], [1.0, 2.0], [2.0, 0.0]])
    zn = torch.tensor([[0.0, 4.0], [0.0, 2.0], [1.0, 0.0], [0.0, 8.0]])
    j_avg = 1.0 / math.log(2.0)  # exp(-alpha / J_avg) = 0.5 for alpha = 1
    out = hardness_aware_negatives(z, zp, zn, pulling_factor=1.0, j_avg=j_avg)
    # row 0: d+ = 1, d- = 4: (1 + 3 * 0.5) / 4 = 0.625 of the way to z-
    assert torch.allclose(out[0], torch.tensor([0.0, 2.5]))
    # row 1: d+ = 3 >= d- = 2: the negative is left unchanged; row 2: d+ = d- = 1: unchanged
    assert torch.equal(out[1], zn[1]) and torch.equal(out[2], zn[2])
    # row 3: d+ = 2, d- = 8: (2 + 6 * 0.5) / 8 = 0.625
    assert torch.allclose(out[3], torch.tensor([0.0, 5.0]))
    # J_avg -> 0 (a small loss): synthetic negative at distance d+ (hardest); J_avg huge: unchanged
    hardest = hardness_aware_negatives(z[:1], zp[:1], zn[:1], pulling_factor=1.0, j_avg=1e-9)
    assert torch.allclose(hardest, torch.tensor([[0.0, 1.0]]))
    easy = hardness_aware_negatives(z[:1], zp[:1], zn[:1], pulling_factor=1.0, j_avg=1e6)
    assert torch.allclose(easy, zn[:1], atol=1e-5)
    # alpha = 0: no pulling
    assert torch.allclose(hardness_aware_negatives(z, zp, zn, 0.0, 1e-3), zn)


@pytest.mark.parametrize("j_avg", [0.0, 1e-30, 1e-12, 1e-6])
@pytest.mark.parametrize("alpha", [0.0, 7.0, 90.0])
def test_augmentor_nan_safe_when_javg_tiny(j_avg, alpha):
    z = torch.randn(5, 3, requires_grad=True)
    zp = z.detach() + 0.1 * torch.randn(5, 3)
    zn = torch.cat([z.detach()[:1], torch.randn(4, 3)])  # row 0: negative coincides with the anchor
    zn.requires_grad_(True)
    out = hardness_aware_negatives(z, zp, zn, alpha, j_avg)
    out.square().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(z.grad).all() and torch.isfinite(zn.grad).all()


@pytest.mark.parametrize("metric", ["npair", "triplet"])
def test_full_objective_nan_safe_when_averages_tiny(metric):
    loss, head, head_module = toy_hdml(metric, **({"mining": "all"} if metric == "triplet" else {}))
    for avg in (loss.javg, loss.jgen_avg):
        avg.mean.fill_(0.0)
    features, labels = npair_batch()
    out = loss(features, labels, head=head)
    total = out["loss"] + out["gen"] + out["cls"]
    total.backward()
    assert all(torch.isfinite(out[k]) for k in ("loss", "metric_syn", "gen", "cls"))
    grads = [p.grad for p in [*loss.parameters(), *head_module.parameters()] if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_running_mean_starts_at_init_and_skips_nan():
    block = RunningLossMean(window=3, init=1e6, update="block")
    sliding = RunningLossMean(window=3, init=1e6, update="sliding")
    for value, want_block, want_sliding in [(1.0, 1e6, 1e6), (2.0, 1e6, 1e6), (float("nan"), 1e6, 1e6),
                                            (3.0, 2.0, 2.0), (7.0, 2.0, 4.0), (8.0, 2.0, 6.0), (9.0, 8.0, 8.0)]:
        block.record(torch.tensor(value))
        sliding.record(torch.tensor(value))
        assert float(block.mean) == pytest.approx(want_block)
        assert float(sliding.mean) == pytest.approx(want_sliding)


# ------------------------------------------------------------------------------------------------ objectives
def test_synthetic_labels_are_the_negatives_labels_npair():
    loss, head, _ = toy_hdml("npair", pulling_factor=50.0)
    loss.javg.mean.fill_(1.0)
    features, labels = npair_batch()
    out = loss(features, labels, head=head)
    classes = torch.tensor([3, 5, 7, 9])
    # anchors (one per class), then row i / column j = the positive of class j pulled toward anchor i
    assert torch.equal(out["synthetic_labels"], torch.cat([classes, classes.repeat(4)]))
    # each pulled negative lies on the segment anchor i -> positive j, so it keeps class j's label
    z = head(features).detach()
    anchors, positives = z[0::2], z[1::2]
    pulled = hardness_aware_negatives(anchors.repeat_interleave(4, 0), positives.repeat_interleave(4, 0),
                                      positives.repeat(4, 1), 50.0, 1.0)
    direction = positives.repeat(4, 1) - anchors.repeat_interleave(4, 0)
    offset = pulled - anchors.repeat_interleave(4, 0)
    t = (offset * direction).sum(1) / direction.square().sum(1)
    assert torch.allclose(offset, t[:, None] * direction, atol=1e-5) and (t > 0).all() and (t <= 1 + 1e-6).all()


def test_synthetic_labels_are_the_negatives_labels_triplet():
    loss, head, _ = toy_hdml("triplet", pulling_factor=7.0, mining="all", squared=False, reduction="mean")
    features, labels = npair_batch()
    out = loss(features, labels, head=head)
    syn = out["synthetic_labels"].reshape(3, -1)  # anchors, positives, pulled negatives
    assert syn.shape[1] == 8 * 6  # 8 anchors x 1 positive x 6 negatives
    assert torch.equal(syn[0], syn[1]) and (syn[0] != syn[2]).all()


def test_ablations_switch_terms_off():
    features, labels = npair_batch()
    loss, head, _ = toy_hdml("npair", use_softmax=False, use_reconstruction=False)
    out = loss(features, labels, head=head)
    assert float(out["gen"]) == 0.0 and float(out["soft"]) == 0.0 and float(out["recon"]) == 0.0
    loss, head, _ = toy_hdml("npair", use_softmax=False)
    out = loss(features, labels, head=head)
    assert float(out["soft"].detach()) == 0.0 and float(out["recon"].detach()) > 0


@pytest.mark.parametrize("overrides", [NPAIR, TRIPLET, TRIPLET + MINED + ("loss.mining=semihard",)])
def test_each_objective_reaches_only_its_optimisers_parameters(compose_cfg, tmp_path, overrides):
    trainer = build_trainer(compose_cfg, tmp_path, *overrides, "loss.pulling_factor=30")
    method, model, loss = trainer.method, trainer.model, trainer.loss
    loss.javg.mean.fill_(1.0)
    loss.jgen_avg.mean.fill_(1e4)  # w = exp(-0.5): both J_m and J_syn matter
    batch = trainer.to_device(next(iter(method.batches(1))))
    model.train()
    params = {"metric": method.metric_params, "gen": method.generator_params, "cls": method.classifier_params}
    ids = {name: {id(p) for p in ps} for name, ps in params.items()}
    assert not (ids["metric"] & ids["gen"]) and not (ids["metric"] & ids["cls"]) and not (ids["gen"] & ids["cls"])
    every = [p for p in [*model.parameters(), *loss.parameters()] if p.requires_grad]
    assert {id(p) for p in every} == ids["metric"] | ids["gen"] | ids["cls"]

    # reference gradients of each objective w.r.t. its own parameters, on a fresh forward of the same batch
    state = {k: v.clone() for k, v in {**model.state_dict(), **{f"l.{k}": v for k, v in loss.state_dict().items()}}.items()}
    ref = method.compute_loss(batch)
    want = {name: torch.autograd.grad(ref[key], params[name], retain_graph=True, allow_unused=True)
            for name, key in (("metric", "loss"), ("gen", "gen"), ("cls", "cls"))}
    # J_gen does depend on the metric layers: only the optimiser ownership keeps it from moving them
    leak = torch.autograd.grad(ref["gen"], params["metric"], retain_graph=True, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in leak)
    # J_metric does depend on the generator (through J_syn): the metric objective must not move it
    leak = torch.autograd.grad(ref["loss"], params["gen"], retain_graph=True, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in leak)
    del ref
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("l.")})
    loss.load_state_dict({k[2:]: v for k, v in state.items() if k.startswith("l.")})

    losses = method.compute_loss(batch)
    before = {id(p): p.detach().clone() for p in every}
    method.backward_and_step(losses)
    for name in params:
        for p, g in zip(params[name], want[name]):
            expected = torch.zeros_like(p) if g is None else g
            got = torch.zeros_like(p) if p.grad is None else p.grad
            assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6), name
    moved = {name: any(not torch.equal(before[id(p)], p.detach()) for p in ps) for name, ps in params.items()}
    assert all(moved.values())
    frozen_trunk = [p for p in model.parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen_trunk)


@pytest.mark.parametrize("plain, hdml", [
    (("loss=npair", "sampler=npair", "trainer.batch_size=10"), NPAIR + ("loss.l2reg=0.003",)),
    (("loss=triplet", "loss.margin=1.0", "loss.mining=all", *MINED),
     TRIPLET + MINED + ("loss.mining=all", "loss.squared=false", "loss.reduction=mean")),
])
def test_pulling_factor_zero_is_plain_training(compose_cfg, tmp_path, plain, hdml):
    """Same seed: identical loss values at every step and identical metric-layer parameters after them."""
    steps = 4
    standard = build_trainer(compose_cfg, tmp_path / "a", *plain)
    reference = train_steps(standard, steps)
    ours = build_trainer(compose_cfg, tmp_path / "b", *hdml, "loss.pulling_factor=0", "method.feature_bn=false",
                         "loss.regular_factor=0")
    values = train_steps(ours, steps)
    assert values == reference
    a, b = standard.model.state_dict(), ours.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ feature cache
FROZEN = ("backbone=resnet18", "backbone.freeze=all", "backbone.embedding_dim=16", "dataset.max_shift=0")


@pytest.mark.slow
def test_cached_training_matches_uncached(compose_cfg, tmp_path):
    uncached = build_trainer(compose_cfg, tmp_path / "u", *NPAIR, *FROZEN)
    cached = build_trainer(compose_cfg, tmp_path / "c", *NPAIR, *FROZEN, "trainer.cache_features=true",
                           "trainer.cache_views=1")
    assert cached.method.cache is not None
    assert cached.method.cache.features.shape[:2] == (1, len(cached.data.train))  # one view of every train image
    a, b = train_steps(uncached, 3), train_steps(cached, 3)
    assert np.allclose(a, b, rtol=1e-5, atol=1e-6)
    sa, sb = uncached.model.head.state_dict(), cached.model.head.state_dict()
    assert all(torch.allclose(sa[k].float(), sb[k].float(), rtol=1e-4, atol=1e-6) for k in sa)
    assert cached.model.info["hdml"]["trunk"].startswith("frozen") and cached.model.info["hdml"]["feature_cache"]


def test_cache_refuses_a_trainable_trunk(compose_cfg, tmp_path):
    with pytest.raises(DMLRunnerError, match="frozen trunk"):
        build_trainer(compose_cfg, tmp_path, *NPAIR, "trainer.cache_features=true")


def test_cache_views_are_deterministic_and_distinct(compose_cfg):
    from dml_runner.build import instantiate

    data = instantiate(compose_cfg("dataset.max_shift=1").dataset, "dataset")
    first = [SeededView(data.train, v, seed=0)[5][0] for v in range(3)]
    again = [SeededView(data.train, v, seed=0)[5][0] for v in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert len({x.numpy().tobytes() for x in first}) > 1

    def embed(dataset, features=True):
        return torch.stack([dataset[i][0].flatten() for i in range(len(dataset))])

    state = torch.get_rng_state()
    cache = FeatureCache.build(embed, data.train, views=2, seed=0)
    assert torch.equal(state, torch.get_rng_state())  # building a cache leaves the global RNG alone
    sampler = [[0, 1, 2], [3, 4]]
    batches = list(cache.batches(sampler, epoch=1))
    assert [tuple(f.shape) for f, _ in batches] == [(3, 64), (2, 64)]
    assert torch.equal(batches[1][1], torch.as_tensor(data.train.labels[[3, 4]]))


def test_frozen_detection(compose_cfg):
    from hydra.utils import instantiate

    frozen = instantiate(compose_cfg(*FROZEN).backbone, in_channels=1)
    tuned = instantiate(compose_cfg().backbone, in_channels=1)
    assert trunk_is_frozen(frozen) and not trunk_is_frozen(tuned)


# ------------------------------------------------------------------------------------------------ configs
def test_hdml_losses_refuse_other_methods(compose_cfg, tmp_path):
    with pytest.raises(DMLRunnerError, match="method=hdml"):
        build_trainer(compose_cfg, tmp_path, "loss=hdml_npair", "method=standard", "trainer.batch_size=10")
    with pytest.raises(DMLRunnerError, match="loss=hdml_npair or loss=hdml_triplet"):
        build_trainer(compose_cfg, tmp_path, "method=hdml")


def test_configs_compose_with_the_documented_fields(compose_cfg):
    for overrides in (NPAIR, TRIPLET):
        cfg = compose_cfg(*overrides)
        for field in ("pulling_factor", "beta", "lambda_", "softmax_factor", "use_softmax", "use_reconstruction",
                      "l2reg"):
            assert field in cfg.loss
        assert cfg.method.generator_lr == 1e-2 and cfg.method.softmax_lr == 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [NPAIR, TRIPLET, NPAIR + FROZEN + ("trainer.cache_features=true",)])
def test_short_run_of_each_config(compose_cfg, tmp_path, overrides):
    from dml_runner.run import run

    cfg = compose_cfg(*overrides, "trainer=smoke", "trainer.save_checkpoints=false", "eval.kmeans_iters=5")
    results = run(cfg, tmp_path)
    assert results["status"] == "completed"
    saved = json.loads((tmp_path / "results.json").read_text())
    hdml = saved["model"]["hdml"]
    assert hdml["metric"] == cfg.loss.metric and hdml["trunk_frozen"] == ("backbone.freeze=all" in overrides)
    history = pd.read_csv(tmp_path / "history.csv")
    assert {"hdml/metric_syn", "hdml/gen", "lr_generator", "lr_softmax"} <= set(history.columns)
    assert (tmp_path / "learning_curves.png").is_file()


@pytest.mark.slow
def test_pulling_factor_sweep_writes_summary_and_plot(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", *NPAIR, "loss.pulling_factor=0,90", "trainer=smoke", "trainer.eval_before_training=false",
            "trainer.save_checkpoints=false", "eval.kmeans_iters=5", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(dml_run_cmd() + args, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = pd.read_csv(sweep / "summary.csv")
    assert summary["status"].tolist() == ["completed", "completed"]
    assert sorted(summary["loss.pulling_factor"]) == [0, 90]
    assert (sweep / "sweep_loss.pulling_factor.png").is_file()


# ------------------------------------------------------------------------------------------------ official ports
# Small numpy ports of the official TensorFlow formulas (wzzheng/HDML), written from the TF code, independent of ours.
def tf_distance(x, y):  # lib/nn_Ops.py distance: sqrt(sum (x - y)^2), keep dims
    return np.sqrt(((x - y) ** 2).sum(1, keepdims=True))


def tf_pulling(kind, emb, j_avg, alpha):
    """lib/HDML.py Pulling: N-pair on [anchors; positives], triplet on [anchors; positives; negatives]."""
    def pull(anc, pos, neg):
        d_ap, d_an = tf_distance(anc, pos), tf_distance(anc, neg)
        neg2 = anc + (neg - anc) * ((d_ap + (d_an - d_ap) * np.exp(-alpha / j_avg)) / d_an)
        return np.where(d_ap >= d_an, neg, neg2)

    if kind == "triplet":
        anc, pos, neg = np.split(emb, 3)
        return np.concatenate([anc, pos, pull(anc, pos, neg)])
    anc, pos = np.split(emb, 2)
    n = anc.shape[0]
    anc_tile, pos_tile = np.repeat(anc, n, 0), np.repeat(pos, n, 0)  # tf.reshape(tf.tile(x, [1, n]), [-1, d])
    neg_tile = np.tile(pos, (n, 1))                                    # tf.tile(neg, [n, 1])
    return np.concatenate([anc, pull(anc_tile, pos_tile, neg_tile)])


def tf_triplet_loss(emb, margin=1.0):  # lib/Loss_ops.py triplet_loss on Loss()'s three splits
    a, p, n = np.split(emb, 3)
    return np.maximum(((a - p) ** 2).sum(1) - ((a - n) ** 2).sum(1) + margin, 0.0).sum()


def tf_xent(logits, targets):  # mean sparse softmax cross-entropy (also softmax_cross_entropy with one-hot rows)
    top = logits.max(1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(1)) + top[:, 0]
    return float((lse - logits[np.arange(len(targets)), targets]).mean())


def tf_npairs_loss(anc, pos, reg):  # Loss_ops.npairs_loss with distinct classes: labels_remapped = identity
    l2 = 0.25 * reg * (((anc ** 2).sum(1)).mean() + ((pos ** 2).sum(1)).mean())
    return l2 + tf_xent(anc @ pos.T, np.arange(len(anc)))


def tf_new_npair_loss(anc, cand, reg):  # Loss_ops.new_npair_loss, equal_shape=False: anchor i vs rows i*n..i*n+n-1
    n = anc.shape[0]
    l2 = 0.25 * reg * (((anc ** 2).sum(1)).mean() + ((cand ** 2).sum(1)).mean())
    xent = np.mean([tf_xent(anc[i:i + 1] @ cand[i * n:(i + 1) * n].T, np.array([i])) for i in range(n)])
    return l2 + xent


def tf_l2_loss(params):  # tf.nn.l2_loss summed: sum v^2 / 2
    return sum(float((p.detach().double().numpy() ** 2).sum()) / 2 for p in params)


def official_case(metric):
    """Our loss with a plain (unnormalised) linear head, as the official fc1, on the official batch layout."""
    torch.manual_seed(3)
    if metric == "triplet":
        labels = torch.tensor([3, 5, 7, 3, 5, 7, 9, 11, 13])  # [anchors; positives; negatives]
        loss = HDMLLoss(metric="triplet", pulling_factor=7.0, beta=5e3, regular_factor=1e-3)
    else:
        labels = torch.tensor([3, 5, 7, 9, 3, 5, 7, 9])  # [anchors; positives]
        loss = HDMLLoss(metric="npair", pulling_factor=90.0, beta=1e4, l2reg=3e-3, regular_factor=5e-3)
    loss.build(feature_dim=6, embedding_dim=4, class_ids=torch.tensor([3, 5, 7, 9, 11, 13]))
    head = torch.nn.Linear(6, 4)
    features = 2.0 * torch.randn(labels.numel(), 6)
    loss.javg.mean.fill_(20.0 if metric == "npair" else 5.0)  # exp(-alpha / J_avg) well inside (0, 1)
    loss.jgen_avg.mean.fill_(1e4)
    return loss, head, features, labels


@pytest.mark.parametrize("metric", ["triplet", "npair"])
def test_objectives_match_a_port_of_the_official_code(metric):
    """J_m (+ weight decay), the augmentor, J_syn, J_metric, J_recon, J_soft and the recorded J_m, against numpy ports
    of main_npair.py / main_triplet.py, lib/HDML.py and lib/Loss_ops.py on the official batch layouts."""
    loss, head, features, labels = official_case(metric)
    params = list(head.parameters())
    out = loss(features, labels, head=head, decay_params=params)

    z = head(features).detach().double().numpy()
    j_avg = float(loss.javg.mean)
    aug = tf_pulling(metric, z, j_avg, loss.pulling_factor)
    gen = loss.generator(torch.cat([head(features), torch.as_tensor(aug, dtype=torch.float32)])).detach()
    y_p, y_q = gen[:len(labels)].double().numpy(), gen[len(labels):]
    z_q = head(y_q).detach().double().numpy()
    y_q = y_q.double().numpy()
    wd = loss.regular_factor * tf_l2_loss(params)
    w = math.exp(-loss.beta / float(loss.jgen_avg.mean))
    W, b = loss.classifier.weight.detach().double().numpy().T, loss.classifier.bias.detach().double().numpy()
    index = {c: i for i, c in enumerate(loss.class_ids.tolist())}
    if metric == "triplet":
        j_m = tf_triplet_loss(z) + wd
        j_syn = tf_triplet_loss(z_q)
        # main_triplet.py: one mean CE over the whole synthetic tuple, with the batch labels
        j_soft = 1e4 * 0.5 * tf_xent(y_q @ W + b, np.array([index[c] for c in labels.tolist()]))
    else:
        n = len(labels) // 2
        j_m = tf_npairs_loss(z[:n], z[n:], loss.l2reg) + wd
        j_syn = tf_new_npair_loss(z_q[:n], z_q[n:], loss.l2reg)
        pos_labels = np.array([index[c] for c in labels[n:].tolist()])
        anc_labels = np.array([index[c] for c in labels[:n].tolist()])
        # HDML.genSoftmax: mean CE over the N x N tile (labels tiled) + mean CE over the anchors
        j_soft = 1e4 * 0.5 * (tf_xent(y_q[n:] @ W + b, np.tile(pos_labels, n)) + tf_xent(y_q[:n] @ W + b, anc_labels))
    j_recon = 0.5 * float(((y_p - features.double().numpy()) ** 2).sum())
    assert float(out["metric_real"].detach() + out["weight_decay"].detach()) == pytest.approx(j_m, rel=1e-5)
    assert float(out["weight_decay"]) == pytest.approx(wd, rel=1e-6) and wd > 0
    assert float(out["metric_syn"]) == pytest.approx(j_syn, rel=1e-4)
    assert float(out["loss"]) == pytest.approx(w * j_m + (1 - w) * j_syn, rel=1e-4)
    assert float(out["soft"]) == pytest.approx(j_soft, rel=1e-4)
    assert float(out["recon"]) == pytest.approx(j_recon, rel=1e-4)
    # the running mean J_avg is fed the weighted J_m, weight decay included (main_*.py fetch J_m = exp(..) * J_m)
    assert float(out["metric_recorded"]) == pytest.approx(w * j_m, rel=1e-5)
    for _ in range(64):
        loss.record(out)
    assert float(loss.javg.mean) == pytest.approx(w * j_m, rel=1e-5)


def test_triplet_soft_is_one_mean_not_a_sum_of_part_means():
    """With unequal per-part cross-entropies, one mean over 3m rows differs from the sum of the three part means."""
    loss, head, features, labels = official_case("triplet")
    out = loss(features, labels, head=head)
    per_part = float(out["soft"]) / (1e4 * 0.5)
    assert per_part < 3 * math.log(6) * 0.9  # one mean CE is ~log(6) at init; the sum of 3 part means is ~3x that


def test_fixed_triplets_refuse_another_layout():
    loss, head, features, _ = official_case("triplet")
    with pytest.raises(DMLRunnerError, match="sampler=hdml_triplets"):
        loss(features, torch.tensor([3, 3, 3, 5, 5, 5, 7, 7, 7]), head=head)
    with pytest.raises(DMLRunnerError, match="multiple of 3"):
        loss(features[:8], torch.tensor([3, 5, 3, 5, 7, 9, 11, 13]), head=head)


def test_batchnorm_uses_the_tensorflow_momentum_and_eps(compose_cfg, tmp_path):
    trainer = build_trainer(compose_cfg, tmp_path, *NPAIR)
    bns = [m for m in [*trainer.model.head.modules(), *trainer.loss.generator.modules()]
           if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(bns) == 2
    for bn in bns:  # tf.layers.batch_normalization: moving = 0.99 moving + 0.01 batch, eps 1e-3
        bn.train()
        x = torch.randn(16, bn.num_features) + 3.0
        before, before_var = bn.running_mean.clone(), bn.running_var.clone()
        out = bn(x)
        assert torch.allclose(bn.running_mean, 0.99 * before + 0.01 * x.mean(0), atol=1e-6)
        want = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-3) * bn.weight + bn.bias
        assert torch.allclose(out, want, atol=1e-5)
        if bn in bns[:1]:  # BN1 (the head's, used by evaluation): TF's non-fused moving variance is the biased one
            biased, unbiased = x.var(0, unbiased=False), x.var(0, unbiased=True)
            assert torch.allclose(bn.running_var, 0.99 * before_var + 0.01 * biased, atol=1e-6)
            assert not torch.allclose(bn.running_var, 0.99 * before_var + 0.01 * unbiased, atol=1e-6)
            bn.eval()  # evaluation normalises with the moving statistics
            moving = (x - bn.running_mean) / torch.sqrt(bn.running_var + 1e-3) * bn.weight + bn.bias
            assert torch.allclose(bn(x), moving, atol=1e-5)


def test_weight_decay_covers_the_trainable_non_batchnorm_metric_parameters(compose_cfg, tmp_path):
    trainer = build_trainer(compose_cfg, tmp_path, *NPAIR)
    method, model = trainer.method, trainer.model
    bn = {id(p) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for p in m.parameters()}
    decayed = {id(p) for p in method.decay_params}
    assert decayed == {id(p) for p in model.parameters() if p.requires_grad and id(p) not in bn}
    assert {id(model.head.fc.weight), id(model.head.fc.bias)} <= decayed
    assert not decayed & {id(p) for p in [*trainer.loss.generator.parameters(), *trainer.loss.classifier.parameters()]}


def test_evaluation_sees_l2_normalised_embeddings_training_the_raw_ones(compose_cfg, tmp_path):
    trainer = build_trainer(compose_cfg, tmp_path, *NPAIR, "backbone.normalize=false")
    model, loss = trainer.model, trainer.loss
    images = next(iter(trainer.method.batches(1)))[0][:4]
    model.train()
    raw = model.head(model.features(images))
    assert not torch.allclose(raw.norm(dim=1), torch.ones(4), atol=1e-3)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(images).norm(dim=1), torch.ones(4), atol=1e-5)
    untouched = build_trainer(compose_cfg, tmp_path / "b", *NPAIR, "backbone.normalize=false",
                              "method.eval_normalize=false").model.eval()
    with torch.no_grad():
        assert not torch.allclose(untouched(images).norm(dim=1), torch.ones(4), atol=1e-3)
    assert loss.metric == "npair"


def test_prepare_model_rebuilds_the_trained_head(compose_cfg, tmp_path):
    """dml-embed's path: a backbone rebuilt from the config takes the trained weights once the method's
    prepare_model has added the head's BatchNorm, and embeds (normalised) as the trained model."""
    from dml_runner.methods.hdml import HDMLMethod
    from dml_runner.build import instantiate as _instantiate

    trainer = build_trainer(compose_cfg, tmp_path, *NPAIR, "backbone.normalize=false")
    cfg = compose_cfg(*QUIET, *NPAIR, "backbone.normalize=false")
    rebuilt = _instantiate(cfg.backbone, "backbone", in_channels=trainer.data.train.in_channels)
    with pytest.raises(RuntimeError):  # the head's BatchNorm is missing
        rebuilt.load_state_dict(trainer.model.state_dict())
    HDMLMethod().prepare_model(rebuilt)
    rebuilt.load_state_dict(trainer.model.state_dict())
    images = next(iter(trainer.method.batches(1)))[0][:4]
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(images), trainer.model.eval()(images))
    assert rebuilt.head.eval_normalize


@pytest.mark.parametrize("nan_to_zero", [True, False])
def test_a_nan_objective_counts_as_zero_as_the_official_code(compose_cfg, tmp_path, monkeypatch, nan_to_zero):
    trainer = build_trainer(compose_cfg, tmp_path, *NPAIR, f"loss.nan_to_zero={str(nan_to_zero).lower()}")
    method, loss = trainer.method, trainer.loss
    forward = type(loss).forward

    def nan_metric(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(type(loss), "forward", nan_metric)
    trainer.model.train()
    losses = method.compute_loss(trainer.to_device(next(iter(method.batches(1)))))
    if not nan_to_zero:  # the trainer's NaN guard stops the run
        assert math.isnan(float(losses["loss"]))
        return
    assert losses["skip_flags"].tolist() == [True, False, False] and float(losses["loss"]) == 0.0
    metric_before = [p.detach().clone() for p in method.metric_params]
    gen_before = [p.detach().clone() for p in method.generator_params]
    method.backward_and_step(losses)
    # TF minimize(0): zero gradients, Adam still takes its (first: zero) step; the generator trains normally
    assert all(p.grad is not None and not p.grad.any() for p in method.metric_params)
    assert all(torch.equal(a, p.detach()) for a, p in zip(metric_before, method.metric_params))
    assert any(not torch.equal(a, p.detach()) for a, p in zip(gen_before, method.generator_params))
    assert all(method.metric_opt.state[p]["step"] == 1 for p in method.metric_params)


# ------------------------------------------------------------------------------------------------ triplet sampler
def test_official_triplet_sampler_layout():
    from dml_runner.samplers.hdml_triplets import HDMLTripletBatchSampler

    labels = np.repeat(np.arange(30), 4)
    sampler = HDMLTripletBatchSampler(labels, batch_size=30, seed=5)
    sampler.set_epoch(2)
    batches = list(sampler)
    assert len(batches) == len(labels) // 30 and batches == list(sampler)  # deterministic per (seed, epoch)
    for batch in batches:
        a, p, n = np.split(np.asarray(batch), 3)
        assert (labels[a] == labels[p]).all() and (a != p).all()
        classes = np.concatenate([labels[a], labels[n]])
        assert len(set(classes.tolist())) == 20  # 2m distinct classes: m anchor classes, m negative classes
    sampler.set_epoch(3)
    assert list(sampler) != batches
    with pytest.raises(ValueError, match="multiple of 3"):
        HDMLTripletBatchSampler(labels, batch_size=32)
    with pytest.raises(ValueError, match="2 x 20 distinct classes"):
        HDMLTripletBatchSampler(labels, batch_size=60)


# ------------------------------------------------------------------------------------------------ the paper rows
ROWS = [f"hdml/{table}/{row}" for table in ("table1_cub200", "table2_cars196", "table3_sop")
        for row in ("hdml_npair", "hdml_triplet")]


@pytest.mark.parametrize("row", ROWS)
def test_rows_compose_with_the_official_values(compose_cfg, row):
    cfg = compose_cfg(f"+experiment={row}")
    dataset = cfg.dataset._target_.rsplit(".", 1)[-1].lower()
    assert cfg.backbone.normalize is False and cfg.backbone.freeze == "none" and cfg.backbone.pretrained
    assert cfg.method.eval_normalize and cfg.method.feature_bn and cfg.loss.nan_to_zero
    assert cfg.loss.regular_factor == (1e-3 if "cub" in row else 5e-3)
    assert cfg.loss.beta == (1e4 if "cars" in row else 5e3)
    if row.endswith("triplet"):
        assert cfg.sampler._target_.endswith("HDMLTripletBatchSampler") and cfg.trainer.batch_size == 120
        assert (cfg.loss.mining, cfg.loss.squared, cfg.loss.reduction, cfg.loss.margin) == ("fixed", True, "sum", 1.0)
    else:
        assert cfg.sampler._target_.endswith("NPairBatchSampler") and cfg.trainer.batch_size == 128
        assert cfg.loss.l2reg == (1.5e-2 if "cub" in row else 3e-3)
    frozen = compose_cfg(f"+experiment={row}", "backbone.freeze=all", "trainer.cache_features=true")
    assert frozen.backbone.freeze == "all" and frozen.trainer.cache_features and dataset


def test_every_hdml_table_row_declares_its_differences(compose_cfg):
    from pathlib import Path

    rows = sorted(Path(__file__).resolve().parent.parent.glob("conf/experiment/hdml/*/*.yaml"))
    assert len(rows) == 27
    for path in rows:
        cfg = compose_cfg(f"+experiment=hdml/{path.parent.name}/{path.stem}")
        text = " ".join(row_deviations(cfg.reference))
        assert "GoogLeNet" in text and "best test NMI" in text and "bf16" in text
        assert "freezes" not in text  # the official trunk is trained (trainable tf.get_variable)
        if not path.stem.startswith("hdml_"):
            assert "weight decay" in text and "NaN" in text
            if cfg.backbone.normalize:  # trained on the unit sphere: the HDML code trains raw z
                assert "raw" in text or "L2-normalised" in text
            else:  # trained raw, evaluated L2-normalised as the HDML code's evaluation.py: nothing to declare
                assert cfg.eval.normalize and "evaluated on raw" not in text


@pytest.mark.slow
def test_a_row_runs_with_the_frozen_trunk_and_feature_cache(compose_cfg, tmp_path):
    """The paper row itself (GoogLeNet, caffe_227, official triplet sampler, HDML) on a tiny CUB tree, with the
    frozen-trunk option and two cached augmentation views; the random GoogLeNet stands in for the weight files."""
    from dml_runner.datasets.fixtures import make_cub200
    from dml_runner.run import run

    root = make_cub200(tmp_path, classes=(1, 2, 3, 4, 101, 102, 103), per_class=3)
    cfg = compose_cfg("+experiment=hdml/table1_cub200/hdml_triplet", f"dataset.root={root}", "backbone.pretrained=false",
                      "backbone.freeze=all", "trainer.cache_features=true", "trainer.cache_views=2",
                      "trainer.batch_size=6", "trainer.epochs=1", "trainer.eval_every=1", "trainer.amp=false",
                      "trainer.save_checkpoints=false", "eval.kmeans_iters=5", *QUIET)
    results = run(cfg, tmp_path / "out")
    assert results["status"] == "completed"
    hdml = json.loads((tmp_path / "out" / "results.json").read_text())["model"]["hdml"]
    assert hdml["trunk_frozen"] and hdml["feature_cache"] and hdml["cache_views"] == 2
    emb = np.load(tmp_path / "out" / "embeddings.npz")["embeddings"]
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)


# ------------------------------------------------------------------------------------- schedule and precision
# CUB-200-2011's training split (classes 1-100, 5,864 images): the samplers' batches per epoch depend on its size.
CUB_TRAIN_LABELS = np.repeat(np.arange(100), [59] * 64 + [58] * 36)
HDML_ROWS = sorted(f"hdml/{p.parent.name}/{p.stem}"
                   for p in (Path(__file__).resolve().parent.parent / "conf/experiment/hdml").glob("*/*.yaml"))
CUB_ROWS = [row for row in HDML_ROWS if row.startswith("hdml/table1_cub200/")]


def row_schedule(cfg, labels):
    """(lr of every optimisation step, 1-based as list index + 1; batches per epoch) of a composed row, from the row's
    own sampler, scheduler or method schedule, stepped as the trainer and HDMLMethod step them."""
    from hydra.utils import instantiate

    from dml_runner.build import instantiate as _instantiate

    sampler = _instantiate(cfg.sampler, "sampler", labels=labels, batch_size=cfg.trainer.batch_size, seed=0)
    per_epoch = len(sampler)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=float(cfg.optimizer.lr))
    per_step = cfg.method._target_.endswith("HDMLMethod")
    if per_step:
        method = _instantiate(cfg.method, "method")
        assert method.lr_milestone_unit == "step"
        schedule = method.metric_schedule(opt)
    else:
        schedule = instantiate(cfg.scheduler)(opt) if cfg.get("scheduler") and cfg.scheduler.get("_target_") else None
    lrs = []
    for step in range(1, cfg.trainer.epochs * per_epoch + 1):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if schedule is not None and (per_step or step % per_epoch == 0):
            schedule.step()
    return lrs, per_epoch


def test_official_schedule_on_cub_never_halves_and_ends_at_step_8004():
    """The official loop tests `step in [5632, 6848]` and `step >= 8000` only at evaluation steps: every 500 steps up
    to 5000, then every batch_per_epoch steps (46 recommended for CUB, 64 for Cars196)."""
    def official(batch_per_epoch):
        step, period, halvings = 0, 500, []
        while True:
            step += 1
            if step % period == 0:
                if step in (5632, 6848):
                    halvings.append(step)
                if step >= 5000:
                    period = batch_per_epoch
                if step >= 8000:
                    return halvings, step

    assert official(46) == ([], 8004)
    assert official(64) == ([5632, 6848], 8000)


@pytest.mark.parametrize("row", CUB_ROWS)
def test_cub_rows_keep_a_constant_lr_to_step_8004(compose_cfg, row):
    cfg = compose_cfg(f"+experiment={row}")
    lrs, per_epoch = row_schedule(cfg, CUB_TRAIN_LABELS)
    assert per_epoch == 5864 // cfg.trainer.batch_size
    assert len(lrs) >= 8004 > len(lrs) - per_epoch  # the first epoch end at or after the official last step
    base = float(cfg.optimizer.lr)
    for step in (1, 5631, 5632, 5633, 5634, 6847, 6848, 6849, 6850, 8000, 8004, len(lrs)):
        assert lrs[step - 1] == base, (row, step)
    assert str(len(lrs)) in " ".join(row_deviations(cfg.reference))  # the row states its run length


@pytest.mark.parametrize("row", ["hdml/table1_cub200/hdml_npair", "hdml/table1_cub200/hdml_triplet",
                                 "hdml/table2_cars196/hdml_npair"])
def test_the_other_reading_halves_at_steps_5632_and_6848(compose_cfg, row):
    """Cars196 rows (batch_per_epoch 64 divides both steps) and the CUB option method.lr_milestones=[5632,6848]."""
    extra = ["method.lr_milestones=[5632,6848]"] if "cub" in row else []
    cfg = compose_cfg(f"+experiment={row}", *extra)
    labels = CUB_TRAIN_LABELS if "cub" in row else np.repeat(np.arange(98), [83] * 18 + [82] * 80)
    lrs, _ = row_schedule(cfg, labels)
    base = float(cfg.optimizer.lr)
    assert lrs[5632 - 1] == base and lrs[5633 - 1] == base / 2  # halved after step 5632
    assert lrs[6848 - 1] == base / 2 and lrs[6849 - 1] == base / 4
    assert lrs[-1] == base / 4


@pytest.mark.parametrize("row", HDML_ROWS)
def test_hdml_rows_evaluate_in_float32_from_cv2_style_resizes(compose_cfg, row):
    """The official evaluation.py embeds in float32 and its converters store cv2.resize(img, (256, 256))."""
    cfg = compose_cfg(f"+experiment={row}")
    assert cfg.eval.amp is False
    assert cfg.transform.train.resize_mode == cfg.transform.test.resize_mode == "warp_cv2"
    text = " ".join(row_deviations(cfg.reference))
    assert "computed in float32 (eval.amp=false)" in text and "evaluation embeds" not in text


def _cv2_linear_oracle(src: np.ndarray, width: int, height: int) -> np.ndarray:
    """One output pixel at a time, OpenCV's INTER_LINEAR for 8-bit images written out: float32 sampling position
    (x + 0.5) * src / dst - 0.5; horizontal taps clamped to the image (weight 1 on the border pixel), vertical taps
    clipped row indices; weights rounded to 1/2048; vertical rounding of OpenCV's vectorised path."""
    h, w = src.shape[:2]
    out = np.zeros((height, width) + src.shape[2:], dtype=np.int64)

    def taps(i, size, dst, clamp):
        pos = float(np.float32((i + 0.5) * (1.0 / (dst / size)) - 0.5))
        lo = math.floor(pos)
        frac = float(np.float32(pos - lo))
        if clamp and (lo < 0 or lo >= size - 1):
            lo, frac = min(max(lo, 0), size - 1), 0.0
        one = np.float32(2048)
        weights = (int(np.rint(np.float32(1 - frac) * one)), int(np.rint(np.float32(frac) * one)))
        return (min(max(lo, 0), size - 1), min(max(lo + 1, 0), size - 1)), weights

    for y in range(height):
        (r0, r1), (b0, b1) = taps(y, h, height, clamp=False)
        for x in range(width):
            (c0, c1), (a0, a1) = taps(x, w, width, clamp=True)
            s0 = (int(src[r0, c0]) * a0 + int(src[r0, c1]) * a1) >> 4 if src.ndim == 2 else \
                (src[r0, c0].astype(np.int64) * a0 + src[r0, c1].astype(np.int64) * a1) >> 4
            s1 = (int(src[r1, c0]) * a0 + int(src[r1, c1]) * a1) >> 4 if src.ndim == 2 else \
                (src[r1, c0].astype(np.int64) * a0 + src[r1, c1].astype(np.int64) * a1) >> 4
            out[y, x] = np.clip((((s0 * b0) >> 16) + ((s1 * b1) >> 16) + 2) >> 2, 0, 255)
    return out.astype(np.uint8)


@pytest.mark.parametrize("shape,size", [((13, 17, 3), (9, 11)), ((5, 4), (12, 10)), ((1, 6, 3), (4, 3)),
                                        ((40, 23, 3), (16, 16)), ((16, 16, 3), (7, 16))])
def test_cv2_linear_resize_matches_the_formula_pixel_by_pixel(shape, size):
    from dml_runner.datasets.transforms import cv2_linear_resize

    src = np.random.default_rng(3).integers(0, 256, size=shape, dtype=np.uint8)
    ours = cv2_linear_resize(src, *size)
    assert ours.shape == (size[1], size[0]) + shape[2:] and ours.dtype == np.uint8
    assert np.array_equal(ours, _cv2_linear_oracle(src, *size))


def test_cv2_linear_resize_special_cases_and_no_antialiasing():
    from PIL import Image

    from dml_runner.datasets.transforms import Cv2LinearResize, caffe_227, cv2_linear_resize

    src = np.random.default_rng(4).integers(0, 256, size=(8, 6, 3), dtype=np.uint8)
    assert np.array_equal(cv2_linear_resize(src, 6, 8), src)  # same size: a copy
    halves = cv2_linear_resize(src, 3, 4)  # exact 2x downscale: OpenCV averages each 2x2 block
    assert np.array_equal(halves, (src.reshape(4, 2, 3, 2, 3).astype(int).sum(axis=(1, 3)) + 2) >> 2)
    # a 1-pixel stripe pattern shrunk 3x: bilinear sampling without antialiasing keeps sampled stripes at full
    # contrast, where an antialiased filter averages them to grey
    stripes = np.tile(np.array([0, 255, 0], dtype=np.uint8), 30)[None, :].repeat(9, axis=0)
    ours = cv2_linear_resize(stripes, 30, 3)
    assert set(np.unique(ours)) == {255}
    pil = np.asarray(Image.fromarray(stripes).resize((30, 3), Image.BILINEAR))
    assert pil.max() < 200
    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, size=(30, 40, 3), dtype=np.uint8))
    assert Cv2LinearResize(16)(image).size == (16, 16)
    assert "Cv2LinearResize" in repr(caffe_227(train=False, resize=16, crop=12, resize_mode="warp_cv2"))
    with pytest.raises(ValueError, match="8-bit"):
        cv2_linear_resize(src.astype(np.float32), 3, 4)
