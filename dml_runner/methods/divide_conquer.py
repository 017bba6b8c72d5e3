"""Divide and Conquer the Embedding Space (Sanakoyeu, Tschernezki, Buechler, Ommer, CVPR 2019).

Follows the official code (CompVis/metric-learning-divide-and-conquer); docs/DIVIDE_CONQUER.md lists each choice.
Divide: k-means (faiss) over the whole, non-augmented training set (by default its L2-normalised pooled backbone
features) splits the data into K clusters; learner k owns the contiguous embedding slice
``[k*ceil(d/K), min((k+1)*ceil(d/K), d))``, L2-normalised on its own, and is trained only on class-balanced batches
from cluster k (its own copy of the loss). Cluster batches are interleaved round-robin; every ``recluster_every``
epochs the data are re-clustered and the new clusters matched to the old ones (Hungarian algorithm on member
overlap) so that learner k keeps its data. From epoch ``full_embedding_from`` on (the official code: 8/19 of the
epochs before the conquer phase) the cluster batches train the full embedding instead of the learner's slice.
Conquer: the last ``finetune_epochs`` train the full embedding on all data (K = 1). The full embedding, trained and
evaluated, is the concatenation of the per-slice-normalised slices, normalised as a whole (``embedding: sliced``).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import math
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dml_runner import DMLRunnerError
from dml_runner.backbones.head import init_sliced_xavier_normal_
from dml_runner.distributed import broadcast_from_main
from dml_runner.evaluation.kmeans import kmeans
from dml_runner.methods.base import TrainContext
from dml_runner.methods.standard import StandardMethod

CLUSTER_ON = ("embedding", "features")
SMALL_CLUSTER = ("shrink", "skip")
EMBEDDING = ("sliced", "whole")
FC_INIT = ("sliced", "head")
FULL_EMBEDDING_FROM = ("official", "conquer")
OFFICIAL_KMEANS_SEED = 1234  # faiss ClusteringParameters' default seed, which the official code never changes
log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ pure helpers
def learner_slices(embedding_dim: int, num_clusters: int) -> list[slice]:
    """Embedding neurons of each learner: ``[k*ceil(d/K), min((k+1)*ceil(d/K), d))`` (official ``init_splitted``)."""
    width = math.ceil(embedding_dim / num_clusters)
    slices = [slice(k * width, min((k + 1) * width, embedding_dim)) for k in range(num_clusters)]
    if any(s.stop <= s.start for s in slices):
        raise DMLRunnerError(
            f"method.num_clusters={num_clusters} leaves some learners without embedding neurons "
            f"(backbone.embedding_dim={embedding_dim}, ceil(d/K)={width}); use K <= d/ceil(d/K) or a larger d")
    return slices


def recluster_epochs(epochs: int, num_clusters: int, recluster_every: int, finetune_epochs: int) -> list[int]:
    """1-based epochs that start with a (re-)clustering: 1, 1+T, 1+2T, ... before the conquer phase (none if K=1)."""
    if num_clusters <= 1:
        return []
    divide_epochs = max(0, epochs - finetune_epochs)
    return [e for e in range(1, divide_epochs + 1) if (e - 1) % recluster_every == 0]


def full_embedding_epoch(epochs: int, finetune_epochs: int, full_embedding_from: str | int) -> int:
    """1-based first epoch in which the cluster batches train the full embedding (> divide epochs: never).

    ``official``: the official ``train.py`` trains the full embedding when the 0-based epoch
    ``e >= finetune_epoch * 8 / 19`` (finetune_epoch = the first conquer epoch, 0-based), i.e. from 1-based epoch
    ``ceil(8 F / 19) + 1`` with F = epochs - finetune_epochs (81 of 200 for F = 190). ``conquer``: the paper's
    reading, slices until the conquer phase. An int: that 1-based epoch.
    """
    divide_epochs = max(0, epochs - finetune_epochs)
    if full_embedding_from == "official":
        return -(-8 * divide_epochs // 19) + 1
    if full_embedding_from == "conquer":
        return divide_epochs + 1
    if isinstance(full_embedding_from, bool) or not isinstance(full_embedding_from, int) or full_embedding_from < 1:
        raise DMLRunnerError(f"method.full_embedding_from={full_embedding_from!r}: use official, conquer or a "
                             "1-based epoch >= 1")
    return int(full_embedding_from)


def match_clusters(previous: np.ndarray, current: np.ndarray, num_clusters: int) -> np.ndarray:
    """Relabel ``current`` so that the summed overlap with ``previous`` is maximal (Hungarian algorithm).

    Entries < 0 (dropped items) are ignored. Returns the relabelled copy of ``current``.
    """
    from scipy.optimize import linear_sum_assignment

    valid = (previous >= 0) & (current >= 0)
    overlap = np.zeros((num_clusters, num_clusters), dtype=np.int64)
    np.add.at(overlap, (previous[valid], current[valid]), 1)
    old_ids, new_ids = linear_sum_assignment(overlap, maximize=True)
    mapping = np.empty(num_clusters, dtype=np.int64)
    mapping[new_ids] = old_ids
    out = current.copy()
    out[current >= 0] = mapping[current[current >= 0]]
    return out


def drop_singleton_classes(assign: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Copy of ``assign`` with -1 for every item whose class has a single image inside its cluster."""
    _, label_ids = np.unique(labels, return_inverse=True)
    key = assign * (label_ids.max() + 1) + label_ids
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    out = assign.copy()
    out[(counts[inverse] == 1) | (assign < 0)] = -1
    return out


