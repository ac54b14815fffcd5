"""Fault injection for the reliability tests: a signal at a chosen moment of training.

Added to a real `train.py` run as a config callback, so the fault lands at an exact batch instead of
after a random sleep:
    +callbacks.fault._target_=tests.faults.SignalAt +callbacks.fault.batch=9 +callbacks.fault.signum=15
"""

import errno
import hashlib
import json
import os
import signal
import time

import lightning as L


class SignalAt(L.Callback):
    """Sends `signum` to this process at the end of its `batch`-th training batch (micro-batch, from 1)."""

    def __init__(self, batch: int, signum: int = signal.SIGTERM, times: int = 1):
        self.batch, self.signum, self.times = batch, signum, times
        self.seen = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.seen += 1
        if self.seen == self.batch:
            for _ in range(self.times):  # times=2: a user pressing Ctrl-C twice
                os.kill(os.getpid(), self.signum)


class DiskFullAt(L.Callback):
    """From the end of optimizer step `step` on, every fsync of a file whose path contains `name` fails
    with ENOSPC, as on a full disk (root ignores read-only permissions, so this is how tests get a
    failing write)."""

    def __init__(self, step: int = 0, name: str = ""):
        self.step, self.name = step, name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step >= self.step and not getattr(os.fsync, "disk_full", False):
            real_fsync, name = os.fsync, self.name

            def fsync(fd):
                if name in os.readlink(f"/proc/self/fd/{fd}"):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                real_fsync(fd)

            fsync.disk_full = True
            os.fsync = fsync


class RecordBatches(L.Callback):
    """Writes what this process trained on to `<path>/batches_rank<r>.json`: per batch, its shape and a
    fingerprint of its token ids, so a test can check what each DDP rank really consumed."""

    def __init__(self, path: str):
        self.path, self.batches = path, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        x, _ = batch
        self.batches.append({"shape": list(x.shape), "ids": hashlib.sha1(x.cpu().numpy().tobytes()).hexdigest()})

    def on_train_end(self, trainer, pl_module) -> None:
        with open(os.path.join(self.path, f"batches_rank{trainer.global_rank}.json"), "w") as handle:
            json.dump(self.batches, handle)


class InfiniteLearningRateAt(L.Callback):
    """Sets every learning rate to infinity for optimizer step `step` (from 1): that step's loss is still
    finite, the weights it leaves are not."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step + 1 == self.step:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = float("inf")


class SlowValidation(L.Callback):
    """Makes every validation batch `seconds` slower, as a large validation split would."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_validation_batch_end(self, *args, **kwargs) -> None:
        time.sleep(self.seconds)
