"""`run(cfg)`: build the data module, model and Lightning Trainer from a config, train, report.

Used by `train.py` and by the Python API, so both train on exactly the same path.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from nanollm.allocator import keep_freed_memory
from nanollm.callbacks import GracefulInterrupt, SafeCheckpointIO, StepCheckpoint, TrainingProgressBar
from nanollm.checkpointing import atomic_copy, keep_finished_state
from nanollm.config import model_config_from, validate_config
from nanollm.corpus import DEFAULT_GLOB, EncodedCorpus
from nanollm.data import CharDataModule
from nanollm.distributed import shared_plan
from nanollm.errors import NanoLLMError
from nanollm.files import atomic_write_text, remove_unused_run_dir
from nanollm.generation import generate_text, usable_prompt
from nanollm.locking import releasing_directories
from nanollm.loggers import EXTRAS, log_final
from nanollm.model import TransformerLanguageModel
from nanollm.module import LanguageModelModule, perplexity
from nanollm.start import Start, load_start, plan_start, rerun_config, start_weights
from nanollm.tokenizer import CharTokenizer

# Our batches come from vectorised indexing into a memmap; worker processes would only add IPC.
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__` defined.*")
warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
warnings.filterwarnings("ignore", message=".*overridden `transfer_batch_to_device`.*")
warnings.filterwarnings("ignore", message=".*torch.distributed.nn.functional.all_gather is deprecated.*")
# Validation metrics are all-gathered by the module itself before logging, so they agree on every rank.
warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting.*")


# Validation batches of about this many tokens were the fastest on a 2-core CPU, for every preset
# (BENCHMARKS.md; larger ones fall out of the caches). data.val_batch_size overrides it (raise it on GPUs).
VAL_BATCH_TOKENS = 4096


@releasing_directories
def run(
    cfg: DictConfig,
    model: TransformerLanguageModel | None = None,
    corpus: EncodedCorpus | None = None,
    callbacks: list[L.Callback] | None = None,
    echo=print,
    explicit: set[str] | None = None,
    extension: str = ".ckpt",
    results_file: bool = True,
) -> dict[str, Any]:
    """Train as `cfg` says and return the results (also written to `<run_dir>/results.json`).

    `explicit`: the config keys the user set (a resumed run takes every other recipe setting from its
    checkpoint). The runbook API writes `.pt` checkpoints and no results.json: its directory holds
    exactly the files the runbook lists.
    """
    validate_config(cfg)
    keep_freed_memory()  # tensor memory freed at one step is reused at the next (allocator.py)
    start = start_run(cfg, explicit or set())
    cfg = start.config
    validate_config(cfg)
    L.seed_everything(start.seed, workers=True, verbose=False)
    if uses_cuda(cfg.trainer):
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and newer

    datamodule = build_datamodule(cfg, corpus, start.seed)
    tokenizer, added = run_vocabulary(datamodule, start)
    module = LanguageModelModule(
        model_config=(model.config if model is not None else model_config_from(cfg, tokenizer.vocab_size)).to_dict(),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        tokenizer=tokenizer.to_dict() if tokenizer is not None else None,
        run_config=OmegaConf.to_container(cfg, resolve=True),
        seed=start.seed,
        compile=cfg.get("compile", False),
        model=model if model is not None else start_weights(model_config_from(cfg, tokenizer.vocab_size), start),
    )
    module.apply_new_settings_on_resume = any(c.startswith(("optim.", "trainer.max_steps")) for c in start.changes)
    checkpoint_dir = Path(cfg.checkpoint_dir)
    interrupt = GracefulInterrupt(checkpoint_dir, last_name=f"last{extension}")
    trainer = build_trainer(cfg, [*(callbacks or []), interrupt], extension)

    if trainer.is_global_zero:
        echo(_summary(cfg, module, datamodule, trainer, start, added))
        if results_file:  # the runbook API's directory holds its checkpoints alone
            atomic_write_text(Path(cfg.run_dir) / "run_config.yaml", rerun_config(start), what="run config")
        if start.kind == "resume":
            keep_finished_state(checkpoint_dir / f"checkpoint_final{extension}", int(start.checkpoint["global_step"]))
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=_resume_path(start), weights_only=True)
    training_time = time.perf_counter() - started

    final_path = checkpoint_dir / f"checkpoint_final{extension}"
    if interrupt.saved_path is None:
        finish_training(trainer, module, datamodule, final_path, extension)
    results = _results(cfg, module, trainer, training_time, final_path, interrupt, start, added)
    _log_hparams(trainer, cfg, results)
    if trainer.is_global_zero:
        if tokenizer is not None and cfg.sample.max_new_tokens > 0:
            results["sample"] = sample_text(module.model, tokenizer, cfg.sample)
        if results_file:
            atomic_write_text(Path(cfg.run_dir) / "results.json", json.dumps(results, indent=2) + "\n", what="results")
    return results


def start_run(cfg: DictConfig, explicit: set[str]) -> Start:
    """Rank 0 plans the start (run directory, checkpoint, seed); every process follows that plan."""
    # The run directory too: Lightning's SLURM auto-requeue saves hpc_ckpt_<n>.ckpt there.
    own_dirs = list(dict.fromkeys([Path(cfg.checkpoint_dir), Path(cfg.run_dir)]))
    plan = shared_plan(cfg.trainer, lambda: plan_start(cfg, own_dirs))
    if Path(plan["run_dir"]) != Path(cfg.run_dir):  # another node's process: rank 0's directory replaces its own
        remove_unused_run_dir(Path(cfg.run_dir))
    return load_start(cfg, plan, explicit)


def _resume_path(start: Start) -> str | None:
    return str(start.path) if start.kind == "resume" else None


def uses_cuda(trainer_cfg: DictConfig) -> bool:
    accelerator = str(trainer_cfg.get("accelerator"))
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def build_datamodule(cfg: DictConfig, corpus: EncodedCorpus | None, seed: int) -> CharDataModule:
    datamodule = CharDataModule(
        path=None if corpus is not None else cfg.data.path,
        context_length=cfg.model.context_length,
        batch_size=cfg.data.batch_size,
        val_fraction=cfg.data.val_fraction,
        seed=seed,
        cache_dir=cfg.data.get("cache_dir"),
        corpus=corpus,
        pin_memory=uses_cuda(cfg.trainer),
        glob=cfg.data.get("glob") or DEFAULT_GLOB,
        val_batch_size=cfg.data.get("val_batch_size") or max(VAL_BATCH_TOKENS // cfg.model.context_length, 1),
        val_windows=cfg.data.get("val_windows"),
        overfit_batches=cfg.data.get("overfit_batches") or 0,
    )
    datamodule.setup("fit")
    return datamodule


def run_vocabulary(datamodule: CharDataModule, start: Start) -> tuple[CharTokenizer | None, int]:
    """The model's vocabulary and how many characters fine-tuning added to it.

    A resumed run keeps its checkpoint's vocabulary, which must hold every character of the data;
    fine-tuning (`init_from`) appends the new text's unseen characters to it.
    """
    text_tokenizer = datamodule.corpus.tokenizer
    if start.tokenizer is None or text_tokenizer is None:
        return text_tokenizer, 0
    if start.kind == "resume":
        unseen = sorted(set(text_tokenizer.chars) - set(start.tokenizer.chars))
        if unseen:
            raise NanoLLMError(
                f"Checkpoint '{start.path}' was trained on text with a different character set than data.path "
                f"({len(unseen)} new character(s), e.g. {unseen[:5]!r}); resume with the same data, or fine-tune "
                f"on the new text with init_from={start.path}."
            )
        tokenizer = start.tokenizer
    else:
        tokenizer = start.tokenizer.extended(text_tokenizer.chars)
    datamodule.use_vocabulary(tokenizer)
    return tokenizer, tokenizer.vocab_size - start.tokenizer.vocab_size


def build_trainer(cfg: DictConfig, extra_callbacks: list[L.Callback], extension: str) -> L.Trainer:
    callbacks = [_instantiate_callback(name, c) for name, c in (cfg.get("callbacks") or {}).items() if c is not None]
    for callback in callbacks:
        if isinstance(callback, ModelCheckpoint):
            callback.FILE_EXTENSION = extension
    callbacks += extra_callbacks
    if cfg.trainer.get("enable_progress_bar", True):
        # tqdm, explicitly: Lightning picks its Rich bar when `rich` is installed, which shows "Epoch 0/-2"
        # for step-based training. Redrawn on the logging interval, when the shown metrics change.
        callbacks.append(TrainingProgressBar(refresh_rate=cfg.trainer.log_every_n_steps))
    loggers = [instantiate_logger(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    try:
        return instantiate(
            cfg.trainer,
            callbacks=callbacks,
            logger=loggers or False,
            plugins=[SafeCheckpointIO()],
            val_check_interval=_val_check_batches(cfg.trainer),
            _convert_="partial",
        )
    except InstantiationException as err:
        raise NanoLLMError(
            f"Lightning refused the trainer settings: {_refusal(err)} (check the trainer.* overrides)."
        ) from None


def _instantiate_callback(name: str, callback_cfg: DictConfig) -> L.Callback:
    try:
        return instantiate(callback_cfg)
    except InstantiationException as err:
        raise NanoLLMError(
            f"callbacks.{name} refused its settings: {_refusal(err)} (check the callbacks.{name}.* overrides)."
        ) from None


def _refusal(err: InstantiationException) -> str:
    """The first line of what the instantiated class raised (Hydra wraps it), or its type when it says nothing."""
    cause = err.__cause__ or err
    text = str(cause).strip()
    return text.splitlines()[0] if text else type(cause).__name__


def instantiate_logger(logger_cfg: DictConfig):
    """A Lightning logger from its config; a tracker whose package is missing names the extra to install."""
    if str(logger_cfg.get("tracking_uri", "")).startswith("file:"):
        # MLflow 3 keeps its local file store (no server, no database) behind this switch.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        return instantiate(logger_cfg)
    except InstantiationException as err:
        cause = err.__cause__
        name = str(logger_cfg.get("_target_", "")).rsplit(".", 1)[-1]
        if isinstance(cause, (ImportError, ModuleNotFoundError)) and name in EXTRAS:
            extra = EXTRAS[name]
            raise NanoLLMError(
                f"logger={extra} needs the optional '{extra}' extra: pip install -e '.[{extra}]' (or use logger=csv)."
            ) from None
        raise NanoLLMError(f"Could not create the logger {name}: {_refusal(err)}") from None


def _val_check_batches(trainer_cfg: DictConfig):
    # Lightning counts val_check_interval in batches; ours is in optimizer steps, like every other interval.
    interval = trainer_cfg.get("val_check_interval")
    if isinstance(interval, int) and not isinstance(interval, bool):
        return interval * int(trainer_cfg.get("accumulate_grad_batches") or 1)
    return interval


def finish_training(trainer: L.Trainer, module: LanguageModelModule, datamodule, final_path: Path, extension: str):
    """Validate at the last step if that was not done, save the final checkpoint, `last` and `best`."""
    last = module.val_history[-1] if module.val_history else {}
    if last.get("step") != trainer.global_step or not last.get("full_pass", True):
        trainer.validate(module, datamodule=datamodule, verbose=False, weights_only=True)  # a full pass
    trainer.save_checkpoint(final_path, weights_only=False)
    if not trainer.is_global_zero:
        return
    step_checkpoints = next((c for c in trainer.checkpoint_callbacks if isinstance(c, StepCheckpoint)), None)
    if step_checkpoints is not None and step_checkpoints.save_last:
        atomic_copy(final_path, final_path.with_name(f"last{extension}"))
    # The validation after training runs outside fit, where ModelCheckpoint does not save: if it is the best
    # so far, the final checkpoint is the best one.
    best = _best_checkpoint_callback(trainer)
    final_loss = module.val_history[-1]["val_loss"] if module.val_history else None
    if best is not None and final_loss is not None and final_loss <= min(h["val_loss"] for h in module.val_history):
        best_path = Path(best.dirpath) / f"{best.filename}{extension}"
        if best.best_model_path != str(best_path) or float(best.best_model_score) > final_loss:
            atomic_copy(final_path, best_path)
            best.best_model_path, best.best_model_score = str(best_path), torch.tensor(final_loss)


def _best_checkpoint_callback(trainer: L.Trainer) -> ModelCheckpoint | None:
    return next((c for c in trainer.checkpoint_callbacks if c.monitor == "val/loss"), None)


def _summary(cfg, module, datamodule, trainer, start: Start, added: int) -> str:
    lines = [
        f"nanollm | model {cfg.model.get('name', 'custom')} | {module.model.num_parameters():,} parameters | "
        f"vocabulary {module.model.config.vocab_size} | train {len(datamodule.train_tokens):,} tokens | "
        f"val {len(datamodule.val_tokens):,} tokens",
        f"device {trainer.strategy.root_device} x{trainer.world_size} | precision {trainer.precision} | "
        f"{cfg.trainer.max_steps} steps of {cfg.data.batch_size} x {cfg.model.context_length} tokens"
        + (f" x {trainer.accumulate_grad_batches} batches" if trainer.accumulate_grad_batches > 1 else "")
        + f" | seed {start.seed}",
        f"run directory {cfg.run_dir}",
    ]
    if start.kind == "resume":
        lines.append(f"resuming from {start.path}")
    if start.changes:
        lines.append(
            f"resuming with changed settings: {'; '.join(start.changes)} (they apply from step "
            f"{start.checkpoint['global_step']} on; the run is no longer an exact continuation)"
        )
    if start.kind == "init":
        lines.append(
            f"fine-tuning from {start.path} (weights only: new optimizer and schedule; "
            f"{added} new character(s) added to the vocabulary)"
        )
    return "\n".join(lines)


def _results(cfg, module, trainer, training_time, final_path, interrupt, start: Start, added: int) -> dict[str, Any]:
    val_loss = module.val_history[-1]["val_loss"] if module.val_history else None
    steps_run = trainer.global_step
    start_step = int(start.checkpoint["global_step"]) if start.kind == "resume" else 0
    # Each optimizer step consumes accumulate_grad_batches batches of data.batch_size windows.
    tokens_per_step = trainer.accumulate_grad_batches * cfg.data.batch_size * cfg.model.context_length
    tokens_seen = steps_run * tokens_per_step
    # The speed of this invocation: a resumed run's earlier steps took time that training_time does not hold.
    tokens_trained = (steps_run - start_step) * tokens_per_step
    best = min(module.val_history, key=lambda h: h["val_loss"], default=None)
    best_callback = _best_checkpoint_callback(trainer)
    return {
        "status": "interrupted" if interrupt.saved_path else "completed",
        "stopped_by": interrupt.received.name if interrupt.saved_path else None,
        "stopped_early": interrupt.saved_path is None and steps_run < cfg.trainer.max_steps,
        "experiment_name": cfg.get("experiment_name"),
        "overrides": _overrides(),
        "model": cfg.model.get("name", "custom"),
        "num_parameters": module.model.num_parameters(),
        "vocab_size": module.model.config.vocab_size,
        "seed": start.seed,
        "resumed_from": str(start.path) if start.kind == "resume" else None,
        "resumed_with_changes": start.changes,
        "init_from": str(start.path) if start.kind == "init" else None,
        "added_characters": added,
        "training_time_seconds": round(training_time, 3),
        "start_step": start_step,
        "global_step": steps_run,
        "tokens_seen": tokens_seen,
        "tokens_per_second": tokens_trained / training_time if training_time > 0 else None,
        "final_train_loss": module.last_train_loss,
        "final_val_loss": val_loss,
        "final_val_perplexity": perplexity(val_loss),
        "best_val_loss": best["val_loss"] if best else None,
        "best_step": best["step"] if best else None,
        "best_checkpoint": best_callback.best_model_path or None if best_callback is not None else None,
        "final_grad_norm": module.last_grad_norm,
        "first_step_unix_time": module.first_step_time,
        "finished_unix_time": time.time(),
        "val_loss_estimate": "final: a full pass over the validation split; during training: "
        + (f"{cfg.data.val_windows} evenly spaced windows" if cfg.data.get("val_windows") else "full passes"),
        "val_history": module.val_history,
        "checkpoint_path": str(interrupt.saved_path or final_path),
        "device": str(trainer.strategy.root_device),
        "torch_threads": torch.get_num_threads(),
        "precision": str(trainer.precision),
        "config": {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "data", "optim")},
    }


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


HPARAM_KEYS = (
    "model.name",
    "model.embedding_dim",
    "model.num_layers",
    "model.num_heads",
    "model.ffn_hidden_dim",
    "model.context_length",
    "model.dropout",
    "optim.name",
    "optim.lr",
    "optim.muon_lr",
    "optim.weight_decay",
    "optim.warmup_steps",
    "data.batch_size",
    "trainer.max_steps",
    "seed",
)
HPARAM_METRICS = ("final_val_loss", "best_val_loss", "final_val_perplexity", "final_train_loss", "num_parameters")


def _log_hparams(trainer: L.Trainer, cfg: DictConfig, results: dict) -> None:
    """Hyperparameters with the final metrics, so a tracker's table (TensorBoard's HParams tab) compares runs."""
    params = {key: OmegaConf.select(cfg, key) for key in HPARAM_KEYS}
    params = {key: value for key, value in params.items() if value is not None}  # optim.muon_lr only with Muon
    metrics = {f"hparams/{key}": results[key] for key in HPARAM_METRICS if results.get(key) is not None}
    for logger in trainer.loggers:
        log_final(logger, params, metrics, trainer.global_step)


def sample_text(model: TransformerLanguageModel, tokenizer, sample: DictConfig) -> str:
    """The configured prompt (unknown characters dropped) and a sampled continuation."""
    prompt = usable_prompt(tokenizer, sample.prompt)
    return generate_text(
        model,
        tokenizer,
        prompt,
        sample.max_new_tokens,
        sample.temperature,
        sample.top_k,
        sample.get("seed", 0),
        beyond_context=sample.get("beyond_context") or "recompute",
    )
