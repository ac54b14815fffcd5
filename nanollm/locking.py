"""One live run per checkpoint directory: an exclusive lock, held while the run trains.

Checking a directory for another run's checkpoints is not enough: a second run started in it before
the first has saved anything would pass the check, and the two would overwrite each other's
checkpoints and results.json. The lock is an advisory `flock` on the directory itself (no lock file
to leave behind), so the kernel releases it when the process ends, however it ends.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from nanollm.errors import NanoLLMError

try:
    import fcntl
except ImportError:  # Windows: no flock; the checks for another run's checkpoints still apply
    fcntl = None

_held: dict[Path, int] = {}  # directory -> the open descriptor that holds its lock


def claim_directory(directory: Path) -> None:
    """Hold `directory` for this run until `release_directories()`; fail if a live run holds it."""
    directory = Path(directory).resolve()
    if fcntl is None or directory in _held:
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise NanoLLMError(
            f"'{directory}' is in use by another run that is still training; start this run in another directory "
            "(leave out hydra.run.dir, or another checkpoint_dir) or wait until that run ends."
        ) from None
    except OSError:  # a file system without locks (some network mounts): train without one
        os.close(descriptor)
        return
    _held[directory] = descriptor


def release_directories() -> None:
    """Let other runs use this run's directories (the end of a run; a process's exit does it too)."""
    while _held:
        os.close(_held.popitem()[1])


def releasing_directories(run):
    """Decorate a function that runs training: whatever way it ends, the directories it claimed are free."""

    @functools.wraps(run)
    def wrapper(*args, **kwargs):
        try:
            return run(*args, **kwargs)
        finally:
            release_directories()

    return wrapper
