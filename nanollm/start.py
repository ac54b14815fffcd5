"""What a run starts from: a new model, a checkpoint to resume, or a checkpoint's weights to fine-tune.

- `ckpt_path=...` resumes the same run: the checkpoint's recipe (architecture, optimizer, schedule,
  data, steps, seed) plus what the user set explicitly on the command line. Unchanged, the run
  continues bit for bit; changed optimizer or schedule settings apply from the current step on.
- `init_from=...` starts a new run from a checkpoint's weights, with a fresh optimizer and schedule,
  on text that may have characters the checkpoint's vocabulary lacks (they are appended).
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from nanollm.checkpointing import (
    BEST_FILES,
    NANOLLM_KEY,
    architecture_mismatch,
    check_run_ownership,
    checked_model_config,
    checkpoint_step,
    list_checkpoints,
    load_model_weights,
    read_checkpoint,
    resolve_checkpoint,
)
from nanollm.config import MODEL_KEYS
from nanollm.errors import NanoLLMError
from nanollm.locking import claim_directory
from nanollm.model import ModelConfig, TransformerLanguageModel
from nanollm.tokenizer import CharTokenizer

# The settings a resumed run takes from its checkpoint unless the command line sets them.
RECIPE = (
    "model",
    "optim",
    "data.path",
    "data.glob",
    "data.batch_size",
    "data.val_fraction",
    "trainer.max_steps",
    "trainer.accumulate_grad_batches",
    "trainer.gradient_clip_val",
    "trainer.val_check_interval",
    "trainer.log_every_n_steps",
    "trainer.precision",
    "compile",
    "seed",
    "checkpoint_interval",
)
# Config groups and presets that restate the whole recipe when given on the command line.
RESTATES_RECIPE = ("experiment", "debug", "hparams_search")


@dataclass
class Start:
    """How this run begins; `config` is the config the run trains with."""

    config: DictConfig
    seed: int
    kind: str = "fresh"  # "fresh", "resume" or "init"
    path: Path | None = None
    checkpoint: dict | None = None
    tokenizer: CharTokenizer | None = None  # the checkpoint's vocabulary (resume and init)
    changes: list[str] = field(default_factory=list)  # recipe settings changed on resume


def explicit_keys(overrides: list[str]) -> set[str]:
    """The config keys a command line sets (`model=small` sets the whole `model` group)."""
    keys = set()
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        keys.add("*" if key in RESTATES_RECIPE else key)
    return keys


def is_explicit(key: str, explicit: set[str]) -> bool:
    return "*" in explicit or any(key == e or key.startswith(e + ".") for e in explicit)


def plan_start(cfg: DictConfig, own_dirs: list[Path], warn=print) -> dict[str, Any]:
    """Rank 0's decisions, as plain data: the run directory, the checkpoint to start from, the seed."""
    _check_writable_directory(own_dirs[0], "checkpoint_dir")
    claim_directory(own_dirs[0])  # before the checks below, so no other run can start here in between
    outputs = Path(cfg.outputs_dir)
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None and requeued_by_slurm(own_dirs):
        ckpt_path = "last"  # the same job, restarted: continue it from its newest good checkpoint
    # A sweep job continues its own run only: another job's checkpoint is another run's.
    found = resolve_checkpoint(ckpt_path, own_dirs, outputs, warn, own_run_only=in_multirun())
    resume_from = found[0] if found else None
    check_run_ownership(own_dirs, resume_from)
    init_from = None
    if cfg.get("init_from"):
        init_from = resolve_checkpoint(str(cfg.init_from), None, outputs, warn)[0]
    seed = cfg.seed
    if seed is None and found is not None:
        seed = found[1][NANOLLM_KEY].get("config", {}).get("seed")  # the seed the run drew at its start
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)  # seed=null: a fresh one, recorded in results.json
    return {
        "run_dir": str(cfg.run_dir),
        "resume_from": str(resume_from) if resume_from else None,
        "init_from": str(init_from) if init_from else None,
        "seed": int(seed),
    }


def in_multirun() -> bool:
    """Whether this is a job of a Hydra sweep (`python train.py -m ...`)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def requeued_by_slurm(own_dirs: list[Path]) -> bool:
    """Lightning's SLURM auto-requeue (SIGUSR1) saved hpc_ckpt_<n>.ckpt in this run directory: this is the
    requeued job, which continues the run, as Lightning itself does when no ckpt_path is given."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return SLURMEnvironment.detect() and any(list_checkpoints(d, ("hpc_ckpt_*.ckpt",)) for d in own_dirs)


