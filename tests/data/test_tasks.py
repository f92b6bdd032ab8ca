"""Reading classification and CoNLL files, and aligning word tags to WordPiece sub-tokens."""

from __future__ import annotations

import json

import pytest

from lmforge.data.tasks import (
    IGNORE_INDEX,
    ClassificationExample,
    TokenExample,
    align_labels,
    label_list,
    read_classification,
    read_conll,
)
from lmforge.errors import LmforgeError
from lmforge.tokenizer import train_tokenizer
from tests.conftest import SAMPLE_TEXT


@pytest.fixture(scope="module")
def wordpiece():
    return train_tokenizer("wordpiece", [SAMPLE_TEXT], vocab_size=120)


# --- read_classification -----------------------------------------------------------------------
def test_sst2_header_shapes(tmp_path):
    # SST-2's train file is "label<TAB>sentence", its dev file "label<TAB>content"; GLUE text holds
    # bare quotes, which QUOTE_NONE keeps as they are
    train = tmp_path / "train.tsv"
    train.write_text('label\tsentence\n1\ta "great" film \n0\tdull\n')
    dev = tmp_path / "dev.tsv"
    dev.write_text("label\tcontent\n0\tit 's not good\n\n")
    assert read_classification(train) == [
        ClassificationExample('a "great" film ', None, "1"),
        ClassificationExample("dull", None, "0"),
    ]
    assert read_classification(dev) == [ClassificationExample("it 's not good", None, "0")]


def test_pairs_csv_and_explicit_columns(tmp_path):
    path = tmp_path / "mrpc.csv"
    path.write_text('sentence1,sentence2,label,q\n"a, b",c,yes,x\nd,e,no,y\n')
    assert read_classification(path) == [
        ClassificationExample("a, b", "c", "yes"),
        ClassificationExample("d", "e", "no"),
    ]
    got = read_classification(path, text_column="q", pair_column="sentence1", label_column="label")
    assert got[0] == ClassificationExample("x", "a, b", "yes")


