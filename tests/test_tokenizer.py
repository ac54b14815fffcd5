import pytest

from nanollm import CharTokenizer, NanoLLMError


def test_round_trip_and_sorted_vocabulary():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == sorted(set("hello world"))
    assert tok.vocab_size == len(set("hello world"))
    assert tok.decode(tok.encode("hello world")) == "hello world"
    assert tok.encode("dlrow") == [tok.stoi[c] for c in "dlrow"]


def test_same_text_gives_same_vocabulary_in_any_order():
    assert CharTokenizer.from_text("abcabc").chars == CharTokenizer.from_text("cbacba").chars


def test_unknown_characters_are_named():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(NanoLLMError, match=r"2 character\(s\).*'x'.*'z'"):
        tok.encode("axbz")


def test_json_round_trip(tmp_path):
    tok = CharTokenizer.from_text("Grüße, naïve café!\n")
    tok.save(tmp_path / "vocab.json")
    assert CharTokenizer.load(tmp_path / "vocab.json") == tok


def test_from_file_and_directory(tmp_path):
    (tmp_path / "a.txt").write_text("abc", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("xyz", encoding="utf-8")
    (tmp_path / "ignored.md").write_text("QQQ", encoding="utf-8")
    assert CharTokenizer.from_path(tmp_path / "a.txt").chars == list("abc")
    assert CharTokenizer.from_path(tmp_path).chars == list("abcxyz")


def test_empty_text_is_rejected():
    with pytest.raises(NanoLLMError, match="empty"):
        CharTokenizer.from_text("")
