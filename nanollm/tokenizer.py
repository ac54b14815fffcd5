"""Character-level tokenizer: one token per Unicode character, in sorted (deterministic) order."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from nanollm.errors import NanoLLMError


class CharTokenizer:
    """Maps each character of a fixed vocabulary to an integer id and back."""

    def __init__(self, chars: Iterable[str]):
        self.chars: list[str] = sorted(set(chars))
        if not self.chars:
            raise NanoLLMError("Cannot build a vocabulary from empty text: give the tokenizer some characters.")
        if any(len(c) != 1 for c in self.chars):
            raise NanoLLMError("CharTokenizer vocabulary entries must be single characters.")
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        # Lookup table over all of Unicode (4 MB), code point -> token id (-1 = unknown): encoding a
        # corpus becomes one numpy gather instead of a Python loop.
        self._lut = np.full(0x110000, -1, dtype=np.int32)
        self._lut[[ord(c) for c in self.chars]] = np.arange(len(self.chars))

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """Build the vocabulary from a string."""
        return cls(text)

    @classmethod
    def from_path(cls, path: str | Path) -> CharTokenizer:
        """Build the vocabulary from a UTF-8 file or a directory of `.txt` files."""
        from nanollm.corpus import scan_vocabulary

        return cls(scan_vocabulary(path))

    # ---- encode / decode ----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, what: str = "Text") -> list[int]:
        """Text to token ids; characters outside the vocabulary raise an error naming them."""
        return self.encode_array(text, what=what).tolist()

    def encode_array(self, text: str, dtype: np.dtype | type = np.int64, what: str = "Text") -> np.ndarray:
        """Text to a numpy array of token ids (fast path used for whole corpora)."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = self._lut[codes]
        if ids.size and ids.min() < 0:
            unknown = sorted({chr(c) for c in codes[ids < 0]})
            shown = ", ".join(repr(c) for c in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            raise NanoLLMError(
                f"{what} contains {len(unknown)} character(s) the model never saw in training: {shown}. "
                "Use only characters that appear in the training text."
            )
        return ids.astype(dtype, copy=False)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Token ids to text."""
        return "".join(self.chars[int(i)] for i in ids)

    # ---- persistence --------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain-type form stored in checkpoints (safe to load with weights_only=True)."""
        return {"type": "char", "chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, data: dict) -> CharTokenizer:
        return cls(data["chars"])

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> CharTokenizer:
        """Read a vocabulary written by `save`."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and self.chars == other.chars

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"
