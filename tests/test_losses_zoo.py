"""DDML, lifted, N-pair, angular, margin and MDL: brute-force loops (values and gradients) and pml oracles."""

from __future__ import annotations

import pytest
import torch

from dml_runner.losses import (
    AngularLoss,
    AngularNPairLoss,
    ContrastiveLoss,
    DDMLLoss,
    LiftedStructureLoss,
    MarginDiscriminateLoss,
    MarginLoss,
    NPairLoss,
    TripletLoss,
)
from dml_runner.losses import mining
from dml_runner.losses.distances import pairwise_distances

try:
    from . import test_losses_reference as ref
except ImportError:  # tests/ is not a package: pytest's rootdir-relative import puts tests/ on sys.path
    import test_losses_reference as ref

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
from pytorch_metric_learning.distances import DotProductSimilarity, LpDistance  # noqa: E402
from pytorch_metric_learning.regularizers import LpRegularizer  # noqa: E402

batch, npair_batch, assert_matches, ATOL = ref.batch, ref.npair_batch, ref.assert_matches, ref.ATOL


def lp():
    return LpDistance(normalize_embeddings=False, p=2, power=1)


# ---------------------------------------------------------------- DDML


@pytest.mark.parametrize("seed", range(3))
def test_ddml_matches_brute_force(seed):
    x, labels = batch(seed)
    loss = DDMLLoss(tau=2.0, beta=5.0)
    assert_matches(lambda e: loss(e, labels), lambda e: ref.ddml(e, labels.tolist(), 2.0, 5.0), x)


# ---------------------------------------------------------------- lifted


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("normalize", [False, True])
def test_lifted_matches_brute_force(seed, normalize):
    x, labels = batch(seed, n=14, classes=4, normalize=normalize)
    loss = LiftedStructureLoss(margin=1.0)
    assert_matches(lambda e: loss(e, labels), lambda e: ref.lifted(e, labels.tolist(), 1.0), x)


@pytest.mark.parametrize("seed", range(2))
def test_lifted_matches_pml_lifted_structure_loss(seed):
    """pml's LiftedStructureLoss averages relu(J_ij)^2 / 2 over ORDERED positive pairs: the same 1/(2|P|) sum."""
    x, labels = batch(seed, n=16, classes=4, normalize=False)
    ours = LiftedStructureLoss(margin=1.0)
    theirs = pml_losses.LiftedStructureLoss(neg_margin=1.0, pos_margin=0.0, distance=lp())
    assert_matches(lambda e: ours(e, labels), lambda e: theirs(e, labels), x)


def test_lifted_differs_from_pml_generalized_lifted_as_documented():
    """GeneralizedLiftedStructureLoss (Hermans et al. 2017) is per anchor, LSE over positives, no square."""
    x, labels = batch(1, n=16, classes=4, normalize=False)
    theirs = pml_losses.GeneralizedLiftedStructureLoss(neg_margin=1.0, pos_margin=0.0, distance=lp())
    v_theirs = theirs(x, labels).double()
    torch.testing.assert_close(v_theirs, ref.generalized_lifted(x, labels.tolist(), 1.0).detach(), atol=ATOL, rtol=1e-4)
    assert not torch.isclose(LiftedStructureLoss()(x, labels).double(), v_theirs, rtol=1e-2)


def test_lifted_no_negative_gives_zero():
    x = torch.randn(6, 4, requires_grad=True)
    value = LiftedStructureLoss()(x, torch.zeros(6, dtype=torch.long))
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------- N-pair and angular


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("l2_reg", [0.0, 0.02])
def test_npair_matches_brute_force(seed, l2_reg):
    x, labels = npair_batch(seed, normalize=False)
    loss = NPairLoss(l2_reg=l2_reg)
    assert_matches(lambda e: loss(e, labels), lambda e: ref.npair(e, labels.tolist(), l2_reg), x)


def test_npair_reads_first_two_samples_of_each_class_from_any_batch():
    x, labels = batch(4, n=15, classes=5, normalize=False)
    loss = NPairLoss(l2_reg=0.01)
    assert_matches(lambda e: loss(e, labels), lambda e: ref.npair(e, labels.tolist(), 0.01), x)


@pytest.mark.parametrize("l2_reg", [0.0, 0.02])
def test_npair_matches_pml(l2_reg):
    """On N x 2 batches every embedding is an anchor or a positive, so 0.25 l2 (mean|a|^2 + mean|p|^2) equals
    pml's LpRegularizer(power=2) (mean |x|^2 over the batch) weighted by l2 / 2."""
    x, labels = npair_batch(1, classes=8, normalize=False)
    ours = NPairLoss(l2_reg=l2_reg)
    theirs = pml_losses.NPairsLoss(
        distance=DotProductSimilarity(normalize_embeddings=False),
        embedding_regularizer=LpRegularizer(p=2, power=2) if l2_reg else None,
        embedding_reg_weight=l2_reg / 2,
    )
    assert_matches(lambda e: ours(e, labels), lambda e: theirs(e, labels), x)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("alpha", [36.0, 45.0])
