"""HDML (issue 6): augmentor formula, objectives and optimiser ownership, reductions, feature cache, configs."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import dml_run_cmd
from dml_runner import DMLRunnerError
from dml_runner.losses.hdml import HDMLLoss, RunningLossMean, hardness_aware_negatives
from dml_runner.methods.feature_cache import FeatureCache, SeededView, trunk_is_frozen

NPAIR = ("loss=hdml_npair", "method=hdml", "sampler=npair", "trainer.batch_size=10")
TRIPLET = ("loss=hdml_triplet", "method=hdml")
QUIET = ("trainer.progress=false", "trainer.num_workers=0")


# ------------------------------------------------------------------------------------------------ helpers
def build_trainer(compose_cfg, out_dir, *overrides):
    """A Trainer (method set up, nothing trained) from the real configs, as dml_runner.run.run builds it."""
    from dml_runner.run import _instantiate
    from dml_runner.trainer import FitSettings, Trainer, seed_everything

    cfg = compose_cfg(*QUIET, *overrides)
    settings = FitSettings(**{f.name: cfg.trainer[f.name] for f in dataclasses.fields(FitSettings)
                              if f.name in cfg.trainer})
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
    loss, head, head_module = toy_hdml(metric)
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
    loss, head, _ = toy_hdml("triplet", pulling_factor=7.0, mining="all")
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


@pytest.mark.parametrize("overrides", [NPAIR, TRIPLET + ("loss.mining=semihard",)])
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
    (("loss=triplet", "loss.margin=1.0", "loss.mining=all"), TRIPLET + ("loss.mining=all",)),
])
def test_pulling_factor_zero_is_plain_training(compose_cfg, tmp_path, plain, hdml):
    """Same seed: identical loss values at every step and identical metric-layer parameters after them."""
    steps = 4
    standard = build_trainer(compose_cfg, tmp_path / "a", *plain)
    reference = train_steps(standard, steps)
    ours = build_trainer(compose_cfg, tmp_path / "b", *hdml, "loss.pulling_factor=0", "method.feature_bn=false")
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
    assert cached.method.cache is not None and cached.method.cache.features.shape[:2] == (1, 901)
    a, b = train_steps(uncached, 3), train_steps(cached, 3)
    assert np.allclose(a, b, rtol=1e-5, atol=1e-6)
    sa, sb = uncached.model.head.state_dict(), cached.model.head.state_dict()
    assert all(torch.allclose(sa[k].float(), sb[k].float(), rtol=1e-4, atol=1e-6) for k in sa)
    assert cached.model.info["hdml"]["trunk"].startswith("frozen") and cached.model.info["hdml"]["feature_cache"]


def test_cache_refuses_a_trainable_trunk(compose_cfg, tmp_path):
    with pytest.raises(DMLRunnerError, match="frozen trunk"):
        build_trainer(compose_cfg, tmp_path, *NPAIR, "trainer.cache_features=true")


def test_cache_views_are_deterministic_and_distinct(compose_cfg):
    from hydra.utils import instantiate

    data = instantiate(compose_cfg("dataset.max_shift=1").dataset)
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
