"""The runbook's Python API, on the same Lightning path as `train.py`.

tokenizer = CharTokenizer.from_text(text)
model = TransformerLanguageModel(vocab_size=tokenizer.vocab_size, embedding_dim=32, num_layers=2,
                                 num_heads=4, ffn_hidden_dim=64, context_length=64)
result = train_with_config(model, tokenizer.encode(text), config, tokenizer=tokenizer)
info = load_checkpoint(config["checkpoint_dir"] + "/checkpoint_final.pt", model)   # info['step'], info['loss']
print(generate_text(model, tokenizer, "The ", max_length=100, temperature=0.8, top_k=40, seed=0))
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from omegaconf import OmegaConf

from nanollm.errors import NanoLLMError, RunDirectoryTaken
from nanollm.generation import generate_text  # noqa: F401  (part of the runbook API)
from nanollm.model import TransformerLanguageModel
from nanollm.tokenizer import CharTokenizer

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# The model's own settings, which a runbook config repeats (vocab_size, embedding_dim, ...): they must match.
MODEL_CONFIG_KEYS = {"vocab_size", "embedding_dim", "num_layers", "num_heads", "ffn_hidden_dim", "context_length"}
OTHER_CONFIG_KEYS = {"checkpoint_dir", "progress_bar"}

RUNBOOK_DEFAULT_STEPS = 1000  # the runbook's num_steps for nano

# Runbook config key -> Hydra config key.
RUNBOOK_KEYS = {
    "learning_rate": "optim.lr",
    "num_steps": "trainer.max_steps",
    "seed": "seed",
    "checkpoint_interval": "checkpoint_interval",
    "batch_size": "data.batch_size",
}


class CheckpointInfo(NamedTuple):
    """What `load_checkpoint` returns: `info['step']`, `info.step` or `step, loss = info`."""

    step: int
    loss: float | None

    def __getitem__(self, key):
        return getattr(self, key) if isinstance(key, str) else tuple.__getitem__(self, key)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices)."""
    import lightning as L

    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise NanoLLMError(f"seed must be an integer in [0, 2**32), got {seed!r}.")

    L.seed_everything(seed, workers=True, verbose=False)


