"""Gradient accumulation: the gradients of ``accumulate`` batches are summed before each optimiser step, so the
step sees an effective batch ``accumulate`` times larger than the one that fits in memory. The loss still sees one
batch at a time (pairs never span two batches). Under torchrun each batch's gradients are averaged over the ranks as
they are computed: correct, without saving communication."""

from __future__ import annotations

from typing import Any

import torch

from dml_runner.methods.base import TrainContext
from dml_runner.methods.standard import StandardMethod


class AccumulatedMethod(StandardMethod):
    def __init__(self, accumulate: int = 2) -> None:
        if accumulate < 1:
            raise ValueError(f"method.accumulate={accumulate}: must be at least 1")
        self.accumulate = accumulate

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        self.pending = 0  # batches whose gradients wait for the next step

    def backward_and_step(self, losses: dict[str, torch.Tensor]) -> None:
        (losses["loss"] / self.accumulate).backward()
        self.pending += 1
        if self.pending == self.accumulate:
            self._step()

    def _step(self) -> None:
        if self.ctx.grad_clip:
            torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], self.ctx.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pending = 0

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        if self.pending:  # an epoch's last, incomplete group still makes a step: checkpoints hold no stray gradients
            self._step()
        return {**super().on_epoch_end(epoch), "optimizer_steps": float(self._steps_taken())}

    def _steps_taken(self) -> int:
        states = [s for s in self.optimizer.state.values() if "step" in s]
        return int(states[0]["step"]) if states else 0

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "accumulate": self.accumulate}
