"""The LightningModule: next-token loss, metrics, AdamW with decay groups, warm-up + cosine schedule."""

from __future__ import annotations

import math
import time

import lightning as L
import numpy as np
import torch

from nanollm.checkpointing import FORMAT_VERSION, NANOLLM_KEY
from nanollm.errors import NanoLLMError
from nanollm.model import ModelConfig, TransformerLanguageModel
from nanollm.optim import apply_new_settings, build_optimizer
from nanollm.tokenizer import CharTokenizer


class NonFiniteLossError(NanoLLMError):
    """The loss became NaN or infinite: training stops before anything bad is saved."""


class LanguageModelModule(L.LightningModule):
    """Trains a TransformerLanguageModel. Metrics are accumulated on the device and logged every
    `log_every_n_steps`, so a training step never waits on the host."""

    def __init__(
        self,
        model_config: dict,
        optim: dict,
        tokenizer: dict | None = None,
        run_config: dict | None = None,
        seed: int = 0,
        compile: bool | str = False,
        model: TransformerLanguageModel | None = None,
    ):
        super().__init__()
        # Plain dicts only: checkpoints must load with torch.load(weights_only=True).
        # logger=False: the HParams tab gets these at the end of training, together with the final metrics.
        self.save_hyperparameters(ignore=["model", "run_config", "tokenizer"], logger=False)
        # from_saved: load_from_checkpoint passes the saved hparams, which predate RoPE in old checkpoints.
        self.model = model if model is not None else TransformerLanguageModel(ModelConfig.from_saved(model_config))
        self.tokenizer = CharTokenizer.from_dict(tokenizer) if tokenizer else None
        self.run_config = run_config or {}
        self.optim = optim
        self.seed = seed
        if compile:  # true, or a torch.compile mode such as "reduce-overhead"
            # In place: state-dict keys stay those of the plain model.
            self.model.compile(mode=None if compile is True else compile)
        self._interval_losses = torch.zeros(0)  # sized in on_train_start
        self._reset_interval()
        self.last_grad_norm: float | None = None
        self.last_train_loss: float | None = None
        self.val_history: list[dict] = []
        self.first_step_time: float | None = None  # wall clock at the end of this process's first step
        self.progress_metrics: dict[str, str] = {}  # shown by the progress bar
        # Set when a resumed run changed optimizer or schedule settings: they apply from the restored step on.
        self.apply_new_settings_on_resume = False
        self._paused_seconds = 0.0  # validation and checkpoint time inside the current log interval
        self._paused_since: float | None = None

    def __setattr__(self, name: str, value) -> None:
        # Lightning records the running hook in `_current_fx_name` twice per hook call, ~30 times a step;
        # nn.Module's parameter/buffer/submodule checks are wasted on it (~0.05 ms a step, measured).
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        # Our batches are always (x, y): move them directly, asynchronously from pinned memory on GPUs.
        x, y = batch
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    # ---- training -----------------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Dropout's randomness is a function of (seed, rank, batch index): a resumed run draws the same masks,
        # while the micro-batches of an accumulated step and the processes of a DDP run all draw different ones.
        if self.model.config.dropout > 0:
            accumulate = self.trainer.accumulate_grad_batches
            index = self.global_step * accumulate + batch_idx % accumulate
            torch.manual_seed(dropout_seed(self.seed, self.global_rank, index))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        _, loss = self.model(x, y)
        # One device write per batch; the interval's mean and any non-finite step are read at log time.
        self._interval_losses[self._interval_steps] = loss.detach()
        self._interval_steps += 1
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.first_step_time is None:
            self.first_step_time = time.time()

    def on_before_optimizer_step(self, optimizer) -> None:
        # Once per optimizer step, after every accumulated batch's backward pass.
        if self._is_log_step():
            self._log_interval(optimizer)

    def _is_log_step(self) -> bool:
        # Every log_every_n_steps optimizer steps, and the last step, so the final loss is always measured.
        if self._trainer is None:
            return False
        step = self.global_step + 1
        return step % self.trainer.log_every_n_steps == 0 or step == self.trainer.max_steps

    def _log_interval(self, optimizer) -> None:
        self.check_finite()
        now = time.perf_counter()
        # Averaged over processes under DDP (one collective per log interval, none per step).
        mean_loss = self.trainer.strategy.reduce(self._interval_losses[: self._interval_steps].mean(), reduce_op="mean")
        tokens = (self._interval_steps - self._untimed_steps) * self._tokens_per_batch()
        elapsed = now - self._interval_start - self._paused_seconds - self._checkpoint_seconds()
        grad_norm = self._gradient_norm()
        self.last_train_loss, self.last_grad_norm = float(mean_loss), float(grad_norm)
        metrics = {
            "train/loss": self.last_train_loss,
            "train/lr": optimizer.param_groups[0]["lr"],
            "train/tokens_per_second": tokens / max(elapsed, 1e-9),
            "train/grad_norm": self.last_grad_norm,
        }
        # Already reduced over the interval, so they go straight to the loggers, as Lightning's own
        # LearningRateMonitor does: self.log would add ~0.6 ms of metric bookkeeping per value (measured).
        # The step is the number of optimizer steps completed once this one is taken.
        self._to_loggers(metrics, step=self.global_step + 1)
        self.progress_metrics = {
            "loss": f"{self.last_train_loss:.4f}",
            "tokens/s": f"{metrics['train/tokens_per_second']:,.0f}",
        }
        self._reset_interval(now)

    def _to_loggers(self, metrics: dict[str, float], step: int) -> None:
        # Lightning's loggers write on rank 0 only.
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)

    def _reset_interval(self, now: float | None = None) -> None:
        self._interval_steps = 0
        self._untimed_steps = 0  # steps of this interval run before a resume, outside the timer
        self._interval_first_step = self.global_step + 1 if self._trainer is not None else 0
        self._interval_start = now if now is not None else time.perf_counter()
        self._paused_seconds = 0.0
        self._checkpoint_seconds_at_start = self._checkpoint_seconds(0.0)

    def _checkpoint_seconds(self, since: float | None = None) -> float:
        """Seconds spent writing checkpoints since the interval started (they are not training time)."""
        io = getattr(self._trainer.strategy, "checkpoint_io", None) if self._trainer is not None else None
        total = getattr(io, "seconds_writing", 0.0)
        return total - (self._checkpoint_seconds_at_start if since is None else since)

    def _tokens_per_batch(self) -> int:
        # data.batch_size is the global batch (split across processes), so this counts every process's tokens.
        dm = self.trainer.datamodule
        return dm.batch_size * self.model.config.context_length if dm is not None else 0

    def on_train_start(self) -> None:
        if self.apply_new_settings_on_resume:
            config = self.lr_schedulers()
            apply_new_settings(
                self.optimizers(use_pl_optimizer=False), config, self.optim, self.trainer.max_steps, self.global_step
            )
        self._reset_interval()
        restored = getattr(self, "_restored_interval", None)
        losses = restored["losses"].to(self.device) if restored else torch.zeros(0, device=self.device)
        # One entry per batch: an interval holds log_every_n_steps optimizer steps of accumulate_grad_batches each.
        size = max(self.trainer.log_every_n_steps * self.trainer.accumulate_grad_batches, len(losses) + 1)
        self._interval_losses = torch.zeros(size, device=self.device)
        self._interval_losses[: len(losses)] = losses
        self._interval_steps = self._untimed_steps = len(losses)
        self._interval_first_step = self.global_step - len(losses) // self.trainer.accumulate_grad_batches

    def check_finite(self) -> None:
        """Raise (stopping training) if a step of the current interval had a non-finite loss."""
        finite = torch.isfinite(self._interval_losses[: self._interval_steps])
        if not bool(finite.all()):
            step = self._interval_first_step + int((~finite).nonzero()[0]) // self.trainer.accumulate_grad_batches
            raise NonFiniteLossError(
                f"Loss became NaN/Inf at step {step}; training stopped and no checkpoint of the diverged weights was saved. "
                f"{self._after_divergence()}"
            )

    def _after_divergence(self) -> str:
        """What to do after the run diverged: resume from its last good checkpoint, if it has one."""
        lower = f"Lower the learning rate (e.g. optim.lr={self.optim['lr'] / 10:g})"
        saved = self.trainer.ckpt_path is not None or any(
            getattr(c, "last_model_path", "") or getattr(c, "best_model_path", "")
            for c in self.trainer.checkpoint_callbacks
        )
        if saved:
            return f"{lower} and resume from the last checkpoint (ckpt_path=last)."
        return f"{lower} and start again: no checkpoint was saved before it diverged."

    # ---- validation ---------------------------------------------------------------------
    def on_validation_start(self) -> None:
        self._paused_since = time.perf_counter()  # validation time is not training time (tokens/s)

    def on_validation_end(self) -> None:
        if self._paused_since is not None:
            self._paused_seconds += time.perf_counter() - self._paused_since
            self._paused_since = None

    def on_validation_epoch_start(self) -> None:
        self._val_loss_sum = torch.zeros((), device=self.device)
        self._val_tokens = torch.zeros((), device=self.device)
        datamodule = self.trainer.datamodule
        if datamodule is not None and self.global_step >= self.trainer.max_steps:
            datamodule.score_every_val_window()  # the run's final validation loss is a full pass

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        _, loss = self.model(x, y)
        # Token-weighted so the last, smaller batch counts for what it holds.
        self._val_loss_sum += loss.detach() * y.numel()
        self._val_tokens += y.numel()

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        loss_sum, tokens = self.all_gather(self._val_loss_sum).sum(), self.all_gather(self._val_tokens).sum()
        val_loss = loss_sum / tokens.clamp(min=1)
        perplexity = torch.exp(val_loss)
        # Already gathered above, so every process holds the same values. self.log (without the loggers)
        # keeps them in callback_metrics for the progress bar and `monitor=` callbacks; the loggers get
        # them directly at the optimizer step. A logged "step" would also rename checkpoints: ModelCheckpoint
        # fills `{step}` from callback_metrics.
        self.log("val/loss", val_loss, logger=False, rank_zero_only=True)
        self.log("val/perplexity", perplexity, prog_bar=True, logger=False, rank_zero_only=True)
        self._to_loggers({"val/loss": float(val_loss), "val/perplexity": float(perplexity)}, step=self.global_step)
        datamodule = self.trainer.datamodule
        full = datamodule is None or int(tokens) >= datamodule.num_val_windows * self.model.config.context_length
        self.val_history.append({"step": int(self.global_step), "val_loss": float(val_loss), "full_pass": full})

    # ---- optimisation -------------------------------------------------------------------
    def _sharded_root(self):
        """The FSDP-wrapped model under trainer=fsdp, else None: each process holds only a shard of the gradients."""
        from lightning.pytorch.strategies import FSDPStrategy

        return self.trainer.model if isinstance(self.trainer.strategy, FSDPStrategy) else None

    def _gradient_norm(self) -> torch.Tensor:
        """The norm of all gradients before clipping, i.e. what the data asked for (over every shard under FSDP)."""
        root = self._sharded_root()
        if root is not None:  # collective: every process logs at the same steps
            return root.clip_grad_norm_(float("inf"))
        return torch.nn.utils.get_total_norm([p.grad for p in self.parameters() if p.grad is not None])

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        by_norm = bool(gradient_clip_val) and gradient_clip_algorithm in (None, "norm")
        root = self._sharded_root() if by_norm else None
        if root is not None:
            # Lightning refuses norm clipping under FSDP (the gradients are sharded); FSDP's own
            # clip_grad_norm_ computes the norm over every shard.
            root.clip_grad_norm_(gradient_clip_val)
        elif (
            by_norm
            and getattr(optimizer, "_step_supports_amp_scaling", False)
            and "bf16" in str(self.trainer.precision)
        ):
            # A fused optimizer under bf16-mixed: Lightning refuses to clip, fearing a GradScaler that
            # unscales inside the step; bf16 uses no scaler, so the gradients are clipped as they are.
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], gradient_clip_val)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        # The fused kernel on CPUs too: a 3x faster optimizer step there (2.1 -> 0.7 ms for the reference model).
        # Not with float16's GradScaler: a fused step unscales the gradients itself, after clipping would run.
        fused = (
            bool(self.optim.get("fused"))
            and self.device.type in ("cuda", "cpu")
            and not str(self.trainer.precision).startswith("16")
        )
        optimizer, schedule = build_optimizer(self.model, self.optim, self.trainer.max_steps, fused=fused)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- checkpoints --------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Never write diverged weights: the previous checkpoint stays the newest good one.
        self.check_finite()
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise NonFiniteLossError(
                f"Weights became NaN/Inf by step {self.global_step}; no checkpoint was written. {self._after_divergence()}"
            )
        checkpoint[NANOLLM_KEY] = {
            "format_version": FORMAT_VERSION,
            "model": self.model.config.to_dict(),
            "tokenizer": self.tokenizer.to_dict() if self.tokenizer else None,
            "config": self.run_config,
            "train_loss": self.last_train_loss,
            "grad_norm": self.last_grad_norm,
            "val_history": list(self.val_history),
            # The running mean of the current log interval, so a resumed run reports the same losses.
            "interval": {"losses": self._interval_losses[: self._interval_steps].cpu()},
        }
        # The keys the runbook documents. torch.save writes a tensor shared by two entries once, so these
        # aliases of the weights and optimizer state cost no space.
        checkpoint["model_state_dict"] = self.model.state_dict()
        checkpoint["optimizer_state_dict"] = (checkpoint.get("optimizer_states") or [None])[0]
        checkpoint["step"] = self.global_step
        checkpoint["loss"] = self.last_train_loss
        checkpoint["config"] = self.run_config

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get(NANOLLM_KEY, {})
        self.val_history = list(saved.get("val_history", []))
        self.last_train_loss = saved.get("train_loss")
        self.last_grad_norm = saved.get("grad_norm")
        self._restored_interval = saved.get("interval")
        if self.tokenizer is None and saved.get("tokenizer"):  # LanguageModelModule.load_from_checkpoint(path)
            self.tokenizer = CharTokenizer.from_dict(saved["tokenizer"])


def dropout_seed(seed: int, rank: int, batch_index: int) -> int:
    """A well-mixed 63-bit seed per (seed, rank, batch index), so neighbouring batches get unrelated masks."""
    return int(np.random.SeedSequence([seed, rank, batch_index]).generate_state(1, np.uint64)[0] >> 1)


def perplexity(loss: float | None) -> float | None:
    return math.exp(loss) if loss is not None and loss < 700 else None
