"""Hardness-Aware Deep Metric Learning (Zheng, Chen, Lu, Zhou, CVPR 2019) over the N-pair and triplet losses.

Pieces (docs/PAPERS.md §4; names as in the paper):

- :func:`hardness_aware_negatives`, the augmentor: a negative ``z-`` of anchor ``z`` (positive ``z+``) is pulled
  toward the anchor, ``z^- = z + [d+ + (d- - d+) exp(-alpha / J_avg)] / d- * (z- - z)`` when ``d+ < d-``, unchanged
  otherwise. ``J_avg`` is the average metric loss of the recent past, so early (large-loss) synthetics stay easy.
- the generator ``z -> FC 512 + ReLU + BN -> FC feature_dim``: maps the real tuple back to the feature space (the
  reconstruction ``y'``) and the augmented tuple to synthetic features ``y~``;
- the model's own embedding head, shared, embeds ``y~`` into synthetic embeddings ``z~``;
- a softmax classifier on features, trained with cross-entropy on real ``y``, and judging ``y~`` (``J_soft``).

Objectives (the official code's, ``wzzheng/HDML`` ``main_npair.py`` / ``main_triplet.py``): ``J_m`` the metric loss
on real embeddings plus the weight-decay term ``regular_factor * sum_v |v|^2 / 2`` over the metric layers' non-BN
weights, ``J_syn`` the metric loss on synthetic embeddings, ``J_metric = w J_m + (1 - w) J_syn`` with ``w =
exp(-beta / J_gen_avg)``; ``J_recon = (1 - lambda) sum |y' - y|^2``; ``J_soft = softmax_factor * lambda * CE(W y~ +
b, label)`` (N-pair: mean CE over the anchors plus mean CE over the N x N synthetic negatives; triplet: one mean CE over
all 3m synthetic rows); ``J_gen = J_recon + J_soft``; ``J_cls = CE(W y + b, label)``. Each is minimised over its own
parameters only (:class:`~dml_runner.methods.hdml.HDMLMethod` owns the three optimisers). ``J_avg`` and
``J_gen_avg`` are running means of the recorded ``w J_m`` (the weighted value, weight decay included, as the
official code records it) and ``J_gen`` (start value ``javg_init``), constants inside a step.

Triplet (``metric="triplet"``, ``mining="fixed"``, the official form): the batch is ``[anchors; positives;
negatives]`` in thirds (:class:`~dml_runner.samplers.hdml_triplets.HDMLTripletBatchSampler`), and ``J_m = sum_i
max(0, |a_i - p_i|^2 - |a_i - n_i|^2 + margin)`` (``squared=True``, ``reduction="sum"``, margin 1).

``pulling_factor=0`` switches hardness-aware synthesis off: ``J_metric = J_m``, i.e. plain N-pair / triplet
training of the metric layers (the generator and classifier still train, without touching them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from dml_runner import DMLRunnerError
from dml_runner.losses._reduction import reduce
from dml_runner.losses.distances import pairwise_distances
from dml_runner.losses.mining import first_pair_per_class, mine_triplets
from dml_runner.losses.npair import npair_loss
from dml_runner.losses.triplet import TripletLoss

METRICS = ("npair", "triplet")
TRIPLET_MINING = ("fixed", "all", "semihard", "hard")
TRIPLET_REDUCTIONS = ("sum", "mean", "nonzero_mean")
# tf.layers.batch_normalization defaults (official BN1 and generator BN): TF momentum 0.99 = PyTorch momentum 0.01
TF_BN = {"momentum": 0.01, "eps": 1e-3}
LAYOUT_CHECKS = 8  # batches whose [anchors; positives; negatives] layout is read on the host off the CPU
_TINY = 1e-12  # floor of J_avg / J_gen_avg and of squared distances: keeps every ratio and gradient finite


def _row_distances(x: Tensor, y: Tensor, squared: bool = False) -> Tensor:
    sq = (x - y).square().sum(dim=-1)
    return sq if squared else sq.clamp_min(_TINY).sqrt()


def hardness_aware_negatives(anchor: Tensor, positive: Tensor, negative: Tensor, pulling_factor: float,
                             j_avg: Tensor | float) -> Tensor:
    """The augmentor (HDML Eq. 4-5), row-wise over (M, D) anchors, positives and negatives::

        z^- = z + [d+ + (d- - d+) * exp(-alpha / J_avg)] / d- * (z- - z)   if d+ < d-,   else z-

    with Euclidean ``d+ = |z - z+|``, ``d- = |z - z-|``. NaN-free for any ``J_avg >= 0`` (floored at 1e-12) and
    for coincident points (``d-`` is only a denominator where ``d- > d+ >= 0``).

    >>> z = torch.tensor([[0.0, 0.0]]); zp = torch.tensor([[1.0, 0.0]]); zn = torch.tensor([[0.0, 4.0]])
    >>> hardness_aware_negatives(z, zp, zn, pulling_factor=1.0, j_avg=1e-12)  # exp(-1/J) -> 0: d^- = d+
    tensor([[0., 1.]])
    """
    d_pos, d_neg = _row_distances(anchor, positive), _row_distances(anchor, negative)
    j_avg = torch.as_tensor(j_avg, dtype=anchor.dtype, device=anchor.device)
    if pulling_factor == 0:
        keep = torch.ones((), dtype=anchor.dtype, device=anchor.device)
    else:
        keep = torch.exp(-pulling_factor / j_avg.clamp_min(_TINY))
    ratio = (d_pos + (d_neg - d_pos) * keep) / d_neg.clamp_min(math.sqrt(_TINY))
    pulled = anchor + ratio[:, None] * (negative - anchor)
    return torch.where((d_pos < d_neg)[:, None], pulled, negative)


class RunningLossMean(nn.Module):
    """Mean of the last ``window`` finite recorded values; ``init`` until ``window`` values have been recorded.

    ``update="block"`` refreshes the mean once every ``window`` records (the official code's ``data_collector``);
    ``"sliding"`` after every record. Values are buffers, so checkpoints keep them.
    """

    def __init__(self, window: int = 64, init: float = 1e6, update: str = "block") -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"javg_window must be >= 1, got {window}")
        if update not in ("block", "sliding"):
            raise ValueError(f"javg_update must be 'block' or 'sliding', got {update!r}")
        self.update_mode = update
        self.register_buffer("values", torch.zeros(window))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("mean", torch.tensor(float(init)))

    @torch.no_grad()
    def record(self, value: Tensor) -> None:
        # on the device throughout (no host sync per step); a NaN step is not recorded (as the official code)
        value = value.detach().float().reshape(()).to(self.values.device)
        ok = torch.isfinite(value)
        window = self.values.numel()
        slot = (self.count % window).reshape(1)
        self.values.index_copy_(0, slot, torch.where(ok, value, self.values.index_select(0, slot)[0]).reshape(1))
        self.count += ok.long()
        due = self.count >= window
        if self.update_mode == "block":
            due &= self.count % window == 0
        self.mean.copy_(torch.where(ok & due, self.values.mean(), self.mean))


class HDMLGenerator(nn.Sequential):
    """Embedding -> FC ``hidden`` + ReLU + BN -> FC ``feature_dim`` (the official code's generator)."""

    def __init__(self, embedding_dim: int, feature_dim: int, hidden: int = 512) -> None:
        super().__init__(nn.Linear(embedding_dim, hidden), nn.ReLU(), nn.BatchNorm1d(hidden, **TF_BN),
                         nn.Linear(hidden, feature_dim))
        for layer in (self[0], self[3]):
            nn.init.xavier_uniform_(layer.weight)  # TF glorot_uniform, as the official fc_block
            nn.init.zeros_(layer.bias)


class HDMLLoss(nn.Module):
    """HDML over ``metric="npair"`` (batches of N classes x 2) or ``"triplet"``.

    Deviation from the loss contract (docs/ARCHITECTURE.md): ``forward(features, labels, head, decay_params)``
    returns a dict of objectives, not ``forward(embeddings, labels) -> scalar``, because HDML synthesises pooled
    features and embeds them with the model's own head; only ``method=hdml`` (HDMLMethod) trains it.

    Triplets: ``mining="fixed"`` (official) reads the batch as ``[anchors; positives; negatives]`` thirds;
    ``"all"`` / ``"semihard"`` / ``"hard"`` mine them from a class-balanced batch with the zoo's miners.
    ``regular_factor`` weights the weight-decay term of ``J_m`` over the parameters passed as ``decay_params``.
    ``nan_to_zero`` (official): a NaN N-pair ``J_syn`` counts as 0 (``Loss_ops.py`` ``new_npair_loss``); the method
    then also skips (zero gradient) any objective that is NaN, as the official ``nn_Ops.training``.

    Built in two steps: the config gives the hyper-parameters, :meth:`build` (called by ``HDMLMethod.setup``)
    the generator and classifier once the feature / embedding sizes and training classes are known.
    :meth:`forward` takes pooled features ``y`` (B, F), labels and the model's embedding head, and returns every
    term (``"loss"`` is ``J_metric``; ``"gen"`` and ``"cls"`` are the other two objectives).
    """

    def __init__(self, metric: str = "npair", pulling_factor: float = 90.0, beta: float = 5e3, lambda_: float = 0.5,
                 softmax_factor: float = 1e4, use_softmax: bool = True, use_reconstruction: bool = True,
                 l2reg: float = 3e-3, margin: float = 1.0, mining: str = "fixed", squared: bool = True,
                 reduction: str = "sum", regular_factor: float = 0.0, nan_to_zero: bool = True, javg_window: int = 64, javg_init: float = 1e6, javg_update: str = "block",
                 generator_hidden: int = 512, method_target: str | None = None) -> None:
        super().__init__()
        if metric not in METRICS:
            raise DMLRunnerError(f"loss.metric={metric!r}: HDML works over one of {METRICS}")
        if method_target is not None and not method_target.endswith("HDMLMethod"):
            raise DMLRunnerError(f"loss=hdml_{metric} is trained by the HDML method, but method is {method_target}: "
                                 "drop the method= override (loss=hdml_* selects method=hdml) or set method=hdml "
                                 "(see docs/HDML.md)")
        if pulling_factor < 0 or not 0.0 <= lambda_ <= 1.0:
            raise DMLRunnerError("loss.pulling_factor must be >= 0 and loss.lambda_ in [0, 1]")
        self.metric, self.pulling_factor, self.beta, self.lambda_ = metric, float(pulling_factor), beta, lambda_
        self.softmax_factor, self.use_softmax, self.use_reconstruction = softmax_factor, use_softmax, use_reconstruction
        if regular_factor < 0:
            raise DMLRunnerError(f"loss.regular_factor must be >= 0, got {regular_factor}")
        self.l2reg, self.generator_hidden = l2reg, generator_hidden
        self.regular_factor, self.nan_to_zero = float(regular_factor), bool(nan_to_zero)
        self._layout_checks = 0
        self.margin, self.mining, self.squared, self.reduction = margin, mining, squared, reduction
        self.triplet = None
        if metric == "triplet":
            if mining not in TRIPLET_MINING:
                raise DMLRunnerError(f"loss.mining={mining!r}: use one of {TRIPLET_MINING} (fixed: the official "
                                     "[anchors; positives; negatives] batches of sampler=hdml_triplets)")
            if reduction not in TRIPLET_REDUCTIONS:
                raise DMLRunnerError(f"loss.reduction={reduction!r}: use one of {TRIPLET_REDUCTIONS}")
            if mining != "fixed" and reduction != "sum":  # the zoo's loss (same values as a plain triplet run)
                self.triplet = TripletLoss(margin=margin, mining=mining, squared=squared, reduction=reduction)
        self.javg = RunningLossMean(javg_window, javg_init, javg_update)     # of J_m: the augmentor's J_avg
        self.jgen_avg = RunningLossMean(javg_window, javg_init, javg_update)  # of J_gen: the weight w
        self.generator: nn.Module | None = None
        self.classifier: nn.Linear | None = None

    # ------------------------------------------------------------------------------------------------ building
    def build(self, feature_dim: int, embedding_dim: int, class_ids: Tensor) -> None:
        """Create the generator and the softmax classifier (one output per training class id)."""
        self.generator = HDMLGenerator(embedding_dim, feature_dim, self.generator_hidden)
        self.classifier = nn.Linear(feature_dim, int(class_ids.numel()))
        nn.init.xavier_uniform_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)
        self.register_buffer("class_ids", torch.as_tensor(class_ids, dtype=torch.long).sort().values)

    def class_index(self, labels: Tensor) -> Tensor:
        return torch.searchsorted(self.class_ids, labels)

    # ------------------------------------------------------------------------------------------------ pieces
    def mix_weight(self) -> Tensor:
        """``w = exp(-beta / J_gen_avg)``: the weight of the real-sample loss (synthetic: ``1 - w``)."""
        return torch.exp(-self.beta / self.jgen_avg.mean.clamp_min(_TINY))

    def _npair_terms(self, z: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor, list[int], Callable]:
        """J_m, the augmented tuple (anchors then N x N pulled negatives), its labels, part sizes, J_syn(z~)."""
        j_m = npair_loss(z, labels, self.l2reg)
        a_idx, p_idx = first_pair_per_class(labels)
        n, dim = a_idx.numel(), z.shape[1]
        anchors, positives = z[a_idx], z[p_idx]
        # row i, column j: anchor i against the positive of class j as negative (j = i: d+ = d-, left unchanged)
        pulled = hardness_aware_negatives(
            anchors.repeat_interleave(n, 0), positives.repeat_interleave(n, 0), positives.repeat(n, 1),
            self.pulling_factor, self.javg.mean)
        augmented = torch.cat([anchors, pulled])
        aug_labels = torch.cat([labels[a_idx], labels[p_idx].repeat(n)])

        def synthetic_loss(z_syn: Tensor) -> Tensor:
            anc, neg = z_syn[:n], z_syn[n:].reshape(n, n, dim)
            logits = torch.einsum("id,ijd->ij", anc, neg)
            ce = F.cross_entropy(logits, torch.arange(n, device=z.device))
            return ce + 0.25 * self.l2reg * (anc.square().sum(1).mean() + neg.square().sum(2).mean())

        # J_soft: mean CE over the anchors + mean CE over the N x N synthetic negatives (official genSoftmax)
        return j_m, augmented, aug_labels, [n, n * n], synthetic_loss

    def _hinge(self, anchor: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        """``max(0, d(a, p) - d(a, n) + margin)`` row-wise, reduced (``sum``: the official ``triplet_loss``)."""
        d_ap = _row_distances(anchor, positive, self.squared)
        d_an = _row_distances(anchor, negative, self.squared)
        hinge = torch.relu(d_ap - d_an + self.margin)
        return hinge.sum() if self.reduction == "sum" else reduce(hinge, self.reduction)

    def _fixed_triplets(self, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Indices of the official layout ``[anchors; positives; negatives]`` (thirds of the batch)."""
        batch = labels.shape[0]
        m = batch // 3
        if batch % 3 or m == 0:
            raise DMLRunnerError(f"loss.mining=fixed reads the batch as [anchors; positives; negatives] thirds, but "
                                 f"it holds {batch} samples: use sampler=hdml_triplets with trainer.batch_size a "
                                 "multiple of 3 (or loss.mining=all|semihard|hard with sampler=class_balanced)")
        a = torch.arange(m, device=labels.device)
        # the layout is checked on every CPU batch, and on the first LAYOUT_CHECKS batches elsewhere (a host read)
        if labels.device.type == "cpu" or self._layout_checks < LAYOUT_CHECKS:
            self._layout_checks += 1
            laid_out = bool(((labels[a] == labels[a + m]) & (labels[a] != labels[a + 2 * m])).all())
        else:
            laid_out = True
        if not laid_out:
            raise DMLRunnerError("loss.mining=fixed needs batches laid out [anchors; positives; negatives] (same class "
                                 "for anchor i and positive i, another for negative i): use sampler=hdml_triplets, "
                                 "or loss.mining=all|semihard|hard with sampler=class_balanced")
        return a, a + m, a + 2 * m

    def _triplet_terms(self, z: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor, list[int], Callable]:
        if self.mining == "fixed":
            a, p, neg = self._fixed_triplets(labels)
        else:
            a, p, neg = mine_triplets(self.mining, pairwise_distances(z, squared=self.squared), labels)
        j_m = self.triplet(z, labels) if self.triplet is not None else self._hinge(z[a], z[p], z[neg])
        m = a.numel()
        pulled = hardness_aware_negatives(z[a], z[p], z[neg], self.pulling_factor, self.javg.mean)
        augmented = torch.cat([z[a], z[p], pulled])
        aug_labels = torch.cat([labels[a], labels[p], labels[neg]])

        def synthetic_loss(z_syn: Tensor) -> Tensor:
            return self._hinge(z_syn[:m], z_syn[m:2 * m], z_syn[2 * m:])

        # J_soft: one mean cross-entropy over all 3m synthetic rows (official main_triplet.py)
        return j_m, augmented, aug_labels, [3 * m], synthetic_loss

    # ------------------------------------------------------------------------------------------------ forward
    def weight_decay(self, params: Iterable[Tensor] | None, like: Tensor) -> Tensor:
        """``regular_factor * sum_v |v|^2 / 2`` (TF ``l2_loss``) over ``params``; 0 without params or factor."""
        params = [] if params is None or self.regular_factor == 0 else list(params)
        if not params:
            return like.new_zeros(())
        return self.regular_factor * 0.5 * sum(p.float().square().sum() for p in params)

    def forward(self, features: Tensor, labels: Tensor, head: Callable[[Tensor], Tensor] | None = None,
                decay_params: Iterable[Tensor] | None = None) -> dict[str, Tensor]:
        if head is None:
            raise DMLRunnerError("loss=hdml_* takes pooled features and the embedding head: train it with "
                                 "method=hdml (see docs/HDML.md)")
        if self.generator is None or self.classifier is None:
            raise DMLRunnerError("HDMLLoss.build() was not called: train it with method=hdml")
        features = features.float()
        z = head(features)
        terms = self._npair_terms if self.metric == "npair" else self._triplet_terms
        metric_loss, augmented, aug_labels, parts, synthetic_loss = terms(z, labels)
        batch = z.shape[0]
        generated = self.generator(torch.cat([z, augmented]))
        y_recon, y_syn = generated[:batch], generated[batch:]
        z_syn = head(y_syn)
        j_syn = synthetic_loss(z_syn)
        zero = features.new_zeros(())
        if self.nan_to_zero and self.metric == "npair":
            # official new_npair_loss: tf.cond(is_nan(loss), 0, loss), decided on the device (no host sync): the
            # value is 0 and the hook sends exact zeros back from z_syn (no 0 * NaN from inside the N-pair loss)
            ok = torch.isfinite(j_syn.detach())
            if z_syn.requires_grad:
                z_syn.register_hook(lambda grad: torch.where(ok, grad, torch.zeros_like(grad)))
            j_syn = torch.where(ok, j_syn, zero)

        j_recon = (1 - self.lambda_) * (y_recon - features.detach()).square().sum() \
            if self.use_reconstruction else zero
        if self.use_softmax:
            logits = self.classifier(y_syn)
            targets = self.class_index(aug_labels)
            ce = sum(F.cross_entropy(lg, t) for lg, t in zip(logits.split(parts), targets.split(parts)))
            j_soft = self.softmax_factor * self.lambda_ * ce
        else:
            j_soft = zero
        j_gen = j_recon + j_soft
        j_cls = F.cross_entropy(self.classifier(features.detach()), self.class_index(labels))

        wd = self.weight_decay(decay_params, features)
        j_m = metric_loss + wd
        w = self.mix_weight()
        j_metric = j_m if self.pulling_factor == 0 else w * j_m + (1 - w) * j_syn
        return {"loss": j_metric, "metric_real": metric_loss, "metric_syn": j_syn, "weight_decay": wd,
                "metric_recorded": (w * j_m).detach(), "gen_recorded": j_gen.detach(), "gen": j_gen, "recon": j_recon, "soft": j_soft, "cls": j_cls,
                "weight_real": w.detach(), "javg": self.javg.mean.clone(), "synthetic_labels": aug_labels}

    @torch.no_grad()
    def record(self, losses: dict[str, Tensor]) -> None:
        """After an optimisation step: feed ``w J_m`` (weight decay included) and ``J_gen`` to the running means,
        the values the official code records (``main_npair.py`` fetches ``J_m = exp(-beta / J_gen) * J_m``)."""
        self.javg.record(losses["metric_recorded"])
        self.jgen_avg.record(losses["gen_recorded"])  # NaN values are not recorded

    def extra_repr(self) -> str:
        return (f"metric={self.metric!r}, pulling_factor={self.pulling_factor}, beta={self.beta}, "
                f"lambda_={self.lambda_}, softmax_factor={self.softmax_factor}, use_softmax={self.use_softmax}, "
                f"use_reconstruction={self.use_reconstruction}, l2reg={self.l2reg}, "
                f"regular_factor={self.regular_factor}, nan_to_zero={self.nan_to_zero}"
                + (f", mining={self.mining!r}, squared={self.squared}, reduction={self.reduction!r}, "
                   f"margin={self.margin}" if self.metric == "triplet" else ""))
