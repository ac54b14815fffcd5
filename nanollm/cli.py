"""What the entry points do around the library: user errors as one line, run dirs, reports."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

import nanollm.config  # noqa: F401  (registers the OmegaConf resolvers conf/ uses)
from nanollm.errors import NanoLLMError, TrainingInterrupted


def exit_on_user_error(main):
    """Print a NanoLLMError as one `error:` line on stderr and exit non-zero, without a traceback.

    In a multirun the failed job is recorded in its results.json instead, so the sweep goes on.
    """

    @functools.wraps(main)
    def wrapper(cfg: DictConfig):
        try:
            return main(cfg)
        except NanoLLMError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            if _in_multirun() and not isinstance(err, TrainingInterrupted):
                _record_failed_job(cfg, err)
                return None
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            print("error: interrupted before training started; nothing was saved.", file=sys.stderr, flush=True)
            sys.exit(130)

    return wrapper


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _record_failed_job(cfg: DictConfig, err: Exception) -> None:
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    record = {"status": "failed", "error": str(err), "overrides": list(hydra_cfg.overrides.task)}
    Path(hydra_cfg.runtime.output_dir, "results.json").write_text(json.dumps(record, indent=2) + "\n")


def check_config_choices(argv: list[str], conf_dir: Path) -> None:
    """Reject an unknown config-group choice (e.g. `model=huge`) in one line, listing the valid ones.

    Hydra reports these with a multi-line search-path dump; this check runs before it.
    """
    for arg in argv[1:]:
        key, sep, value = arg.partition("=")
        group = key.lstrip("+~")
        # hydra/* groups also come from installed plugins (launchers, sweepers): Hydra checks those.
        if not sep or "(" in value or group.startswith("hydra") or not (conf_dir / group).is_dir():
            continue
        for choice in value.split(","):  # a sweep lists several choices
            if choice and choice != "null" and not (conf_dir / group / f"{choice}.yaml").is_file():
                options = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
                print(
                    f"error: unknown {group} '{choice}'; choose one of: {', '.join(options)} (e.g. {group}={options[0]}).",
                    file=sys.stderr,
                )
                sys.exit(1)


def quiet_lightning() -> None:
    """Keep Lightning's start-up chatter (GPU/TPU availability, ...) out of the console; we print a summary."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)


def train_command(cfg: DictConfig) -> float | None:
    """`python train.py`: train, print the report, return the final validation loss (for sweepers)."""
    from hydra.core.hydra_config import HydraConfig

    from nanollm.config import validate_config

    validate_config(cfg)  # before the heavy imports, so config mistakes fail in a second
    from nanollm.training import run

    quiet_lightning()
    if cfg.run_dir is None:
        cfg.run_dir = HydraConfig.get().runtime.output_dir
    results = run(cfg)
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank == 0:  # under DDP every process returns here; one report is enough
        print(format_report(results))
    if results["status"] == "interrupted":
        raise TrainingInterrupted(
            f"interrupted at step {results['global_step']}; saved {results['checkpoint_path']}. "
            "Resume with the same command plus ckpt_path=last."
        )
    return results["final_val_loss"]


def format_report(results: dict) -> str:
    def num(value, fmt=".4f"):
        return "n/a" if value is None else format(value, fmt)

    lines = [
        f"final train loss      {num(results['final_train_loss'])}",
        f"final val loss        {num(results['final_val_loss'])}  (perplexity {num(results['final_val_perplexity'], '.2f')})",
        f"final gradient norm   {num(results['final_grad_norm'])}",
        f"steps                 {results['global_step']}  in {results['training_time_seconds']:.1f} s",
        f"checkpoint            {results['checkpoint_path']}",
    ]
    if results.get("sample"):
        lines += ["", "sample:", results["sample"]]
    return "\n".join(lines)


def generate_command(cfg: DictConfig) -> None:
    """`python generate.py`: load a checkpoint alone and stream samples to stdout."""
    import torch

    from nanollm.checkpointing import model_from_checkpoint, resolve_checkpoint
    from nanollm.generation import check_sampling_args, generate_tokens, make_generator

    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise NanoLLMError(
            "ckpt_path is required: python generate.py ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt (or ckpt_path=last)."
        )
    check_sampling_args(cfg.max_new_tokens, cfg.temperature, cfg.top_k)
    if not isinstance(cfg.num_samples, int) or cfg.num_samples < 1:
        raise NanoLLMError(f"num_samples must be an integer >= 1, got {cfg.num_samples!r}.")
    path, checkpoint = resolve_checkpoint(str(cfg.ckpt_path), None, Path(cfg.outputs_dir))
    device = (
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else ("cpu" if cfg.device == "auto" else cfg.device)
    )
    model, tokenizer, _ = model_from_checkpoint(path, checkpoint)
    if tokenizer is None:
        raise NanoLLMError(
            f"Checkpoint '{path}' has no vocabulary (it was trained on raw token ids); decode its ids yourself."
        )
    model.to(device)
    prompt_ids = tokenizer.encode(str(cfg.prompt), what="The prompt")
    generator = make_generator(cfg.seed)
    for index in range(cfg.num_samples):
        if cfg.num_samples > 1:
            print(f"--- sample {index + 1} ---")
        sys.stdout.write(str(cfg.prompt))
        for token in generate_tokens(
            model, prompt_ids, cfg.max_new_tokens, float(cfg.temperature), cfg.top_k, generator, use_cache=cfg.use_cache
        ):
            sys.stdout.write(tokenizer.chars[token])
            sys.stdout.flush()
        sys.stdout.write("\n")
