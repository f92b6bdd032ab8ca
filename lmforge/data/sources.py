"""Where training text comes from: files, folders, globs, JSONL, gzip, or a built-in corpus.

A data source `SRC` is one of
- a text file (any name; the whole file is one document);
- a folder: every text file under it, recursively, in sorted path order, one document per file.
  "Text file" means a name ending in one of `FOLDER_SUFFIXES` (optionally followed by `.gz`);
  hidden files and folders (a name starting with ".") and files with a NUL byte in their first
  8 KiB (binary) are skipped, so a folder can hold a README, images or a `.git` directory;
- a glob pattern such as `data/*.txt` or `data/**/*.md`: the matching files in sorted order
  (binary and hidden ones skipped), any name; a matched folder is read as a folder;
- a JSONL file (`.jsonl`): one JSON object per line, one document per line, its text in
  `text_field` (default "text");
- any of the files above gzip-compressed (`.txt.gz`, `.jsonl.gz`, ...);
- `builtin:pydocs`: the Python reference documentation that ships inside CPython
  (`pydoc_data.topics`), one document per topic in sorted key order, so every machine can
  prepare a small real corpus without downloading anything.

Files are read as UTF-8. Every document goes through `clean_text` and empty documents are dropped,
so the same SRC always yields the same stream of documents; `source_fingerprint` hashes that
stream for the data manifest.
"""

from __future__ import annotations

import functools
import glob
import gzip
import hashlib
import json
import os
import re
import sys
import unicodedata
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from lmforge.errors import LmforgeError

BUILTIN_PREFIX = "builtin:"
BUILTINS = ("pydocs",)
FOLDER_SUFFIXES = (".txt", ".text", ".md", ".markdown", ".rst", ".jsonl")
ACCEPTED = (
    "a text file, a folder of text files (" + ", ".join(FOLDER_SUFFIXES) + ", optionally .gz), "
    "a glob pattern such as 'data/*.txt', a .jsonl file, or "
    + ", ".join(BUILTIN_PREFIX + b for b in BUILTINS)
)
_SNIFF_BYTES = 8192
_GLOB_CHARS = re.compile(r"[*?\[]")
# Zero-width (non-)joiners are format characters (Cf) that carry meaning: they shape Persian and
# Indic scripts and join emoji sequences, so cleaning keeps them.
_KEPT_FORMAT_CHARS = "\u200c\u200d"


# --- cleaning ----------------------------------------------------------------------------------
@functools.cache
def _control_chars() -> re.Pattern[str]:
    """A regex class of every control (Cc) and format (Cf) character except \\n, \\t, ZWNJ, ZWJ."""
    keep = set("\n\t" + _KEPT_FORMAT_CHARS)
    ranges: list[list[int]] = []  # [first, last] code points; ranges make the regex ~10x faster
    for c in range(sys.maxunicode + 1):
        if unicodedata.category(chr(c)) in ("Cc", "Cf") and chr(c) not in keep:
            if ranges and ranges[-1][1] == c - 1:
                ranges[-1][1] = c
            else:
                ranges.append([c, c])
    parts = [re.escape(chr(a)) + ("" if a == b else "-" + re.escape(chr(b))) for a, b in ranges]
    return re.compile("[" + "".join(parts) + "]+")


