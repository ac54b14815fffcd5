"""The optimizer and its learning-rate schedule (plain PyTorch): AdamW with weight decay on matrices
only, or Muon for the hidden weight matrices with AdamW for the rest; linear warm-up, then cosine decay.

Used by the LightningModule and by the benchmark's bare loop, so both optimise identically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from nanollm.errors import NanoLLMError

OPTIMIZERS = ("adamw", "muon")
# Moonshot's scaling ("Muon is Scalable for LLM Training"): a Muon update of lr * 0.2 * sqrt(max(rows, cols))
# times the orthogonalised momentum has the RMS of a typical AdamW update at lr, in any matrix shape.
# So optim.muon_lr is on AdamW's scale and its weight decay means what AdamW's does (torch's Muon shrinks
# by lr * weight_decay per step). Keller Jordan's "original" scaling needs lr ~0.02 and a much smaller
# decay for the same effect.
MUON_ADJUST_LR = "match_rms_adamw"


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


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for the hidden weight matrices and AdamW for the rest, as the one optimizer that Lightning's
    automatic optimization, gradient clipping, the LR scheduler and checkpoints expect.

    Its param_groups are the inner optimizers' own group dicts (AdamW's first) and its `state` is the
    dict both inner optimizers read, so whatever sets a group's lr or moves the state to a device
    reaches them; its state_dict is the ordinary one of all those groups.
    """

    def __init__(self, adamw: torch.optim.AdamW, muon: torch.optim.Muon):
        self.adamw, self.muon = adamw, muon
        super().__init__([*adamw.param_groups, *muon.param_groups], defaults={})
        self._share()

    def _share(self) -> None:
        """Point the inner optimizers at this optimizer's groups and state (again after a load replaced them)."""
        count = len(self.adamw.param_groups)
        # __setstate__ is how Optimizer.load_state_dict installs groups and state; AdamW's also fills in defaults.
        self.adamw.__setstate__({"param_groups": self.param_groups[:count], "state": self.state})
        self.muon.__setstate__({"param_groups": self.param_groups[count:], "state": self.state})

    def step(self, closure=None):
        loss = None
        if closure is not None:  # Lightning's forward and backward pass: run once, for both optimizers
            with torch.enable_grad():
                loss = closure()
        self.adamw.step()
        self.muon.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._share()


def is_muon_group(group: Mapping) -> bool:
    """Whether a parameter group is Muon's (only Muon's groups have Newton-Schulz settings)."""
    return "ns_steps" in group


def _check_same_optimizer(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """A load_state_dict pre-hook: a state saved by the other optimizer is a user's mistake, not a bug."""
    saved, wanted = (
        "muon" if any(is_muon_group(group) for group in groups) else "adamw"
        for groups in (state_dict["param_groups"], optimizer.param_groups)
    )
    if saved != wanted:
        raise NanoLLMError(
            f"The checkpoint's optimizer state is for optim={saved}, but this run uses optim={wanted}: resume with the "
            "checkpoint's optimizer (leave out optim=...), or start a new run from its weights with init_from=."
        )


def build_optimizer(
    model: torch.nn.Module, optim: Mapping, max_steps: int, fused: bool = False
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer and its per-step schedule for `max_steps` steps, as `optim` (the config group) says."""
    name = optim.get("name") or "adamw"  # checkpoints from before optim=muon have no name
    if name not in OPTIMIZERS:
        raise NanoLLMError(f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {name!r}.")
    trained = [p for p in model.parameters() if p.requires_grad]
    # The hidden matrices: the weights of attention's and the feed-forward network's linear layers. Embeddings
    # (and the LM head tied to the token embedding) are lookups rather than hidden transforms: AdamW's.
    linear = [m.weight for m in model.blocks.modules() if isinstance(m, torch.nn.Linear)] if name == "muon" else []
    for weight in linear:
        if weight.dim() != 2:  # FSDP, for one, flattens parameters into 1-D shards
            raise NanoLLMError(
                f"optim=muon orthogonalises whole weight matrices, but found a weight of shape {tuple(weight.shape)} "
                "(sharded by trainer=fsdp?); use trainer=ddp, or optim=adamw."
            )
    hidden = {id(p) for p in linear}
    groups = [
        {"params": [p for p in trained if p.dim() >= 2 and id(p) not in hidden], "weight_decay": optim["weight_decay"]},
        {"params": [p for p in trained if p.dim() < 2], "weight_decay": 0.0},  # biases and LayerNorm gains
    ]
    optimizer = torch.optim.AdamW(groups, lr=optim["lr"], betas=tuple(optim["betas"]), fused=fused or None)
    if name == "muon":
        muon = torch.optim.Muon(
            [p for p in trained if id(p) in hidden],
            lr=optim["muon_lr"],
            weight_decay=optim["muon_weight_decay"],
            momentum=optim["momentum"],
            nesterov=bool(optim["nesterov"]),
            ns_steps=int(optim["ns_steps"]),
            adjust_lr_fn=MUON_ADJUST_LR,
        )
        optimizer = MuonWithAdamW(optimizer, muon)
    optimizer.register_load_state_dict_pre_hook(_check_same_optimizer)
    # One multiplier for every group: each group's own peak rate (optim.lr, optim.muon_lr) times the schedule.
    schedule = WarmupCosine(optim["warmup_steps"], max_steps, optim["min_lr_ratio"])
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def apply_new_settings(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    optim: Mapping,
    max_steps: int,
    step: int,
) -> None:
    """After a resume with changed settings: the new peak rates, momenta and weight decays, and a schedule
    stretched to the new `max_steps` that continues from where the restored one stood at `step`."""
    old: WarmupCosine = scheduler.lr_lambdas[0]
    new = old.continued(step, int(optim["warmup_steps"]), max_steps, float(optim["min_lr_ratio"]))
    adamw_decays = iter((True, False))  # AdamW's groups: matrices and embeddings, then biases and gains
    for group in optimizer.param_groups:
        if is_muon_group(group):
            group["initial_lr"] = float(optim["muon_lr"])
            group["weight_decay"] = float(optim["muon_weight_decay"])
            group["momentum"] = float(optim["momentum"])
            group["nesterov"] = bool(optim["nesterov"])
            group["ns_steps"] = int(optim["ns_steps"])
        else:
            group["initial_lr"] = float(optim["lr"])
            group["weight_decay"] = float(optim["weight_decay"]) if next(adamw_decays, False) else 0.0
            group["betas"] = tuple(optim["betas"])
        group["lr"] = group["initial_lr"] * new(step)
    scheduler.lr_lambdas = [new] * len(optimizer.param_groups)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