def test_angular_matches_brute_force(seed, alpha):
    x, labels = batch(seed, n=12, classes=4, normalize=False)
    loss = AngularLoss(alpha=alpha)
    assert_matches(lambda e: loss(e, labels), lambda e: ref.angular(e, labels.tolist(), alpha), x)


@pytest.mark.parametrize("make_batch", [npair_batch, lambda s, **kw: batch(s, n=16, classes=4, **kw)])
def test_angular_matches_pml(make_batch):
    """Equal on unit-norm embeddings. Documented difference: pml normalises anchors and positives but uses the
    raw negatives x_n in (x_a + x_p)^T x_n; ours normalises all of them (the paper assumes unit features)."""
    x, labels = make_batch(2, normalize=True)
    ours = AngularLoss(alpha=40.0)
    theirs = pml_losses.AngularLoss(alpha=40)
    v_ours, g_ours = ref.value_and_grad(lambda e: ours(e, labels), x)
    v_theirs, g_theirs = ref.value_and_grad(lambda e: theirs(e, labels), x)
    torch.testing.assert_close(v_ours, v_theirs, atol=ATOL, rtol=1e-4)
    # gradients agree in the tangent space of the sphere (pml's raw-x_n term has a radial component)
    x0 = x.detach()

    def tangent(g):
        return g - (g * x0).sum(1, keepdim=True) * x0

    torch.testing.assert_close(tangent(g_ours), tangent(g_theirs), atol=ATOL, rtol=1e-4)
    raw = 3.0 * x.detach()
    assert not torch.isclose(ours(raw, labels).double(), theirs(raw, labels).double(), rtol=1e-3)
    torch.testing.assert_close(ours(raw, labels), ours(x, labels), atol=1e-5, rtol=1e-5)


def test_angular_npair_is_npair_plus_lambda_angular():
    x, labels = npair_batch(3, normalize=False)
    loss = AngularNPairLoss(alpha=45.0, lambda_ang=2.0, l2_reg=0.01)
    assert_matches(
        lambda e: loss(e, labels),
        lambda e: ref.npair(e, labels.tolist(), 0.01) + 2.0 * ref.angular(e, labels.tolist(), 45.0),
        x,
    )


# ---------------------------------------------------------------- margin loss and its samplers


