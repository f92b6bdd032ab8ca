"""Fine-tuning data: labelled sentences (GLUE style) and tagged words (CoNLL style).

Sentence classification reads `.tsv`, `.csv` (both with a header row) or `.jsonl` (one object a
line) into `ClassificationExample`s. Column names default to the common ones, first present wins:
the text is "text", "sentence", "content", "sentence1" or "question"; the optional second text of
a pair is "text_pair" or "sentence2". So SST-2's train ("label<TAB>sentence") and dev
("label<TAB>content") files both work without options. TSVs are read with quoting off, because
GLUE's TSVs hold bare quote characters inside sentences.

Token classification reads CoNLL files (one "word ... tag" line per token, a blank line between
sentences) into `TokenExample`s, and `align_labels` puts word tags onto WordPiece sub-tokens the
way Hugging Face's token-classification examples do: the first sub-token of a word carries its
tag, every other position carries -100, the label `F.cross_entropy` ignores.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

TEXT_COLUMNS = ("text", "sentence", "content", "sentence1", "question")
PAIR_COLUMNS = ("text_pair", "sentence2")
CLASSIFICATION_SUFFIXES = (".tsv", ".csv", ".jsonl")
IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index; HF uses it for unlabelled tokens
DOCSTART = "-DOCSTART-"  # CoNLL-2003 document separator line, not a sentence


@dataclass
class ClassificationExample:
    text: str
    pair: str | None
    label: str


@dataclass
class TokenExample:
    words: list[str]
    tags: list[str]


# --- sentence classification -------------------------------------------------------------------
def _check_file(path: Path) -> None:
    if not path.is_file():
        raise LmforgeError(f"data file {str(path)!r} does not exist")


def _pick_column(
    columns: list[str], given: str | None, defaults: tuple[str, ...], role: str, where: str
) -> str | None:
    """The column to read for `role`: `given` if set (it must exist), else the first default present."""
    shown = ", ".join(map(repr, columns)) or "none"
    if given is not None:
        if given not in columns:
            raise LmforgeError(f"{where}: no {role} column {given!r} (columns: {shown})")
        return given
    found = next((c for c in defaults if c in columns), None)
    if found is None and role == "text":
        raise LmforgeError(
            f"{where}: no text column (looked for {', '.join(defaults)}; columns: {shown}); "
            f"name it with text_column"
        )
    return found


def _label_str(value: object, where: str) -> str:
    # JSON labels may be numbers; bools and floats are refused since str() would not round-trip
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise LmforgeError(f"{where}: label must be a string or an integer, got {value!r}")
    if not value.strip():
        raise LmforgeError(f"{where}: empty label")
    return value.strip()


def _text_str(value: object, column: str, where: str) -> str:
    if not isinstance(value, str):
        raise LmforgeError(
            f"{where}: column {column!r} must be a string, got {type(value).__name__}"
        )
    return value


def _delimited_rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) for each non-blank row after the header of a TSV or CSV file."""
    tsv = path.suffix.lower() == ".tsv"
    # utf-8-sig drops the byte-order mark spreadsheet programs put before the header
    with open(path, encoding="utf-8-sig", newline="") as f:
        if tsv:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                return
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue  # blank lines, often a trailing newline
                where = f"{path}:{reader.line_num}"
                if len(row) != len(header):
                    raise LmforgeError(
                        f"{where}: {len(row)} field(s) but the header has {len(header)} "
                        f"({', '.join(map(repr, header))})"
                    )
                yield reader.line_num, dict(zip(header, row, strict=True))
        except csv.Error as e:
            raise LmforgeError(f"{path}:{reader.line_num}: not valid CSV/TSV ({e})") from e


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LmforgeError(
                    f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                    f"JSONL needs one object per line"
                ) from e
            if not isinstance(record, dict):
                raise LmforgeError(
                    f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}"
                )
            yield lineno, record


def read_classification(
    path: str | Path,
    text_column: str | None = None,
    pair_column: str | None = None,
    label_column: str = "label",
) -> list[ClassificationExample]:
    """Read labelled sentences (or sentence pairs) from a .tsv, .csv or .jsonl file."""
    path = Path(path)
    _check_file(path)
    suffix = path.suffix.lower()
    if suffix not in CLASSIFICATION_SUFFIXES:
        raise LmforgeError(
            f"cannot read {str(path)!r}: unknown extension {suffix or '(none)'!r}; "
            f"use one of {', '.join(CLASSIFICATION_SUFFIXES)}"
        )
    rows: Iterable[tuple[int, dict]] = (
        _jsonl_rows(path) if suffix == ".jsonl" else _delimited_rows(path)
    )
    examples = []
    columns: tuple[str | None, str | None, str] | None = None
    try:
        for lineno, row in rows:
            where = f"{path}:{lineno}"
            if columns is None:
                # columns are chosen once, from the header (or the first JSON object)
                names = list(row)
                text_col = _pick_column(names, text_column, TEXT_COLUMNS, "text", where)
                pair_col = _pick_column(names, pair_column, PAIR_COLUMNS, "pair", where)
                _pick_column(names, label_column, (), "label", where)
                columns = (text_col, pair_col, label_column)
            text_col, pair_col, label_col = columns
            for col in (text_col, pair_col, label_col):
                if col is not None and col not in row:  # JSONL objects can differ
                    keys = ", ".join(map(repr, row)) or "none"
                    raise LmforgeError(f"{where}: no column {col!r} (keys: {keys})")
            examples.append(
                ClassificationExample(
                    text=_text_str(row[text_col], text_col, where),
                    pair=None if pair_col is None else _text_str(row[pair_col], pair_col, where),
                    label=_label_str(row[label_col], where),
                )
            )
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{str(path)!r} is not UTF-8 text ({e.reason}); convert it first") from e
    if not examples:
        raise LmforgeError(f"{str(path)!r} has no examples (a header row and no data rows?)")
    return examples


