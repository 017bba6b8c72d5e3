"""The training-method contract: what happens to one batch, and which batches an epoch sees.

The trainer (``dml_runner.training.trainer``) owns the loop, devices, AMP, evaluation, checkpoints and the NaN guard; a
method owns the optimisation. Methods are plain Python objects built from ``conf/method/<name>.yaml``.

A method's trainable modules and its loss computation form one :class:`TaskModule` (an ``nn.Module`` whose
forward takes a device batch and returns the dict of losses, as timm's training tasks); the trainer wraps it for
data-parallel training (``TrainContext.parallel``: DistributedDataParallel under torchrun, the module itself in one
process), so gradients are averaged over the ranks while the backward pass runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dml_runner import DMLRunnerError
from dml_runner.distributed import DistInfo


@dataclass
class TrainContext:
    """Everything a method may need, handed over by the trainer before training starts."""

    model: nn.Module
    loss: nn.Module
    device: torch.device
    make_optimizer: Callable[..., torch.optim.Optimizer]
    make_scheduler: Callable[..., Any] | None
    train_set: Any
    make_sampler: Callable[..., Any]
    make_loader: Callable[..., Iterable]
    embed: Callable[..., torch.Tensor]  # embed(dataset, features=False) -> (N, D) tensor on the CPU
    autocast: Callable[[], Any]
    epochs: int
    head_lr_mult: float = 1.0
    loss_lr_mult: float = 1.0
    grad_clip: float | None = None
    cache_features: bool = False  # trainer.cache_features: methods with a frozen trunk may train from cached features
    cache_views: int = 1
    seed: int = 0
    eval_transform: Callable[[Any], Any] | None = None  # the test-time (non-augmenting) transform of the images
    log: Callable[[str], None] = print
    # data parallelism (identity / a single process unless torchrun started several, see dml_runner.distributed):
    # parallel(task, find_unused_parameters) wraps a TaskModule in DistributedDataParallel; gather(shard) is the
    # global batch (in the sampler's order, differentiable) a loss must see; dist says which rank this is
    parallel: Callable[..., nn.Module] = field(default=lambda module, find_unused_parameters=False: module)
    gather: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda shard: shard)
    dist: DistInfo = field(default_factory=DistInfo)

    @property
    def base_lr(self) -> float:
        """The learning rate of the optimizer config (its ``lr``; 1e-3 when the config sets none)."""
        return float((getattr(self.make_optimizer, "keywords", None) or {}).get("lr", 1e-3))

    def build_optimizer(self, loss: nn.Module) -> torch.optim.Optimizer:
        """The configured optimiser over trunk, head (x head_lr_mult) and ``loss`` parameters (x loss_lr_mult)."""
        return self.make_optimizer(param_groups(self.model, loss, self.head_lr_mult, self.loss_lr_mult,
                                                self.base_lr))


class TaskModule(nn.Module):
    """A method's trainable modules as one ``nn.Module``; ``forward(batch)`` is the method's :meth:`Method.forward`.

    The unit that DistributedDataParallel wraps: its parameters (those that require gradients) are the ones whose
    gradients are averaged over the ranks, and every call of its forward prepares DDP for the backward pass(es)
    that follow. Register the modules in the order they are applied (model, then loss): DDP fills its
    communication buckets in reverse registration order, which then matches the order of the backward pass.
    """

    def __init__(self, forward: Callable[[tuple], dict[str, torch.Tensor]], **modules: nn.Module) -> None:
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)
        self._forward = forward

    def forward(self, batch: tuple) -> dict[str, torch.Tensor]:
        return self._forward(batch)


class Method:
    """Base class. Subclasses implement :meth:`forward`, :meth:`backward_and_step`, and, if needed, the other hooks;
    their ``setup`` builds ``self.task`` with :meth:`build_task`."""

    ctx: TrainContext
    task: nn.Module  # the TaskModule, wrapped by ctx.parallel

    def setup(self, ctx: TrainContext) -> None:
        """Build optimisers and schedulers (the model and loss are already on ``ctx.device``)."""
        self.ctx = ctx

    def prepare_model(self, model: nn.Module) -> None:
        """Change the model's structure as this method trains and evaluates it (layers added to the head, the
        evaluated embedding), without a TrainContext. ``setup`` calls it; dml-embed / dml-export call it on a model
        rebuilt from a run's config before loading the run's weights. Default: nothing to change."""

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each epoch (1-based), e.g. to re-cluster."""

    def batches(self, epoch: int) -> Iterable:
        """Batches of this epoch: tuples ``(images, labels, *extra)`` of CPU tensors."""
        raise NotImplementedError

    def build_task(self, find_unused_parameters: bool = False, **modules: nn.Module) -> None:
        """``self.task``: ``modules`` (every trainable one, in the order they are applied) and :meth:`forward` as a
        :class:`TaskModule`, wrapped for data parallelism. ``find_unused_parameters``: some trainable parameters
        take no part in some steps (DDP then finds them in each step's graph instead of waiting for them)."""
        self.task = self.ctx.parallel(TaskModule(self.forward, **modules), find_unused_parameters)

    def forward(self, batch: tuple) -> dict[str, torch.Tensor]:
        """The task's forward on a device batch (this rank's shard): ``{"loss": scalar, ...other scalars to log}``.

        Embeddings go through ``ctx.gather`` (and the labels too) before the loss, so the loss sees the global batch.
        """
        raise NotImplementedError

    def compute_loss(self, batch: tuple) -> dict[str, torch.Tensor]:
        """Forward pass on a device batch through the (wrapped) task module."""
        task = getattr(self, "task", None)
        if task is None:
            raise DMLRunnerError(f"{type(self).__name__}.setup did not call self.build_task(model=..., loss=...): "
                                 "the trainer runs a method's forward through its task module")
        return task(batch)

    def backward_and_step(self, losses: dict[str, torch.Tensor]) -> None:
        """Backward pass and optimiser step(s); only called when the loss is finite."""
        raise NotImplementedError

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        """Step schedulers; return values (e.g. learning rate) to record in history."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def param_groups(model: nn.Module, loss: nn.Module, head_lr_mult: float, loss_lr_mult: float,
                 base_lr: float) -> list[dict[str, Any]]:
    """Optimiser parameter groups: backbone trunk, embedding head (x head_lr_mult), loss parameters (x loss_lr_mult).

    Frozen parameters (``requires_grad=False``) are left out; empty groups are dropped.
    """
    head = getattr(model, "head", None)
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    trunk = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    head_params = [p for p in (head.parameters() if head is not None else []) if p.requires_grad]
    loss_params = [p for p in loss.parameters() if p.requires_grad]
    groups = [
        {"params": trunk, "lr": base_lr, "name": "trunk"},
        {"params": head_params, "lr": base_lr * head_lr_mult, "name": "head"},
        {"params": loss_params, "lr": base_lr * loss_lr_mult, "name": "loss"},
    ]
    return [g for g in groups if g["params"]]