def test_distance_weighted_probabilities_match_formula_by_sampling():
    """Sample many times; empirical negative frequencies per anchor follow 1/q(d) (clipped, cut at 1.4)."""
    x, labels = batch(0, n=10, dim=8, classes=3)
    expected = ref.distance_weighted_probabilities(x, labels.tolist(), 0.5, 1.4)
    d = pairwise_distances(x)
    counts = torch.zeros(10, 10, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        a, p, n = mining.distance_weighted_triplets(d, labels, 8, 0.5, 1.4, generator=g)
        counts.index_put_((a, n), torch.ones_like(a, dtype=torch.float64), accumulate=True)
    freq = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    rows = counts.sum(dim=1) > 0
    torch.testing.assert_close(freq[rows], expected[rows], atol=0.05, rtol=0)
    pos, _ = mining.label_masks(labels)
    assert torch.equal(counts.sum(dim=1), 400 * pos.sum(dim=1).double())  # one negative per positive pair


def test_closest_negative_triplets_follow_official_dc_rule():
    x, labels = batch(1, n=16, dim=8, classes=3)
    d = pairwise_distances(x).detach()
    a, p, n = mining.closest_negative_triplets(d, labels, cutoff=0.5)
    for anchor in range(16):
        ps = [j for j in range(16) if j != anchor and labels[j] == labels[anchor]]
        negs = sorted(
            (k for k in range(16) if labels[k] != labels[anchor] and d[anchor, k] >= 0.5), key=lambda k: float(d[anchor, k])
        )
        expected = list(zip(ps, negs))  # k-th positive with k-th closest eligible negative, truncated
        got = [(int(j), int(k)) for i, j, k in zip(a, p, n) if int(i) == anchor]
        assert got == expected


@pytest.mark.parametrize("sampling", ["distance_weighted", "closest"])
@pytest.mark.parametrize("per_class", [False, True])
@pytest.mark.parametrize("nu", [0.0, 0.1])
def test_margin_matches_brute_force(sampling, per_class, nu):
    x, labels = batch(2, n=16, dim=8, classes=4)
    loss = MarginLoss(alpha=0.2, beta=1.0, num_classes=4 if per_class else None, nu=nu, sampling=sampling)
    with torch.no_grad():
        loss.beta.copy_(torch.linspace(0.9, 1.2, loss.beta.numel()))
    beta = (lambda a: loss.beta[labels[a]]) if per_class else (lambda a: loss.beta[0])

    def triplets_of(e):
        d = pairwise_distances(e)
        if sampling == "closest":
            return mining.closest_negative_triplets(d, labels, 0.5)
        return mining.distance_weighted_triplets(d, labels, e.shape[1], 0.5, 1.4)

    torch.manual_seed(0)
    triplets = list(zip(*(t.tolist() for t in triplets_of(x))))
    torch.manual_seed(0)
    assert_matches(
        lambda e: loss(e, labels), lambda e: ref.margin(e, labels.tolist(), triplets, 0.2, beta, nu), x
    )


@pytest.mark.parametrize("per_class", [False, True])
def test_margin_matches_pml_on_same_triplets(per_class):
    """Same triplets -> same loss and gradient, beta learnable. pml adds nu * beta un-normalised for a single
    beta; ours (as the D&C code) adds nu * sum over triplets / #nonzero: compared with nu = 0 there."""
    x, labels = batch(3, n=16, dim=8, classes=4)
    nu = 0.05 if per_class else 0.0
    kw = dict(num_classes=4) if per_class else {}
    ours = MarginLoss(alpha=0.2, beta=1.1, nu=nu, sampling="closest", **kw)
    theirs = pml_losses.MarginLoss(margin=0.2, beta=1.1, nu=nu, learn_beta=True, distance=lp(), **kw)
    triplets = mining.closest_negative_triplets(pairwise_distances(x), labels, 0.5)
    assert_matches(lambda e: ours(e, labels), lambda e: theirs(e, labels, triplets), x)
    ours(x, labels).backward()
    theirs(x, labels, triplets).backward()
    torch.testing.assert_close(ours.beta.grad.double(), theirs.beta.grad.double(), atol=ATOL, rtol=1e-4)


def test_margin_fixed_beta_is_a_buffer():
    loss = MarginLoss(learn_beta=False)
    assert not list(loss.parameters()) and "beta" in dict(loss.named_buffers())
    assert len(list(MarginLoss(learn_beta=True, num_classes=5).parameters())) == 1


# ---------------------------------------------------------------- MDL (reconstructed from the abstract)


@pytest.mark.parametrize("seed", range(3))
def test_mdl_matches_brute_force(seed):
    x, labels = batch(seed, n=14, classes=4)
    loss = MarginDiscriminateLoss(margin=0.2, gamma=8.0)
    assert_matches(lambda e: loss(e, labels), lambda e: ref.mdl(e, labels.tolist(), 0.2, 8.0), x)


def test_mdl_tends_to_hard_max_min_and_is_zero_when_strictly_separated():
    x, labels = batch(5, n=14, classes=4)
    d = pairwise_distances(x).detach()
    pos, neg = mining.label_masks(labels)
    valid = pos.any(1) & neg.any(1)
    hard = torch.relu(
        d.masked_fill(~pos, -1).max(1).values - d.masked_fill(~neg, 9).min(1).values + 0.2
    )[valid].mean()
    torch.testing.assert_close(MarginDiscriminateLoss(0.2, gamma=1e4)(x, labels).detach(), hard, atol=1e-3, rtol=0)
    separated = torch.tensor([[0.0, 0.0], [0.0, 0.01], [5.0, 0.0], [5.0, 0.01]])
    assert MarginDiscriminateLoss(0.2, 10.0)(separated, torch.tensor([0, 0, 1, 1])).item() == 0.0


# ---------------------------------------------------------------- every loss: edge cases and bf16

ALL_LOSSES = {
    "contrastive": ContrastiveLoss,
    "contrastive_plain": lambda: ContrastiveLoss(squared=False, reduction="nonzero_mean"),
    "triplet": TripletLoss,
    "triplet_all": lambda: TripletLoss(mining="all"),
    "triplet_semihard": lambda: TripletLoss(mining="semihard"),
    "triplet_hard": lambda: TripletLoss(mining="hard"),
    "ddml": DDMLLoss,
    "lifted": LiftedStructureLoss,
    "npair": NPairLoss,
    "angular": AngularLoss,
    "angular_npair": AngularNPairLoss,
    "margin": MarginLoss,
    "margin_closest": lambda: MarginLoss(sampling="closest"),
    "mdl": MarginDiscriminateLoss,
}


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_no_positive_pair_gives_finite_loss_and_grad(name):
    x = torch.nn.functional.normalize(torch.randn(6, 5), dim=1).requires_grad_(True)
    value = ALL_LOSSES[name]()(x, torch.arange(6))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()
    if not name.startswith(("contrastive", "ddml", "npair", "angular_npair")):  # pair losses keep negative terms
        assert value.item() == 0.0


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_single_class_and_duplicates_are_finite(name):
    x = torch.nn.functional.normalize(torch.randn(4, 5), dim=1)
    x = torch.cat([x, x]).requires_grad_(True)
    for labels in (torch.zeros(8, dtype=torch.long), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])):
        value = ALL_LOSSES[name]()(x, labels)
        (grad,) = torch.autograd.grad(value, x)
        assert torch.isfinite(value) and torch.isfinite(grad).all()


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_bf16_autocast_on_cpu(name):
    x, labels = npair_batch(0, classes=8)
    x = x.detach().float().requires_grad_(True)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = torch.nn.functional.linear(x, torch.eye(x.shape[1]))
        assert emb.dtype == torch.bfloat16
        value = ALL_LOSSES[name]()(emb, labels)
    assert value.dtype == torch.float32
    value.backward()
    assert torch.isfinite(x.grad).all()
    torch.manual_seed(0)
    torch.testing.assert_close(value, ALL_LOSSES[name]()(x, labels), atol=0.05, rtol=0.05)
