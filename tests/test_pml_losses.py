"""loss=pml: every pytorch-metric-learning loss and miner by name (dml_runner/losses/pml.py, conf/loss/pml.yaml)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from dml_runner import DMLRunnerError
from dml_runner.losses.pml import PMLLoss, loss_names, miner_names

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
from pytorch_metric_learning.distances import LpDistance  # noqa: E402

DIM = 8
# required arguments without a default in pml (everything else keeps pml's defaults)
REQUIRED = {"RankedListLoss": {"margin": 0.4, "Tn": 1.0}}


def batch(seed: int = 0, classes: tuple[int, ...] = (0, 1, 2, 3), per_class: int = 4):
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor(classes).repeat_interleave(per_class)
    emb = torch.nn.functional.normalize(torch.randn(len(labels), DIM, generator=g), dim=1)
    return emb, labels


# (wrapper kwargs, the pml loss built by hand, the pml miner built by hand or None)
CASES = {
    "multi_similarity+miner": (
        dict(name="MultiSimilarityLoss", kwargs={"alpha": 2, "beta": 40}, miner="MultiSimilarityMiner",
             miner_kwargs={"epsilon": 0.1}),
        lambda: pml_losses.MultiSimilarityLoss(alpha=2, beta=40), lambda: pml_miners.MultiSimilarityMiner(0.1)),
    "proxy_anchor": (dict(name="ProxyAnchorLoss", kwargs={"margin": 0.2, "alpha": 16}),
                     lambda: pml_losses.ProxyAnchorLoss(4, DIM, margin=0.2, alpha=16), None),
    "proxy_nca": (dict(name="ProxyNCALoss", kwargs={"softmax_scale": 3}),
                  lambda: pml_losses.ProxyNCALoss(4, DIM, softmax_scale=3), None),
    "soft_triple": (dict(name="SoftTripleLoss", kwargs={"centers_per_class": 2}),
                    lambda: pml_losses.SoftTripleLoss(4, DIM, centers_per_class=2), None),
    "normalized_softmax": (dict(name="NormalizedSoftmaxLoss"), lambda: pml_losses.NormalizedSoftmaxLoss(4, DIM), None),
    "arcface": (dict(name="ArcFaceLoss", kwargs={"margin": 20}), lambda: pml_losses.ArcFaceLoss(4, DIM, margin=20),
                None),
    "cosface": (dict(name="CosFaceLoss"), lambda: pml_losses.CosFaceLoss(4, DIM), None),
    "supcon": (dict(name="SupConLoss", kwargs={"temperature": 0.2}), lambda: pml_losses.SupConLoss(0.2), None),
    "circle": (dict(name="CircleLoss", kwargs={"m": 0.25, "gamma": 64}), lambda: pml_losses.CircleLoss(0.25, 64),
               None),
    "triplet_lp+batch_hard": (
        dict(name="TripletMarginLoss", kwargs={"margin": 0.1, "distance": "LpDistance"}, miner="BatchHardMiner"),
        lambda: pml_losses.TripletMarginLoss(margin=0.1, distance=LpDistance()), lambda: pml_miners.BatchHardMiner()),
    "margin_per_class_beta": (dict(name="MarginLoss", kwargs={"learn_beta": True}, num_classes=4),
                              lambda: pml_losses.MarginLoss(learn_beta=True, num_classes=4), None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_wrapper_gives_exactly_pmls_value_and_gradient(case):
    """Labels 10, 20, 30, 40: the per-class weights follow the sorted training class ids (rows 0..3)."""
    spec, make_ref, make_miner = CASES[case]
    emb, idx = batch(seed=1)
    class_ids = torch.tensor([10, 20, 30, 40])
    train = class_ids[idx]
    ours = PMLLoss(**spec, embedding_size=DIM, train_labels=train.numpy() if "num_classes" not in spec else None)
    ref = make_ref()
    ref.load_state_dict(ours.loss.state_dict())  # the same proxies / centres / betas
    ref_labels = idx if ours.num_classes is not None else train
    x1, x2 = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    value = ours(x1, train if "num_classes" not in spec else idx)
    miner = make_miner() if make_miner else None
    expected = ref(x2, ref_labels, miner(x2, ref_labels) if miner else None)
    assert value.dim() == 0 and torch.isfinite(value)
    assert torch.equal(value, expected)
    value.backward()
    expected.backward()
    assert torch.equal(x1.grad, x2.grad)
    for (name, p), q in zip(ours.loss.named_parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_a_loss_without_per_class_weights_ignores_the_class_ids():
    emb, labels = batch(seed=2)
    ours = PMLLoss("MultiSimilarityLoss", train_labels=[0, 1, 2, 3])
    assert ours.num_classes is None and not list(ours.parameters())
    assert torch.equal(ours(emb, labels + 100), pml_losses.MultiSimilarityLoss()(emb, labels))


def test_per_class_weights_are_parameters_and_stay_float32_under_bf16_autocast():
    emb, labels = batch(seed=3)
    ours = PMLLoss("ProxyAnchorLoss", embedding_size=DIM, train_labels=labels.numpy())
    assert [n for n, _ in ours.named_parameters()] == ["loss.proxies"]
    assert "class_ids" in ours.state_dict()  # checkpoints keep the class -> weight row map
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = ours(emb.to(torch.bfloat16), labels)
    assert ours.loss.proxies.dtype == torch.float32 and value.dtype == torch.float32
    assert torch.equal(value, ours(emb.to(torch.bfloat16).float(), labels))


@pytest.mark.parametrize("name", loss_names())
def test_every_pml_loss_builds_by_name_and_trains(name):
    emb, labels = batch(seed=4, classes=(0, 1, 2, 3, 4, 5), per_class=2)
    loss = PMLLoss(name, kwargs=REQUIRED.get(name), embedding_size=DIM, train_labels=labels.numpy())
    x = emb.clone().requires_grad_(True)
    value = loss(x, labels)
    assert value.dim() == 0 and torch.isfinite(value), name
    value.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0, name


@pytest.mark.parametrize("miner", miner_names())
def test_every_pml_miner_builds_by_name(miner):
    emb, labels = batch(seed=5, classes=(0, 1, 2, 3), per_class=3)  # 12 = 4 triplets for the packaged-triplets miner
    loss = PMLLoss("ContrastiveLoss", miner=miner)
    value = loss(emb.clone().requires_grad_(True), labels)
    assert value.dim() == 0 and torch.isfinite(value), miner


@pytest.mark.parametrize("kwargs, words", [
    (dict(name="MultiSimilarity"), ["loss.name=MultiSimilarity", "did you mean MultiSimilarityLoss?"]),
    (dict(name="proxyanchor"), ["loss.name=proxyanchor", "ProxyAnchorLoss"]),
    (dict(name="NoSuchThing"), ["loss.name=NoSuchThing", "known: AngularLoss, ArcFaceLoss"]),
    (dict(miner="MultiSimilarity"), ["loss.miner=MultiSimilarity", "did you mean MultiSimilarityMiner?"]),
    (dict(kwargs={"alhpa": 2}), ["loss.kwargs.alhpa", "not a parameter of MultiSimilarityLoss", "did you mean alpha"]),
    (dict(miner="MultiSimilarityMiner", miner_kwargs={"epsilonn": 0.1}),
     ["loss.miner_kwargs.epsilonn", "MultiSimilarityMiner", "did you mean epsilon"]),
    (dict(miner_kwargs={"epsilon": 0.1}), ["loss.miner_kwargs", "without loss.miner"]),
    (dict(name="RankedListLoss"), ["loss.kwargs.margin", "RankedListLoss needs it"]),
    (dict(name="ProxyAnchorLoss", kwargs={"num_classes": 3}), ["loss.kwargs.num_classes", "loss.num_classes"]),
    (dict(name="ProxyAnchorLoss"), ["loss.num_classes", "ProxyAnchorLoss learns one weight per class"]),
    (dict(name="ProxyAnchorLoss", num_classes=3, train_labels=[0, 1, 2, 3]),
     ["loss.num_classes=3", "the training split has 4 classes"]),
    (dict(name="VICRegLoss"), ["loss.name=VICRegLoss", "not labelled batches"]),
    (dict(name="PNPLoss", miner="BatchHardMiner"), ["loss.miner=BatchHardMiner", "PNPLoss uses no mined pairs"]),
    (dict(kwargs={"distance": "Cosine"}), ["loss.kwargs.distance=Cosine", "did you mean CosineSimilarity?"]),
    (dict(miner="BatchEasyHardMiner", miner_kwargs={"pos_strategy": "hardest"}),  # pml's own check, one line
     ["loss.miner_kwargs: BatchEasyHardMiner(pos_strategy='hardest') failed", "pos_strategy must be one of"]),
    (dict(name="HistogramLoss", kwargs={"n_bins": 3, "delta": 0.5}),
     ["loss.kwargs: HistogramLoss(n_bins=3, delta=0.5) failed", "delta = 2/n_bins"]),
])
def test_bad_names_and_kwargs_give_one_line_naming_the_option(kwargs, words):
    with pytest.raises(DMLRunnerError) as err:
        PMLLoss(**{"embedding_size": DIM, **kwargs})
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_a_label_outside_the_weighted_classes_is_refused_with_the_fix():
    emb, labels = batch(seed=6)
    by_hand = PMLLoss("ProxyAnchorLoss", num_classes=4, embedding_size=DIM)
    with pytest.raises(DMLRunnerError, match="label 4 is not one of the 4 classes.*loss.num_classes=null"):
        by_hand(emb, labels + 1)
    from_data = PMLLoss("ArcFaceLoss", embedding_size=DIM, train_labels=[1, 3, 5, 7])
    with pytest.raises(DMLRunnerError, match="label 2 is not one of the 4 classes ArcFaceLoss"):
        from_data(emb, torch.tensor([1, 3, 5, 2]).repeat_interleave(4))


# ---------------------------------------------------------------------------------------- config and runs


def test_the_config_composes_as_documented(compose_cfg):
    from hydra.utils import instantiate

    cfg = compose_cfg("loss=pml", "loss.name=MultiSimilarityLoss", "+loss.kwargs.alpha=2",
                      "loss.miner=MultiSimilarityMiner", "+loss.miner_kwargs.epsilon=0.1")
    assert cfg.loss.embedding_size == cfg.backbone.embedding_dim
    loss = instantiate(cfg.loss, _convert_="all")
    assert isinstance(loss.loss, pml_losses.MultiSimilarityLoss) and loss.loss.alpha == 2
    assert isinstance(loss.miner, pml_miners.MultiSimilarityMiner) and loss.miner.epsilon == 0.1


SHORT = ("trainer=smoke", "trainer.epochs=2", "eval.kmeans_iters=5", "trainer.eval_before_training=false")
RUNS = {
    "MultiSimilarityLoss+miner": ("loss.name=MultiSimilarityLoss", "+loss.kwargs.alpha=2",
                                  "loss.miner=MultiSimilarityMiner", "+loss.miner_kwargs.epsilon=0.1"),
    "ProxyAnchorLoss": ("loss.name=ProxyAnchorLoss", "trainer.loss_lr_mult=100"),
    "ArcFaceLoss": ("loss.name=ArcFaceLoss", "loss.num_classes=10", "trainer.loss_lr_mult=10"),  # set by hand
    "SupConLoss": ("loss.name=SupConLoss",),
    "CircleLoss": ("loss.name=CircleLoss", "+loss.kwargs.gamma=64"),
}


@pytest.mark.parametrize("run_name", list(RUNS))
def test_pml_losses_train_end_to_end_on_digits(compose_cfg, tmp_path, monkeypatch, run_name):
    """The real run path (dataset, sampler, trainer, evaluation, results.json); the loss's weights are trained."""
    from dml_runner.run import run

    built: list[tuple[PMLLoss, dict[str, torch.Tensor]]] = []
    original_init = PMLLoss.__init__

    def keep(self, *args, **kwargs):  # observes the loss dml-run builds; changes nothing
        original_init(self, *args, **kwargs)
        built.append((self, {n: p.detach().clone() for n, p in self.named_parameters()}))

    monkeypatch.setattr(PMLLoss, "__init__", keep)
    cfg = compose_cfg("loss=pml", *RUNS[run_name], *SHORT)
    results = run(cfg, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == saved["status"] == "completed" and saved["final_epoch"] == 2
    assert saved["config"]["loss"]["name"] == run_name.split("+")[0]
    assert 0.0 <= saved["metrics"]["recall@1"] <= 1.0
    (loss, initial), = built
    if initial:  # proxies / class weights: one row per training class, moved by the optimiser
        assert loss.num_classes == saved["dataset"]["train_classes"]
        for name, param in loss.named_parameters():
            assert not torch.equal(param.detach().cpu(), initial[name]), f"{name} was not trained"
        ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
        assert set(initial) <= set(ckpt["loss"])  # resume restores them
        assert "class_ids" in ckpt["loss"] or cfg.loss.num_classes is not None  # the class -> weight row map
        groups = {g["name"]: g for g in ckpt["method"]["optimizer"]["param_groups"]}
        assert len(groups["loss"]["params"]) == len(initial)  # the optimiser's "loss" group at loss_lr_mult
        assert groups["loss"]["lr"] == pytest.approx(groups["trunk"]["lr"] * cfg.trainer.loss_lr_mult)


@pytest.mark.parametrize("overrides, words", [
    (("loss.name=ProxyAnchor",), ["loss.name=ProxyAnchor: ", "did you mean ProxyAnchorLoss or"]),
    (("loss.miner=MultiSimilarity",), ["loss.miner=MultiSimilarity: ", "did you mean MultiSimilarityMiner"]),
    (("+loss.kwargs.alhpa=2",), ["loss.kwargs.alhpa: not a parameter of MultiSimilarityLoss", "did you mean alpha"]),
    (("loss.miner=TripletMarginMiner", "+loss.miner_kwargs.type_of_triplet=hard"),
     ["loss.miner_kwargs.type_of_triplet: not a parameter of TripletMarginMiner", "did you mean type_of_triplets"]),
])
def test_bad_names_and_kwargs_stop_the_run_before_anything_is_written(compose_cfg, tmp_path, overrides, words):
    from dml_runner.run import run

    with pytest.raises(DMLRunnerError) as err:
        run(compose_cfg("loss=pml", *overrides, *SHORT), tmp_path / "run")
    assert "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value)
    assert not (tmp_path / "run").exists()  # refused by the config check, before data are read


@pytest.mark.slow
def test_dml_run_and_dml_report_name_rows_by_the_pml_loss(tmp_path):
    """Two `dml-run loss=pml loss.name=...` runs; dml-report tells the rows apart by the differing key loss.name."""
    from conftest import run_dml

    from dml_runner.cli.report import main as report_main

    names = ("CircleLoss", "SupConLoss")
    for name in names:
        run_dml(["loss=pml", f"loss.name={name}", *SHORT, f"hydra.run.dir={tmp_path / name}"], cwd=tmp_path)
        saved = json.loads((tmp_path / name / "results.json").read_text())
        assert saved["choices"]["loss"] == "pml" and saved["config"]["loss"]["name"] == name
        assert saved["config"]["loss"]["embedding_size"] == saved["model"]["embedding_dim"]
    assert report_main([*(str(tmp_path / n) for n in names), "--out", str(tmp_path / "tables"), "--no-figures",
                        "--no-html"]) == 0
    report = (tmp_path / "tables" / "report.md").read_text()
    rows = [line.split("|")[1].strip() for line in report.splitlines() if line.startswith("| name=")]
    assert sorted(rows) == [f"name={n}" for n in names], report
    assert "Settings that differ between rows (per-row recipe, `recipe` column of the CSV): loss.name." in report
    runs = pd.read_csv(tmp_path / "tables" / "runs.csv")
    assert sorted(runs["row"]) == sorted(f"loss=pml loss.name={n} {' '.join(SHORT)}" for n in names)


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_a_proxy_loss_with_a_miner(tmp_path):
    """DistributedDataParallel (gloo, 2 processes): the loss and miner see the global batch, the proxies train."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2", "-m", "dml_runner",
           "loss=pml", "loss.name=ProxyAnchorLoss", "loss.miner=MultiSimilarityMiner", "trainer.loss_lr_mult=100",
           "trainer.device=cpu", *SHORT, f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "completed" and res["world_size"] == 2
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["loss"]["loss.proxies"].shape == (res["dataset"]["train_classes"], res["model"]["embedding_dim"])
    assert torch.equal(ckpt["loss"]["class_ids"], torch.arange(res["dataset"]["train_classes"]))
    optimizer = ckpt["method"]["optimizer"]
    (proxies,) = next(g["params"] for g in optimizer["param_groups"] if g["name"] == "loss")
    assert optimizer["state"][proxies]["exp_avg"].abs().sum() > 0  # Adam saw the proxies' gradients
