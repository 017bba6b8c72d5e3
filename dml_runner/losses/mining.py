"""Pair and triplet mining: the one place every loss takes its pairs and triplets from.

Everything is vectorised over (B, B) or (B, B, B) tensors; no Python loop over anchors or pairs. Miners take a
(B, B) distance matrix (see :mod:`dml_runner.losses.distances`) and int64 labels (B,), and return index tensors
``(anchor, positive, negative)`` of equal length. Mining never needs gradients: distances are detached inside.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "label_masks",
    "all_triplets_mask",
    "all_triplets",
    "semihard_triplets",
    "batch_hard_triplets",
    "distance_weighted_triplets",
    "closest_negative_triplets",
    "dc_closest_triplets",
    "first_pair_per_class",
    "mine_triplets",
    "MINERS",
]

Triplets = tuple[Tensor, Tensor, Tensor]


def label_masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Boolean (B, B) masks ``(positive, negative)``: same label excluding i == j, and different label."""
    labels = labels.reshape(-1)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def all_triplets_mask(labels: Tensor) -> Tensor:
    """(B, B, B) boolean mask, True at [a, p, n] when (a, p) is a positive pair and (a, n) a negative one."""
    pos, neg = label_masks(labels)
    return pos[:, :, None] & neg[:, None, :]


def all_triplets(labels: Tensor) -> Triplets:
    """Every valid triplet of the batch as index tensors (O(B^3) memory)."""
    a, p, n = all_triplets_mask(labels).nonzero(as_tuple=True)
    return a, p, n


def semihard_triplets(dist: Tensor, labels: Tensor) -> Triplets:
    """One triplet per positive pair (a, p), FaceNet / TensorFlow ``triplet_semihard_loss`` semantics.

    The negative is the closest one strictly farther than the positive (``d_an > d_ap``); when the anchor has no
    such negative, it is the farthest negative of the anchor (all its negatives are then "hard"). Anchors without
    negatives give no triplet. Vectorised over a (|P|, B) tensor: every positive pair against every sample.
    """
    dist = dist.detach()
    pos, neg = label_masks(labels)
    a, p = (pos & neg.any(dim=1)[:, None]).nonzero(as_tuple=True)
    d_an, is_neg = dist[a], neg[a]
    outside = is_neg & (d_an > dist[a, p][:, None])
    closest_outside = d_an.masked_fill(~outside, math.inf).argmin(dim=1)
    farthest = d_an.masked_fill(~is_neg, -math.inf).argmax(dim=1)
    return a, p, torch.where(outside.any(dim=1), closest_outside, farthest)


def batch_hard_triplets(dist: Tensor, labels: Tensor) -> Triplets:
    """One triplet per anchor: its farthest positive and closest negative (Hermans et al. 2017, batch hard).

    Anchors without a positive or without a negative give no triplet.
    """
    dist = dist.detach()
    pos, neg = label_masks(labels)
    hardest_pos = dist.masked_fill(~pos, -math.inf).argmax(dim=1)
    hardest_neg = dist.masked_fill(~neg, math.inf).argmin(dim=1)
    (a,) = (pos.any(dim=1) & neg.any(dim=1)).nonzero(as_tuple=True)
    return a, hardest_pos[a], hardest_neg[a]


def distance_weighted_triplets(
    dist: Tensor,
    labels: Tensor,
    embedding_dim: int,
    cutoff: float = 0.5,
    nonzero_loss_cutoff: float = 1.4,
    generator: torch.Generator | None = None,
) -> Triplets:
    """Distance-weighted negative sampling (Wu et al., ICCV 2017, Sec. 4), one negative per positive pair.

    For L2-normalised points on the (n-1)-sphere, pairwise distances follow
    ``q(d) ∝ d^(n-2) (1 - d^2/4)^((n-3)/2)``; each negative of anchor a is drawn with weight ``1/q(d_an)``, the
    distance clipped below at ``cutoff`` (0.5), and negatives at ``d_an >= nonzero_loss_cutoff`` (beta + alpha,
    where the margin loss is 0) get weight 0. An anchor whose negatives all have weight 0 samples uniformly among
    its negatives (as the authors' code does). Assumes L2-normalised embeddings (distances in [0, 2]).
    """
    dist = dist.detach()
    pos, neg = label_masks(labels)
    d = dist.clamp_min(cutoff)
    log_w = (2.0 - embedding_dim) * d.log() - 0.5 * (embedding_dim - 3) * (1.0 - 0.25 * d * d).clamp_min(
        1e-8
    ).log()
    eligible = neg & (dist < nonzero_loss_cutoff)
    # anchors whose negatives all have weight 0 fall back to uniform sampling over their negatives
    fallback = ~eligible.any(dim=1, keepdim=True)
    log_w = torch.where(fallback, 0.0, log_w).masked_fill(~torch.where(fallback, neg, eligible), -math.inf)
    a, p = (pos & neg.any(dim=1)[:, None]).nonzero(as_tuple=True)
    # Gumbel-max trick: argmax(log w - log E), E ~ Exp(1), draws index k with probability w_k / sum(w), for all
    # positive pairs at once (torch.multinomial loops over rows)
    exponential = torch.rand(a.shape[0], dist.shape[1], generator=generator, device=dist.device)
    exponential = -exponential.clamp_min(torch.finfo(exponential.dtype).tiny).log()
    n = (log_w[a] - exponential.log()).argmax(dim=1)
    return a, p, n


