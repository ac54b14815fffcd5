"""Lightning callbacks: graceful Ctrl-C, gradient-health warnings and text samples in TensorBoard."""

from __future__ import annotations

import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

from nanollm.checkpointing import LAST_NAME
from nanollm.generation import generate_text, usable_prompt


class GracefulInterrupt(L.Callback):
    """First Ctrl-C: finish the current step, save `last.ckpt`, stop. A second Ctrl-C aborts at once."""

    def __init__(self, checkpoint_dir: str | Path):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.requested = False
        self.saved_path: Path | None = None
        self._previous = None

    def _handler(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and _in_main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.requested and not trainer.should_stop:
            self.saved_path = self.checkpoint_dir / LAST_NAME
            trainer.save_checkpoint(self.saved_path, weights_only=False)
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class TrainingHealth(L.Callback):
    """Warns once when the gradient norm stays outside the healthy range for `patience` log intervals."""

    def __init__(self, grad_norm_low: float = 0.01, grad_norm_high: float = 10.0, patience: int = 5):
        self.low, self.high, self.patience = grad_norm_low, grad_norm_high, patience
        self._streak = 0
        self.warned = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        norm = getattr(pl_module, "last_grad_norm", None)
        # The module measures the norm on log steps only; after the step, global_step is a multiple of the interval.
        if norm is None or self.warned or trainer.global_step % trainer.log_every_n_steps:
            return
        self._streak = self._streak + 1 if not (self.low <= norm <= self.high) else 0
        if self._streak >= self.patience:
            self.warned = True
            if norm < self.low:
                advice = "learning has stalled: raise optim.lr or check the data"
            else:
                advice = "training risks instability: lower optim.lr or keep trainer.gradient_clip_val at 1.0"
            trainer.print(
                f"warning: gradient norm {norm:.3g} has been outside the healthy range "
                f"[{self.low}, {self.high}] for {self._streak} log intervals (step {trainer.global_step}); {advice}."
            )


class TextSamples(L.Callback):
    """After each validation, writes a sample from a fixed prompt to TensorBoard to watch text improve."""

    def __init__(self, prompt: str = "The ", max_new_tokens: int = 200, temperature: float = 0.8, top_k: int = 40):
        self.prompt, self.max_new_tokens = prompt, max_new_tokens
        self.temperature, self.top_k = temperature, top_k

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        tokenizer = pl_module.tokenizer
        experiment = getattr(trainer.logger, "experiment", None)
        if trainer.sanity_checking or tokenizer is None or not hasattr(experiment, "add_text"):
            return
        prompt = usable_prompt(tokenizer, self.prompt)
        text = generate_text(
            pl_module.model, tokenizer, prompt, self.max_new_tokens, self.temperature, self.top_k, seed=0
        )
        # Markdown code block keeps line breaks and spacing as generated.
        experiment.add_text("samples/text", "```\n" + text + "\n```", global_step=trainer.global_step)


class TrainingProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, showing the train loss and tokens/s of the last log interval."""

    def get_metrics(self, trainer: L.Trainer, pl_module) -> dict:
        # The module hands training scalars to the loggers directly, so they are not in progress_bar_metrics.
        return {**super().get_metrics(trainer, pl_module), **getattr(pl_module, "progress_metrics", {})}