def _check_writable_directory(directory: Path, key: str) -> None:
    """Fail before training, not at the first checkpoint, when the directory cannot hold files."""
    if directory.exists() and not directory.is_dir():
        raise NanoLLMError(f"{key} '{directory}' is a file, not a directory; point {key} at a directory.")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise NanoLLMError(f"Cannot create {key} '{directory}': {err.strerror or err}.") from None
    try:  # a directory that exists but refuses files (read-only) would fail only at the first save
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as err:
        raise NanoLLMError(f"Cannot write into {key} '{directory}': {err.strerror or err}.") from None


def load_start(cfg: DictConfig, plan: dict[str, Any], explicit: set[str]) -> Start:
    """Read the planned checkpoint (every process reads the same file) and build the run's config."""
    cfg.run_dir, cfg.seed = plan["run_dir"], plan["seed"]
    if plan["resume_from"]:
        path = Path(plan["resume_from"])
        checkpoint = read_checkpoint(path)
        checked_model_config(path, checkpoint)
        saved = checkpoint[NANOLLM_KEY]
        config, changes = with_recipe(cfg, saved.get("config") or {}, explicit)
        with_logger_versions(config, saved.get("config") or {})
        with_architecture(config, saved["model"], explicit)
        _check_architecture(path, saved, config, "Resume")
        _check_steps_left(path, checkpoint, config)
        _check_no_later_states(path, checkpoint, config, changes)
        return Start(config, config.seed, "resume", path, checkpoint, _tokenizer(saved), changes)
    if plan["init_from"]:
        path = Path(plan["init_from"])
        checkpoint = read_checkpoint(path)
        checked_model_config(path, checkpoint)
        saved = checkpoint[NANOLLM_KEY]
        config, _ = with_recipe(cfg, {"model": (saved.get("config") or {}).get("model", {})}, explicit, ("model",))
        with_architecture(config, saved["model"], explicit)
        _check_architecture(path, saved, config, "Fine-tune")
        return Start(config, config.seed, "init", path, checkpoint, _tokenizer(saved))
    return Start(cfg, cfg.seed)


def with_recipe(
    cfg: DictConfig, saved: dict, explicit: set[str], recipe: tuple[str, ...] = RECIPE
) -> tuple[DictConfig, list[str]]:
    """`cfg` with the checkpoint's recipe settings wherever the command line does not set them, and the
    list of recipe settings that differ from the checkpoint's (`optim.lr: 0.003 -> 0.0003`)."""
    # Unresolved, so that interpolations such as optim.lr: ${model.recommended_lr} follow the checkpoint's model.
    config = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    saved_cfg = OmegaConf.create(saved)
    changes = []
    for section in recipe:
        for key, saved_value in _leaves(OmegaConf.select(saved_cfg, section), section):
            if not is_explicit(key, explicit):
                OmegaConf.update(config, key, saved_value, merge=False, force_add=True)
            elif OmegaConf.select(config, key) != saved_value:
                changes.append(f"{key}: {saved_value!r} -> {OmegaConf.select(config, key)!r}")
    return config, changes


def with_logger_versions(config: DictConfig, saved: dict) -> None:
    """A resumed run logs on as the same run: each logger keeps the run name (`version`) the run started
    with, which a command line with other overrides (`trainer.max_steps=...`) would otherwise change."""
    saved_loggers = saved.get("logger") or {}
    for name, logger in (config.get("logger") or {}).items():
        version = (saved_loggers.get(name) or {}).get("version")
        if logger is not None and "version" in logger and version is not None:
            logger.version = version


def with_architecture(config: DictConfig, saved_model: dict, explicit: set[str]) -> None:
    """The checkpoint's architecture wherever the command line does not set a model key (checkpoints from
    before a key existed get its old meaning, e.g. learned positions)."""
    architecture = ModelConfig.from_saved(saved_model).to_dict()
    for key in MODEL_KEYS:
        if not is_explicit(f"model.{key}", explicit):
            OmegaConf.update(config, f"model.{key}", architecture[key], merge=False, force_add=True)


def _leaves(node, prefix: str):
    if node is None:
        return []
    if OmegaConf.is_dict(node):
        return [leaf for key in node for leaf in _leaves(node[key], f"{prefix}.{key}")]
    return [(prefix, OmegaConf.to_container(node) if OmegaConf.is_list(node) else node)]


