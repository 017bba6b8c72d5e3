"""Contrastive and triplet losses and the shared miners: brute-force loops and pytorch-metric-learning oracles."""

from __future__ import annotations

import pytest
import torch

from dml_runner.losses import ContrastiveLoss, TripletLoss
from dml_runner.losses import mining
from dml_runner.losses.distances import pairwise_distances, pairwise_squared_distances

try:
    from . import test_losses_reference as ref
except ImportError:  # tests/ is not a package: pytest's rootdir-relative import puts tests/ on sys.path
    import test_losses_reference as ref

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
from pytorch_metric_learning.distances import LpDistance  # noqa: E402
from pytorch_metric_learning.reducers import DoNothingReducer, MeanReducer  # noqa: E402

ATOL = ref.ATOL
batch, assert_matches = ref.batch, ref.assert_matches


def lp():
    return LpDistance(normalize_embeddings=False, p=2, power=1)


# ---------------------------------------------------------------- distances and miners


def test_distances_match_cdist_and_have_finite_grad_at_zero():
    x, _ = batch()
    x = torch.cat([x, x[:2]]).detach().requires_grad_(True)  # duplicated points: D = 0 off the diagonal
    d = pairwise_distances(x)
    torch.testing.assert_close(d.double(), torch.cdist(x, x).detach(), atol=1e-5, rtol=0)
    assert torch.all(d.diagonal() == 0)
    d.sum().backward()
    assert torch.isfinite(x.grad).all()
    sq = pairwise_squared_distances(x)
    torch.testing.assert_close(sq.double(), torch.cdist(x, x).detach() ** 2, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["all", "semihard", "hard"])
@pytest.mark.parametrize("seed", range(4))
def test_miners_match_brute_force(kind, seed):
    x, labels = batch(seed, n=14, classes=3)
    d = pairwise_distances(x)
    if kind == "all":
        got = mining.all_triplets(labels)
    elif kind == "semihard":
        got = mining.semihard_triplets(d, labels)
    else:
        got = mining.batch_hard_triplets(d, labels)
    got = sorted(zip(*(t.tolist() for t in got)))
    assert got == sorted(ref.triplets(x, labels.tolist(), kind))


def test_batch_hard_matches_pml_miner():
    x, labels = batch(3, n=16, classes=4)
    ours = mining.batch_hard_triplets(pairwise_distances(x), labels)
    theirs = pml_miners.BatchHardMiner(distance=lp())(x.float(), labels)
    assert sorted(zip(*(t.tolist() for t in ours))) == sorted(zip(*(t.tolist() for t in theirs)))


def test_semihard_differs_from_pml_semihard_miner_as_documented():
    """pml's "semihard" miner returns EVERY triplet with d_ap < d_an <= d_ap + margin; ours keeps one per
    positive pair (the closest negative beyond d_ap) and falls back to the farthest negative (TF semantics)."""
    x, labels = batch(5, n=20, classes=4)
    margin = 0.3
    d = pairwise_distances(x).detach().double()
    a, p, n = mining.semihard_triplets(d, labels)
    ours = {(i, j): k for i, j, k in zip(a.tolist(), p.tolist(), n.tolist())}
    theirs = pml_miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard", distance=lp())(
        x.float(), labels
    )
    by_pair: dict = {}
    for i, j, k in zip(*(t.tolist() for t in theirs)):
        by_pair.setdefault((i, j), []).append(k)
    assert by_pair, "test batch should contain semi-hard triplets"
    for (i, j), negs in by_pair.items():
        assert ours[(i, j)] == min(negs, key=lambda k: float(d[i, k]))
    assert len(ours) > len(by_pair)  # pairs without a semi-hard negative still get a (hard) triplet


def test_first_pair_per_class():
    labels = torch.tensor([3, 1, 3, 2, 1, 3, 7])
    a, p = mining.first_pair_per_class(labels)
    assert a.tolist() == [1, 0] and p.tolist() == [4, 2]


# ---------------------------------------------------------------- contrastive


@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "nonzero_mean"])
@pytest.mark.parametrize("seed", range(3))
def test_contrastive_matches_brute_force(squared, reduction, seed):
    x, labels = batch(seed)
    loss = ContrastiveLoss(margin=0.9, squared=squared, reduction=reduction)
    assert_matches(
        lambda e: loss(e, labels), lambda e: ref.contrastive(e, labels.tolist(), 0.9, squared, reduction), x
    )


def test_contrastive_plain_hinge_matches_pml():
    x, labels = batch(1, n=16)
    ours = ContrastiveLoss(margin=0.9, squared=False, reduction="nonzero_mean")
    theirs = pml_losses.ContrastiveLoss(pos_margin=0, neg_margin=0.9, distance=lp())
    assert_matches(lambda e: ours(e, labels), lambda e: theirs(e, labels), x)


