"""Data sources: every kind of SRC, text cleaning, and the errors a user can cause."""

from __future__ import annotations

import gzip
import json

import pytest

from lmforge.data.sources import clean_text, describe_source, read_documents, source_fingerprint
from lmforge.errors import LmforgeError


def test_text_file_is_one_document(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("line one\nline two\n")
    assert list(read_documents(str(path))) == ["line one\nline two\n"]
    assert describe_source(str(path)) == f"file {str(path)!r}"


def test_folder_reads_text_files_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.md").write_text("third")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "b.rst").write_text("second")  # "b.rst" sorts before "b/z.md"
    (tmp_path / ".hidden.txt").write_text("hidden file")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "notes.txt").write_text("hidden folder")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\x00\x01")
    (tmp_path / "binary.txt").write_bytes(b"abc\x00def")
    (tmp_path / "script.py").write_text("not a text suffix")
    (tmp_path / "empty.txt").write_text("  \n")  # empty documents are dropped
    assert list(read_documents(str(tmp_path))) == ["first", "second", "third"]
    assert "4 text files" in describe_source(str(tmp_path))


def test_glob_pattern(tmp_path):
    for name, text in [("x1.txt", "one"), ("x2.txt", "two"), ("y.txt", "other")]:
        (tmp_path / name).write_text(text)
    assert list(read_documents(str(tmp_path / "x*.txt"))) == ["one", "two"]


def test_jsonl_with_text_field(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"body": "first doc", "id": 1}, {"body": "second doc", "id": 2}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # blank lines are skipped
    assert list(read_documents(str(path), text_field="body")) == ["first doc", "second doc"]


def test_gzip_text_and_jsonl(tmp_path):
    with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write("zipped text")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "zipped json"}) + "\n")
    assert list(read_documents(str(tmp_path / "a.txt.gz"))) == ["zipped text"]
    assert list(read_documents(str(tmp_path / "b.jsonl.gz"))) == ["zipped json"]
    assert list(read_documents(str(tmp_path))) == ["zipped text", "zipped json"]


def test_builtin_pydocs_yields_many_documents():
    documents = list(read_documents("builtin:pydocs"))
    assert len(documents) > 50
    assert all(d.strip() for d in documents)
    assert documents == list(read_documents("builtin:pydocs"))  # same order every time


def test_clean_text():
    assert clean_text("cafe\u0301") == "caf\u00e9"  # NFC composes e + combining acute
    assert clean_text("a\r\nb\rc") == "a\nb\nc"
    assert clean_text("tab\there\nnew\x00\x07\x1b\x7f\x85\ufeff\u200bline") == "tab\there\nnewline"
    assert clean_text("e\u200b\u0301") == "\u00e9"  # composes once the invisible character is gone
    assert (
        clean_text("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645")
        == "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"
    )  # ZWNJ kept


def test_documents_are_cleaned(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeffcafe\u0301\r\nok\x1b".encode())
    assert list(read_documents(str(path))) == ["caf\u00e9\nok"]


def test_fingerprint_depends_on_cleaned_text_and_document_boundaries(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1.txt").write_text("ab")
    (tmp_path / "a" / "2.txt").write_text("c")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "1.txt").write_text("a")
    (tmp_path / "b" / "2.txt").write_text("bc")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "1.txt").write_text("a\r\nb\x07")
    (tmp_path / "c" / "2.txt").write_text("c")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "1.txt").write_text("a\nb")
    (tmp_path / "d" / "2.txt").write_text("c")
    a, b, c, d = (source_fingerprint(str(tmp_path / n)) for n in "abcd")
    assert len(a) == 64 and a != b
    assert c == d  # same text after cleaning


@pytest.mark.parametrize(
    "make, src, message",
    [
        (lambda p: None, "missing.txt", "does not exist"),
        (lambda p: (p / "e.txt").write_text(""), "e.txt", "has no text"),
        (lambda p: (p / "e.txt").write_text("\x00"), "e.txt", "binary"),
        (lambda p: (p / "d").mkdir(), "d", "no text files"),
        (lambda p: None, "*.txt", "matched no text files"),
        (lambda p: None, "builtin:nope", "built-ins are: builtin:pydocs"),
        (lambda p: (p / "l.txt").write_bytes(b"caf\xe9"), "l.txt", "not UTF-8"),
    ],
)
def test_source_errors(tmp_path, make, src, message):
    make(tmp_path)
    src = src if src.startswith("builtin:") else str(tmp_path / src)
    with pytest.raises(LmforgeError, match=message) as info:
        list(read_documents(src))
    assert "\n" not in str(info.value)


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(LmforgeError, match=r"d\.jsonl:2: not valid JSON"):
        list(read_documents(str(path)))
    path.write_text('{"text": "ok"}\n\n{"content": "x"}\n')
    with pytest.raises(
        LmforgeError, match=r"d\.jsonl:3: no field 'text' \(keys: 'content'\).*--text-field"
    ):
        list(read_documents(str(path)))
    path.write_text('{"text": 5}\n')
    with pytest.raises(LmforgeError, match=r"d\.jsonl:1: field 'text' must be a string"):
        list(read_documents(str(path)))
    path.write_text("[1, 2]\n")
    with pytest.raises(LmforgeError, match=r"d\.jsonl:1: expected a JSON object"):
        list(read_documents(str(path)))