class InterleavedBatchSampler:
    """Batch sampler over the whole training set: one batch of each cluster in turn (round-robin).

    As the official ``merge``: an epoch holds ``K' x max_k len(sampler_k)`` batches (K' = clusters trained); a
    cluster that runs out restarts its sampler with a fresh draw. ``learners`` lists each batch's learner id.
    """

    def __init__(self, clusters: list[tuple[int, np.ndarray, Any]]) -> None:
        self.clusters = clusters  # (learner id, global item indices, batch sampler over those items)
        self.plan: list[tuple[int, list[int]]] = []
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        longest = max(len(sampler) for _, _, sampler in self.clusters)
        per_cluster = []
        for _, members, sampler in self.clusters:
            draws: list[list[int]] = []
            restart = 0
            while len(draws) < longest:
                sampler.set_epoch(epoch + restart * 1_000_003)  # a restart draws new batches
                draws += [members[np.asarray(b)].tolist() for b in sampler]
                restart += 1
            per_cluster.append(draws[:longest])
        self.plan = [(k, per_cluster[i][j]) for j in range(longest)
                     for i, (k, _, _) in enumerate(self.clusters)]

    @property
    def learners(self) -> list[int]:
        return [k for k, _ in self.plan]

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self) -> Iterator[list[int]]:
        return (batch for _, batch in self.plan)


class _TaggedBatches:
    """Loader batches ``(images, labels)`` -> ``(images, labels, learner_id)`` (the id is a Python int)."""

    def __init__(self, loader: Iterable, learners: list[int]) -> None:
        self.loader, self.learners = loader, learners

    def __len__(self) -> int:
        return len(self.learners)

    def __iter__(self) -> Iterator[tuple]:
        for (images, labels, *_), k in zip(self.loader, self.learners):
            yield images, labels, k