def compose_config(overrides: list[str]):
    """The same composed config `python train.py <overrides>` would use."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="nanollm_api"):
        return compose(config_name="train", overrides=overrides)


def train_with_config(
    model: TransformerLanguageModel,
    tokens,
    config: dict[str, Any],
    resume_from: str | Path | None = None,
    tokenizer: CharTokenizer | None = None,
) -> dict[str, Any]:
    """Train `model` in place on `tokens` (ids) as the runbook's `config` says.

    Writes `checkpoint_step_<N>.pt` every `checkpoint_interval` steps and `checkpoint_final.pt` into
    `config["checkpoint_dir"]`, the runbook's file names, and returns the results, including
    `final_loss` and `final_grad_norm`. Pass `tokenizer` to store the vocabulary in the checkpoints
    (then generate.py and eval.py can use them).
    """
    from nanollm.checkpointing import check_resumable_into, read_checkpoint
    from nanollm.corpus import EncodedCorpus, token_dtype
    from nanollm.training import run

    if not isinstance(config, Mapping):
        raise NanoLLMError(
            f"config must be a dict of settings, e.g. {{'checkpoint_dir': 'checkpoints'}}, got {config!r}."
        )
    if not isinstance(config.get("checkpoint_dir"), (str, os.PathLike)) or not str(config["checkpoint_dir"]):
        raise NanoLLMError(
            "config['checkpoint_dir'] is required: the directory for checkpoint files (a str or Path), "
            f"got {config.get('checkpoint_dir')!r}."
        )
    if not isinstance(model, TransformerLanguageModel):
        raise NanoLLMError(f"model must be a nanollm TransformerLanguageModel, got {type(model).__name__}.")
    unknown = sorted(set(config) - set(RUNBOOK_KEYS) - MODEL_CONFIG_KEYS - OTHER_CONFIG_KEYS, key=str)
    if unknown:  # a typo (learnin_rate) would otherwise train with the default silently
        raise NanoLLMError(
            f"Unknown config key(s) {', '.join(map(repr, unknown))}; the keys are "
            f"{', '.join(sorted({*RUNBOOK_KEYS, *MODEL_CONFIG_KEYS, *OTHER_CONFIG_KEYS}))}."
        )
    sizes = model.config.to_dict()
    for key in sorted(MODEL_CONFIG_KEYS & set(config)):
        if config[key] is not None and config[key] != sizes[key]:
            raise NanoLLMError(
                f"config['{key}'] ({config[key]!r}) differs from the model's ({sizes[key]!r}); build the model "
                f"with {key}=config['{key}']."
            )
    if tokenizer is not None and tokenizer.vocab_size != model.config.vocab_size:
        raise NanoLLMError(
            f"The tokenizer has {tokenizer.vocab_size} characters but the model's vocab_size is "
            f"{model.config.vocab_size}; build the model with vocab_size=tokenizer.vocab_size."
        )
    ids = np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise NanoLLMError("tokens must be a 1-D sequence of integer token ids (e.g. tokenizer.encode(text)).")
    if ids.size and ids.min() < 0:
        raise NanoLLMError("tokens must be non-negative token ids.")
    if ids.size < 2:
        raise NanoLLMError(f"Token sequence must have at least 2 tokens, got {ids.size}.")
    if ids.max() >= model.config.vocab_size:  # here, before a narrower dtype could wrap a huge id around
        raise NanoLLMError(
            f"Token id {ids.max()} is outside the model's vocabulary (vocab_size {model.config.vocab_size}); "
            "encode the text with the tokenizer the model was built for, or build the model with the "
            "tokenizer's vocab_size."
        )

    checkpoint_dir = Path(config["checkpoint_dir"]).resolve()
    config = {k: v.item() if isinstance(v, np.generic) else v for k, v in config.items()}  # np.float64(1e-3) etc.
    num_steps = config.get("num_steps")
    if num_steps is None:
        num_steps = config["num_steps"] = RUNBOOK_DEFAULT_STEPS
    # The runbook's files only: no logger, samples, best checkpoint or last.pt. Group choices go through
    # Hydra; values are set on the composed config (any string is safe there).
    cfg = compose_config(["~logger", "~callbacks.text_samples", "~callbacks.best_checkpoint"])
    values = {RUNBOOK_KEYS[k]: v for k, v in config.items() if k in RUNBOOK_KEYS and v is not None}
    explicit = {*values, "model"}  # a resumed run keeps its checkpoint's other settings
    values.update({f"model.{k}": v for k, v in model.config.to_dict().items() if k != "vocab_size"})
    values.update(
        {
            "model.name": "custom",
            "data.path": "<tokens>",
            "run_dir": str(checkpoint_dir),
            "checkpoint_dir": str(checkpoint_dir),
            "callbacks.model_checkpoint.save_last": False,
            "trainer.val_check_interval": num_steps if isinstance(num_steps, int) and num_steps > 0 else 1,
            "trainer.enable_progress_bar": bool(config.get("progress_bar", True)),
            "sample.max_new_tokens": 0 if tokenizer is None else 100,
            "ckpt_path": str(resume_from) if resume_from is not None else None,
        }
    )
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False)
    corpus = EncodedCorpus(tokenizer, ids.astype(token_dtype(int(ids.max()) + 1)), source="<tokens>")
    if resume_from is not None and Path(resume_from).is_file():
        # Before the run's own check, which words its remedy for the command line (leave out model keys).
        check_resumable_into(model, read_checkpoint(resume_from), Path(resume_from))
    try:
        results = run(
            cfg,
            model=model,
            corpus=corpus,
            echo=lambda *_: None,
            explicit=explicit,
            extension=".pt",
            results_file=False,
        )
    except RunDirectoryTaken as err:  # its message gives the command line's remedy; say the API's
        raise NanoLLMError(_taken_directory_remedy(err)) from None
    results["final_loss"] = results["final_train_loss"]
    return results


def _taken_directory_remedy(err: RunDirectoryTaken) -> str:
    from nanollm.checkpointing import list_checkpoints

    if err.resume_from is None:
        held = list_checkpoints(Path(err.directory))
        newest = f"'{held[0]}'" if held else "one of its checkpoints"  # newest first
        return (
            f"'{err.directory}' already holds checkpoints of another run: continue that run with "
            f"resume_from={newest}, or train this one in another config['checkpoint_dir']."
        )
    return (
        f"'{err.directory}' holds checkpoints of another run, so '{err.resume_from}' cannot be resumed into it: "
        f"set config['checkpoint_dir'] to the directory that holds it ('{Path(err.resume_from).parent}') or a new one."
    )


def load_checkpoint(
    path: str | Path, model: TransformerLanguageModel, optimizer: torch.optim.Optimizer | None = None
) -> CheckpointInfo:
    """Load weights (and optionally optimizer state) into `model`; returns `(step, loss)`."""
    from nanollm.checkpointing import NANOLLM_KEY, load_model_weights, read_checkpoint

    _check_path(path)
    checkpoint = read_checkpoint(path)
    load_model_weights(model, checkpoint, path)
    if optimizer is not None and checkpoint.get("optimizer_states"):
        try:
            optimizer.load_state_dict(checkpoint["optimizer_states"][0])
        except (ValueError, KeyError, AttributeError) as err:
            raise NanoLLMError(
                f"The optimizer does not match the one '{path}' was saved with ({err}): nanollm's AdamW keeps "
                "two parameter groups (decayed matrices, undecayed norms and biases). To continue training, "
                "use train_with_config(..., resume_from=path), which restores it."
            ) from None
    return CheckpointInfo(int(checkpoint["global_step"]), checkpoint[NANOLLM_KEY].get("train_loss"))


def load_model(path: str | Path) -> tuple[TransformerLanguageModel, CharTokenizer | None]:
    """Rebuild the model and tokenizer from a checkpoint file alone."""
    from nanollm.checkpointing import model_from_checkpoint

    _check_path(path)
    model, tokenizer, _ = model_from_checkpoint(path)
    return model, tokenizer


def _check_path(path) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise NanoLLMError(f"path must be a checkpoint file path (a str or Path), got {path!r}.")
