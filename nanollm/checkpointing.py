"""Checkpoint files: crash-safe writes, loads that cannot run code, and finding the one to resume.

Checkpoints are Lightning checkpoints with one extra entry, `nanollm`, holding the model's
architecture, the tokenizer's vocabulary and the resolved run config as plain types, so
`generate.py` needs nothing but the file. This module imports no Lightning (importing it takes ~2 s):
generate.py and eval.py read checkpoints without it; Lightning writes them through
callbacks.SafeCheckpointIO.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from nanollm.errors import NanoLLMError, RunDirectoryTaken
from nanollm.files import atomic_copy, atomic_write

__all__ = ["atomic_copy", "atomic_torch_save"]

NANOLLM_KEY = "nanollm"
FORMAT_VERSION = 1
FINAL_NAME = "checkpoint_final.ckpt"
LAST_NAME = "last.ckpt"
BEST_NAME = "best.ckpt"


class DamagedCheckpointError(NanoLLMError):
    """The file exists but cannot be read as a checkpoint (truncated, corrupted)."""


def atomic_torch_save(obj: Any, path: Path) -> None:
    """`torch.save` with the write-then-rename guarantee of `nanollm.files.atomic_write`."""
    atomic_write(path, lambda handle: torch.save(obj, handle), what="checkpoint")


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Load a nanollm checkpoint without ever unpickling code; errors say what is wrong with the file."""
    path = Path(path)
    if not path.exists():
        raise NanoLLMError(
            f"Checkpoint '{path}' does not exist. Check the path, or use ckpt_path=last for the newest run."
        )
    if path.is_dir():  # a run directory keeps its checkpoints in checkpoints/, a sweep's jobs in <n>/checkpoints/
        inside = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = list_checkpoints(inside) or sorted(path.glob(f"*/checkpoints/{LAST_NAME}"))
        if not found:
            raise NanoLLMError(
                f"Checkpoint path '{path}' is a directory with no checkpoints in it; pass a checkpoint file "
                "(outputs/<date>/<time>/checkpoints/last.ckpt) or ckpt_path=last."
            )
        raise NanoLLMError(f"Checkpoint path '{path}' is a directory; pass a checkpoint file in it, e.g. {found[0]}.")
    if not path.is_file():  # a FIFO or a device would block or stream forever
        raise NanoLLMError(f"Checkpoint '{path}' is not a regular file; pass a checkpoint file written by nanollm.")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # The weights-only unpickler names the callable it refused ("GLOBAL os.system"); other
        # unpickling failures mean the bytes are simply not a checkpoint.
        if "GLOBAL" in str(err):
            raise NanoLLMError(
                f"Refused to load '{path}': it contains Python objects that could run code, which nanollm "
                "checkpoints never do. Only load checkpoints you trust, written by nanollm."
            ) from None
        raise DamagedCheckpointError(
            f"Checkpoint '{path}' is damaged or not a checkpoint file ({_unpickling_reason(err)})."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, IndexError, TypeError) as err:
        # Arbitrary bytes make torch's safe unpickler fail in many ways (a text file starting with "h": KeyError).
        reason = str(err).splitlines()[0] if str(err) and not isinstance(err, LookupError) else "not a PyTorch file"
        raise DamagedCheckpointError(f"Checkpoint '{path}' is damaged or not a checkpoint file ({reason}).") from None
    if not isinstance(checkpoint, dict) or NANOLLM_KEY not in checkpoint or "state_dict" not in checkpoint:
        raise NanoLLMError(
            f"'{path}' is not a nanollm checkpoint (no model/vocabulary record). Pass a .ckpt written by train.py."
        )
    return checkpoint


def _unpickling_reason(err: pickle.UnpicklingError) -> str:
    """What the weights-only unpickler found, without torch's advice to retry with weights_only=False
    (which could run code: the opposite of what a damaged file needs)."""
    found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(err))
    return found.group(1).strip() if found else "its bytes are not a saved PyTorch object"