def test_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [
        {"text": "hi", "text_pair": "yo", "label": 2},
        {"text": "ho", "text_pair": "x", "label": "10"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_classification(path) == [
        ClassificationExample("hi", "yo", "2"),
        ClassificationExample("ho", "x", "10"),
    ]


@pytest.mark.parametrize(
    "name, content, kwargs, match",
    [
        ("d.txt", "x", {}, "unknown extension '.txt'"),
        ("d.tsv", "label\tfoo\n1\tx\n", {}, "no text column .*columns: 'label', 'foo'"),
        (
            "d.tsv",
            "text\tlabel\nx\t1\n",
            {"label_column": "y"},
            "no label column 'y' .*'text', 'label'",
        ),
        ("d.tsv", "text\tlabel\nx\t1\n", {"pair_column": "p"}, "no pair column 'p'"),
        ("d.tsv", "text\tlabel\nx\t \n", {}, r"d.tsv:2: empty label"),
        ("d.tsv", "text\tlabel\nx\t1\t2\n", {}, r"d.tsv:2: 3 field\(s\)"),
        ("d.tsv", "text\tlabel\n", {}, "no examples"),
        ("d.jsonl", '{"text": "a", "label": "1"}\n{"text": \n', {}, r"d.jsonl:2: not valid JSON"),
        ("d.jsonl", "[1]\n", {}, r"d.jsonl:1: expected a JSON object"),
        (
            "d.jsonl",
            '{"text": "a", "label": "1"}\n{"text": "b"}\n',
            {},
            r"d.jsonl:2: no column 'label'",
        ),
        ("d.jsonl", '{"text": "a", "label": 1.5}\n', {}, "label must be a string or an integer"),
        ("d.jsonl", '{"text": 3, "label": "1"}\n', {}, "column 'text' must be a string"),
    ],
)
def test_classification_errors(tmp_path, name, content, kwargs, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(LmforgeError, match=match):
        read_classification(path, **kwargs)


def test_missing_file(tmp_path):
    with pytest.raises(LmforgeError, match="does not exist"):
        read_classification(tmp_path / "nope.tsv")
    with pytest.raises(LmforgeError, match="does not exist"):
        read_conll(tmp_path / "nope.conll")


def test_label_list():
    def examples(*labels):
        return [ClassificationExample("t", None, label) for label in labels]

    assert label_list(examples("10", "2", "-1", "2")) == ["-1", "2", "10"]
    assert label_list(examples("pos", "neg", "10")) == ["10", "neg", "pos"]


# --- read_conll --------------------------------------------------------------------------------
def test_read_conll(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(
        "-DOCSTART- -X- -X- O\n\n"
        "EU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n\n"
        "Peter B-PER\nBlackburn I-PER\n"  # no blank line at the end of the file
    )
    assert read_conll(path) == [
        TokenExample(["EU", "rejects"], ["B-ORG", "O"]),
        TokenExample(["Peter", "Blackburn"], ["B-PER", "I-PER"]),
    ]


@pytest.mark.parametrize(
    "content, match",
    [
        ("EU B-ORG\nrejects\n", r"train.txt:2: expected 'word ... tag'"),
        ("-DOCSTART- O\n\n\n", "no tagged sentences"),
    ],
)
def test_conll_errors(tmp_path, content, match):
    path = tmp_path / "train.txt"
    path.write_text(content)
    with pytest.raises(LmforgeError, match=match):
        read_conll(path)


# --- align_labels ------------------------------------------------------------------------------
LABELS = {"O": 0, "B-X": 1, "B-LOC": 2, "I-LOC": 3}


def test_align_labels_first_subtoken(wordpiece):
    words, tags = ["The", "quickest", "U.S.", "fox"], ["O", "B-X", "B-LOC", "I-LOC"]
    out = align_labels(wordpiece, words, tags, LABELS)
    pieces = [wordpiece.backend.id_to_token(i) for i in out["input_ids"]]
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]"
    # each word's first piece carries its tag; the rest of the word and the specials are ignored
    expected = [IGNORE_INDEX]
    for word, tag in zip(words, tags, strict=True):
        n = len(wordpiece.backend.encode(word, add_special_tokens=False).ids)
        expected += [LABELS[tag]] + [IGNORE_INDEX] * (n - 1)
    expected.append(IGNORE_INDEX)
    assert out["labels"] == expected
    assert len(expected) > len(words) + 2  # some word really was split
    assert out["attention_mask"] == [1] * len(pieces)
    assert out["token_type_ids"] == [0] * len(pieces)


def test_align_labels_truncation_keeps_sep(wordpiece):
    words, tags = ["The", "quickest", "fox"], ["O", "B-X", "O"]
    full = align_labels(wordpiece, words, tags, LABELS)
    out = align_labels(wordpiece, words, tags, LABELS, max_length=4)
    assert out["input_ids"] == [*full["input_ids"][:3], wordpiece.sep_id]
    assert out["labels"] == [*full["labels"][:3], IGNORE_INDEX]
    assert all(len(v) == 4 for v in out.values())
    assert align_labels(wordpiece, words, tags, LABELS, max_length=100) == full


def test_align_labels_leaves_backend_settings(wordpiece):
    words, tags = ["the", "fox", "jumps"], ["O", "O", "O"]
    # how many pieces each word gets depends on the trained vocab: compare with an untouched backend
    expected = align_labels(wordpiece, words, tags, LABELS)
    assert len(expected["input_ids"]) >= 5
    wordpiece.backend.enable_truncation(3)
    try:
        assert align_labels(wordpiece, words, tags, LABELS) == expected
        assert wordpiece.backend.truncation["max_length"] == 3
    finally:
        wordpiece.backend.no_truncation()


def test_align_labels_errors(wordpiece, bpe_tokenizer):
    with pytest.raises(LmforgeError, match="2 words but 1 tags"):
        align_labels(wordpiece, ["a", "b"], ["O"], LABELS)
    with pytest.raises(LmforgeError, match="unknown tag.*'B-PER'.*known tags: 'O'"):
        align_labels(wordpiece, ["a"], ["B-PER"], LABELS)
    with pytest.raises(LmforgeError, match="max_length must be >= 2"):
        align_labels(wordpiece, ["a"], ["O"], LABELS, max_length=1)
    with pytest.raises(LmforgeError, match=r"\[CLS\] and \[SEP\].*'bpe'"):
        align_labels(bpe_tokenizer, ["a"], ["O"], LABELS)


def test_align_labels_needs_cls_sep_post_processor(wordpiece):
    saved = wordpiece.backend.post_processor
    wordpiece.backend.post_processor = None
    try:
        with pytest.raises(LmforgeError, match="post-processor does not add"):
            align_labels(wordpiece, ["fox"], ["O"], LABELS)
    finally:
        wordpiece.backend.post_processor = saved