# ------------------------------------------------------------------------------------------------ the method
class DivideConquerMethod(StandardMethod):
    """K learners on K embedding slices, each trained on its own k-means cluster of the data; then K = 1.

    Phases of a run with K > 1 (1-based epochs, E = trainer.epochs, F = E - ``finetune_epochs``):

    - ``divide`` (epochs < ``full_embedding_from``): cluster batches, learner k trains its normalised slice;
    - ``full`` (``full_embedding_from`` .. F): cluster batches (still re-clustered, one loss per learner) train
      the full embedding; ``full_embedding_from: official`` = ceil(8 F / 19) + 1 (81 of 200), ``conquer`` = never;
    - ``conquer`` (F+1 .. E): the full embedding on one cluster holding all data (singleton classes dropped, as the
      official K = 1 clustering does), learner 0's loss.

    ``embedding``: ``sliced`` (official) makes the head L2-normalise each learner's slice on its own, then the
    concatenation as a whole, for the full and conquer phases and for evaluation; ``whole`` keeps the head's
    output (the raw fc output normalised as a whole). ``fc_init``: ``sliced`` re-initialises the head's fc as the
    official ``init_splitted`` (Xavier-normal per slice, default Linear bias); ``head`` keeps the head's init.
    ``cluster_on``: ``features`` (official: L2-normalised pooled backbone features) or ``embedding`` (the paper).
    ``niter`` / ``nredo`` / ``kmeans_seed`` of the k-means (official 100 / 1 / 1234 for every clustering; null
    seed: derived from trainer.seed and the epoch); ``kmeans_backend``: ``faiss`` (the official code's faiss.Kmeans,
    all points, no early stop) or ``torch`` (dml-runner's k-means++ seeded k-means, :mod:`dml_runner.evaluation.kmeans`,
    run to a fixed point). ``normalize_slices`` L2-normalises each learner's slice in the
    divide phase. ``small_cluster``: a cluster with fewer classes than a class-balanced batch needs is trained with
    a smaller batch (``shrink``: its classes x samples_per_class, at least ``min_classes`` classes) or ``skip``-ped;
    a cluster below ``min_classes`` classes is always skipped (logged). K = 1 is ``method=standard`` exactly.
    """

    @staticmethod
    def check_config(node: dict[str, Any], config: dict[str, Any]) -> None:
        """dml-run's config validation: the cluster counts are positive and the run is long enough to divide."""
        from dml_runner.config import positive_int

        k, fine, epochs = node.get("num_clusters", 1), node.get("finetune_epochs", 0), config["trainer"]["epochs"]
        positive_int("method.num_clusters", k)
        positive_int("method.finetune_epochs", fine, minimum=0)
        positive_int("method.recluster_every", node.get("recluster_every", 1))
        if k > 1 and epochs <= fine:
            raise DMLRunnerError(
                f"method.finetune_epochs={fine} >= trainer.epochs={epochs}: divide_conquer would never divide "
                f"(every num_clusters trains the same plain model); set trainer.epochs above {fine} or lower "
                "method.finetune_epochs")

    def __init__(self, num_clusters: int = 8, recluster_every: int = 2, finetune_epochs: int = 10,
                 full_embedding_from: str | int = "official", embedding: str = "sliced", fc_init: str = "sliced",
                 cluster_on: str = "features", niter: int = 100, nredo: int = 1,
                 kmeans_seed: int | None = OFFICIAL_KMEANS_SEED, kmeans_backend: str = "faiss",
                 normalize_slices: bool = True,
                 small_cluster: str = "shrink", min_classes: int = 2) -> None:
        if num_clusters < 1:
            raise DMLRunnerError(f"method.num_clusters must be >= 1, got {num_clusters}")
        if recluster_every < 1:
            raise DMLRunnerError(f"method.recluster_every must be >= 1 epoch, got {recluster_every}")
        if finetune_epochs < 0:
            raise DMLRunnerError(f"method.finetune_epochs must be >= 0, got {finetune_epochs}")
        if cluster_on not in CLUSTER_ON:
            raise DMLRunnerError(f"method.cluster_on={cluster_on!r}: use one of {CLUSTER_ON}")
        if embedding not in EMBEDDING:
            raise DMLRunnerError(f"method.embedding={embedding!r}: use one of {EMBEDDING}")
        if fc_init not in FC_INIT:
            raise DMLRunnerError(f"method.fc_init={fc_init!r}: use one of {FC_INIT}")
        if isinstance(full_embedding_from, str) and full_embedding_from not in FULL_EMBEDDING_FROM:
            raise DMLRunnerError(f"method.full_embedding_from={full_embedding_from!r}: use one of "
                                 f"{FULL_EMBEDDING_FROM} or a 1-based epoch")
        full_embedding_epoch(1, 0, full_embedding_from)  # validates an int
        if kmeans_backend not in ("faiss", "torch"):
            raise DMLRunnerError(f"method.kmeans_backend={kmeans_backend!r}: use faiss (official) or torch")
        if small_cluster not in SMALL_CLUSTER:
            raise DMLRunnerError(f"method.small_cluster={small_cluster!r}: use one of {SMALL_CLUSTER}")
        if min_classes < 2:
            raise DMLRunnerError(f"method.min_classes must be >= 2 (a batch needs negatives), got {min_classes}")
        self.num_clusters = int(num_clusters)
        self.recluster_every = int(recluster_every)
        self.finetune_epochs = int(finetune_epochs)
        self.full_embedding_from = full_embedding_from
        self.embedding = embedding
        self.fc_init = fc_init
        self.cluster_on = cluster_on
        self.niter, self.nredo = int(niter), int(nredo)
        self.kmeans_seed = None if kmeans_seed is None else int(kmeans_seed)
        self.kmeans_backend = kmeans_backend
        if kmeans_backend == "faiss" and importlib.util.find_spec("faiss") is None:
            log.warning("method.kmeans_backend=faiss: faiss is not installed, so the clusterings use dml-runner's "
                        "torch k-means (method.kmeans_backend=torch; other clusters than the official code's): pip "
                        "install faiss-cpu for the official one")
            self.kmeans_backend = "torch"
        self.normalize_slices = normalize_slices
        self.small_cluster = small_cluster
        self.min_classes = int(min_classes)
        self.assignments: np.ndarray | None = None  # raw k-means ids of the last clustering (matching reference)
        self.divide_sampler: InterleavedBatchSampler | None = None
        self.conquer_sampler: InterleavedBatchSampler | None = None
        self._epoch_log: dict[str, Any] = {}
        self._phase = "divide"  # of the current epoch (set by on_epoch_start)
        self.active_learners = 0

    # -------------------------------------------------------------------------------------------- setup
    def setup(self, ctx: TrainContext) -> None:
        self.ctx = ctx
        head = getattr(ctx.model, "head", None)
        if self.num_clusters > 1 and (head is None or not hasattr(head, "fc")):
            raise DMLRunnerError("method=divide_conquer needs an EmbeddingModel (trunk + head with an fc layer)")
        embedding_dim = head.fc.out_features if head is not None else 0
        self.slices = learner_slices(embedding_dim, self.num_clusters) if self.num_clusters > 1 else []
        n = len(ctx.train_set)
        if self.num_clusters > n:
            raise DMLRunnerError(f"method.num_clusters={self.num_clusters} exceeds the {n} training images")
        if self.num_clusters > 1:
            self._configure_head(head)
        # learner k has its own copy of the loss (official: one margin loss per cluster); learner 0 uses ctx.loss,
        # which the conquer phase trains and the trainer checkpoints
        self.learner_losses = nn.ModuleList(
            [ctx.loss] + [copy.deepcopy(ctx.loss) for _ in range(self.num_clusters - 1)])
        self.optimizer = ctx.build_optimizer(self.learner_losses)
        self.scheduler = ctx.make_scheduler(self.optimizer) if ctx.make_scheduler else None
        # K = 1 is ordinary training on the whole set, with the same sampler and loader
        self.sampler = ctx.make_sampler(ctx.train_set.labels)
        self.loader = ctx.make_loader(ctx.train_set, self.sampler)
        self.schedule = set(recluster_epochs(ctx.epochs, self.num_clusters, self.recluster_every,
                                             self.finetune_epochs))
        self.full_from = full_embedding_epoch(ctx.epochs, self.finetune_epochs, self.full_embedding_from)
        if self.num_clusters > 1 and not self.schedule:
            ctx.log(f"divide_conquer: method.finetune_epochs={self.finetune_epochs} >= trainer.epochs="
                    f"{ctx.epochs}: no divide epoch, only the conquer phase")
        # a batch trains one learner's loss copy: with learnable loss parameters the other copies sit out the step
        learnable_loss = any(p.requires_grad for p in ctx.loss.parameters())
        self.build_task(find_unused_parameters=self.num_clusters > 1 and learnable_loss, model=ctx.model,
                        learner_losses=self.learner_losses)

    def prepare_model(self, model: nn.Module) -> None:
        """The evaluated embedding: with K > 1 and ``embedding: sliced``, the head normalises each learner's slice
        on its own (the slices follow from the head's width and ``num_clusters``)."""
        if self.num_clusters <= 1 or self.embedding != "sliced":
            return
        head = getattr(model, "head", None)
        if not hasattr(head, "set_slices"):
            raise DMLRunnerError("method.embedding=sliced needs the backbone's EmbeddingHead; use "
                                 "method.embedding=whole with this model")
        head.set_slices(learner_slices(head.fc.out_features, self.num_clusters))

    def _configure_head(self, head: nn.Module) -> None:
        """Official fc init and evaluated embedding; recorded in the model's info (results.json)."""
        if self.fc_init == "sliced":
            init_sliced_xavier_normal_(head.fc, self.slices, seed=self.ctx.seed + 1)
        self.prepare_model(self.ctx.model)
        info = getattr(self.ctx.model, "info", None)
        if isinstance(info, dict):
            width = self.slices[0].stop - self.slices[0].start
            whole = "L2-normalised" if getattr(head, "normalize", True) else "not normalised (backbone.normalize=false)"
            info["dc_embedding"] = (
                f"sliced: each of the {len(self.slices)} slices ({width} dims) L2-normalised on its own, the "
                f"concatenation {whole}" if self.embedding == "sliced" else f"whole: the fc output {whole} as a whole")
            info["dc_fc_init"] = self.fc_init

    def phase(self, epoch: int) -> str:
        """``standard`` (K = 1), ``divide``, ``full`` (cluster batches, full embedding) or ``conquer``."""
        if self.num_clusters <= 1:
            return "standard"
        if epoch > self.ctx.epochs - self.finetune_epochs:
            return "conquer"
        return "full" if epoch >= self.full_from else "divide"

    def in_divide_phase(self, epoch: int) -> bool:
        """Cluster batches (the divide and the full-embedding phases)."""
        return self.phase(epoch) in ("divide", "full")

    # -------------------------------------------------------------------------------------------- clustering
    def _cluster_view(self) -> Any:
        """The training set with the test-time transform (no augmentation), in training-set order."""
        from dml_runner.datasets.base import SubsetLabelledDataset

        train = self.ctx.train_set
        # the trainer hands over the test split's transform (None = images as loaded, no augmentation either)
        view = getattr(self, "_view", None)
        if view is not None and view[0] is train:  # one view per training set: its loader (and cache) are reused
            return view[1]
        if hasattr(train, "with_transform"):  # a decoded-cache dataset: the view reads its own exact cache
            out = train.with_transform(self.ctx.eval_transform, progress=self.ctx.dist.is_main)
        else:
            out = SubsetLabelledDataset(train, np.arange(len(train)), transform=self.ctx.eval_transform)
        self._view = (train, out)
        return out

    def recluster(self, epoch: int) -> None:
        """Embed the training set, k-means it and match the clusters to the previous ones; under torchrun rank 0
        does this alone and broadcasts the assignments, so every rank builds the same cluster batches (each rank
        then takes its shard of every batch)."""
        ctx = self.ctx
        t0 = time.time()
        assign, t_embed = None, 0.0
        if ctx.dist.is_main:
            x = ctx.embed(self._cluster_view(), features=self.cluster_on == "features")
            if self.cluster_on == "features":
                x = F.normalize(x.float(), dim=1)
            x = x.numpy()
            t_embed = time.time() - t0
            seed = self.kmeans_seed if self.kmeans_seed is not None else ctx.seed * 7919 + epoch
            # on the training GPU when there is one (faiss's GPU index on this rank's device alone)
            _, assign = kmeans(x, self.num_clusters, niter=self.niter, nredo=self.nredo, seed=seed,
                               backend=self.kmeans_backend, tol=0.0,
                               device=ctx.device if ctx.device.type == "cuda" else "cpu")
            if self.assignments is not None:
                assign = match_clusters(self.assignments, assign, self.num_clusters)
        self.assignments = broadcast_from_main(assign)
        self._build_cluster_sampler(epoch)
        self._epoch_log["cluster_time_s"] = round(time.time() - t0, 3)
        self._epoch_log["cluster_embed_time_s"] = round(t_embed, 3)

    def _cluster_sampler(self, k: int, members: np.ndarray, epoch: int) -> Any:
        """``(k, members, sampler)`` for one cluster, or None (logged) when it cannot be trained."""
        ctx = self.ctx
        labels = ctx.train_set.labels
        spc = getattr(self.sampler, "samples_per_class", None)
        per_batch = getattr(self.sampler, "classes_per_batch", None)
        n_classes = np.unique(labels[members]).size
        batch_size = None
        if n_classes < self.min_classes:
            log.warning(f"divide_conquer: epoch {epoch}: cluster {k} has {members.size} images of {n_classes} "
                        f"class(es) after dropping singleton classes; learner {k} is skipped until re-clustering")
            return None
        if per_batch is not None and n_classes < per_batch:
            if self.small_cluster == "skip":
                log.warning(f"divide_conquer: epoch {epoch}: cluster {k} has {n_classes} classes < {per_batch} "
                            f"per batch; learner {k} is skipped (method.small_cluster=skip)")
                return None
            batch_size = n_classes * spc
            ctx.log(f"divide_conquer: epoch {epoch}: cluster {k} has {n_classes} classes < {per_batch} "
                    f"per batch; its batches hold {n_classes} x {spc} = {batch_size} images")
        try:
            sampler = ctx.make_sampler(labels[members], batch_size=batch_size, seed=ctx.seed + 7919 * (k + 1))
        except ValueError as err:  # the configured sampler cannot batch this cluster
            log.warning(f"divide_conquer: epoch {epoch}: learner {k} is skipped until re-clustering: {err}")
            return None
        return k, members, sampler

    def _build_cluster_sampler(self, epoch: int) -> None:
        ctx = self.ctx
        kept = drop_singleton_classes(self.assignments, ctx.train_set.labels)
        clusters, sizes = [], []
        for k in range(self.num_clusters):
            members = np.flatnonzero(kept == k)
            sizes.append(members.size)
            cluster = self._cluster_sampler(k, members, epoch)
            if cluster is not None:
                clusters.append(cluster)
        if not clusters:
            raise DMLRunnerError(
                f"divide_conquer: no cluster of the {self.num_clusters} holds {self.min_classes} classes; "
                "lower method.num_clusters (the data cannot support this many learners)")
        self.divide_sampler = InterleavedBatchSampler(clusters)
        self.divide_loader = ctx.make_loader(ctx.train_set, self.divide_sampler)
        self._epoch_log["cluster_sizes"] = "|".join(str(s) for s in sizes)
        self.active_learners = len(clusters)
        ctx.log(f"divide_conquer: epoch {epoch}: cluster sizes {self._epoch_log['cluster_sizes']} "
                f"({int((kept < 0).sum())} images dropped as singleton classes)")

    def _build_conquer_sampler(self, epoch: int) -> None:
        """One cluster of all training images, classes with a single image dropped (the official K = 1 phase)."""
        ctx = self.ctx
        kept = drop_singleton_classes(np.zeros(len(ctx.train_set), dtype=np.int64), ctx.train_set.labels)
        cluster = self._cluster_sampler(0, np.flatnonzero(kept == 0), epoch)
        if cluster is None:
            raise DMLRunnerError("divide_conquer: the conquer phase cannot batch the training set "
                                 f"({int((kept == 0).sum())} images of classes with >= 2 images)")
        self.conquer_sampler = InterleavedBatchSampler([cluster])
        self.conquer_loader = ctx.make_loader(ctx.train_set, self.conquer_sampler)
        ctx.log(f"divide_conquer: epoch {epoch}: conquer phase, the full embedding on all data "
                f"({int((kept < 0).sum())} images of single-image classes dropped)")

    # -------------------------------------------------------------------------------------------- training
    def on_epoch_start(self, epoch: int) -> None:
        self._epoch_log = {}
        phase = self._phase = self.phase(epoch)
        if phase in ("divide", "full") and (epoch in self.schedule or self.divide_sampler is None):
            if epoch not in self.schedule and self.assignments is not None:
                self._build_cluster_sampler(epoch)  # resumed between re-clusterings: reuse the saved clusters
            else:
                self.recluster(epoch)
        elif phase == "conquer" and self.conquer_sampler is None:
            self._build_conquer_sampler(epoch)
        if phase == "full" and epoch == self.full_from:
            self.ctx.log(f"divide_conquer: epoch {epoch}: cluster batches now train the full embedding")

    def batches(self, epoch: int) -> Iterable:
        phase = self.phase(epoch)
        if phase == "standard":
            return super().batches(epoch)
        sampler, loader = ((self.conquer_sampler, self.conquer_loader) if phase == "conquer"
                           else (self.divide_sampler, self.divide_loader))
        sampler.set_epoch(epoch)
        return _TaggedBatches(loader, sampler.learners)

    def learner_embedding(self, images: torch.Tensor, k: int) -> torch.Tensor:
        """Learner k's slice of the fc output (before any normalisation of the head), normalised on its own."""
        model = self.ctx.model
        z = model.head.fc(model.head.dropout(model.features(images)))[:, self.slices[k]]
        return F.normalize(z.float(), dim=1) if self.normalize_slices else z.float()

    def forward(self, batch: tuple) -> dict[str, torch.Tensor]:
        if len(batch) < 3:
            return super().forward(batch)
        images, labels, k = batch[0], batch[1], int(batch[2])
        with self.ctx.autocast():
            if self._phase == "divide":
                embeddings = self.learner_embedding(images, k)
            else:  # full-embedding and conquer phases: the embedding the model is evaluated with
                embeddings = self.ctx.model(images)
        return {"loss": self.learner_losses[k](self.ctx.gather(embeddings.float()), self.ctx.gather(labels))}

    def on_epoch_end(self, epoch: int) -> dict[str, Any]:
        out = super().on_epoch_end(epoch)
        phase = self.phase(epoch)
        out["dc_learners"] = self.active_learners if phase in ("divide", "full") else 1
        if self.num_clusters > 1:
            out["dc_phase"] = phase
        out.update(self._epoch_log)
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["learner_losses"] = self.learner_losses.state_dict()
        state["assignments"] = None if self.assignments is None else torch.from_numpy(self.assignments)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "learner_losses" in state:
            self.learner_losses.load_state_dict(state["learner_losses"])
        if state.get("assignments") is not None:
            self.assignments = state["assignments"].numpy()