def test_contrastive_squared_is_pml_per_pair_terms_squared():
    """Documented difference: the paper squares both hinges; pml does not."""
    x, labels = batch(2, n=16)
    per_pair = pml_losses.ContrastiveLoss(
        pos_margin=0, neg_margin=0.9, distance=lp(), reducer=DoNothingReducer()
    )(x, labels)
    pos, neg = per_pair["pos_loss"]["losses"] ** 2, per_pair["neg_loss"]["losses"] ** 2
    expected = pos.sum() / (pos > 0).sum() + neg.sum() / (neg > 0).sum()
    got = ContrastiveLoss(margin=0.9, squared=True, reduction="nonzero_mean")(x, labels)
    torch.testing.assert_close(got.double(), expected.double(), atol=ATOL, rtol=1e-4)


# ---------------------------------------------------------------- triplet


@pytest.mark.parametrize("mining_kind", ["all", "semihard", "hard"])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "nonzero_mean"])
@pytest.mark.parametrize("seed", range(2))
def test_triplet_matches_brute_force(mining_kind, squared, reduction, seed):
    x, labels = batch(seed, n=14, classes=4)
    loss = TripletLoss(margin=0.3, mining=mining_kind, squared=squared, reduction=reduction)
    assert_matches(
        lambda e: loss(e, labels),
        lambda e: ref.triplet(e, labels.tolist(), 0.3, mining_kind, squared, reduction),
        x,
    )


@pytest.mark.parametrize("reduction", ["mean", "nonzero_mean"])
def test_triplet_all_matches_pml(reduction):
    x, labels = batch(4, n=16)
    ours = TripletLoss(margin=0.3, mining="all", reduction=reduction)
    reducer = {"reducer": MeanReducer()} if reduction == "mean" else {}
    theirs = pml_losses.TripletMarginLoss(margin=0.3, distance=lp(), **reducer)
    assert_matches(lambda e: ours(e, labels), lambda e: theirs(e, labels), x)


def test_triplet_hard_matches_pml_with_batch_hard_miner():
    x, labels = batch(6, n=16)
    ours = TripletLoss(margin=0.3, mining="hard")
    miner = pml_miners.BatchHardMiner(distance=lp())
    theirs = pml_losses.TripletMarginLoss(margin=0.3, distance=lp(), reducer=MeanReducer())
    assert_matches(lambda e: ours(e, labels), lambda e: theirs(e, labels, miner(e, labels)), x)


def test_triplet_semihard_matches_pml_on_our_triplets():
    x, labels = batch(7, n=16)
    ours = TripletLoss(margin=0.3, mining="semihard")
    triplets = mining.semihard_triplets(pairwise_distances(x), labels)
    theirs = pml_losses.TripletMarginLoss(margin=0.3, distance=lp(), reducer=MeanReducer())
    assert_matches(lambda e: ours(e, labels), lambda e: theirs(e, labels, triplets), x)


# ---------------------------------------------------------------- edge cases (parametrised over every loss)

# The edge cases (no positive pair, a single class, duplicate points, bf16 autocast) of these losses and the rest
# of the zoo, mining variants included, are tested once for all in tests/test_losses_zoo.py (ALL_LOSSES).


# ---------------------------------------------------------------- configs


CONF_LOSS = __import__("pathlib").Path(__file__).resolve().parents[1] / "conf" / "loss"


@pytest.mark.parametrize("path", sorted(CONF_LOSS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_loss_config_instantiates_and_runs(path, compose_cfg):
    hydra_utils = pytest.importorskip("hydra.utils")
    from omegaconf import OmegaConf

    if "defaults" in OmegaConf.load(path):
        pytest.skip("composes other groups (a method's loss): built and tested with its method")
    assert path.read_text().lstrip().startswith("#"), "each loss config starts with a comment naming its paper"
    loss = hydra_utils.instantiate(compose_cfg(f"loss={path.stem}").loss)  # composed: pml reads backbone.*
    assert isinstance(loss, torch.nn.Module)
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=1).requires_grad_(True)
    labels = torch.arange(8).repeat_interleave(2)
    value = loss(x, labels)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(x.grad).all()


def test_margin_per_class_beta_refuses_a_label_out_of_range_in_one_line():
    """Per-class betas index by label: a label >= num_classes is a one-line error naming the option (on CUDA the
    index would be a device-side assert); labels inside the range train as before."""
    from dml_runner import DMLRunnerError
    from dml_runner.losses.margin import MarginLoss

    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(8, 4, generator=gen), dim=1)
    loss = MarginLoss(num_classes=3, sampling="closest")
    assert torch.isfinite(loss(x, torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])))
    with pytest.raises(DMLRunnerError, match=r"loss.num_classes=3 .* label 3") as err:
        loss(x, torch.tensor([0, 0, 1, 1, 3, 3, 0, 1]))
    assert "\n" not in str(err.value)
    with pytest.raises(DMLRunnerError, match="label -1"):
        loss(x, torch.tensor([0, 0, 1, 1, -1, -1, 0, 1]))
    MarginLoss(sampling="closest")(x, torch.tensor([0, 0, 1, 1, 7, 7, 9, 9]))  # one shared beta: any labels