def clean_text(text: str) -> str:
    """Normalise newlines to \\n, drop control/format characters (keeping \\n and \\t), apply NFC.

    NFC comes last, so removing an invisible character between a letter and its combining mark
    still lets the two compose ("e\\u200b\\u0301" -> "é").
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _control_chars().sub("", text)
    return unicodedata.normalize("NFC", text)


# A sentence ends at . ! or ? (optionally closed by a quote or bracket) followed by whitespace and
# an upper-case letter, digit, quote or bracket: "e.g. this" stays whole, "Done. Next" splits.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[A-Z0-9\"'(\[])")


def split_sentences(document: str) -> list[str]:
    """Cut a document into sentences for next-sentence prediction, without an NLP library.

    Paragraphs are separated by blank lines. A prose paragraph has its lines joined and is cut at
    sentence ends (see `_SENTENCE_END`); an indented paragraph (a code or literal block, as in
    the Python docs) is kept as one unit, since cutting code at full stops makes no sentences.
    Whitespace-only pieces are dropped.
    """
    sentences = []
    for paragraph in re.split(r"\n\s*\n", document):
        if not paragraph.strip():
            continue
        lines = paragraph.strip("\n").split("\n")
        if lines[0][:1].isspace():
            sentences.append(paragraph.strip())
            continue
        prose = " ".join(line.strip() for line in lines)
        sentences.extend(piece.strip() for piece in _SENTENCE_END.split(prose) if piece.strip())
    return sentences


# --- resolving SRC into files ------------------------------------------------------------------
def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _base_suffix(path: Path) -> str:
    """The suffix that says what a file holds, looking through `.gz` (`a.jsonl.gz` -> `.jsonl`)."""
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[: -len(".gz")]
    return os.path.splitext(name)[1]


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _is_binary(path: Path) -> bool:
    try:
        with _open_binary(path) as f:
            head = f.read(_SNIFF_BYTES)
    except (OSError, EOFError, zlib.error) as e:
        raise LmforgeError(f"cannot read {str(path)!r}: {e}") from e
    return b"\x00" in head


def _folder_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]  # prune .git, .cache, ...
        for name in filenames:
            path = Path(dirpath) / name
            if (
                not _is_hidden(name)
                and _base_suffix(path) in FOLDER_SUFFIXES
                and not _is_binary(path)
            ):
                files.append(path)
    # sort on the relative posix path so the order (and the fingerprint) is the same on every OS
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _glob_files(pattern: str) -> list[Path]:
    files: list[Path] = []
    for match in sorted(glob.glob(pattern, recursive=True)):
        path = Path(match)
        if path.is_dir():
            files.extend(_folder_files(path))
        elif path.is_file() and not _is_hidden(path.name) and not _is_binary(path):
            files.append(path)
    return files


def _resolve(src: str) -> tuple[str, list[Path]]:
    """(kind, files) for SRC; kind is "file", "folder", "glob" or "builtin" (no files)."""
    if src.startswith(BUILTIN_PREFIX):
        name = src[len(BUILTIN_PREFIX) :]
        if name not in BUILTINS:
            raise LmforgeError(
                f"unknown built-in data source {src!r}; built-ins are: "
                + ", ".join(BUILTIN_PREFIX + b for b in BUILTINS)
            )
        return "builtin", []
    path = Path(src).expanduser()
    if path.is_file():
        if _is_binary(path):
            raise LmforgeError(f"data source {src!r} is a binary file; use {ACCEPTED}")
        return "file", [path]
    if path.is_dir():
        files = _folder_files(path)
        if not files:
            raise LmforgeError(
                f"folder {src!r} has no text files (looked for {', '.join(FOLDER_SUFFIXES)}, "
                f"optionally .gz, skipping hidden and binary files)"
            )
        return "folder", files
    if _GLOB_CHARS.search(src):
        files = _glob_files(os.path.expanduser(src))
        if not files:
            raise LmforgeError(f"glob pattern {src!r} matched no text files; use {ACCEPTED}")
        return "glob", files
    raise LmforgeError(f"data source {src!r} does not exist; use {ACCEPTED}")


# --- reading documents -------------------------------------------------------------------------
def _read_text_file(path: Path) -> str:
    try:
        with _open_binary(path) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise LmforgeError(f"cannot read {str(path)!r}: {e}") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LmforgeError(
            f"{str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8 first"
        ) from e


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    try:
        with _open_binary(path) as f:
            for lineno, raw in enumerate(f, start=1):
                yield from _jsonl_line(path, lineno, raw, text_field)
    except (OSError, EOFError, zlib.error) as e:
        raise LmforgeError(f"cannot read {str(path)!r}: {e}") from e


def _jsonl_line(path: Path, lineno: int, raw: bytes, text_field: str) -> Iterator[str]:
    where = f"{path}:{lineno}"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{where}: not UTF-8 text ({e.reason})") from e
    if not line.strip():
        return  # blank lines (often a trailing newline) are not documents
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise LmforgeError(
            f"{where}: not valid JSON ({e.msg} at column {e.colno}); JSONL needs one object per line"
        ) from e
    if not isinstance(record, dict):
        raise LmforgeError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        keys = ", ".join(map(repr, list(record)[:10])) or "none"
        raise LmforgeError(
            f"{where}: no field {text_field!r} (keys: {keys}); pick the text field with --text-field"
        )
    text = record[text_field]
    if not isinstance(text, str):
        raise LmforgeError(
            f"{where}: field {text_field!r} must be a string, got {type(text).__name__}"
        )
    yield text


def _raw_documents(src: str, text_field: str) -> Iterator[str]:
    kind, files = _resolve(src)
    if kind == "builtin":  # only pydocs so far
        from pydoc_data.topics import topics

        for key in sorted(topics):
            yield topics[key]
        return
    for path in files:
        if _base_suffix(path) == ".jsonl":
            yield from _read_jsonl(path, text_field)
        else:
            yield _read_text_file(path)


def read_documents(src: str, text_field: str = "text") -> Iterator[str]:
    """Yield the cleaned, non-empty documents of SRC in a fixed order (see the module docstring)."""
    count = 0
    for raw in _raw_documents(src, text_field):
        text = clean_text(raw)
        if text.strip():
            count += 1
            yield text
    if count == 0:
        raise LmforgeError(
            f"data source {src!r} has no text (every document is empty after cleaning)"
        )


# --- describing and hashing --------------------------------------------------------------------
def describe_source(src: str) -> str:
    """A short human description of SRC for logs, e.g. "folder 'books' (12 text files)"."""
    kind, files = _resolve(src)
    if kind == "builtin":
        version = ".".join(map(str, sys.version_info[:3]))
        return f"{src} (Python {version} reference documentation topics)"
    if kind == "file":
        return f"file {src!r}"
    return f"{kind} {src!r} ({len(files)} text file{'s' if len(files) != 1 else ''})"


class Fingerprint:
    """Running sha256 over a stream of documents; a NUL byte ends each one.

    Cleaned text never holds NUL (it is a control character), so the separator makes the hash
    tell ["ab", "c"] from ["a", "bc"].
    """

    def __init__(self) -> None:
        self._sha = hashlib.sha256()

    def update(self, document: str) -> None:
        self._sha.update(document.encode("utf-8"))
        self._sha.update(b"\x00")

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def fingerprint_documents(documents: Iterable[str]) -> str:
    fingerprint = Fingerprint()
    for document in documents:
        fingerprint.update(document)
    return fingerprint.hexdigest()


def source_fingerprint(src: str, text_field: str = "text") -> str:
    """sha256 (hex) of SRC's cleaned document stream: equal iff the prepared text is equal."""
    return fingerprint_documents(read_documents(src, text_field))
