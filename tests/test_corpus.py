import numpy as np
import pytest

from nanollm import NanoLLMError
from nanollm.corpus import prepare_corpus


def test_directory_is_encoded_once_cached_and_memory_mapped(tmp_path):
    data = tmp_path / "texts"
    data.mkdir()
    (data / "a.txt").write_text("alpha beta\n", encoding="utf-8")
    (data / "b.txt").write_text("gamma delta\n", encoding="utf-8")
    corpus = prepare_corpus(data, tmp_path / "cache")
    assert corpus.tokenizer.decode(corpus.tokens) == "alpha beta\ngamma delta\n"
    assert isinstance(corpus.tokens, np.memmap) and corpus.tokens.dtype == np.uint16
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(cached) == 2
    mtimes = [p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()]
    prepare_corpus(data, tmp_path / "cache")
    assert [p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()] == mtimes  # reused, not rebuilt
    (data / "b.txt").write_text("gamma epsilon\n", encoding="utf-8")
    changed = prepare_corpus(data, tmp_path / "cache")
    assert changed.tokenizer.decode(changed.tokens).endswith("epsilon\n")  # content change -> new entry


def test_chunked_decoding_handles_characters_split_across_chunks(tmp_path, monkeypatch):
    import nanollm.corpus as corpus_module

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
    with pytest.raises(NanoLLMError, match="no .txt files"):
        prepare_corpus(tmp_path / "empty", None)
