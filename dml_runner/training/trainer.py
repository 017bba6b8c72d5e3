"""The training loop: devices, AMP, data parallelism, evaluation schedule, checkpoints, history and the NaN guard.

Plain PyTorch; :mod:`dml_runner.run` builds the objects from the config and calls :func:`fit`. Checkpoints are the
:class:`~dml_runner.training.checkpoint.Checkpointer`'s, seeds come from :mod:`dml_runner.devices`. Under torchrun the
method's task module runs in DistributedDataParallel and its loss sees the gathered global batch
(:mod:`dml_runner.distributed`); evaluation and every file are rank 0's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dml_runner import DMLRunnerError
from dml_runner.config import TrainerConfig
from dml_runner.datasets.base import DatasetSplits, LabelledDataset
from dml_runner.devices import epoch_seed, resolve_device, seed_everything, seed_worker
from dml_runner.distributed import (DistInfo, ShardedBatchSampler, broadcast_module, convert_sync_batchnorm,
                                    data_parallel, gather_global_batch, init_distributed, rank_device, wait_for_main)
from dml_runner.loggers import CSVLogger
from dml_runner.methods.base import Method, TrainContext
from dml_runner.rundir import EMBEDDINGS, model_fingerprint, write_embeddings
from dml_runner.training.checkpoint import Checkpointer

log = logging.getLogger(__name__)


class TrainingDivergedError(DMLRunnerError):
    """The loss became NaN or infinite."""


class OutOfMemoryError(DMLRunnerError):
    """The device ran out of memory during training."""


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: the run stops, keeping the checkpoint of the last completed epoch.

    A KeyboardInterrupt, so no ``except Exception`` on the way up swallows it.
    """

    def __init__(self, signum: int) -> None:
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.signame = signal.Signals(signum).name
        self.checkpoint_epoch: int | None = None  # filled in by the Trainer (None: no checkpoint yet)


def loader_workers(setting: int | None, dataset: object, cuda: bool, local_processes: int | None = None) -> int:
    """DataLoader worker processes: ``setting`` (``trainer.num_workers``), or when null: on CUDA, a dataset that decodes
    image files gets min(8, cores per local process - 1); otherwise 0 (in-memory data need no workers, and on the CPU
    the workers would take the cores the training step computes on)."""
    if setting is not None:
        return int(setting)
    from dml_runner.datasets.images import ImageListDataset

    base = dataset
    while hasattr(base, "base"):  # a subset or validation split of a file dataset reads the same files
        base = base.base
    if not (cuda and isinstance(base, ImageListDataset)):
        return 0
    if local_processes is None:  # torchrun's processes on this machine share its cores
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores // max(1, local_processes) - 1))


DATA_BOUND_SHARE = 0.5  # above this share of the training loop spent waiting for batches, the run warns
KEPT_EVAL_LOADERS = 3  # embedding loaders kept with their workers: validation, test and one view of a method


class _Waits:
    """Seconds a loop spends waiting in an iterator's ``__next__`` (``total``; ``last``: the latest wait)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.last = 0.0

    def iterate(self, iterable: Any) -> Any:
        it = iter(iterable)
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            self.last = time.perf_counter() - t
            self.total += self.last
            yield item


def compile_backbone(model: torch.nn.Module) -> None:
    """``trainer.compile``: torch.compile the backbone's trunk in place (``nn.Module.compile``: its state-dict keys,
    hence checkpoints, stay as they are); a model without a trunk is compiled whole."""
    target = getattr(model, "trunk", None)
    (target if isinstance(target, torch.nn.Module) else model).compile()


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def average_over_draws(evaluate: Callable[..., dict[str, float]], emb: np.ndarray, labels: np.ndarray,
                       draws: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Mean of each metric over several (query_mask, gallery_mask) draws, plus `<metric>_std` and `num_draws`."""
    runs = [evaluate(emb, labels, query_mask=q, gallery_mask=g) for q, g in draws]
    out: dict[str, float] = {}
    for key in runs[0]:
        values = np.array([r[key] for r in runs], dtype=np.float64)
        out[key] = float(values.mean())
        if not key.startswith("num_"):
            out[f"{key}_std"] = float(values.std())
    out["num_draws"] = float(len(runs))
    return out