def label_list(examples: Iterable[ClassificationExample]) -> list[str]:
    """The distinct labels, sorted: numerically if all are integers ("2" < "10"), else as text.

    The position of a label in this list is its class id, so the order must not depend on which
    label happens to come first in the file.
    """
    labels = {e.label for e in examples}
    try:
        return sorted(labels, key=int)
    except ValueError:
        return sorted(labels)


# --- token classification ----------------------------------------------------------------------
def read_conll(path: str | Path) -> list[TokenExample]:
    """Read CoNLL-style tagged sentences: "word ... tag" per line (tag = last column)."""
    path = Path(path)
    _check_file(path)
    examples: list[TokenExample] = []
    words: list[str] = []
    tags: list[str] = []
    try:
        with open(path, encoding="utf-8-sig") as f:
            # a trailing blank line closes the last sentence
            for lineno, line in enumerate([*f, ""], start=1):
                fields = line.split()
                if fields and fields[0] == DOCSTART:
                    continue
                if not fields:
                    if words:
                        examples.append(TokenExample(words, tags))
                        words, tags = [], []
                    continue
                if len(fields) < 2:
                    raise LmforgeError(
                        f"{path}:{lineno}: expected 'word ... tag' (at least 2 columns), "
                        f"got {line.strip()!r}"
                    )
                words.append(fields[0])
                tags.append(fields[-1])
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{str(path)!r} is not UTF-8 text ({e.reason}); convert it first") from e
    if not examples:
        raise LmforgeError(f"{str(path)!r} has no tagged sentences")
    return examples


def align_labels(
    tokenizer: Tokenizer,
    words: list[str],
    tags: list[str],
    label_to_id: dict[str, int],
    max_length: int | None = None,
) -> dict[str, list[int]]:
    """Encode pre-split words as "[CLS] ... [SEP]" and give each word's first sub-token its tag id.

    Returns equal-length lists `input_ids`, `attention_mask` (all 1), `token_type_ids` (all 0)
    and `labels` (-100 on special tokens and non-first sub-tokens). With `max_length` (special
    tokens included) the sub-tokens past it are dropped and [SEP] is kept as the last token; words
    cut off entirely are then unlabelled.
    """
    if len(words) != len(tags):
        raise LmforgeError(f"got {len(words)} words but {len(tags)} tags; give one tag per word")
    unknown = sorted({t for t in tags if t not in label_to_id})
    if unknown:
        raise LmforgeError(
            f"unknown tag(s) {', '.join(map(repr, unknown))}; known tags: "
            + ", ".join(map(repr, label_to_id))
        )
    if tokenizer.cls_id is None or tokenizer.sep_id is None:
        raise LmforgeError(
            f"token classification needs a tokenizer with [CLS] and [SEP] (a WordPiece/BERT one); "
            f"this one is {tokenizer.kind!r}"
        )
    if max_length is not None and max_length < 2:
        raise LmforgeError(f"max_length must be >= 2 ([CLS] and [SEP]), got {max_length}")
    # no truncation or padding by the backend: truncation here must keep [SEP], padding is the collator's job
    with tokenizer.bare_backend() as backend:
        encoding = backend.encode(words, is_pretokenized=True, add_special_tokens=True)
    ids, word_ids = encoding.ids, encoding.word_ids
    if len(ids) < 2 or ids[0] != tokenizer.cls_id or ids[-1] != tokenizer.sep_id:
        raise LmforgeError(
            "the tokenizer's post-processor does not add [CLS] ... [SEP]; "
            "token classification needs a BERT-style WordPiece tokenizer"
        )
    labels = []
    previous = None
    for word in word_ids:
        # word is None on [CLS]/[SEP]; a word split into several sub-tokens repeats its index
        first = word is not None and word != previous
        labels.append(label_to_id[tags[word]] if first else IGNORE_INDEX)
        previous = word
    if max_length is not None and len(ids) > max_length:
        ids = [*ids[: max_length - 1], tokenizer.sep_id]
        labels = [*labels[: max_length - 1], IGNORE_INDEX]
    return {
        "input_ids": list(ids),
        "attention_mask": [1] * len(ids),
        "token_type_ids": [0] * len(ids),
        "labels": labels,
    }
