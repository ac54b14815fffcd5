"""Character-level tokenizer: one token per Unicode character, in sorted (deterministic) order."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from nanollm.errors import NanoLLMError


class CharTokenizer:
    """Maps each character of a vocabulary to an integer id and back.

    `CharTokenizer(text_or_chars)` builds the vocabulary at once; `CharTokenizer()` followed by
    `build_vocab(path)` is the runbook's two-step form.
    """

    def __init__(self, chars: Iterable[str] | None = None):
        self.chars: list[str] = []
        self.stoi: dict[str, int] = {}
        # Lookup table over all of Unicode (4 MB), code point -> token id (-1 = unknown): encoding a
        # corpus becomes one numpy gather instead of a Python loop.
        self._lut = np.full(0x110000, -1, dtype=np.int32)
        if chars is not None:
            self._set_chars(sorted(set(chars)))

    def _set_chars(self, chars: list[str]) -> None:
        """Use `chars` as the vocabulary, in this order (id = position)."""
        if not chars:
            raise NanoLLMError("Cannot build a vocabulary from empty text: give the tokenizer some characters.")
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise NanoLLMError("CharTokenizer vocabulary entries must be distinct single characters.")
        self._lut[[ord(c) for c in self.chars]] = -1
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self._lut[[ord(c) for c in self.chars]] = np.arange(len(self.chars))

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """Build the vocabulary from a string."""
        if not isinstance(text, str):
            raise NanoLLMError(f"from_text takes the text as a str, got {type(text).__name__}.")
        return cls(text)

    @classmethod
    def from_path(cls, path: str | Path, glob: str = "**/*.txt") -> CharTokenizer:
        """Build the vocabulary from a UTF-8 file or the files of a directory that match `glob`."""
        return cls().build_vocab(path, glob)

    def build_vocab(self, path: str | Path, glob: str = "**/*.txt") -> CharTokenizer:
        """Set the vocabulary to every character of a UTF-8 file or of a directory's matching files."""
        from nanollm.corpus import scan_vocabulary

        self._set_chars(sorted(scan_vocabulary(path, glob)))
        return self

    def extended(self, text_chars: Iterable[str]) -> CharTokenizer:
        """This vocabulary plus the characters of `text_chars` it lacks: old characters keep their ids,
        new ones are appended in sorted order (for fine-tuning on new text)."""
        new = sorted(set(text_chars) - set(self.chars))
        tokenizer = CharTokenizer()
        tokenizer._set_chars(self.chars + new)
        return tokenizer

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
        if not self.chars:
            raise NanoLLMError(
                "The tokenizer has no vocabulary yet: call tokenizer.build_vocab('data/raw/sample.txt') first."
            )
        if not isinstance(text, str):
            raise NanoLLMError(f"{what} must be a string, got {text!r}.")
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
        """Token ids to text; an id outside the vocabulary is an error (a negative one would index from the end)."""
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise NanoLLMError(f"decode takes a sequence of token ids, got {type(ids).__name__}.")
        ids = list(ids.tolist() if hasattr(ids, "tolist") else ids)  # numpy arrays, torch tensors
        not_ids = [i for i in ids if isinstance(i, bool) or not isinstance(i, (int, np.integer))]
        if not_ids:  # int(1.7) would decode id 1
            raise NanoLLMError(f"Token ids must be integers, got {not_ids[0]!r}.")
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise NanoLLMError(
                f"Token id {bad[0]} is outside the vocabulary (ids 0 to {self.vocab_size - 1}); "
                "decode ids from this tokenizer or its model."
            )
        return "".join(self.chars[i] for i in ids)

    # ---- persistence --------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain-type form stored in checkpoints (safe to load with weights_only=True)."""
        return {"type": "char", "chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, data: dict) -> CharTokenizer:
        tokenizer = cls()
        tokenizer._set_chars(list(data["chars"]))  # stored order: an extended vocabulary is not sorted
        return tokenizer

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> CharTokenizer:
        """Read a vocabulary written by `save`."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as err:
            raise NanoLLMError(f"Cannot read the vocabulary file '{path}': {err.strerror or err}.") from None
        except ValueError:  # not UTF-8 or not JSON
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("chars"), str):
            raise NanoLLMError(f"'{path}' is not a vocabulary file written by CharTokenizer.save.")
        return cls.from_dict(data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and self.chars == other.chars

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"
