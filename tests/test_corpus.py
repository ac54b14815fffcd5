import os
import subprocess
import sys
import time

import numpy as np
import pytest

import nanollm.corpus as corpus_module
from nanollm import NanoLLMError
from nanollm.corpus import prepare_corpus, scan_vocabulary


def write(path, text, age=10.0):
    """Write a file last modified `age` seconds ago (old enough for its stats to key the cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    set_age(path, age)


def set_age(path, age):
    stamp = time.time_ns() - int(age * 1e9)
    os.utime(path, ns=(stamp, stamp))


def decoded(corpus) -> str:
    return corpus.tokenizer.decode(corpus.tokens)


def only(directory, pattern):
    (match,) = directory.glob(pattern)
    return match


@pytest.fixture
def calls(monkeypatch):
    """How often the corpus is hashed and encoded: each reads every byte of it."""
    counts = {"hashed": 0, "encoded": 0}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(corpus_module, "content_key", counting("hashed", corpus_module.content_key))
    monkeypatch.setattr(corpus_module, "_encode_to_cache", counting("encoded", corpus_module._encode_to_cache))
    return counts


@pytest.fixture
def texts(tmp_path):
    data = tmp_path / "texts"
    write(data / "a.txt", "alpha beta\n")
    write(data / "sub" / "b.txt", "gamma delta\n")
    return data


def test_directory_is_encoded_once_cached_and_memory_mapped(tmp_path):
    data = tmp_path / "texts"
    data.mkdir()
    (data / "a.txt").write_text("alpha beta\n", encoding="utf-8")
    (data / "b.txt").write_text("gamma delta\n", encoding="utf-8")
    corpus = prepare_corpus(data, tmp_path / "cache")
    assert corpus.tokenizer.decode(corpus.tokens) == "alpha beta\ngamma delta\n"
    assert isinstance(corpus.tokens, np.memmap) and corpus.tokens.dtype == np.uint16
    # The manifest is keyed by the data source (its path and glob), the other two by content: the names sort
    # either way, so compare the kinds.
    cached = sorted(p.name.split(".", 1)[1] for p in (tmp_path / "cache").iterdir())
    assert cached == ["manifest.json", "tokens.npy", "vocab.json"]
    mtimes = [p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()]
    prepare_corpus(data, tmp_path / "cache")
    assert [p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()] == mtimes  # reused, not rebuilt
    (data / "b.txt").write_text("gamma epsilon\n", encoding="utf-8")
    changed = prepare_corpus(data, tmp_path / "cache")
    assert changed.tokenizer.decode(changed.tokens).endswith("epsilon\n")  # content change -> new entry


def test_repeated_start_reads_no_file_contents(tmp_path, texts, monkeypatch):
    first = prepare_corpus(texts, tmp_path / "cache")

    def fail(*args, **kwargs):
        raise AssertionError("a repeated start read the corpus")

    for name in ("content_key", "iter_text", "_scan"):
        monkeypatch.setattr(corpus_module, name, fail)
    again = prepare_corpus(texts, tmp_path / "cache")
    assert decoded(again) == decoded(first) == "alpha beta\ngamma delta\n"


def test_same_size_edit_is_detected_and_reencoded(tmp_path, texts, calls):
    prepare_corpus(texts, tmp_path / "cache")
    write(texts / "a.txt", "alpha bet@\n", age=5)  # same size, new content, new time
    assert decoded(prepare_corpus(texts, tmp_path / "cache")) == "alpha bet@\ngamma delta\n"
    assert calls == {"hashed": 2, "encoded": 2}


def test_touched_file_reuses_its_entry_and_is_quick_again(tmp_path, texts, calls):
    prepare_corpus(texts, tmp_path / "cache")
    set_age(texts / "a.txt", 5)  # new modification time, same content
    assert decoded(prepare_corpus(texts, tmp_path / "cache")) == "alpha beta\ngamma delta\n"
    assert calls == {"hashed": 2, "encoded": 1}
    prepare_corpus(texts, tmp_path / "cache")
    assert calls == {"hashed": 2, "encoded": 1}  # the manifest now holds the new time


def test_recently_modified_files_are_hashed_until_their_time_settles(tmp_path, texts, calls):
    # A file changed again within its filesystem's time tick would keep the same stats.
    write(texts / "a.txt", "alpha beta\n", age=0)
    prepare_corpus(texts, tmp_path / "cache")
    prepare_corpus(texts, tmp_path / "cache")
    assert calls == {"hashed": 2, "encoded": 1}
    set_age(texts / "a.txt", 10)
    prepare_corpus(texts, tmp_path / "cache")
    prepare_corpus(texts, tmp_path / "cache")
    assert calls == {"hashed": 3, "encoded": 1}


def test_glob_selects_the_files_and_each_file_set_has_its_entry(tmp_path, texts):
    write(texts / "main.py", "print(1)\n")
    write(texts / "pkg" / "util.py", "x = 2\n")
    cache = tmp_path / "cache"
    assert decoded(prepare_corpus(texts, cache, glob="**/*.py")) == "print(1)\nx = 2\n"
    assert decoded(prepare_corpus(texts, cache)) == "alpha beta\ngamma delta\n"
    assert decoded(prepare_corpus(texts, cache, glob="*.py")) == "print(1)\n"
    assert decoded(prepare_corpus(texts, cache, glob="**/*.py")) == "print(1)\nx = 2\n"
    assert scan_vocabulary(texts, "**/*.py") == set("print(1)\nx = 2\n")


def test_no_matching_file_names_the_glob_and_its_key(tmp_path, texts):
    with pytest.raises(NanoLLMError, match=r"no files matching '\*\*/\*\.py' \(data\.glob\)"):
        prepare_corpus(texts, tmp_path / "cache", glob="**/*.py")
    with pytest.raises(NanoLLMError, match=r"data\.glob must be a pattern relative to the data directory"):
        prepare_corpus(texts, tmp_path / "cache", glob="/abs/*.txt")


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty(path):
    path.write_bytes(b"")


def garbage(path):
    path.write_text('{"chars": ', encoding="utf-8")


def wrong_length(path):
    np.save(path, np.zeros(3, dtype=np.uint16))  # a valid array, but not the one the manifest records


@pytest.mark.parametrize(
    "pattern, damage",
    [
        ("*.tokens.npy", truncate),
        ("*.tokens.npy", empty),
        ("*.tokens.npy", wrong_length),
        ("*.vocab.json", empty),
        ("*.vocab.json", garbage),
        ("*.manifest.json", garbage),
    ],
)
def test_damaged_cache_file_is_named_in_one_warning_and_rebuilt(tmp_path, texts, capsys, pattern, damage):
    prepare_corpus(texts, tmp_path / "cache")
    damaged = only(tmp_path / "cache", pattern)
    damage(damaged)
    capsys.readouterr()
    assert decoded(prepare_corpus(texts, tmp_path / "cache")) == "alpha beta\ngamma delta\n"
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and str(damaged) in warnings[0], warnings
    prepare_corpus(texts, tmp_path / "cache")
    assert capsys.readouterr().err == ""  # repaired


def test_temporaries_of_dead_processes_on_this_host_are_removed(tmp_path, texts):
    cache = tmp_path / "cache"
    cache.mkdir()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead, live, host, key = child.pid, os.getpid(), corpus_module._HOST, "0123456789abcdef01234567"
    stale = [f"{key}.tokens.npy.tmp-{host}-{dead}", f"{key}.tokens.tmp{dead}.npy", f"{key}.vocab.tmp{dead}"]
    kept = [f"{key}.tokens.npy.tmp-{host}-{live}", f"{key}.tokens.npy.tmp-not-{host}-{dead}", "notes.tmp1"]
    for name in stale + kept:
        (cache / name).write_bytes(b"partial")
    prepare_corpus(texts, cache)
    remaining = {p.name for p in cache.iterdir()}
    assert set(kept) <= remaining and not set(stale) & remaining


def test_interrupted_encoding_leaves_no_temporary_file(tmp_path, texts, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(corpus_module.CharTokenizer, "encode_array", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(texts, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_chunked_decoding_handles_characters_split_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "CHUNK_BYTES", 3)
    text = "naïve café — größer " * 5
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    corpus = prepare_corpus(tmp_path / "t.txt", tmp_path / "cache")
    assert corpus.tokenizer.decode(corpus.tokens) == text


def test_non_utf8_file_names_file_and_byte_offset(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"hello world \xff\xfe more")
    with pytest.raises(NanoLLMError, match=r"bad.txt.*not valid UTF-8.*offset 12"):
        prepare_corpus(tmp_path / "bad.txt", tmp_path / "cache")


@pytest.mark.parametrize("content", ["", "a"])
def test_fewer_than_two_tokens(tmp_path, content):
    (tmp_path / "t.txt").write_text(content, encoding="utf-8")
    with pytest.raises(NanoLLMError, match="Token sequence must have at least 2 tokens"):
        prepare_corpus(tmp_path / "t.txt", tmp_path / "cache")


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(NanoLLMError, match="does not exist"):
        prepare_corpus(tmp_path / "nope.txt", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NanoLLMError, match=r"no files matching '\*\*/\*\.txt' \(data\.glob\)"):
        prepare_corpus(tmp_path / "empty", None)
