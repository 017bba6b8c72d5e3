"""HDML training (Zheng et al., CVPR 2019): three optimisers over one forward pass, and the official lr schedule.

The loss (:class:`~dml_runner.losses.hdml.HDMLLoss`) computes every term; this method owns

- the metric optimiser over the metric layers: the embedding head (with HDML's BatchNorm before the FC layer when
  ``feature_bn``) and the trunk when it is not frozen; minimises ``J_metric``;
- the generator optimiser (minimises ``J_gen``) and the softmax-classifier optimiser (``J_cls`` on real features);
- the schedule: the metric learning rate times ``lr_gamma`` at each of ``lr_milestones`` (in steps or epochs;
  official code: halved at steps 5632 and 6848 where those are evaluation steps, i.e. on Cars196 but not on CUB with
  its recommended ``batch_per_epoch`` 46, whose rows set no milestone; the generator and classifier rates stay
  constant);
- with ``trainer.cache_features=true`` and a frozen trunk, training from a :class:`FeatureCache`;
- the weight-decay term of ``J_m``: the metric layers' non-BatchNorm parameters go to the loss as ``decay_params``
  (official ``main_npair.py``: every trainable variable built before the loss except BatchNorm ones, i.e. the
  trunk and fc1);
- evaluation on L2-normalised embeddings while training sees the raw ones (``eval_normalize``; official
  ``evaluation.py`` evaluates ``tf.nn.l2_normalize(z)``);
- NaN steps as the official ``nn_Ops.training`` (``loss.nan_to_zero``): an objective whose value is NaN counts as 0,
  so its optimiser steps with a zero gradient, and training goes on.

Each objective is back-propagated into its own parameters only (``backward(inputs=...)``), as the official
TensorFlow code's ``minimize(loss, var_list=...)``: ``J_gen`` never moves the metric layers, ``J_metric`` never
moves the generator.

Data parallelism (torchrun): each rank computes the pooled features of its shard; they are all-gathered (with
gradients, in the sampler's order) and every rank computes all objectives on the global batch. One
DistributedDataParallel wraps the model and the loss (generator and classifier) together, with
``find_unused_parameters=False``, rather than one wrapper per optimiser: the three objectives share one forward
pass (the generator and classifier act on the head's embeddings), and their three backward passes fill disjoint
parameter sets whose union is every trainable parameter. DDP only needs each parameter's gradient exactly once per
step, in any of the passes, and all-reduces each bucket as soon as it is full (after the first step the buckets
follow the order in which gradients arrive: head and trunk during ``J_metric``'s pass, then generator, then
classifier). Hence two rules: a skipped (NaN) objective still sends a zero gradient through autograd, and a
generator with no objective at all (``use_softmax`` and ``use_reconstruction`` both off) is frozen at setup.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from dml_runner import DMLRunnerError
from dml_runner.distributed import any_rank
from dml_runner.losses.hdml import TF_BN, HDMLLoss
from dml_runner.methods.base import Method, TrainContext, param_groups
from dml_runner.methods.feature_cache import FeatureCache, require_frozen_trunk, trunk_is_frozen

_LOGGED = ("metric_real", "metric_syn", "weight_decay", "gen", "recon", "soft", "cls", "weight_real", "javg")
_OBJECTIVES = (("loss", "metric"), ("gen", "generator"), ("cls", "classifier"))


class BiasedVarianceBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose moving variance averages the biased batch variance (divided by N, not N - 1).

    The HDML code's BN1 is ``tf.layers.batch_normalization(fused=True)`` on (N, 1024) pool5 features; TensorFlow
    falls back to its non-fused path for inputs that are not 4-D, which updates ``moving_variance`` with
    ``tf.nn.moments``' biased variance. PyTorch's BatchNorm averages the unbiased one. Normalisation in training
    (batch statistics) and in evaluation (moving statistics) is PyTorch's own.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats):
            return super().forward(x)
        out = nn.functional.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            flat = x.detach().float()
            self.running_mean.lerp_(flat.mean(0), factor)
            self.running_var.lerp_(flat.var(0, unbiased=False), factor)
        return out


class HDMLMethod(Method):
    def __init__(self, metric_lr: float | None = None, generator_lr: float = 1e-2, softmax_lr: float = 1e-3,
                 lr_milestones: tuple[int, ...] | list[int] = (5632, 6848), lr_milestone_unit: str = "step",
                 lr_gamma: float = 0.5, feature_bn: bool = True, eval_normalize: bool = True) -> None:
        if lr_milestone_unit not in ("step", "epoch"):
            raise DMLRunnerError(f"method.lr_milestone_unit={lr_milestone_unit!r}: use step or epoch")
        self.metric_lr, self.generator_lr, self.softmax_lr = metric_lr, generator_lr, softmax_lr
        self.lr_milestones, self.lr_milestone_unit, self.lr_gamma = list(lr_milestones), lr_milestone_unit, lr_gamma
        self.feature_bn, self.eval_normalize = feature_bn, eval_normalize
        self.cache: FeatureCache | None = None

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        loss, model = ctx.loss, ctx.model
        if not isinstance(loss, HDMLLoss):
            raise DMLRunnerError(f"method=hdml trains the HDML losses, got {type(loss).__name__}: use "
                                 "loss=hdml_npair or loss=hdml_triplet")
        if ctx.make_scheduler is not None:
            raise DMLRunnerError("method=hdml has its own learning-rate schedule (method.lr_milestones, "
                                 "method.lr_gamma): use scheduler=none")
        frozen = trunk_is_frozen(model)
        if ctx.cache_features:
            require_frozen_trunk(model)
        # New layers are initialised from their own seed and leave the global RNG untouched, so data augmentation
        # and sampling see the same random stream as a plain run of the same seed.
        self.prepare_model(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed + 7919)
            loss.build(model.feature_dim, model.embedding_dim, torch.as_tensor(np.unique(ctx.train_set.labels)))
        model.head.to(ctx.device)
        loss.to(ctx.device)
        if not (loss.use_softmax or loss.use_reconstruction):
            # J_gen is the constant 0: the generator never moves (in one process its gradients stay None); frozen,
            # so that data-parallel training does not wait for gradients that never come
            loss.generator.requires_grad_(False)

        base_lr = self.metric_lr if self.metric_lr is not None else ctx.base_lr
        groups = param_groups(model, nn.Module(), ctx.head_lr_mult, ctx.loss_lr_mult, base_lr)
        self.metric_params = [p for g in groups for p in g["params"]]
        bn_params = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                     for p in m.parameters()}
        self.decay_params = [p for p in self.metric_params if id(p) not in bn_params]
        self.generator_params = list(loss.generator.parameters())
        self.classifier_params = list(loss.classifier.parameters())
        self.metric_opt = ctx.make_optimizer(groups)
        self.generator_opt = ctx.make_optimizer([{"params": self.generator_params, "name": "generator"}],
                                                lr=self.generator_lr)
        self.classifier_opt = ctx.make_optimizer([{"params": self.classifier_params, "name": "softmax"}],
                                                 lr=self.softmax_lr)
        self.scheduler = self.metric_schedule(self.metric_opt)

        self.build_task(model=model, loss=loss)
        self.sampler = ctx.make_sampler(ctx.train_set.labels)
        if ctx.cache_features:
            self.cache = FeatureCache.build(ctx.embed, ctx.train_set, ctx.cache_views, ctx.seed)
            ctx.log(f"HDML feature cache: {ctx.cache_views} view(s) x {len(ctx.train_set)} images, "
                    f"{self.cache.nbytes() / 2**20:.1f} MiB")
        else:
            self.loader = ctx.make_loader(ctx.train_set, self.sampler)
        info = {"metric": loss.metric, "trunk": "frozen (option)" if frozen else "fine-tuned (paper and official code)",
                "trunk_frozen": frozen, "feature_bn": self.feature_bn, "feature_cache": bool(ctx.cache_features),
                "cache_views": ctx.cache_views if ctx.cache_features else None, "pulling_factor": loss.pulling_factor,
                "use_softmax": loss.use_softmax, "use_reconstruction": loss.use_reconstruction,
                "regular_factor": loss.regular_factor, "nan_to_zero": loss.nan_to_zero,
                "eval_normalize": self.eval_normalize,
                "bn": "momentum 0.01 (TF 0.99), eps 1e-3, biased moving variance",
                "lrs": {"metric": base_lr, "generator": self.generator_lr, "softmax": self.softmax_lr}}
        if isinstance(getattr(model, "info", None), dict):
            model.info["hdml"] = info  # recorded in results.json under "model"
        self.info = info
        self._sums: dict[str, torch.Tensor] = {}
        self._steps = 0

    def metric_schedule(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.MultiStepLR:
        """The metric optimiser's schedule: times ``lr_gamma`` at each of ``lr_milestones``, stepped after every
        optimisation step (``lr_milestone_unit="step"``) or epoch; no milestones: a constant lr."""
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, self.lr_milestones, self.lr_gamma)

    def prepare_model(self, model: nn.Module) -> None:
        """The head as HDML trains and evaluates it: ``feature_bn`` puts a BatchNorm (TF's momentum and eps, moving
        variance of the biased batch variance: :class:`BiasedVarianceBatchNorm1d`) before the FC layer (official: pool5 -> BN -> FC; part of the head, so evaluation uses it too), and
        ``eval_normalize`` L2-normalises the evaluated embeddings."""
        if self.feature_bn:
            model.head.dropout = nn.Sequential(BiasedVarianceBatchNorm1d(model.feature_dim, **TF_BN),
                                               model.head.dropout)
        if self.eval_normalize:
            model.head.eval_normalize = True

    # ------------------------------------------------------------------------------------------------ steps
    def batches(self, epoch: int) -> Iterable:
        self.sampler.set_epoch(epoch)
        self._sums, self._steps = {}, 0
        return self.cache.batches(self.sampler, epoch) if self.cache is not None else self.loader

    def forward(self, batch: tuple) -> dict[str, torch.Tensor]:
        inputs, labels = batch[0], batch[1]
        if self.cache is not None:
            features = inputs
        else:
            with self.ctx.autocast():
                features = self.ctx.model.features(inputs)
        features, labels = self.ctx.gather(features.float()), self.ctx.gather(labels)
        out = self.ctx.loss(features, labels, head=self.ctx.model.head, decay_params=self.decay_params)
        # every rank computes the objectives on the same global batch; the OR over ranks guarantees they also
        # take the same skip decision (a rank that skips alone would leave DDP waiting for its gradients)
        flags = any_rank(torch.stack([~torch.isfinite(out[key].detach()) for key, _ in _OBJECTIVES]))
        # the flags stay on the device (no host sync per step); backward_and_step zeroes the skipped gradients
        if self.ctx.loss.nan_to_zero:
            # official nn_Ops.training: tf.cond(is_nan(loss), 0, loss), so a NaN objective gives zero gradients
            out["skip_flags"] = flags
            for (key, _), flag in zip(_OBJECTIVES, flags):
                out[key] = torch.where(flag, out[key].new_zeros(()), out[key])
        else:  # a NaN total: the trainer's NaN guard stops the run with its message
            out["loss"] = out["loss"] + torch.where(flags.any(), float("nan"), 0.0)
        return out

    def backward_and_step(self, losses: dict[str, torch.Tensor]) -> None:
        optimisers = (self.metric_opt, self.generator_opt, self.classifier_opt)
        for opt in optimisers:
            opt.zero_grad(set_to_none=True)
        owned = {"loss": self.metric_params, "gen": self.generator_params, "cls": self.classifier_params}
        flags = losses.get("skip_flags")
        for i, (key, _) in enumerate(_OBJECTIVES):
            params = [p for p in owned[key] if p.requires_grad]
            if params and losses[key].requires_grad:
                losses[key].backward(inputs=params, retain_graph=key != "cls")
            if flags is not None:
                # NaN objective: Adam still steps, with a zero gradient (as TF's minimize of 0); the backward above
                # went through autograd, so DDP saw (and all-reduced) a gradient of every parameter
                for p in params:
                    if p.grad is not None:
                        p.grad.masked_fill_(flags[i], 0.0)
        if self.ctx.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.metric_params, self.ctx.grad_clip)
        for opt in optimisers:
            opt.step()
        self.ctx.loss.record(losses)
        if self.lr_milestone_unit == "step":
            self.scheduler.step()
        for key in _LOGGED:
            value = losses[key].detach().float()
            self._sums[key] = self._sums[key] + value if key in self._sums else value
        self._steps += 1

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        if self.lr_milestone_unit == "epoch":
            self.scheduler.step()
        out = {f"lr_{g.get('name', i)}": g["lr"] for i, g in enumerate(self.metric_opt.param_groups)}
        out["lr_generator"] = self.generator_opt.param_groups[0]["lr"]
        out["lr_softmax"] = self.classifier_opt.param_groups[0]["lr"]
        out.update({f"hdml/{k}": float(v) / max(self._steps, 1) for k, v in self._sums.items()})
        return out

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"metric_optimizer": self.metric_opt.state_dict(), "generator_optimizer": self.generator_opt.state_dict(),
                "softmax_optimizer": self.classifier_opt.state_dict(), "scheduler": self.scheduler.state_dict(),
                "hdml": self.info}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.metric_opt.load_state_dict(state["metric_optimizer"])
        self.generator_opt.load_state_dict(state["generator_optimizer"])
        self.classifier_opt.load_state_dict(state["softmax_optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
