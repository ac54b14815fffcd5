"""Reading text corpora: file or directory, UTF-8 checks, vocabulary scan, and a cached token array.

A corpus is encoded once, in chunks, into a `.npy` file keyed by the content's hash and then
memory-mapped, so preparing a large corpus needs little memory and training memory does not
grow with the corpus. A manifest per data source maps the files' names, sizes and modification
times to that key, so a repeated start stats the files instead of reading them.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanollm.errors import NanoLLMError
from nanollm.tokenizer import CharTokenizer

CHUNK_BYTES = 8 * 1024 * 1024
CACHE_FORMAT = "v1"
DEFAULT_GLOB = "**/*.txt"
# Some filesystems keep modification times in 1-2 s ticks: a file changed again within the tick it was
# read in keeps its size and time, so stats younger than this are not trusted as a key.
SETTLE_NS = 2_000_000_000
# Temporary files carry host and pid: a pid only says whether the writer is alive on its own host.
_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"
# `<key>.<name>.tmp-<host>-<pid>`, and the `<key>.tokens.tmp<pid>.npy` / `<key>.vocab.tmp<pid>` of older versions.
_TEMPORARY = re.compile(r"[0-9a-f]{24}\..*\.tmp(?:-(?P<host>[A-Za-z0-9._-]+)-)?(?P<pid>\d+)(?:\.npy)?")
_KEY = re.compile(r"[0-9a-f]{24}")


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


def list_text_files(path: str | Path, glob: str = DEFAULT_GLOB) -> list[Path]:
    """The files a data path stands for: the file itself, or every file under a directory that matches `glob`."""
    path = Path(path)
    if not path.exists():
        raise NanoLLMError(
            f"Data path '{path}' does not exist (relative paths start from {Path.cwd()}). "
            "Pass data.path=/path/to/text.txt or a directory of text files."
        )
    if path.is_file():
        return _readable([path])
    if not path.is_dir():  # a device, a pipe or a socket: glob would find nothing under it
        raise NanoLLMError(
            f"Data path '{path}' is not a regular file or a directory; pass data.path=/path/to/text.txt "
            "or a directory of text files."
        )
    try:
        files = sorted(p for p in path.glob(glob) if p.is_file())
    except (TypeError, ValueError, NotImplementedError):  # empty, absolute or not a string
        raise NanoLLMError(
            f"data.glob must be a pattern relative to the data directory, such as '{DEFAULT_GLOB}', got {glob!r}."
        ) from None
    if not files:
        raise NanoLLMError(
            f"Directory '{path}' contains no files matching '{glob}' (data.glob); put UTF-8 text files in it, "
            "set data.glob to a pattern that matches them, or point data.path at a file."
        )
    return _readable(files)


def _readable(files: list[Path]) -> list[Path]:
    unreadable = [f for f in files if not os.access(f, os.R_OK)]
    if unreadable:
        raise NanoLLMError(
            f"Cannot read '{unreadable[0]}' (permission denied){' and others' if len(unreadable) > 1 else ''}; "
            "make it readable (chmod +r) or leave it out of the data path."
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


def scan_vocabulary(path: str | Path, glob: str = DEFAULT_GLOB) -> set[str]:
    """Every distinct character in a file, or in the files of a directory that match `glob`."""
    return _scan(list_text_files(path, glob))[0]


def _scan(files: list[Path], progress: str | None = None) -> tuple[set[str], int]:
    seen = np.zeros(0x110000, dtype=bool)
    num_chars = 0
    for text in iter_text(files, progress=progress):
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        seen[np.unique(codes) if codes.size < 4096 else np.flatnonzero(np.bincount(codes))] = True
        num_chars += codes.size
    return {chr(c) for c in np.flatnonzero(seen)}, num_chars


def content_key(files: list[Path], progress: str | None = None) -> str:
    """A hash of the files' names (relative), sizes and bytes: the cache key of the encoding."""
    digest = hashlib.sha256(CACHE_FORMAT.encode())
    root = _root(files)
    bar = _progress_bar(sum(f.stat().st_size for f in files), progress)
    for file in files:
        digest.update(f"{file.relative_to(root)}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as handle:
            while block := handle.read(CHUNK_BYTES):
                digest.update(block)
                if bar is not None:
                    bar.update(len(block))
    if bar is not None:
        bar.close()
    return digest.hexdigest()[:24]


def stats_key(files: list[Path]) -> str | None:
    """A hash of the files' names, sizes and modification times; None while a file may still be changing."""
    settled_before = time.time_ns() - SETTLE_NS
    digest = hashlib.sha256(CACHE_FORMAT.encode())
    root = _root(files)
    for file in files:
        stat = file.stat()
        if stat.st_mtime_ns > settled_before:
            return None
        digest.update(f"{file.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:24]


def _root(files: list[Path]) -> Path:
    return files[0].parent if len(files) == 1 else Path(os.path.commonpath(files))


def prepare_corpus(path: str | Path, cache_dir: str | Path | None, glob: str = DEFAULT_GLOB) -> EncodedCorpus:
    """Scan, encode and cache a corpus (or reuse the cache), returning it memory-mapped.

    A repeated start reads no file contents: while the files' stats match the manifest, its content
    key is trusted; otherwise the files are hashed, and an identical content reuses its entry.
    """
    files = list_text_files(path, glob)
    if cache_dir is None:
        text = "".join(iter_text(files))
        _check_length(len(text), path)
        return EncodedCorpus.from_text(text)
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise NanoLLMError(
            f"Cannot use data.cache_dir '{cache_dir}': {err.strerror or err}. Point data.cache_dir at a writable directory."
        ) from None
    remove_stale_temporaries(cache_dir)
    manifest_file = cache_dir / f"{_source_key(path, glob)}.manifest.json"
    manifest = _read_manifest(manifest_file)
    stats = stats_key(files)  # before any content is read: a change made meanwhile shows up next start
    if manifest is not None and stats is not None and manifest["stats_key"] == stats:
        key = manifest["content_key"]
    else:
        key = content_key(files, progress="hashing")
    known_length = manifest["num_tokens"] if manifest is not None and manifest["content_key"] == key else None
    tokens_file, vocab_file = cache_dir / f"{key}.tokens.npy", cache_dir / f"{key}.vocab.json"
    corpus = _load_entry(tokens_file, vocab_file, known_length, path)
    if corpus is None:
        tokenizer = _encode_to_cache(files, tokens_file, vocab_file)
        corpus = EncodedCorpus(tokenizer, np.load(tokens_file, mmap_mode="r"), source=str(path))
    entry = {"stats_key": stats, "content_key": key, "num_tokens": len(corpus.tokens)}
    if entry != manifest:
        _write_atomically(manifest_file, json.dumps(entry))
    _check_length(len(corpus.tokens), path)
    return corpus


def _source_key(path: str | Path, glob: str) -> str:
    # One manifest per data source: a file, or a directory read through one glob.
    path = Path(path).resolve()
    pattern = glob if path.is_dir() else ""
    return hashlib.sha256(f"{CACHE_FORMAT}\0{path}\0{pattern}".encode()).hexdigest()[:24]


def _read_manifest(file: Path) -> dict | None:
    """The manifest's entry, or None when there is none; a damaged one is reported and ignored."""
    try:
        entry = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        entry = None
    valid = (
        isinstance(entry, dict)
        and isinstance(entry.get("stats_key"), (str, type(None)))
        and isinstance(entry.get("content_key"), str)
        and _KEY.fullmatch(entry["content_key"]) is not None  # it names files: never a path
        and type(entry.get("num_tokens")) is int
    )
    if not valid:
        _warn(f"cache manifest '{file}' is damaged; hashing the corpus to find its entry.")
        return None
    return entry


def _load_entry(tokens_file: Path, vocab_file: Path, known_length: int | None, source) -> EncodedCorpus | None:
    """The cached encoding, or None when it is missing or damaged (a damaged file is reported)."""
    if not (tokens_file.exists() and vocab_file.exists()):
        return None  # never built, or a run was killed between writing the two files
    try:
        tokenizer = CharTokenizer.load(vocab_file)
    except (OSError, ValueError, KeyError, TypeError, NanoLLMError):
        return _damaged(vocab_file, "not a valid vocabulary file")
    try:
        tokens = np.load(tokens_file, mmap_mode="r")
    except (OSError, ValueError, EOFError):
        return _damaged(tokens_file, "truncated or not a .npy array")
    dtype = np.dtype(token_dtype(tokenizer.vocab_size))
    if tokens.ndim != 1 or tokens.dtype != dtype:
        return _damaged(tokens_file, f"a {tokens.ndim}-D {tokens.dtype} array, expected 1-D {dtype}")
    if known_length is not None and len(tokens) != known_length:
        return _damaged(tokens_file, f"{len(tokens)} tokens, the manifest records {known_length}")
    return EncodedCorpus(tokenizer, tokens, source=str(source))


def _damaged(file: Path, reason: str) -> None:
    _warn(f"cache file '{file}' is damaged ({reason}); rebuilding it.")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def remove_stale_temporaries(cache_dir: Path) -> None:
    """Delete the temporary files of runs killed on this host; a live process's may be in use."""
    for file in cache_dir.iterdir():
        match = _TEMPORARY.fullmatch(file.name)
        if match and match["host"] in (None, _HOST) and not _process_exists(int(match["pid"])):
            file.unlink(missing_ok=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks the pid
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process, or no pid at all: leave it
        return True
    return True


def _temporary(file: Path) -> Path:
    return file.with_name(f"{file.name}.tmp-{_HOST}-{os.getpid()}")


def _write_atomically(file: Path, text: str) -> None:
    # Write-then-rename, so a reader never sees a half-written file.
    tmp = _temporary(file)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, file)


def _encode_to_cache(files: list[Path], tokens_file: Path, vocab_file: Path) -> CharTokenizer:
    vocab, num_chars = _scan(files, progress="vocabulary")
    _check_length(num_chars, files[0] if len(files) == 1 else files[0].parent)
    tokenizer = CharTokenizer(vocab)
    tmp_tokens = _temporary(tokens_file)
    try:
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
    finally:
        tmp_tokens.unlink(missing_ok=True)  # an error or Ctrl-C; a kill leaves it to remove_stale_temporaries
    tmp_vocab = _temporary(vocab_file)
    tokenizer.save(tmp_vocab)
    os.replace(tmp_vocab, vocab_file)
    return tokenizer


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
