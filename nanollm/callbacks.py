"""Lightning callbacks: graceful Ctrl-C, gradient-health warnings and text samples in TensorBoard; and
the checkpoint IO plugin that writes atomically and loads safely."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

from nanollm.checkpointing import LAST_NAME, atomic_torch_save, read_checkpoint
from nanollm.errors import TrainingInterrupted
from nanollm.generation import generate_text, usable_prompt
from nanollm.loggers import log_text_sample


class GracefulInterrupt(L.Callback):
    """Ctrl-C, or SIGTERM (what SLURM and most schedulers send before a time limit or a preemption):
    finish the current optimizer step, save `last.ckpt`, stop. A second Ctrl-C aborts at once.

    Saves happen only at optimizer-step boundaries, never between the micro-batches of an accumulated
    step, so a resumed run continues exactly. Under DDP the processes agree on stopping (one signalled
    process is enough), because the save is collective.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, checkpoint_dir: str | Path, last_name: str = LAST_NAME):
        self.checkpoint_dir, self.last_name = Path(checkpoint_dir), last_name
        self.received: signal.Signals | None = None
        self.saved_path: Path | None = None
        self._previous: dict[signal.Signals, object] = {}
        self._step_at_batch_start = -1

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            # A second Ctrl-C: stop now. Lightning would turn a KeyboardInterrupt into a silent exit(1);
            # this one reaches the command, which names what is kept. A save it cuts short leaves the
            # previous file whole (atomic writes).
            raise TrainingInterrupted.again(self.checkpoint_dir)
        self.received = self.received or signal.Signals(signum)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if _in_main_thread():
            self._previous = {sig: signal.signal(sig, self._handler) for sig in self.SIGNALS}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self._step_at_batch_start or trainer.should_stop:
            return  # inside an accumulated step: its optimizer step has not been taken yet
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        else:
            stop = self.received is not None
        if stop:
            self.saved_path = self.checkpoint_dir / self.last_name
            trainer.save_checkpoint(self.saved_path, weights_only=False)
            trainer.should_stop = True
            # Lightning validates when a run is stopped early; a signalled run should end at once.
            trainer.limit_val_batches = 0

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes atomically and only ever loads with `weights_only=True`."""

    seconds_writing = 0.0  # total time spent in saves, so throughput figures can leave it out

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        started = time.perf_counter()
        try:
            atomic_torch_save(checkpoint, Path(path))
        finally:
            self.seconds_writing += time.perf_counter() - started

    def load_checkpoint(self, path, map_location: Any | None = "cpu", weights_only: bool | None = None) -> dict:
        return read_checkpoint(Path(path), map_location=map_location)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint for the periodic `checkpoint_step_<N>` files (and `last`).

    The last step is saved as `checkpoint_final` by the run itself, so no step file duplicates it
    (the runbook's `ls` shows `checkpoint_step_500.pt  checkpoint_final.pt` for 1000 steps).
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step < trainer.max_steps:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        # Lightning would write `last` once more here (as last-v1 beside the one a signal saved); the run
        # writes `last` itself: a copy of checkpoint_final, or the state GracefulInterrupt saved.
        pass


class TrainingHealth(L.Callback):
    """Warns once when the gradient norm stays outside the healthy range for `patience` log intervals."""

    def __init__(self, grad_norm_low: float = 0.01, grad_norm_high: float = 10.0, patience: int = 5):
        for key, value in (("grad_norm_low", grad_norm_low), ("grad_norm_high", grad_norm_high)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{key} must be a number >= 0, got {value!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an integer >= 1, got {patience!r}")
        self.low, self.high, self.patience = grad_norm_low, grad_norm_high, patience
        self._streak = 0
        self._last_counted_step = -1
        self.warned = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        norm = getattr(pl_module, "last_grad_norm", None)
        # The module measures the norm on log steps only; after the step, global_step is a multiple of the
        # interval. Under gradient accumulation several batches end at that step: count it once.
        step = trainer.global_step
        if norm is None or self.warned or step % trainer.log_every_n_steps or step == self._last_counted_step:
            return
        self._last_counted_step = step
        self._streak = self._streak + 1 if not (self.low <= norm <= self.high) else 0
        if self._streak >= self.patience:
            self.warned = True
            if norm < self.low:
                advice = "learning has stalled: raise optim.lr or check the data"
            else:
                advice = "training risks instability: lower optim.lr or keep trainer.gradient_clip_val at 1.0"
            if trainer.is_global_zero:
                logging.getLogger("nanollm").warning(
                    f"warning: gradient norm {norm:.3g} has been outside the healthy range [{self.low}, {self.high}] "
                    f"for {self._streak} log intervals (step {trainer.global_step}); {advice}."
                )


class TextSamples(L.Callback):
    """After each validation, logs a sample from a fixed prompt to every logger that takes text, to watch
    the text improve."""

    def __init__(
        self,
        prompt: str = "The ",
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int = 40,
        beyond_context: str = "rolling",
    ):
        self.prompt, self.max_new_tokens = prompt, max_new_tokens
        self.temperature, self.top_k, self.beyond_context = temperature, top_k, beyond_context

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        tokenizer = pl_module.tokenizer
        if trainer.sanity_checking or tokenizer is None or not trainer.loggers or not trainer.is_global_zero:
            return
        prompt = usable_prompt(tokenizer, self.prompt)
        text = generate_text(
            pl_module.model,
            tokenizer,
            prompt,
            self.max_new_tokens,
            self.temperature,
            self.top_k,
            seed=0,
            beyond_context=self.beyond_context,
        )
        for logger in trainer.loggers:
            log_text_sample(logger, text, trainer.global_step)


class TrainingProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar for step-based training: optimizer steps out of trainer.max_steps, the train
    loss and tokens/s of the last log interval, and no epoch number or logger version."""

    def on_train_epoch_start(self, trainer: L.Trainer, *args) -> None:
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        bar.n = bar.initial = trainer.global_step  # a resumed run starts part of the way
        bar.set_description(self.train_description, refresh=False)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.train_progress_bar is not None and self._should_update(step, trainer.max_steps):
            self.train_progress_bar.n = step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=True)

    def get_metrics(self, trainer: L.Trainer, pl_module) -> dict:
        # The module hands training scalars to the loggers directly, so they are not in progress_bar_metrics.
        metrics = {**super().get_metrics(trainer, pl_module), **getattr(pl_module, "progress_metrics", {})}
        metrics.pop("v_num", None)  # the logger's version: for us, the run name
        return metrics
