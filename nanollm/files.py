"""Crash-safe file writes: a temporary file beside the target, flushed to disk, then renamed into place.

Checkpoints, results.json, reports and cache entries are all written this way, so a kill or a full
disk at any moment leaves the old file or the new one, never a truncated one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from nanollm.errors import NanoLLMError


def atomic_write(path: Path, write: Callable[[BinaryIO], None], what: str = "file", replace: bool = True) -> None:
    """Write through `write(handle)` to a temporary file beside `path`, flush it to disk, then rename it
    into place: a kill or a full disk at any moment leaves the old file or the new one, never a truncated one.
    With `replace=False` a file that exists at `path` by then is left as it is, and that is an error.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    except FileExistsError:
        tmp.unlink(missing_ok=True)
        raise NanoLLMError(
            f"'{path}' was created by something else meanwhile; it was left as it is and the {what} not written "
            "there. Choose a new file name."
        ) from None
    except OSError as err:
        with contextlib.suppress(OSError):  # the directory itself may be what failed (read-only, gone)
            tmp.unlink(missing_ok=True)
        raise NanoLLMError(
            f"Could not save {what} '{path}': {err.strerror or err}. Free disk space or make the directory "
            "writable; earlier files are intact."
        ) from None


def _link_new(tmp: Path, path: Path) -> None:
    """Give `tmp` the name `path` only if no file has it: a link fails where a rename would replace."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: check, then rename
        if path.exists():
            raise FileExistsError(path) from None
        os.replace(tmp, path)
    else:
        tmp.unlink()


def remove_unused_run_dir(run_dir: Path) -> None:
    """Remove a run directory that holds nothing but Hydra's config snapshots (.hydra/) and empty
    directories: one made for a run that never wrote anything."""
    run_dir = Path(run_dir)
    if run_dir.is_dir() and all(p.is_dir() or p.relative_to(run_dir).parts[0] == ".hydra" for p in run_dir.rglob("*")):
        shutil.rmtree(run_dir, ignore_errors=True)


def atomic_copy(source: Path, target: Path) -> None:
    """Copy a file with the same write-then-rename guarantee."""

    def copy(handle: BinaryIO) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, handle, 16 * 1024 * 1024)

    atomic_write(target, copy, what="checkpoint")


def atomic_write_text(path: Path, text: str, what: str = "file", replace: bool = True) -> None:
    """Write a text file (results.json, reports) with the write-then-rename guarantee."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")), what=what, replace=replace)
