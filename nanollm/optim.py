"""AdamW with weight decay on matrices only, and linear warm-up then cosine decay (plain PyTorch).

Used by the LightningModule and by the benchmark's bare loop, so both optimise identically.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def build_optimizer(
    model: torch.nn.Module, optim: Mapping, max_steps: int, fused: bool = False
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimizer and its per-step schedule for `max_steps` steps, as `optim` (the config group) says."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": optim["weight_decay"]},  # matrices and embeddings
        {"params": no_decay, "weight_decay": 0.0},  # biases and LayerNorm gains
    ]
    optimizer = torch.optim.AdamW(groups, lr=optim["lr"], betas=tuple(optim["betas"]), fused=fused or None)
    max_steps = max(int(max_steps), 1)
    warmup = min(int(optim["warmup_steps"]), max_steps - 1)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(max_steps - warmup, 1), eta_min=optim["lr"] * float(optim["min_lr_ratio"])
    )
    if warmup == 0:
        return optimizer, cosine
    linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warmup, total_iters=warmup)
    return optimizer, torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])