def closest_negative_triplets(dist: Tensor, labels: Tensor, cutoff: float = 0.5) -> Triplets:
    """Negative selection of the official Divide-and-Conquer code (CompVis, ``lib/loss/sampler.py``) on balanced batches.

    Equal to the official sampler only when every anchor has enough negatives at ``d >= cutoff``; the margin loss's
    ``sampling="closest_exact"`` ports that sampler line by line.

    Every positive pair (a, p) is kept; anchor a takes as many negatives as it has positives, the closest ones
    with ``d_an >= cutoff``; the k-th positive of a (in index order) is paired with its k-th such negative, and
    positives left without a negative are dropped (the official code truncates the same way).
    """
    dist = dist.detach()
    pos, neg = label_masks(labels)
    eligible = neg & (dist >= cutoff)
    _, order = dist.masked_fill(~eligible, math.inf).sort(dim=1)
    rank_of_pos = pos.long().cumsum(dim=1) - 1
    keep = pos & (rank_of_pos < eligible.sum(dim=1, keepdim=True))
    a, p = keep.nonzero(as_tuple=True)
    return a, p, order[a, rank_of_pos[a, p]]


def dc_closest_triplets(dist: Tensor, labels: Tensor, cutoff: float = 0.5) -> Triplets:
    """Triplets of the official Divide-and-Conquer sampler (``lib/loss/sampler.py``, PyTorch 0.4/1.0 semantics).

    m = (number of positive pairs in the batch) // B. Per anchor, the m entries with the smallest
    ``max(D, 0.01) + 1e6 * ([positive] + [D < cutoff])`` are its negatives (the 0.01 floor is the official
    ``pdist`` clamp; when fewer than m negatives lie at D >= cutoff the nearest excluded items fill up, the anchor
    itself first). The anchor keeps min(its positives, m) triplets: its first positives and its first chosen
    negatives, both in index order (the official running truncation). The margin loss sums positive and negative
    terms separately, so only these sets matter, not the pairing.
    """
    d = dist.detach().clamp_min(0.01)
    pos, _ = label_masks(labels)
    m = int(pos.sum()) // len(labels)
    score = d + 1e6 * (pos.to(d.dtype) + (d < cutoff).to(d.dtype))
    chosen = score.topk(max(1, min(m, len(labels))), dim=1, largest=False).indices
    neg = torch.zeros_like(pos).scatter_(1, chosen, True)
    keep = pos.sum(dim=1, keepdim=True).clamp_max(m)
    pos = pos & (pos.long().cumsum(dim=1) <= keep)
    neg = neg & (neg.long().cumsum(dim=1) <= keep)
    a, p = pos.nonzero(as_tuple=True)  # row-major: each anchor contributes keep[a] entries to both
    _, n = neg.nonzero(as_tuple=True)
    return a, p, n


MINERS = ("all", "semihard", "hard", "distance_weighted", "closest", "closest_exact")


def mine_triplets(mining: str, dist: Tensor, labels: Tensor, embedding_dim: int | None = None,
                  cutoff: float = 0.5, nonzero_loss_cutoff: float = 1.4) -> Triplets:
    """The triplets of the miner named ``mining`` (one of :data:`MINERS`): the one dispatch the losses share.

    ``embedding_dim``, ``cutoff`` and ``nonzero_loss_cutoff`` are read by the margin loss's samplers only
    (``distance_weighted``, ``closest``, ``closest_exact``).
    """
    if mining == "all":
        return all_triplets(labels)
    if mining == "semihard":
        return semihard_triplets(dist, labels)
    if mining == "hard":
        return batch_hard_triplets(dist, labels)
    if mining == "distance_weighted":
        if embedding_dim is None:
            raise ValueError("distance_weighted sampling needs the embedding dimension")
        return distance_weighted_triplets(dist, labels, embedding_dim, cutoff, nonzero_loss_cutoff)
    if mining == "closest":
        return closest_negative_triplets(dist, labels, cutoff)
    if mining == "closest_exact":
        return dc_closest_triplets(dist, labels, cutoff)
    raise ValueError(f"unknown mining {mining!r}; expected one of {MINERS}")


def first_pair_per_class(labels: Tensor) -> tuple[Tensor, Tensor]:
    """For every class with at least two samples, the indices of its first two samples (anchor, positive).

    Classes are returned in increasing label order; extra samples of a class are ignored (as in
    pytorch-metric-learning's N-pair loss). This is how N-pair style losses read a batch of N classes x 2.
    """
    labels = labels.reshape(-1)
    n = labels.shape[0]
    # stable sort by label keeps each class's samples in index order
    sorted_labels, order = labels.sort(stable=True)
    is_first = torch.ones(n, dtype=torch.bool, device=labels.device)
    is_first[1:] = sorted_labels[1:] != sorted_labels[:-1]
    has_second = torch.zeros(n, dtype=torch.bool, device=labels.device)
    has_second[:-1] = is_first[:-1] & (sorted_labels[1:] == sorted_labels[:-1])
    (first_pos,) = has_second.nonzero(as_tuple=True)
    return order[first_pos], order[first_pos + 1]
