"""The LightningDataModule: contiguous train/validation split and batches of character windows.

Batch `i` depends only on `(seed, rank, i)` (nanollm.windows), so the module's state is a single
counter and a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from nanollm.corpus import DEFAULT_GLOB, EncodedCorpus, prepare_corpus
from nanollm.errors import NanoLLMError
from nanollm.tokenizer import CharTokenizer
from nanollm.windows import RandomWindows, SequentialWindows


class CharDataModule(L.LightningDataModule):
    """Serves character windows from a text file, the files of a directory matching `glob`, or an encoded corpus."""

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
        glob: str = DEFAULT_GLOB,
        val_batch_size: int | None = None,
        overfit_batches: int = 0,
        val_windows: int | None = None,
    ):
        super().__init__()
        if path is None and corpus is None:
            raise NanoLLMError("No training data: set data.path to a UTF-8 text file or directory.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise NanoLLMError(f"data.batch_size must be an integer >= 1, got {batch_size!r}.")
        if not 0.0 < val_fraction < 1.0:
            raise NanoLLMError(f"data.val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}.")
        self.path, self.glob, self.cache_dir, self.corpus = path, glob, cache_dir, corpus
        self.context_length, self.batch_size, self.val_fraction = context_length, batch_size, val_fraction
        self.seed, self.pin_memory = seed, pin_memory
        # Validation only runs forward passes, so it can take far larger batches than training.
        self.val_batch_size = val_batch_size or batch_size
        self.overfit_batches = overfit_batches
        # Validations during training score val_windows windows of the split; the last one scores every window.
        self.val_windows = val_windows
        self.val_dataset: SequentialWindows | None = None
        self.id_map: np.ndarray | None = None  # set by use_vocabulary
        self.batches_served = 0  # restored from checkpoints; the next training batch's index
        self.train_tokens: np.ndarray | None = None
        self.val_tokens: np.ndarray | None = None

    def prepare_data(self) -> None:
        # Runs on one process per node: build the cached encoding so the other ranks only read it.
        if self.corpus is None:
            prepare_corpus(self.path, self.cache_dir, self.glob)

    def setup(self, stage: str | None = None) -> None:
        if self.train_tokens is not None:
            return
        if self.corpus is None:
            self.corpus = prepare_corpus(self.path, self.cache_dir, self.glob)
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

    def use_vocabulary(self, tokenizer: CharTokenizer) -> None:
        """Serve ids of `tokenizer` (the model's vocabulary), which must hold every character of the corpus."""
        corpus_chars = self.corpus.tokenizer.chars
        if corpus_chars == tokenizer.chars[: len(corpus_chars)]:
            self.id_map = None  # same ids: nothing to re-number
            return
        missing = [c for c in corpus_chars if c not in tokenizer.stoi]
        if missing:
            raise NanoLLMError(
                f"The model's vocabulary lacks {len(missing)} character(s) of the data: {missing[:10]!r}."
            )
        self.id_map = np.array([tokenizer.stoi[c] for c in corpus_chars], dtype=np.int64)

    def _rank_and_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        dataset = RandomWindows(
            self.train_tokens,
            self.context_length,
            self._per_rank(self.batch_size, world, "data.batch_size"),
            self.seed,
            rank,
            self.batches_served,
            self.id_map,
            self.overfit_batches or None,
        )
        return DataLoader(dataset, batch_size=None, pin_memory=self.pin_memory)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        batch = max(self.val_batch_size // world, 1)
        fitting = self.trainer is not None and self.trainer.state.fn == "fit"  # trainer.validate() scores every window
        limit = self.val_windows if fitting else None
        self.val_dataset = SequentialWindows(
            self.val_tokens, self.context_length, batch, rank, world, self.id_map, limit
        )
        return DataLoader(self.val_dataset, batch_size=None, pin_memory=self.pin_memory)

    def score_every_val_window(self) -> None:
        """Make the coming validation a full pass over the split (the last one of a run)."""
        if self.val_dataset is not None:
            self.val_dataset.limit = None

    @property
    def num_val_windows(self) -> int:
        return (len(self.val_tokens) - 1) // self.context_length

    @staticmethod
    def _per_rank(batch_size: int, world_size: int, key: str) -> int:
        # data.batch_size is the global batch: each of N processes draws batch_size / N windows.
        if batch_size % world_size:
            raise NanoLLMError(
                f"{key} ({batch_size}) must be divisible by the number of processes ({world_size}); "
                f"use a multiple of {world_size}, e.g. {key}={world_size * max(batch_size // world_size, 1)}."
            )
        return batch_size // world_size

    def state_dict(self) -> dict:
        # Each optimizer step consumes `accumulate_grad_batches` batches, so the step count gives the position.
        if self.trainer is None:
            return {"batches_served": self.batches_served}
        return {"batches_served": int(self.trainer.global_step * self.trainer.accumulate_grad_batches)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.batches_served = int(state_dict["batches_served"])