# train.py writes .ckpt files; the runbook API .pt files.
CHECKPOINT_FILES = ("*.ckpt", "*.pt")
BEST_FILES = (BEST_NAME, "best.pt")


def list_checkpoints(directory: Path | None, patterns: tuple[str, ...] = CHECKPOINT_FILES) -> list[Path]:
    """Checkpoint files in a directory, newest first (by modification time, then name)."""
    if directory is None or not directory.is_dir():
        return []
    files = {p for pattern in patterns for p in directory.glob(pattern) if p.is_file()}
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)


def keep_finished_state(final_path: Path, step: int) -> Path | None:
    """Before a finished run is trained further, give its final state a step file of its own.

    The last step of a run is saved only as `checkpoint_final`, which the continued run replaces at its
    new end: without this the model the run ended with (the one that was evaluated and sampled) would be
    kept nowhere. A hard link where the file system allows it, so it costs no space.
    """
    kept = final_path.with_name(f"checkpoint_step_{step}{final_path.suffix}")
    if not final_path.is_file() or kept.exists() or checkpoint_step(final_path) != step:
        return None
    try:
        os.link(final_path, kept)
    except OSError:
        atomic_copy(final_path, kept)
    return kept


def checkpoint_step(path: Path) -> int | None:
    """The training step a checkpoint was saved at, read without loading its tensors (None if unreadable)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception:  # damaged or foreign: not a state of this run to protect or compare
        return None


def newest_good_checkpoint(
    directories: list[Path], patterns: tuple[str, ...] = CHECKPOINT_FILES, warn=print
) -> tuple[Path, dict] | None:
    """The newest readable checkpoint among `directories` and its contents; damaged files are reported and skipped.

    best.ckpt only counts when asked for by name: it is a copy of an earlier state, not the run's latest.
    """
    wants_best = patterns == BEST_FILES
    candidates = sorted(
        (p for d in directories for p in list_checkpoints(d, patterns) if wants_best or p.name not in BEST_FILES),
        key=lambda p: p.stat().st_mtime_ns,
        reverse=True,
    )
    for path in candidates:
        try:
            return path, read_checkpoint(path)
        except DamagedCheckpointError as err:
            warn(f"warning: {err} Falling back to an older checkpoint.")
        except NanoLLMError as err:
            warn(f"warning: skipping {path}: {err}")
    return None


def resolve_checkpoint(
    ckpt_path: str | None,
    own_dirs: Path | list[Path] | None,
    outputs_dir: Path,
    warn=print,
    own_run_only: bool = False,
) -> tuple[Path, dict] | None:
    """Turn the user's `ckpt_path` into a checkpoint file and its loaded contents (None for a fresh run).

    `last` means the newest good checkpoint of this run (`own_dirs`), else of the newest run under
    `outputs_dir`; `best` the same among `best.ckpt` files. Lightning's own `ckpt_path="last"` only
    looks in the current run, which for a fresh timestamped Hydra run is empty, so we resolve it ourselves.
    `own_run_only` (a sweep's job): only this run's own checkpoints; none means a fresh start.
    """
    if ckpt_path in (None, ""):
        return None
    name = str(ckpt_path)
    if name not in ("last", "best"):
        return Path(name), read_checkpoint(Path(name))
    patterns = CHECKPOINT_FILES if name == "last" else BEST_FILES
    own = [own_dirs] if isinstance(own_dirs, Path) else list(own_dirs or [])
    found = newest_good_checkpoint(own, patterns, warn)
    if found is None and own_run_only:
        warn(f"ckpt_path={name}: this job has no checkpoint of its own yet, so it starts from the beginning.")
        return None
    if found is None and outputs_dir.is_dir():
        run_dirs = {p.parent for pattern in patterns for p in outputs_dir.rglob(pattern)}
        found = newest_good_checkpoint(sorted(run_dirs), patterns, warn)
    if found is None:
        what = "no checkpoint" if name == "last" else f"no {BEST_NAME} (it is written at the first validation)"
        raise NanoLLMError(
            f"ckpt_path={name} found {what} in this run or under '{outputs_dir}'. "
            "Train first, or pass ckpt_path=/path/to/file.ckpt."
        )
    return found


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint file belongs to (`<run>/checkpoints/x.ckpt`, or `<run>/hpc_ckpt_1.ckpt`)."""
    checkpoint = Path(checkpoint).resolve()
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def check_run_ownership(own_dirs: list[Path], resume_from: Path | None) -> None:
    """A run directory belongs to one run: refuse to write into one that holds another run's checkpoints.

    Starting fresh there, or resuming a checkpoint of another run there, would mix the two runs'
    checkpoints and overwrite `last.ckpt`, `checkpoint_final.ckpt` and `results.json`.
    """
    held = [p for d in own_dirs for p in list_checkpoints(d)]
    if not held:
        recorded = next((d for d in own_dirs if holds_results(d)), None)
        if recorded is not None and (resume_from is None or Path(resume_from).resolve().parent != recorded.resolve()):
            # Its checkpoints are elsewhere (checkpoint_dir), but this run would replace its results.json.
            raise RunDirectoryTaken(
                f"'{recorded}' holds another run's results.json; start this run in another directory "
                "(hydra.run.dir=..., or leave it out), or resume that run with ckpt_path=<one of its checkpoints>.",
                recorded,
                resume_from,
            )
        return
    where = own_dirs[0]
    if resume_from is None:
        raise RunDirectoryTaken(
            f"'{where}' already holds checkpoints of another run; resume it with ckpt_path=last "
            "or start a new run in another directory (hydra.run.dir=...).",
            where,
            resume_from,
        )
    if Path(resume_from).resolve().parent not in {d.resolve() for d in own_dirs}:
        raise RunDirectoryTaken(
            f"'{where}' holds checkpoints of another run, so '{resume_from}' cannot be resumed into it. Continue "
            f"that run in its own directory (hydra.run.dir={run_dir_of(resume_from)} ckpt_path=last) or in a new "
            "one (leave out hydra.run.dir).",
            where,
            resume_from,
        )


def run_record(run_dir: Path) -> dict | None:
    """A run directory's results.json: None if there is none, `{"status": "unknown"}` if it cannot be read."""
    try:
        record = json.loads((Path(run_dir) / "results.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        record = None
    return record if isinstance(record, dict) else {"status": "unknown"}


def holds_results(run_dir: Path) -> bool:
    """Whether a directory holds the results of a run, which nothing may replace; a failed run's may be
    replaced by its retry, and an unreadable one is not ours to replace either."""
    record = run_record(run_dir)
    return record is not None and record.get("status", "unknown") != "failed"


def architecture_mismatch(saved: dict, wanted: dict) -> list[str]:
    """`model.key (checkpoint X, config Y)` for each architecture setting that differs."""
    return [
        f"model.{key} (checkpoint {saved.get(key)!r}, config {wanted.get(key)!r})"
        for key in sorted(set(saved) | set(wanted))
        if key != "dropout" and saved.get(key) != wanted.get(key)
    ]


# No nanollm model needs more positions; a larger value in a file is damage, not a model.
MAX_CONTEXT_LENGTH = 1 << 20


def checked_model_config(path: str | Path, checkpoint: dict):
    """The checkpoint's model settings, checked against its weights before any memory is allocated for them.

    A file that loads safely can still hold a damaged record: a missing or unknown setting, sizes that
    do not match the stored weights (absurd ones would allocate gigabytes), or NaN/Inf weights.
    """
    from nanollm.model import ModelConfig

    record = checkpoint[NANOLLM_KEY].get("model") if isinstance(checkpoint[NANOLLM_KEY], dict) else None
    if not isinstance(record, dict):
        raise NanoLLMError(f"Checkpoint '{path}' has no model record (nanollm.model); it cannot be rebuilt.")
    known = set(ModelConfig.__dataclass_fields__)
    unknown = sorted(set(record) - known)
    if unknown:
        raise NanoLLMError(
            f"Checkpoint '{path}' has unknown model settings {unknown} (written by a newer or modified nanollm?)."
        )
    try:
        config = ModelConfig.from_saved(record)
    except (TypeError, ValueError) as err:
        raise NanoLLMError(f"Checkpoint '{path}' has an invalid model record: {err}.") from None
    except NanoLLMError as err:
        raise NanoLLMError(f"Checkpoint '{path}' has an invalid model record: {err}") from None
    state = checkpoint["state_dict"]
    embedding = state.get("model.token_embedding.weight")
    expected = (config.vocab_size, config.embedding_dim)
    if not isinstance(embedding, torch.Tensor) or tuple(embedding.shape) != expected:
        found = tuple(embedding.shape) if isinstance(embedding, torch.Tensor) else None
        raise NanoLLMError(
            f"Checkpoint '{path}' is inconsistent: its model record says vocab_size x embedding_dim = {expected}, "
            f"its token embedding is {found}."
        )
    if config.context_length > MAX_CONTEXT_LENGTH:
        raise NanoLLMError(f"Checkpoint '{path}' records an implausible context_length ({config.context_length}).")
    bad = [
        k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and not v.isfinite().all()
    ]
    if bad:
        raise NanoLLMError(
            f"Checkpoint '{path}' holds NaN/Inf weights ({bad[0]}{' ...' if len(bad) > 1 else ''}): it was saved "
            "from a diverged run. Use an earlier checkpoint."
        )
    return config


def model_from_checkpoint(path: str | Path, checkpoint: dict | None = None):
    """Rebuild `(model, tokenizer, checkpoint)` from a checkpoint file alone (or its already loaded contents)."""
    from nanollm.model import TransformerLanguageModel
    from nanollm.tokenizer import CharTokenizer

    checkpoint = checkpoint if checkpoint is not None else read_checkpoint(path)
    saved = checkpoint[NANOLLM_KEY]
    model = TransformerLanguageModel(checked_model_config(path, checkpoint))
    load_model_weights(model, checkpoint, path)
    tokenizer = CharTokenizer.from_dict(saved["tokenizer"]) if saved.get("tokenizer") else None
    return model.eval(), tokenizer, checkpoint


def load_model_weights(model, checkpoint: dict, path: str | Path, same_settings: bool = True) -> None:
    """Copy the checkpoint's weights into `model`; a different architecture is named key by key, and
    (`same_settings`) a model built with other settings than the checkpoint records is refused even
    where the weights' shapes agree (num_heads, activation, a RoPE model's context_length)."""
    prefix = "model."
    state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    resized = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    differ = settings_that_differ(model, checkpoint, path) if same_settings or missing or unexpected or resized else ""
    if missing or unexpected or resized or differ:
        parts = [
            f"{label}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("different shape", resized))
            if keys
        ]
        detail = f" ({'; '.join(parts)})" if parts else ""
        raise NanoLLMError(
            f"Checkpoint '{path}' does not match this model's architecture{detail}. "
            f"Build the model with the checkpoint's settings{differ}."
        )
    model.load_state_dict(state)


def check_resumable_into(model, checkpoint: dict, path: str | Path) -> None:
    """A model built elsewhere (the API's) must be built as the checkpoint's was: Lightning would fail on
    its state dict otherwise."""
    differ = settings_that_differ(model, checkpoint, path)
    if differ:
        raise NanoLLMError(f"Cannot resume '{path}' into this model: build it with the checkpoint's settings{differ}.")


def settings_that_differ(model, checkpoint: dict, path: str | Path) -> str:
    """`: vocab_size=57 (this model has 42)`, for each model setting the checkpoint records differently."""
    try:
        saved = checked_model_config(path, checkpoint).to_dict()
        own = model.config.to_dict()
    except (NanoLLMError, AttributeError, KeyError, TypeError):  # no usable record, or not a nanollm model
        return ""
    differ = [
        f"{k}={v!r} (this model has {own.get(k)!r})" for k, v in saved.items() if k != "dropout" and own.get(k) != v
    ]
    return ": " + ", ".join(differ) if differ else ""
