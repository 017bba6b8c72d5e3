"""Ordinary training: sample a batch, embed it, apply the loss, take one optimiser step."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from dml_runner.methods.base import Method, TrainContext


class StandardMethod(Method):
    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        self.optimizer = ctx.build_optimizer(ctx.loss)
        self.scheduler = ctx.make_scheduler(self.optimizer) if ctx.make_scheduler else None
        self.sampler = ctx.make_sampler(ctx.train_set.labels)
        self.loader = ctx.make_loader(ctx.train_set, self.sampler)
        self.build_task(model=ctx.model, loss=ctx.loss)

    def batches(self, epoch: int) -> Iterable:
        self.sampler.set_epoch(epoch)
        return self.loader

    def forward(self, batch: tuple) -> dict[str, torch.Tensor]:
        images, labels = batch[0], batch[1]
        with self.ctx.autocast():
            embeddings = self.ctx.model(images)
        return {"loss": self.ctx.loss(self.ctx.gather(embeddings.float()), self.ctx.gather(labels))}

    def backward_and_step(self, losses: dict[str, torch.Tensor]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if self.ctx.grad_clip:
            torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], self.ctx.grad_clip)
        self.optimizer.step()

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        if self.scheduler is not None:
            self.scheduler.step()
        return {f"lr_{g.get('name', i)}": g["lr"] for i, g in enumerate(self.optimizer.param_groups)}

    def state_dict(self) -> dict[str, Any]:
        state = {"optimizer": self.optimizer.state_dict()}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
