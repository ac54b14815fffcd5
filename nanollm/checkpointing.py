"""Checkpoint files: crash-safe writes, loads that cannot run code, and finding the one to resume.

Checkpoints are Lightning checkpoints with one extra entry, `nanollm`, holding the model's
architecture, the tokenizer's vocabulary and the resolved run config as plain types, so
`generate.py` needs nothing but the file.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from nanollm.errors import NanoLLMError

NANOLLM_KEY = "nanollm"
FORMAT_VERSION = 1
FINAL_NAME = "checkpoint_final.ckpt"
LAST_NAME = "last.ckpt"


class DamagedCheckpointError(NanoLLMError):
    """The file exists but cannot be read as a checkpoint (truncated, corrupted)."""


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes atomically and only ever loads with `weights_only=True`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        atomic_torch_save(checkpoint, Path(path))

    def load_checkpoint(self, path, map_location: Any | None = "cpu", weights_only: bool | None = None) -> dict:
        return read_checkpoint(Path(path), map_location=map_location)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename it into place.

    A kill at any moment leaves either the old file or the new one, never a truncated one.
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise NanoLLMError(
            f"Could not save checkpoint '{path}': {err.strerror or err}. Free disk space or make the directory "
            "writable; earlier checkpoints are intact."
        ) from None


def atomic_copy(source: Path, target: Path) -> None:
    """Copy a file with the same write-then-rename guarantee."""
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        with open(source, "rb") as src, open(tmp, "wb") as dst:
            while block := src.read(16 * 1024 * 1024):
                dst.write(block)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise NanoLLMError(f"Could not write checkpoint '{target}': {err.strerror or err}.") from None


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Load a nanollm checkpoint without ever unpickling code; errors say what is wrong with the file."""
    path = Path(path)
    if not path.exists():
        raise NanoLLMError(
            f"Checkpoint '{path}' does not exist. Check the path, or use ckpt_path=last for the newest run."
        )
    if path.is_dir():
        raise NanoLLMError(
            f"Checkpoint path '{path}' is a directory; pass a .ckpt file inside it (e.g. {path}/last.ckpt)."
        )
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
        raise DamagedCheckpointError(f"Checkpoint '{path}' is damaged or not a checkpoint file ({err}).") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DamagedCheckpointError(f"Checkpoint '{path}' is damaged or not a checkpoint file ({reason}).") from None
    if not isinstance(checkpoint, dict) or NANOLLM_KEY not in checkpoint or "state_dict" not in checkpoint:
        raise NanoLLMError(
            f"'{path}' is not a nanollm checkpoint (no model/vocabulary record). Pass a .ckpt written by train.py."
        )
    return checkpoint


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files in a directory, newest first (by modification time, then name)."""
    if not directory.is_dir():
        return []
    files = [p for p in directory.glob("*.ckpt") if p.is_file()]
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)


def newest_good_checkpoint(directories: list[Path], warn=print) -> tuple[Path, dict] | None:
    """The newest readable checkpoint among `directories` and its contents; damaged files are reported and skipped."""
    candidates = sorted(
        (p for d in directories for p in list_checkpoints(d)), key=lambda p: p.stat().st_mtime_ns, reverse=True
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
    ckpt_path: str | None, checkpoint_dir: Path | None, outputs_dir: Path
) -> tuple[Path, dict] | None:
    """Turn the user's `ckpt_path` into a checkpoint file and its loaded contents (None for a fresh run).

    `last` means the newest good checkpoint of this run's directory, else of the newest run
    under `outputs_dir`. Lightning's own `ckpt_path="last"` only looks in the current run,
    which for a fresh timestamped Hydra run is empty, so we resolve it ourselves.
    """
    if ckpt_path in (None, ""):
        return None
    if str(ckpt_path) != "last":
        return Path(ckpt_path), read_checkpoint(Path(ckpt_path))
    found = newest_good_checkpoint([checkpoint_dir]) if checkpoint_dir is not None else None
    if found is None and outputs_dir.is_dir():
        run_dirs = {p.parent for p in outputs_dir.rglob("*.ckpt")}
        found = newest_good_checkpoint(sorted(run_dirs))
    if found is None:
        raise NanoLLMError(
            f"ckpt_path=last found no checkpoint in this run or under '{outputs_dir}'. "
            "Train first, or pass ckpt_path=/path/to/file.ckpt."
        )
    return found


def architecture_mismatch(saved: dict, wanted: dict) -> list[str]:
    """`model.key (checkpoint X, config Y)` for each architecture setting that differs."""
    return [
        f"model.{key} (checkpoint {saved.get(key)!r}, config {wanted.get(key)!r})"
        for key in sorted(set(saved) | set(wanted))
        if key != "dropout" and saved.get(key) != wanted.get(key)
    ]


def model_from_checkpoint(path: str | Path, checkpoint: dict | None = None):
    """Rebuild `(model, tokenizer, checkpoint)` from a checkpoint file alone (or its already loaded contents)."""
    from nanollm.model import ModelConfig, TransformerLanguageModel
    from nanollm.tokenizer import CharTokenizer

    checkpoint = checkpoint if checkpoint is not None else read_checkpoint(path)
    saved = checkpoint[NANOLLM_KEY]
    model = TransformerLanguageModel(ModelConfig.from_saved(saved["model"]))
    load_model_weights(model, checkpoint, path)
    tokenizer = CharTokenizer.from_dict(saved["tokenizer"]) if saved.get("tokenizer") else None
    return model.eval(), tokenizer, checkpoint


def load_model_weights(model, checkpoint: dict, path: str | Path) -> None:
    """Copy the checkpoint's weights into `model`; a different architecture is named key by key."""
    prefix = "model."
    state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    resized = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or resized:
        parts = [
            f"{label}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("different shape", resized))
            if keys
        ]
        raise NanoLLMError(
            f"Checkpoint '{path}' does not match this model's architecture ({'; '.join(parts)}). "
            "Build the model with the checkpoint's settings."
        )
    model.load_state_dict(state)