def _check_architecture(path: Path, saved: dict, config: DictConfig, action: str) -> None:
    """After `with_architecture`, only a model key the user set explicitly can contradict the checkpoint."""
    wanted = {key: config.model.get(key) for key in MODEL_KEYS}
    have = ModelConfig.from_saved(saved["model"]).to_dict()
    mismatched = architecture_mismatch({k: have.get(k) for k in MODEL_KEYS}, wanted)
    if mismatched:
        raise NanoLLMError(
            f"Checkpoint '{path}' has a different architecture than the config: {', '.join(mismatched)}. "
            f"{action} with the checkpoint's model settings (leave out the model keys), or start a new run."
        )


def _check_steps_left(path: Path, checkpoint: dict, config: DictConfig) -> None:
    """Resuming a run that has already reached trainer.max_steps would train nothing and rewrite its results."""
    step, max_steps = int(checkpoint["global_step"]), int(config.trainer.max_steps)
    if step >= max_steps:
        raise NanoLLMError(
            f"'{path}' is at step {step} and trainer.max_steps is {max_steps}: there is nothing left to train "
            "(nothing was changed). Give a larger trainer.max_steps to train longer."
        )


def _check_no_later_states(path: Path, checkpoint: dict, config: DictConfig, changes: list[str]) -> None:
    """Resuming an earlier checkpoint of a run in the run's own directory with changed settings starts another
    continuation, which would overwrite the later checkpoints of the first one. Unchanged, the resumed run
    retraces its steps exactly and rewrites the same states."""
    own_dirs = {Path(config.checkpoint_dir).resolve(), Path(config.run_dir).resolve()}
    if not changes or path.resolve().parent not in own_dirs:
        return
    step = int(checkpoint["global_step"])
    # best.ckpt is a copy of one of the run's states: a later one than the newest periodic checkpoint
    # (a validation after it) is the continuing run's to replace.
    later = [p for p in list_checkpoints(path.parent) if p.name not in BEST_FILES and (checkpoint_step(p) or 0) > step]
    if later:
        raise NanoLLMError(
            f"'{path}' is at step {step}, and its directory holds later checkpoints of the run ({later[0].name}, ...) "
            f"that resuming there with changed settings ({'; '.join(changes)}) would overwrite. Resume it into a "
            "new run directory (leave out hydra.run.dir; in the Python API, another checkpoint_dir), or resume "
            "the newest checkpoint (ckpt_path=last)."
        )


def _tokenizer(saved: dict) -> CharTokenizer | None:
    return CharTokenizer.from_dict(saved["tokenizer"]) if saved.get("tokenizer") else None


# A run's settings saved as a primary config need the Hydra settings train.yaml selects (run directories,
# job logging); `--config-dir <run>` keeps conf/ in the search path, where these are found.
RERUN_DEFAULTS = [{"hydra": "default"}, "_self_", {"override hydra/job_logging": "nanollm"}]


def rerun_config(start: Start) -> str:
    """The settings the run trains with, as a config that trains them again as a new run:
    `python train.py --config-dir <run> --config-name run_config`.

    They are the effective settings (a resumed run's include its checkpoint's recipe, which its
    command line did not repeat), with the seed the run used and no run directory or checkpoint to
    resume; fine-tuning names its checkpoint file (`last` would find another one later).
    """
    config = OmegaConf.to_container(start.config, resolve=False)
    config.update(run_dir=None, ckpt_path=None, seed=start.seed)
    if start.kind == "init":
        config["init_from"] = str(start.path.resolve())
    return OmegaConf.to_yaml({"defaults": RERUN_DEFAULTS, **config})


def start_weights(config: ModelConfig, start: Start) -> TransformerLanguageModel:
    """The model a run begins with. Fine-tuning copies the checkpoint's weights; the embedding rows of
    characters the checkpoint's vocabulary lacked keep their fresh initialisation (the tied output
    layer shares them)."""
    model = TransformerLanguageModel(config)
    if start.kind != "init":
        return model  # fresh, or resumed (Lightning restores the weights)
    prefix = "model."
    state = {k[len(prefix) :]: v for k, v in start.checkpoint["state_dict"].items() if k.startswith(prefix)}
    embedding = model.token_embedding.weight.detach().clone()
    old_rows = state["token_embedding.weight"].shape[0]
    embedding[:old_rows] = state["token_embedding.weight"]
    state["token_embedding.weight"] = embedding
    state["lm_head.weight"] = embedding
    # The vocabulary may have grown, so the settings differ from the checkpoint's by design.
    load_model_weights(
        model, {"state_dict": {prefix + k: v for k, v in state.items()}}, start.path, same_settings=False
    )
    return model
