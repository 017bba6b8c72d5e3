"""Margin loss (Wu, Manmatha, Smola, Kraehenbuehl, "Sampling Matters in Deep Embedding Learning", ICCV 2017)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dml_runner.losses.distances import pairwise_distances
from dml_runner.losses.mining import closest_negative_triplets, distance_weighted_triplets

SAMPLING = ("distance_weighted", "closest", "closest_exact")


def dc_closest_triplets(dist: Tensor, labels: Tensor, cutoff: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """Triplets of the official Divide-and-Conquer sampler (``lib/loss/sampler.py``, PyTorch 0.4/1.0 semantics).

    m = (number of positive pairs in the batch) // B. Per anchor, the m entries with the smallest
    ``max(D, 0.01) + 1e6 * ([positive] + [D < cutoff])`` are its negatives (the 0.01 floor is the official
    ``pdist`` clamp; when fewer than m negatives lie at D >= cutoff the nearest excluded items fill up, the anchor
    itself first). The anchor keeps min(its positives, m) triplets: its first positives and its first chosen
    negatives, both in index order (the official running truncation). The margin loss sums positive and negative
    terms separately, so only these sets matter, not the pairing.
    """
    d = dist.detach().clamp_min(0.01)
    same = labels.reshape(-1, 1) == labels.reshape(1, -1)
    pos = same & ~torch.eye(len(labels), dtype=torch.bool, device=dist.device)
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


class MarginLoss(nn.Module):
    """Wu et al. 2017, Eq. 3-4, over sampled triplets (a, p, n)::

        L = ( sum [D_ap - beta(a) + alpha]_+ + sum [beta(a) - D_an + alpha]_+ + nu * sum beta(a) ) / #nonzero terms

    D is Euclidean; ``#nonzero`` counts the positive and negative hinge terms that are > 0 (as the authors' and the
    Divide-and-Conquer code); a batch with none gives 0. ``beta(a)`` is one boundary (``num_classes=None``) or a
    per-class boundary indexed by the anchor's label (labels must then be in ``[0, num_classes)``); it is an
    ``nn.Parameter`` trained with the model when ``learn_beta``, else a fixed buffer. ``nu`` weights its L1
    penalty, summed over the triplets as the D&C code does.

    ``sampling``:

    - ``"distance_weighted"`` (paper): one negative per positive pair drawn with weight 1/q(D_an), distances clipped
      at ``cutoff`` = 0.5 and negatives at ``D >= nonzero_loss_cutoff`` (beta + alpha) dropped; assumes
      L2-normalised embeddings. Uses the global torch RNG.
    - ``"closest"``: all positives, each anchor paired with as many of its closest negatives with D >= cutoff (the
      official D&C rule on class-balanced batches); an anchor short of such negatives drops its surplus positives.
    - ``"closest_exact"``: the official D&C sampler (``lib/loss/sampler.py``) line by line, see
      :func:`dc_closest_triplets`; differs from ``closest`` when classes in a batch have different sizes or an
      anchor has fewer negatives at D >= cutoff than the batch's mean number of positives.
    """

    def __init__(
        self,
        alpha: float = 0.2,
        beta: float = 1.2,
        learn_beta: bool = True,
        num_classes: int | None = None,
        nu: float = 0.0,
        sampling: str = "distance_weighted",
        cutoff: float = 0.5,
        nonzero_loss_cutoff: float = 1.4,
    ) -> None:
        super().__init__()
        if sampling not in SAMPLING:
            raise ValueError(f"unknown sampling {sampling!r}; expected one of {SAMPLING}")
        init = torch.full((num_classes or 1,), float(beta))
        if learn_beta:
            self.beta = nn.Parameter(init)
        else:
            self.register_buffer("beta", init)
        self.alpha = alpha
        self.nu = nu
        self.per_class_beta = num_classes is not None
        self.sampling = sampling
        self.cutoff = cutoff
        self.nonzero_loss_cutoff = nonzero_loss_cutoff

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        dist = pairwise_distances(embeddings)
        if self.sampling == "distance_weighted":
            a, p, n = distance_weighted_triplets(
                dist, labels, embeddings.shape[1], self.cutoff, self.nonzero_loss_cutoff
            )
        elif self.sampling == "closest":
            a, p, n = closest_negative_triplets(dist, labels, self.cutoff)
        else:
            a, p, n = dc_closest_triplets(dist, labels, self.cutoff)
        beta = self.beta.float()
        beta = beta[labels[a]] if self.per_class_beta else beta.expand(a.shape[0])
        pos_loss = torch.relu(dist[a, p] - beta + self.alpha)
        neg_loss = torch.relu(beta - dist[a, n] + self.alpha)
        num_nonzero = (pos_loss > 0).sum() + (neg_loss > 0).sum()
        total = pos_loss.sum() + neg_loss.sum() + self.nu * beta.sum()
        return total / num_nonzero.clamp_min(1)

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta_shape={tuple(self.beta.shape)}, nu={self.nu}, sampling={self.sampling!r}, "
            f"cutoff={self.cutoff}, nonzero_loss_cutoff={self.nonzero_loss_cutoff}"
        )
