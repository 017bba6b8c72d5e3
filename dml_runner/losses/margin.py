"""Margin loss (Wu, Manmatha, Smola, Kraehenbuehl, "Sampling Matters in Deep Embedding Learning", ICCV 2017)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dml_runner import DMLRunnerError
from dml_runner.losses.distances import pairwise_distances
from dml_runner.losses.mining import mine_triplets

SAMPLING = ("distance_weighted", "closest", "closest_exact")  # mining.mine_triplets's samplers of the margin loss


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
      :func:`~dml_runner.losses.mining.dc_closest_triplets`; differs from ``closest`` when classes in a batch have different sizes or an
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
        if self.per_class_beta and labels.numel():
            # checked on the host (one small copy per step, per-class betas only): an index past the end is a
            # device-side assert on CUDA that names nothing
            lo, hi = (int(v) for v in torch.stack(labels.aminmax()).tolist())
            if lo < 0 or hi >= self.beta.numel():
                raise DMLRunnerError(f"loss.num_classes={self.beta.numel()} (per-class margin betas) but the batch has "
                                     f"label {hi if hi >= self.beta.numel() else lo}: set loss.num_classes to the "
                                     "number of training classes (labels 0..n-1), or null for one beta")
        dist = pairwise_distances(embeddings)
        a, p, n = mine_triplets(self.sampling, dist, labels, embeddings.shape[1], self.cutoff,
                                self.nonzero_loss_cutoff)
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