class Trainer:
    def __init__(self, settings: TrainerConfig, data: DatasetSplits, model: torch.nn.Module, loss: torch.nn.Module,
                 method: Method, make_optimizer: Callable, make_scheduler: Callable | None,
                 make_sampler: Callable, evaluate: Callable[..., dict[str, float]], out_dir: Path,
                 dist_info: DistInfo | None = None, config: dict[str, Any] | None = None,
                 logger: Any = None, eval_amp: bool = False) -> None:
        self.s = settings
        self.finite_check_every: int | None = None  # NaN-guard reads (None: every 50 steps on CUDA, else every step)
        self.eval_amp = eval_amp  # eval.amp: evaluation embeds under the training autocast (else float32)
        self.logger = logger  # dml_runner.loggers.MetricLogger or None
        self.data = data
        self.dist = dist_info or DistInfo()
        self.device = resolve_device(settings.device, "trainer.device")
        self.device = rank_device(self.dist, self.device)
        if self.dist.enabled and self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        init_distributed(self.dist, self.device, settings.dist_timeout_s)
        self.cuda = self.device.type == "cuda"
        self.use_amp = settings.amp and self.cuda
        self.channels_last = settings.channels_last and self.cuda
        self.model = model.to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if settings.compile:
            compile_backbone(self.model)
        if settings.sync_bn:
            # before the method builds anything: layers it adds after the gather already see the global batch
            self.model = convert_sync_batchnorm(self.model, self.dist, self.device)
        self.loss = loss.to(self.device)
        if self.dist.enabled:
            broadcast_module(self.model)
            broadcast_module(self.loss)
        self.method = method
        self.evaluate_fn = evaluate
        self.out_dir = Path(out_dir)
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.history_csv = CSVLogger(self.out_dir)  # history.csv, written by rank 0 only
        self.config = config or {}
        self.checkpointer = Checkpointer(self.out_dir, self.config,
                                         enabled=settings.save_checkpoints and self.dist.is_main)
        self.history: list[dict[str, Any]] = []
        self.select_split = self._selection_split()
        self.best: dict[str, Any] | None = None
        self.untrained: dict[str, float] | None = None
        self._last_emb: np.ndarray | None = None
        self._last_test: dict[str, float] | None = None
        self._pending_eval: dict[str, Any] | None = None  # a trained epoch whose evaluation has not finished
        self.start_epoch = 1
        self._eval_loaders: dict[int, tuple[Any, DataLoader]] = {}  # id(dataset) -> (dataset, its loader)
        self._train_workers: int | None = None  # worker processes of the last training loader built
        self._warned_data_bound = False

        def sampler_factory(labels: Any, batch_size: int | None = None, seed: int | None = None) -> Any:
            sampler = make_sampler(labels, batch_size=batch_size, seed=seed)
            return ShardedBatchSampler(sampler, self.dist) if self.dist.enabled else sampler

        def parallel(task: torch.nn.Module, find_unused_parameters: bool = False) -> torch.nn.Module:
            return data_parallel(task, self.dist, self.device, find_unused_parameters)

        self.method.setup(TrainContext(
            model=self.model, loss=self.loss, device=self.device, make_optimizer=make_optimizer,
            make_scheduler=make_scheduler, train_set=data.train, make_sampler=sampler_factory,
            make_loader=self.train_loader, embed=self.embed, autocast=self.autocast, epochs=settings.epochs,
            head_lr_mult=settings.head_lr_mult, loss_lr_mult=settings.loss_lr_mult, grad_clip=settings.grad_clip,
            cache_features=settings.cache_features, cache_views=settings.cache_views, seed=settings.seed,
            eval_transform=getattr(data.test, "transform", None), log=log.info, parallel=parallel,
            gather=gather_global_batch, dist=self.dist))

    # ----------------------------------------------------------------------------------------- helpers
    def _selection_split(self) -> str:
        """The split that chooses best.pt; the final epoch when there is no validation split.

        The test set chooses only when asked for explicitly (``trainer.select_on=test``): a checkpoint chosen on the
        test classes reports an optimistic number.
        """
        choice = self.s.select_on
        if choice == "auto":
            return "val" if self.data.val is not None else "final"
        if choice == "val" and self.data.val is None:
            raise DMLRunnerError("trainer.select_on=val needs a validation split: set dataset.val_fraction>0")
        if choice not in ("val", "test", "final"):
            raise DMLRunnerError(f"trainer.select_on={choice!r}: use auto, val, final or test")
        if choice == "test":
            log.warning("trainer.select_on=test: best.pt is chosen on the TEST set, so its numbers are optimistic "
                        "(use it only to compare with papers that did the same)")
        return choice

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.use_amp:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _worker_options(self, workers: int) -> dict[str, Any]:
        """DataLoader keywords that exist only with worker processes (``trainer.prefetch_factor``)."""
        if workers == 0 or self.s.prefetch_factor is None:
            return {}
        return {"prefetch_factor": int(self.s.prefetch_factor)}

    def train_loader(self, dataset: LabelledDataset, batch_sampler: Any) -> DataLoader:
        """Workers draw their seeds from the global torch RNG, which is reseeded every epoch (see epoch_seed)."""
        workers = loader_workers(self.s.num_workers, dataset, self.cuda)
        self._train_workers = workers
        return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers,
                          pin_memory=self.cuda and self.s.pin_memory,
                          persistent_workers=False if workers == 0 else self.s.persistent_workers,
                          worker_init_fn=seed_worker if workers > 0 else None, **self._worker_options(workers))

    def eval_loader(self, dataset: LabelledDataset) -> DataLoader:
        """The embedding loader of ``dataset`` in order; with workers and ``trainer.persistent_workers`` it is
        built once and kept (its workers then live from one evaluation to the next, until :meth:`release`)."""
        known = self._eval_loaders.get(id(dataset))
        if known is not None and known[0] is dataset:
            return known[1]
        workers = loader_workers(self.s.num_workers, dataset, self.cuda)
        persistent = workers > 0 and self.s.persistent_workers
        loader = DataLoader(dataset, batch_size=self.s.eval_batch_size, shuffle=False, num_workers=workers,
                            pin_memory=self.cuda and self.s.pin_memory, persistent_workers=persistent,
                            **self._worker_options(workers))
        if persistent:  # the dataset is kept with its loader, so its id is not reused while the entry lives
            while len(self._eval_loaders) >= KEPT_EVAL_LOADERS:  # a method embedding ever new views: no pile-up
                self._eval_loaders.pop(next(iter(self._eval_loaders)))
            self._eval_loaders[id(dataset)] = (dataset, loader)
        return loader

    def to_device(self, batch: Any) -> tuple:
        out = []
        for item in batch:
            if isinstance(item, torch.Tensor):
                item = item.to(self.device, non_blocking=True)
                if self.channels_last and item.ndim == 4:
                    item = item.contiguous(memory_format=torch.channels_last)
            out.append(item)
        return tuple(out)

    @torch.no_grad()
    def embed(self, dataset: LabelledDataset, features: bool = False, amp: bool = True) -> torch.Tensor:
        """Embeddings (or pooled trunk features) of a whole dataset in eval mode, float32 on the CPU.

        The global CPU generator is left as it was (a DataLoader iterator draws its seed from it): a rank that embeds
        alone (evaluation, Divide & Conquer's clustering on rank 0) keeps the random stream of the other ranks, so
        random choices inside a loss (negative sampling) stay the same on every rank.
        """
        was_training = self.model.training
        self.model.eval()
        loader = self.eval_loader(dataset)
        chunks = []
        with torch.random.fork_rng(devices=[]):
            for images, _ in loader:
                (images,) = self.to_device((images,))
                with self.autocast() if amp else contextlib.nullcontext():
                    out = self.model.features(images) if features else self.model(images)
                chunks.append(out.float().cpu())
        self.model.train(was_training)
        return torch.cat(chunks)

    def evaluate_split(self, split: str) -> tuple[dict[str, float], np.ndarray]:
        dataset = self.data.val if split == "val" else self.data.test
        emb = self.embed(dataset, amp=self.eval_amp).numpy()  # float32 unless eval.amp
        masks = {}
        if split == "test" and self.data.eval_mode == "query_gallery":
            masks = {"query_mask": self.data.query_mask, "gallery_mask": self.data.gallery_mask}
        if not np.isfinite(emb).all():
            raise TrainingDivergedError(f"the {split} embeddings contain NaN/inf; the model has diverged")
        if split == "test" and self.data.eval_draws:
            return average_over_draws(self.evaluate_fn, emb, dataset.labels, self.data.eval_draws), emb
        metrics = self.evaluate_fn(emb, dataset.labels, **masks)
        return metrics, emb

    def release(self) -> None:
        """Break the reference cycles of a finished run: the method's context calls back into the trainer and its
        task module into the method. Without this their model, optimiser state and loader workers (GPU memory too)
        live until the next full garbage collection, into the next run of an in-process multirun. The method cannot
        train afterwards."""
        vars(self.method).pop("ctx", None)
        vars(self.method).pop("task", None)
        self._eval_loaders.clear()  # their persistent workers end with the loaders

    def _barrier(self) -> None:
        wait_for_main()

    # ----------------------------------------------------------------------------------------- main loop
    def fit(self, resume: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            return self._fit(resume)
        except RunInterrupted as interrupt:
            interrupt.checkpoint_epoch = self.checkpointer.epoch
            raise
        finally:
            if self.logger is not None:
                self.logger.close()

    def _fit(self, resume: dict[str, Any] | None) -> dict[str, Any]:
        s = self.s
        start = time.time()
        if resume is not None:
            self._restore(resume)
            self.checkpointer.epoch = self.start_epoch - 1
        elif s.eval_before_training:
            self.untrained = self._evaluate_epoch(0, train_loss=float("nan"), epoch_time=0.0, extra={})
        if self._pending_eval is not None:  # interrupted during an evaluation: the trained epoch was kept
            self._evaluate_epoch(**self._pending_eval)
            self._pending_eval = None
            self.checkpointer.save_last(self.start_epoch - 1, self._state)
        for epoch in range(self.start_epoch, s.epochs + 1):
            t0 = time.time()
            seed_everything(epoch_seed(s.seed, epoch))
            self.model.train()
            try:
                train_loss, extra = self._train_epoch(epoch)
            except DMLRunnerError:
                raise
            except RuntimeError as err:
                if _is_oom(err):
                    raise OutOfMemoryError(
                        f"{self.device} ran out of memory at epoch {epoch}: lower trainer.batch_size, set "
                        "trainer.amp=true, or use a smaller backbone. The last good checkpoint (if any) is kept in "
                        f"{self.out_dir / 'last.pt'}.") from err
                raise
            epoch_time = time.time() - t0
            self._log_epoch(epoch, train_loss, epoch_time, extra)
            if epoch % s.eval_every == 0 or epoch == s.epochs:
                # last.pt is written once, before the evaluation, with the evaluation pending: an interrupt (or a
                # crash) during the evaluation loses nothing, and a resume from it evaluates this epoch first
                self._pending_eval = {"epoch": epoch, "train_loss": train_loss, "epoch_time": epoch_time,
                                      "extra": extra}
                self.checkpointer.save_last(epoch, self._state)
                self._evaluate_epoch(**self._pending_eval)
                self._pending_eval = None
            else:
                self._record(epoch, train_loss, epoch_time, extra, {})
                self.checkpointer.save_last(epoch, self._state)
            self._barrier()
        if self._last_emb is None and self.dist.is_main:  # resumed after the final evaluation
            self._last_test, self._last_emb = self.evaluate_split("test")
        if self.select_split == "final":  # no validation split: the final epoch is the selected checkpoint
            self.best = {"epoch": s.epochs, "split": "final", "metric": s.select_metric,
                         "value": (self._last_test or {}).get(s.select_metric), "test_metrics": self._last_test,
                         "checkpoint": "last.pt" if s.save_checkpoints else None}
        if s.save_embeddings and self.dist.is_main:
            self._save_embeddings(self._last_emb)
        return {"final": {"epoch": s.epochs, "metrics": self._last_test}, "timing": self.timing(),
                "untrained": self.untrained, "best": self.best, "wall_time_s": time.time() - start,
                "device": str(self.device), "amp": self.use_amp, "selection_split": self.select_split,
                "resumed_from_epoch": self.start_epoch - 1 if resume is not None else None,
                "world_size": self.dist.world_size}

    def _train_epoch(self, epoch: int) -> tuple[float, dict[str, Any]]:
        s = self.s
        self.method.on_epoch_start(epoch)
        batches = self.method.batches(epoch)
        total = len(batches) if hasattr(batches, "__len__") else None
        if s.max_steps_per_epoch:
            total = min(total or s.max_steps_per_epoch, s.max_steps_per_epoch)
        # a bar only on a terminal: in a log file its redraws are noise (the epoch's log line says the same)
        bar = tqdm(batches, total=total, desc=f"epoch {epoch}/{s.epochs}", leave=False, dynamic_ncols=True,
                   disable=not (s.progress and self.dist.is_main and sys.stderr.isatty()))
        # the running loss and the first non-finite step stay on the device: the host reads them every
        # `every` steps (each read waits for the GPU), on the CPU at every step (free there)
        every = self.finite_check_every or (50 if self.cuda else 1)
        acc = torch.float32 if self.device.type == "mps" else torch.float64
        running, bad_step, n_steps = torch.zeros((), dtype=acc, device=self.device), None, 0
        # where the loop's time goes, on host clocks only: `waits` is the time spent in the loader's __next__ (the
        # loop waiting for a batch); the rest of the loop, read after the epoch's final host read of the running
        # loss (which waits for the device), is the steps' time. No per-step synchronisation.
        waits = _Waits()
        loop_start = time.perf_counter()
        for step, batch in enumerate(waits.iterate(bar), start=1):
            if s.max_steps_per_epoch and step > s.max_steps_per_epoch:
                waits.total -= waits.last  # a batch fetched only to end the epoch
                break
            losses = self.method.compute_loss(self.to_device(batch))
            value = losses["loss"].detach().to(acc)
            bad_now = ~torch.isfinite(value)
            bad_step = torch.where(bad_now, step, 0) if bad_step is None else \
                torch.where((bad_step == 0) & bad_now, step, bad_step)
            if step % every == 0:  # before the step: on the CPU a non-finite loss never reaches the weights
                self._check_finite(bad_step, epoch)
            self.method.backward_and_step(losses)
            running += value
            n_steps += 1
            if step % every == 0:
                bar.set_postfix(loss=f"{float(running) / n_steps:.4f}")
        bar.close()
        if bad_step is not None:
            self._check_finite(bad_step, epoch)
        if n_steps == 0:
            raise DMLRunnerError("an epoch produced no batch: the training set is smaller than one batch "
                                 "(lower trainer.batch_size)")
        train_loss = float(running) / n_steps  # the host read that waits for the epoch's last step
        loop_time = time.perf_counter() - loop_start
        timing = {"data_time_s": round(waits.total, 3), "step_time_s": round(max(0.0, loop_time - waits.total), 3)}
        return train_loss, {**timing, **(self.method.on_epoch_end(epoch) or {})}

    def _log_epoch(self, epoch: int, train_loss: float, epoch_time: float, extra: dict[str, Any]) -> None:
        """The epoch's log line with the share of the training loop spent waiting for data, and a warning (once a
        run) when loading took most of it."""
        data_s, step_s = extra.get("data_time_s", 0.0), extra.get("step_time_s", 0.0)
        share = data_s / (data_s + step_s) if data_s + step_s > 0 else 0.0
        log.info("epoch %d/%d: train loss %.4f (%.1f s; %.0f%% waiting for data)", epoch, self.s.epochs, train_loss,
                 epoch_time, 100 * share)
        if share > DATA_BOUND_SHARE and not self._warned_data_bound and self.dist.is_main:
            self._warned_data_bound = True
            workers = self._train_workers
            cache = (self.data.info.get("decoded_cache") or {}).get("train") or {}
            log.warning("epoch %d spent %.0f%% of its training loop waiting for data (%.1f of %.1f s): loading, not "
                        "the model, sets the pace. Raise trainer.num_workers (now %s)%s", epoch, 100 * share, data_s,
                        data_s + step_s, "null" if workers is None else workers,
                        "" if cache.get("cached") else ", and keep the decoded-image cache on (dataset.cache=auto; "
                        "docs/CACHE.md)")

    def timing(self) -> dict[str, Any]:
        """results.json's ``timing``: the data and step times of every trained epoch and their totals."""
        rows = [{"epoch": r["epoch"], "data_time_s": r["data_time_s"], "step_time_s": r["step_time_s"]}
                for r in self.history if "data_time_s" in r]
        data_s = sum(r["data_time_s"] for r in rows)
        step_s = sum(r["step_time_s"] for r in rows)
        return {"data_time_s": round(data_s, 3), "step_time_s": round(step_s, 3),
                "data_share": round(data_s / (data_s + step_s), 4) if data_s + step_s > 0 else None,
                "per_epoch": rows}

    def _check_finite(self, bad_step: torch.Tensor, epoch: int) -> None:
        """The NaN guard: the run stops at the first non-finite training loss, naming its step (one host read)."""
        step = int(bad_step)
        if step:
            raise TrainingDivergedError(
                f"the training loss became nan/inf at epoch {epoch}, step {step}; stopping. The last good "
                f"checkpoint (if any) is kept in {self.out_dir / 'last.pt'}. Try a lower optimizer.lr, "
                "trainer.grad_clip=1.0 or trainer.amp=false.")

    def _evaluate_epoch(self, epoch: int, train_loss: float, epoch_time: float,
                        extra: dict[str, Any]) -> dict[str, float] | None:
        """Evaluation runs once, on rank 0; the other ranks wait."""
        if not self.dist.is_main:
            self._barrier()
            return None
        split_metrics: dict[str, dict[str, float]] = {}
        if self.data.val is not None:
            split_metrics["val"], _ = self.evaluate_split("val")
        split_metrics["test"], self._last_emb = self.evaluate_split("test")
        self._last_test = split_metrics["test"]
        self._record(epoch, train_loss, epoch_time, extra, split_metrics)
        chosen = split_metrics["test" if self.select_split == "final" else self.select_split]
        key = self.s.select_metric
        if key not in chosen:
            raise DMLRunnerError(f"trainer.select_metric={key!r} is not computed; available: {sorted(chosen)}")
        shown = "test" if self.select_split == "final" else self.select_split
        log.info("epoch %d: %s", epoch, ", ".join(f"{shown} {k} {v:.4f}" for k, v in chosen.items()
                                                  if k in ("recall@1", "nmi", "map@r")))
        if self.select_split != "final" and epoch > 0 and (self.best is None or chosen[key] > self.best["value"]):
            self.best = {"epoch": epoch, "split": self.select_split, "metric": key, "value": chosen[key],
                         "test_metrics": split_metrics["test"]}
            self.checkpointer.save_best(epoch, self._state, metrics=split_metrics)
        self._barrier()
        return split_metrics["test"]

    def _record(self, epoch: int, train_loss: float, epoch_time: float, extra: dict[str, Any],
                split_metrics: dict[str, dict[str, float]]) -> None:
        if not self.dist.is_main:
            return
        row: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss, "epoch_time_s": round(epoch_time, 3)}
        row.update(extra)
        for split, metrics in split_metrics.items():
            row.update({f"{split}/{k}": v for k, v in metrics.items()})
        self.history.append(row)
        self._write_history()
        if self.logger is not None:
            self.logger.log_metrics(epoch, row)

    def _write_history(self) -> None:
        self.history_csv.write_rows(self.history)

    def _state(self) -> dict[str, Any]:
        """What a checkpoint keeps to continue: the state dicts, the history, the best epoch and the evaluation
        progress (the Checkpointer adds the epoch and the config)."""
        return {"model": self.model.state_dict(), "loss": self.loss.state_dict(), "method": self.method.state_dict(),
                "history": self.history, "best": self.best, "untrained": self.untrained,
                "last_test": self._last_test, "pending_eval": self._pending_eval}

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.loss.load_state_dict(state["loss"])
        self.method.load_state_dict(state["method"])
        self.history = list(state.get("history", []))
        self.best = state.get("best")
        self.untrained = state.get("untrained")
        self._last_test = state.get("last_test")
        self._pending_eval = state.get("pending_eval")
        self.start_epoch = int(state["epoch"]) + 1
        if self.dist.is_main and self.history:
            self._write_history()
        log.info("resumed after epoch %d", state["epoch"])

    def _save_embeddings(self, emb: np.ndarray) -> None:
        """embeddings.npz: the final test embeddings with labels, image paths and class names (dml-eval,
        dml-search), and the query/gallery masks of a query-gallery protocol."""
        masks = {"query_mask": self.data.query_mask, "gallery_mask": self.data.gallery_mask} \
            if self.data.eval_mode == "query_gallery" else {}
        write_embeddings(self.out_dir / EMBEDDINGS, emb, self.data.test.labels, self.data.test, **masks,
                         fingerprint=model_fingerprint(self.model, self.config))
