"""Reading text corpora: file or directory, UTF-8 checks, vocabulary scan, and a cached token array.

A corpus is encoded once, in chunks, into a `.npy` file keyed by the content's hash and then
memory-mapped, so preparing a large corpus needs little memory and training memory does not
grow with the corpus.
"""

from __future__ import annotations

import codecs
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanollm.errors import NanoLLMError
from nanollm.tokenizer import CharTokenizer

CHUNK_BYTES = 8 * 1024 * 1024
CACHE_FORMAT = "v1"


@dataclass
class EncodedCorpus:
    """A tokenizer and the whole corpus as a 1-D integer array (often a read-only memmap)."""

    tokenizer: CharTokenizer | None  # None when training on ids the caller encoded
    tokens: np.ndarray
    source: str = "<text>"

    @classmethod
    def from_text(cls, text: str, tokenizer: CharTokenizer | None = None) -> EncodedCorpus:
        tokenizer = tokenizer or CharTokenizer.from_text(text)
        return cls(tokenizer, tokenizer.encode_array(text, token_dtype(tokenizer.vocab_size)))

    @property
    def num_bytes_on_disk(self) -> int:
        return int(self.tokens.nbytes)


def token_dtype(vocab_size: int) -> type:
    """The smallest unsigned integer type that holds every token id."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def list_text_files(path: str | Path) -> list[Path]:
    """The files a data path stands for: the file itself, or every `.txt` under a directory."""
    path = Path(path)
    if not path.exists():
        raise NanoLLMError(
            f"Data path '{path}' does not exist (relative paths start from {Path.cwd()}). "
            "Pass data.path=/path/to/text.txt or a directory of .txt files."
        )
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise NanoLLMError(
            f"Directory '{path}' contains no .txt files. Put UTF-8 .txt files in it or point data.path at a file."
        )
    return files


def iter_text(files: list[Path], chunk_bytes: int = CHUNK_BYTES, progress: str | None = None) -> Iterator[str]:
    """Decode files as UTF-8 in chunks; invalid bytes raise an error naming the file and byte offset."""
    total = sum(f.stat().st_size for f in files)
    bar = _progress_bar(total, progress)
    try:
        for file in files:
            decoder = codecs.getincrementaldecoder("utf-8")()
            offset = 0
            with open(file, "rb") as handle:
                while True:
                    chunk = handle.read(chunk_bytes)
                    pending = len(decoder.getstate()[0])
                    try:
                        text = decoder.decode(chunk, final=not chunk)
                    except UnicodeDecodeError as err:
                        raise NanoLLMError(
                            f"File '{file}' is not valid UTF-8 (bad byte at offset {offset - pending + err.start}). "
                            "Convert it to UTF-8 (e.g. iconv -t UTF-8) or remove it from the data path."
                        ) from None
                    if text:
                        yield text
                    if not chunk:
                        break
                    offset += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()


def scan_vocabulary(path: str | Path) -> set[str]:
    """Every distinct character in a file or directory of `.txt` files."""
    return _scan(list_text_files(path))[0]


def _scan(files: list[Path], progress: str | None = None) -> tuple[set[str], int]:
    seen = np.zeros(0x110000, dtype=bool)
    num_chars = 0
    for text in iter_text(files, progress=progress):
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        seen[np.unique(codes) if codes.size < 4096 else np.flatnonzero(np.bincount(codes))] = True
        num_chars += codes.size
    return {chr(c) for c in np.flatnonzero(seen)}, num_chars


def content_key(files: list[Path]) -> str:
    """A hash of the files' names (relative), sizes and bytes: the cache key of the encoding."""
    digest = hashlib.sha256(CACHE_FORMAT.encode())
    root = files[0].parent if len(files) == 1 else Path(os.path.commonpath(files))
    for file in files:
        digest.update(f"{file.relative_to(root)}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as handle:
            while block := handle.read(CHUNK_BYTES):
                digest.update(block)
    return digest.hexdigest()[:24]


def prepare_corpus(path: str | Path, cache_dir: str | Path | None) -> EncodedCorpus:
    """Scan, encode and cache a corpus (or reuse the cache), returning it memory-mapped."""
    files = list_text_files(path)
    if cache_dir is None:
        text = "".join(iter_text(files))
        _check_length(len(text), path)
        return EncodedCorpus.from_text(text)
    cache_dir = Path(cache_dir)
    key = content_key(files)
    tokens_file, vocab_file = cache_dir / f"{key}.tokens.npy", cache_dir / f"{key}.vocab.json"
    if not (tokens_file.exists() and vocab_file.exists()):
        _encode_to_cache(files, tokens_file, vocab_file)
    tokenizer = CharTokenizer.load(vocab_file)
    tokens = np.load(tokens_file, mmap_mode="r")
    _check_length(len(tokens), path)
    return EncodedCorpus(tokenizer, tokens, source=str(path))


def _encode_to_cache(files: list[Path], tokens_file: Path, vocab_file: Path) -> None:
    vocab, num_chars = _scan(files, progress="vocabulary")
    _check_length(num_chars, files[0] if len(files) == 1 else files[0].parent)
    tokenizer = CharTokenizer(vocab)
    tokens_file.parent.mkdir(parents=True, exist_ok=True)
    tmp_tokens = tokens_file.with_suffix(f".tmp{os.getpid()}.npy")
    out = np.lib.format.open_memmap(tmp_tokens, mode="w+", dtype=token_dtype(len(vocab)), shape=(num_chars,))
    position = 0
    for text in iter_text(files, progress="encoding"):
        ids = tokenizer.encode_array(text, out.dtype)
        out[position : position + len(ids)] = ids
        position += len(ids)
    out.flush()
    del out
    # Write-then-rename so a killed preparation never leaves a half-written cache entry.
    os.replace(tmp_tokens, tokens_file)
    tmp_vocab = vocab_file.with_suffix(f".tmp{os.getpid()}")
    tokenizer.save(tmp_vocab)
    os.replace(tmp_vocab, vocab_file)


def _check_length(num_tokens: int, path: str | Path) -> None:
    if num_tokens < 2:
        raise NanoLLMError(
            f"Token sequence must have at least 2 tokens, but '{path}' has {num_tokens}. Use a text file with more content."
        )


def _progress_bar(total: int, label: str | None):
    # Only worth drawing for corpora that take a noticeable time to process.
    if label is None or total < 32 * 1024 * 1024:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=f"Preparing data ({label})", leave=False)
