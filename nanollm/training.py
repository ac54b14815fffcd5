"""`run(cfg)`: build the data module, model and Lightning Trainer from a config, train, report.

Used by `train.py` and by the Python API, so both train on exactly the same path.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from nanollm.callbacks import GracefulInterrupt, TrainingProgressBar
from nanollm.checkpointing import (
    FINAL_NAME,
    LAST_NAME,
    NANOLLM_KEY,
    SafeCheckpointIO,
    architecture_mismatch,
    atomic_copy,
    list_checkpoints,
    resolve_checkpoint,
)
from nanollm.config import model_config_from, validate_config
from nanollm.corpus import EncodedCorpus
from nanollm.data import CharDataModule
from nanollm.errors import NanoLLMError
from nanollm.generation import generate_text, usable_prompt
from nanollm.model import ModelConfig, TransformerLanguageModel
from nanollm.module import LanguageModelModule, perplexity

# Our batches come from vectorised indexing into a memmap; worker processes would only add IPC.
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__` defined.*")
warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
warnings.filterwarnings("ignore", message=".*overridden `transfer_batch_to_device`.*")
warnings.filterwarnings("ignore", message=".*torch.distributed.nn.functional.all_gather is deprecated.*")
# Validation metrics are all-gathered by the module itself before logging, so they agree on every rank.
warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting.*")


def run(
    cfg: DictConfig,
    model: TransformerLanguageModel | None = None,
    corpus: EncodedCorpus | None = None,
    callbacks: list[L.Callback] | None = None,
    echo=print,
) -> dict[str, Any]:
    """Train as `cfg` says and return the results (also written to `<run_dir>/results.json`)."""
    validate_config(cfg)
    run_dir = Path(cfg.run_dir)
    checkpoint_dir = Path(cfg.checkpoint_dir)
    if cfg.seed is not None:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
    if str(cfg.trainer.accelerator) in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and newer

    datamodule = CharDataModule(
        path=None if corpus is not None else cfg.data.path,
        context_length=cfg.model.context_length,
        batch_size=cfg.data.batch_size,
        val_fraction=cfg.data.val_fraction,
        seed=cfg.seed or 0,
        cache_dir=cfg.data.get("cache_dir"),
        corpus=corpus,
        pin_memory=str(cfg.trainer.accelerator) in ("gpu", "cuda"),
    )
    datamodule.setup("fit")
    tokenizer = datamodule.corpus.tokenizer
    model_config = model.config if model is not None else model_config_from(cfg, tokenizer.vocab_size)
    if int(datamodule.corpus.tokens.max()) >= model_config.vocab_size:
        raise NanoLLMError(
            f"Token id {int(datamodule.corpus.tokens.max())} is outside the model's vocabulary "
            f"(vocab_size {model_config.vocab_size}); build the model with the tokenizer's vocab_size."
        )

    found = resolve_checkpoint(cfg.ckpt_path, checkpoint_dir, Path(cfg.outputs_dir))
    resume_from = found[0] if found else None
    if found is not None:
        _check_resumable(*found, model_config.to_dict(), tokenizer)
    elif list_checkpoints(checkpoint_dir):
        raise NanoLLMError(
            f"'{checkpoint_dir}' already holds checkpoints of another run; resume it with ckpt_path=last "
            "or start a new run in another directory (hydra.run.dir=...)."
        )

    run_config = OmegaConf.to_container(cfg, resolve=True)
    module = LanguageModelModule(
        model_config=model_config.to_dict(),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        tokenizer=tokenizer.to_dict() if tokenizer is not None else None,
        run_config=run_config,
        seed=cfg.seed or 0,
        compile=bool(cfg.get("compile", False)),
        model=model,
    )
    interrupt = GracefulInterrupt(checkpoint_dir)
    configured = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks = [*configured, *(callbacks or []), interrupt]
    if cfg.trainer.get("enable_progress_bar", True):
        # tqdm, explicitly: Lightning picks its Rich bar when `rich` is installed, which shows "Epoch 0/-2"
        # for step-based training. Redrawn on the logging interval, when the shown metrics change.
        callbacks.append(TrainingProgressBar(refresh_rate=cfg.trainer.log_every_n_steps))
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[SafeCheckpointIO()],
        val_check_interval=_val_check_batches(cfg.trainer),
        _convert_="partial",
    )

    if trainer.is_global_zero:
        echo(_summary(cfg, module, datamodule, trainer, run_dir, resume_from))
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None, weights_only=True)
    training_time = time.perf_counter() - started

    final_path = checkpoint_dir / FINAL_NAME
    if interrupt.saved_path is None:
        if not module.val_history or module.val_history[-1]["step"] != trainer.global_step:
            trainer.validate(module, datamodule=datamodule, verbose=False, weights_only=True)
        trainer.save_checkpoint(final_path, weights_only=False)
        if trainer.is_global_zero:
            atomic_copy(final_path, checkpoint_dir / LAST_NAME)
    results = _results(cfg, module, trainer, training_time, final_path, interrupt)
    _log_hparams(trainer, cfg, results)
    if trainer.is_global_zero:
        if tokenizer is not None and cfg.sample.max_new_tokens > 0:
            results["sample"] = sample_text(module.model, tokenizer, cfg.sample)
        (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _val_check_batches(trainer_cfg: DictConfig):
    # Lightning counts val_check_interval in batches; ours is in optimizer steps, like every other interval.
    interval = trainer_cfg.get("val_check_interval")
    if isinstance(interval, int) and not isinstance(interval, bool):
        return interval * int(trainer_cfg.get("accumulate_grad_batches") or 1)
    return interval


def _check_resumable(path: Path, checkpoint: dict, wanted_model: dict, tokenizer) -> None:
    saved = checkpoint[NANOLLM_KEY]
    mismatched = architecture_mismatch(ModelConfig.from_saved(saved["model"]).to_dict(), wanted_model)
    if mismatched:
        raise NanoLLMError(
            f"Checkpoint '{path}' has a different architecture than the config: {', '.join(mismatched)}. "
            "Use the same model settings as the checkpoint, or start a new run without ckpt_path."
        )
    if tokenizer is not None and saved.get("tokenizer") and saved["tokenizer"] != tokenizer.to_dict():
        raise NanoLLMError(
            f"Checkpoint '{path}' was trained on text with a different character set than data.path; "
            "resume with the same data, or start a new run."
        )


def _summary(cfg, module, datamodule, trainer, run_dir: Path, resume_from) -> str:
    lines = [
        f"nanollm | model {cfg.model.get('name', 'custom')} | {module.model.num_parameters():,} parameters | "
        f"vocabulary {module.model.config.vocab_size} | train {len(datamodule.train_tokens):,} tokens | "
        f"val {len(datamodule.val_tokens):,} tokens",
        f"device {trainer.strategy.root_device} x{trainer.world_size} | precision {trainer.precision} | "
        f"{cfg.trainer.max_steps} steps of {cfg.data.batch_size} x {cfg.model.context_length} tokens",
        f"run directory {run_dir}",
    ]
    if resume_from:
        lines.append(f"resuming from {resume_from}")
    return "\n".join(lines)


def _results(cfg, module, trainer, training_time, final_path, interrupt) -> dict[str, Any]:
    val_loss = module.val_history[-1]["val_loss"] if module.val_history else None
    steps_run = trainer.global_step
    tokens_seen = steps_run * cfg.data.batch_size * cfg.model.context_length
    return {
        "status": "interrupted" if interrupt.saved_path else "completed",
        "experiment_name": cfg.get("experiment_name"),
        "overrides": _overrides(),
        "model": cfg.model.get("name", "custom"),
        "num_parameters": module.model.num_parameters(),
        "vocab_size": module.model.config.vocab_size,
        "training_time_seconds": round(training_time, 3),
        "global_step": steps_run,
        "tokens_seen": tokens_seen,
        "tokens_per_second": tokens_seen / training_time if training_time > 0 else None,
        "final_train_loss": module.last_train_loss,
        "final_val_loss": val_loss,
        "final_val_perplexity": perplexity(val_loss),
        "best_val_loss": min((h["val_loss"] for h in module.val_history), default=None),
        "final_grad_norm": module.last_grad_norm,
        "first_step_unix_time": module.first_step_time,
        "val_loss_estimate": "full pass over the validation split",
        "val_history": module.val_history,
        "checkpoint_path": str(interrupt.saved_path or final_path),
        "device": str(trainer.strategy.root_device),
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
    "optim.lr",
    "optim.weight_decay",
    "optim.warmup_steps",
    "data.batch_size",
    "trainer.max_steps",
    "seed",
)
HPARAM_METRICS = ("final_val_loss", "best_val_loss", "final_val_perplexity", "final_train_loss", "num_parameters")


def _log_hparams(trainer: L.Trainer, cfg: DictConfig, results: dict) -> None:
    """Hyperparameters with the final metrics, so TensorBoard's HParams tab compares the runs of a sweep."""
    params = {key: OmegaConf.select(cfg, key) for key in HPARAM_KEYS}
    metrics = {f"hparams/{key}": results[key] for key in HPARAM_METRICS if results.get(key) is not None}
    for logger in trainer.loggers:
        logger.log_hyperparams(params, metrics)
        logger.finalize("success")


def sample_text(model: TransformerLanguageModel, tokenizer, sample: DictConfig) -> str:
    """The configured prompt (unknown characters dropped) and a sampled continuation."""
    prompt = usable_prompt(tokenizer, sample.prompt)
    return generate_text(
        model, tokenizer, prompt, sample.max_new_tokens, sample.temperature, sample.top_k, sample.get("seed", 0)
    )
