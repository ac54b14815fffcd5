"""AdamW with weight decay on matrices only, and linear warm-up then cosine decay (plain PyTorch).

Used by the LightningModule and by the benchmark's bare loop, so both optimise identically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


class WarmupCosine:
    """The learning-rate multiplier at each optimizer step: linear warm-up to 1, then cosine decay to
    `min_ratio` at `max_steps`.

    A resumed run whose settings changed continues from where the old schedule stood: from step
    `from_step` the cosine's phase runs on from `from_phase` (in [0, pi]) to pi at the new `max_steps`,
    so the rate never jumps back up. A callable object rather than a function, so that LambdaLR stores
    its fields in checkpoints and a resumed run restores exactly this schedule.
    """

    def __init__(self, warmup: int, max_steps: int, min_ratio: float, from_step: int = 0, from_phase: float = 0.0):
        self.max_steps = max(int(max_steps), 1)
        self.warmup = min(int(warmup), self.max_steps - 1)
        self.min_ratio = float(min_ratio)
        self.from_step, self.from_phase = int(from_step), float(from_phase)

    def phase(self, step: int) -> float:
        """The cosine's angle at `step`: 0 at the end of warm-up, pi at `max_steps`."""
        start, start_phase = max(self.from_step, self.warmup), self.from_phase if self.from_step > self.warmup else 0.0
        span = max(self.max_steps - start, 1)
        return start_phase + (math.pi - start_phase) * min(max(step - start, 0), span) / span

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return 1.0 / self.warmup + (1.0 - 1.0 / self.warmup) * step / self.warmup
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(self.phase(step)))

    def continued(self, step: int, warmup: int, max_steps: int, min_ratio: float) -> WarmupCosine:
        """The schedule for new settings from `step` on, starting at this schedule's multiplier there."""
        if step <= warmup:  # still warming up: the new schedule's warm-up takes over where this one is
            return WarmupCosine(warmup, max_steps, min_ratio)
        fraction = (self(step) - min_ratio) / (1.0 - min_ratio) if min_ratio < 1 else 0.0
        return WarmupCosine(warmup, max_steps, min_ratio, step, math.acos(2 * min(max(fraction, 0.0), 1.0) - 1))


def build_optimizer(
    model: torch.nn.Module, optim: Mapping, max_steps: int, fused: bool = False
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer and its per-step schedule for `max_steps` steps, as `optim` (the config group) says."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": optim["weight_decay"]},  # matrices and embeddings
        {"params": no_decay, "weight_decay": 0.0},  # biases and LayerNorm gains
    ]
    optimizer = torch.optim.AdamW(groups, lr=optim["lr"], betas=tuple(optim["betas"]), fused=fused or None)
    schedule = WarmupCosine(optim["warmup_steps"], max_steps, optim["min_lr_ratio"])
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def apply_new_settings(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    optim: Mapping,
    max_steps: int,
    step: int,
) -> None:
    """After a resume with changed settings: the new peak rate, betas and weight decay, and a schedule
    stretched to the new `max_steps` that continues from where the restored one stood at `step`."""
    old: WarmupCosine = scheduler.lr_lambdas[0]
    new = old.continued(step, int(optim["warmup_steps"]), max_steps, float(optim["min_lr_ratio"]))
    scheduler.lr_lambdas = [new] * len(optimizer.param_groups)
    scheduler.base_lrs = [float(optim["lr"])] * len(optimizer.param_groups)
    for group, decays in zip(optimizer.param_groups, (True, False), strict=False):
        group["initial_lr"] = float(optim["lr"])
        group["lr"] = float(optim["lr"]) * new(step)
        group["betas"] = tuple(optim["betas"])
        group["weight_decay"] = float(optim["weight_decay"]) if decays else 0.0
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
