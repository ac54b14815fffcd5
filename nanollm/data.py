"""The LightningDataModule: contiguous train/validation split and batches of character windows.

Training batches are drawn at random offsets straight from the (memory-mapped) token array, a
whole batch per fetch with vectorised indexing. Batch `i` depends only on `(seed, rank, i)`,
so the module's state is a single counter and a resumed run sees exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from nanollm.corpus import EncodedCorpus, prepare_corpus
from nanollm.errors import NanoLLMError


class RandomWindows(IterableDataset):
    """An endless stream of `(x, y)` batches, each `batch_size` windows at random offsets."""

    def __init__(self, tokens: np.ndarray, context_length: int, batch_size: int, seed: int, rank: int, start: int):
        self.tokens, self.context_length, self.batch_size = tokens, context_length, batch_size
        self.seed, self.rank, self.start = seed, rank, start
        self._span = np.arange(context_length + 1)

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, index])
        offsets = rng.integers(0, len(self.tokens) - self.context_length, size=self.batch_size)
        windows = torch.from_numpy(self.tokens[offsets[:, None] + self._span].astype(np.int64))  # (B, T+1)
        return windows[:, :-1], windows[:, 1:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        index = self.start
        while True:
            yield self.batch(index)
            index += 1


class SequentialWindows(IterableDataset):
    """Non-overlapping windows covering the validation split once: a stable, comparable estimate."""

    def __init__(self, tokens: np.ndarray, context_length: int, batch_size: int):
        num_windows = (len(tokens) - 1) // context_length
        self.starts = np.arange(num_windows) * context_length
        self.tokens, self.context_length, self.batch_size = tokens, context_length, batch_size

    def __len__(self) -> int:
        return -(-len(self.starts) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        span = np.arange(self.context_length + 1)
        for first in range(0, len(self.starts), self.batch_size):
            starts = self.starts[first : first + self.batch_size]
            windows = torch.from_numpy(self.tokens[starts[:, None] + span].astype(np.int64))
            yield windows[:, :-1], windows[:, 1:]


class CharDataModule(L.LightningDataModule):
    """Serves character windows from a text file, a directory of `.txt` files, or an encoded corpus."""

    def __init__(
        self,
        path: str | Path | None = None,
        context_length: int = 64,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        seed: int = 1337,
        cache_dir: str | Path | None = None,
        corpus: EncodedCorpus | None = None,
        pin_memory: bool = False,
    ):
        super().__init__()
        if path is None and corpus is None:
            raise NanoLLMError("No training data: set data.path to a UTF-8 text file or directory.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise NanoLLMError(f"data.batch_size must be an integer >= 1, got {batch_size!r}.")
        if not 0.0 < val_fraction < 1.0:
            raise NanoLLMError(f"data.val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}.")
        self.path, self.cache_dir, self.corpus = path, cache_dir, corpus
        self.context_length, self.batch_size, self.val_fraction = context_length, batch_size, val_fraction
        self.seed, self.pin_memory = seed, pin_memory
        self.batches_served = 0  # restored from checkpoints; the next training batch's index
        self.train_tokens: np.ndarray | None = None
        self.val_tokens: np.ndarray | None = None

    def prepare_data(self) -> None:
        # Runs on one process per node: build the cached encoding so the other ranks only read it.
        if self.corpus is None:
            prepare_corpus(self.path, self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.train_tokens is not None:
            return
        if self.corpus is None:
            self.corpus = prepare_corpus(self.path, self.cache_dir)
        tokens = self.corpus.tokens
        split = int(len(tokens) * (1 - self.val_fraction))
        self.train_tokens, self.val_tokens = tokens[:split], tokens[split:]
        needed = self.context_length + 1
        for name, part in (("training", self.train_tokens), ("validation", self.val_tokens)):
            if len(part) < needed:
                raise NanoLLMError(
                    f"The {name} split of '{self.corpus.source}' has {len(part)} tokens but model.context_length + 1 = "
                    f"{needed} are needed: use a longer text or a smaller model.context_length."
                )

    def train_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        dataset = RandomWindows(
            self.train_tokens, self.context_length, self._per_rank_batch(world), self.seed, rank, self.batches_served
        )
        return DataLoader(dataset, batch_size=None, pin_memory=self.pin_memory)

    def val_dataloader(self) -> DataLoader:
        world = self.trainer.world_size if self.trainer else 1
        dataset = SequentialWindows(self.val_tokens, self.context_length, self._per_rank_batch(world))
        return DataLoader(dataset, batch_size=None, pin_memory=self.pin_memory)

    def _per_rank_batch(self, world_size: int) -> int:
        # data.batch_size is the global batch: each of N processes draws batch_size / N windows.
        if self.batch_size % world_size:
            raise NanoLLMError(
                f"data.batch_size ({self.batch_size}) must be divisible by the number of processes ({world_size})."
            )
        return self.batch_size // world_size

    def state_dict(self) -> dict:
        # Each optimizer step consumes `accumulate_grad_batches` batches, so the step count gives the position.
        if self.trainer is None:
            return {"batches_served": self.batches_served}
        return {"batches_served": int(self.trainer.global_step * self.trainer.accumulate_grad_batches)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.batches_served = int(state_dict["batches_served"])
