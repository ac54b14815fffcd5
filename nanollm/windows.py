"""Batches of character windows (plain PyTorch and NumPy): random ones for training, every window once
for validation.

Training batches are drawn at random offsets straight from the (memory-mapped) token array, a
whole batch per fetch with vectorised indexing. Batch `i` depends only on `(seed, rank, i)`.
Used by the LightningDataModule and by the benchmark's bare loop, so both see the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset


def windows_at(tokens: np.ndarray, starts: np.ndarray, length: int, id_map: np.ndarray | None) -> torch.Tensor:
    """(len(starts), length) int64 token windows, re-numbered through `id_map` when the run's vocabulary
    orders characters differently from the cached encoding (a fine-tuned, extended vocabulary)."""
    windows = tokens[starts[:, None] + np.arange(length)]
    return torch.from_numpy(id_map[windows] if id_map is not None else windows.astype(np.int64))


class RandomWindows(IterableDataset):
    """An endless stream of `(x, y)` batches, each `batch_size` windows at random offsets.

    With `repeat` set, batch indices cycle through the first `repeat` ones: the same few batches over
    and over, to check that a model can overfit them (`debug=overfit`).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        context_length: int,
        batch_size: int,
        seed: int,
        rank: int,
        start: int,
        id_map: np.ndarray | None = None,
        repeat: int | None = None,
    ):
        self.tokens, self.context_length, self.batch_size = tokens, context_length, batch_size
        self.seed, self.rank, self.start, self.id_map, self.repeat = seed, rank, start, id_map, repeat

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.repeat:
            index %= self.repeat
        rng = np.random.default_rng([self.seed, self.rank, index])
        offsets = rng.integers(0, len(self.tokens) - self.context_length, size=self.batch_size)
        windows = windows_at(self.tokens, offsets, self.context_length + 1, self.id_map)  # (B, T+1)
        return windows[:, :-1], windows[:, 1:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        index = self.start
        while True:
            yield self.batch(index)
            index += 1


class SequentialWindows(IterableDataset):
    """Non-overlapping windows covering the validation split once: a stable, comparable estimate.

    With `limit`, an iteration scores only that many windows, evenly spaced over the split (a cheaper
    estimate during training, as nanoGPT's); `limit` is read when an iteration starts, so it can be
    lifted for the last validation. Under DDP each process takes every `world`-th of those windows,
    so the split is scored once in all.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        context_length: int,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        id_map: np.ndarray | None = None,
        limit: int | None = None,
    ):
        num_windows = (len(tokens) - 1) // context_length
        self.all_starts = np.arange(num_windows) * context_length
        self.tokens, self.context_length, self.batch_size, self.id_map = tokens, context_length, batch_size, id_map
        self.rank, self.world, self.limit = rank, world, limit

    def starts(self) -> np.ndarray:
        """The starts of the windows this process scores in this iteration."""
        starts = self.all_starts
        if self.limit is not None and self.limit < len(starts):
            starts = starts[np.unique(np.linspace(0, len(starts) - 1, self.limit).round().astype(np.int64))]
        return starts[self.rank :: self.world]

    def __len__(self) -> int:
        # With a limit the iteration may stop earlier: Lightning takes len() as an upper bound.
        return -(-len(self.all_starts[self.rank :: self.world]) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        starts = self.starts()
        for first in range(0, len(starts), self.batch_size):
            windows = windows_at(
                self.tokens, starts[first : first + self.batch_size], self.context_length + 1, self.id_map
            )
            yield windows[:, :-1], windows[:, 1:]
