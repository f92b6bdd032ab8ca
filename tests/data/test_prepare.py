"""`prepare`: tokenizer training, the token stream, train/val split, shards and the manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmforge.config import from_dict
from lmforge.data.prepare import PrepareConfig, _chunks, prepare, token_dtype
from lmforge.data.sources import read_documents, source_fingerprint
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer, train_tokenizer

DOCS = [
    "The quick brown fox jumps over the lazy dog.\nIt was not amused.\n",
    "Pack my box with five dozen liquor jugs!\r\nHow vexingly quick daft zebras jump?",
    "Caf\u0065\u0301 au lait, s'il vous pla\u00eet. " * 5,
]


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, text in enumerate(DOCS):
        (folder / f"doc{i}.txt").write_text(text, newline="")
    return str(folder)


def stream(out_dir, manifest) -> np.ndarray:
    """The whole token stream: train shards then val shards."""
    files = [s["file"] for split in ("train", "val") for s in manifest["shards"][split]]
    return np.concatenate([np.fromfile(out_dir / f, dtype=np.uint16) for f in files])


def test_prepare_char(corpus, tmp_path):
    out = tmp_path / "data"
    manifest = prepare(PrepareConfig(corpus, tokenizer="char"), out, progress=False)
    cleaned = list(read_documents(corpus))
    assert manifest["format_version"] == 1 and manifest["tokenizer"] == "char"
    assert manifest["documents"] == 3
    assert manifest["characters"] == sum(map(len, cleaned))
    assert manifest["source_sha256"] == source_fingerprint(corpus)
    assert manifest["dtype"] == "uint16"
    assert manifest["created_by"].startswith("lmforge ")
    assert json.loads((out / "manifest.json").read_text()) == manifest
    tokens = manifest["tokens"]
    for split in ("train", "val"):
        assert tokens[split] == sum(s["tokens"] for s in manifest["shards"][split])
    assert tokens["val"] == round(0.1 * (tokens["train"] + tokens["val"]))
    tokenizer = Tokenizer.load(out)
    assert manifest["vocab_size"] == tokenizer.vocab_size
    ids = stream(out, manifest)
    assert len(ids) == tokens["train"] + tokens["val"]
    assert tokenizer.decode(ids.tolist()) == "\n\n".join(cleaned)  # cleaned: "\r\n" -> "\n", NFC
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folders left


def test_prepare_bpe_ends_each_document_with_eos(corpus, tmp_path):
    out = tmp_path / "data"
    manifest = prepare(PrepareConfig(corpus, tokenizer="bpe", vocab_size=300), out, progress=False)
    tokenizer = Tokenizer.load(out)
    eos = tokenizer.eos_id
    assert manifest["eos_id"] == eos is not None
    assert manifest["vocab_size"] <= 300 and manifest["dtype"] == "uint16"
    ids = stream(out, manifest).tolist()
    assert ids.count(eos) == 3 and ids[-1] == eos
    documents, start = [], 0
    for i, token in enumerate(ids):
        if token == eos:
            documents.append(tokenizer.decode(ids[start:i]))
            start = i + 1
    assert documents == list(read_documents(corpus))


def test_small_shards_hold_the_same_stream(corpus, tmp_path):
    whole = prepare(PrepareConfig(corpus, tokenizer="char"), tmp_path / "whole", progress=False)
    sharded = prepare(
        PrepareConfig(corpus, tokenizer="char", shard_tokens=7),
        tmp_path / "sharded",
        progress=False,
    )
    assert sharded["tokens"] == whole["tokens"]
    for split in ("train", "val"):
        shards = sharded["shards"][split]
        assert [s["file"] for s in shards] == [f"{split}-{i:05d}.bin" for i in range(len(shards))]
        assert all(s["tokens"] == 7 for s in shards[:-1]) and 1 <= shards[-1]["tokens"] <= 7
        for s in shards:
            assert (tmp_path / "sharded" / s["file"]).stat().st_size == 2 * s["tokens"]
    assert len(sharded["shards"]["train"]) > 1
    np.testing.assert_array_equal(
        stream(tmp_path / "sharded", sharded), stream(tmp_path / "whole", whole)
    )


def test_val_fraction_zero_warns(corpus, tmp_path):
    manifest = prepare(
        PrepareConfig(corpus, tokenizer="char", val_fraction=0), tmp_path / "d", progress=False
    )
    assert manifest["tokens"]["val"] == 0 and manifest["shards"]["val"] == []
    assert any("no validation split" in w for w in manifest["warnings"])


def test_prepare_replaces_a_previous_data_dir_but_nothing_else(corpus, tmp_path):
    out = tmp_path / "data"
    prepare(
        PrepareConfig(corpus, tokenizer="bpe", vocab_size=300, shard_tokens=5), out, progress=False
    )
    assert (out / "train-00001.bin").exists()
    manifest = prepare(PrepareConfig(corpus, tokenizer="char"), out, progress=False)
    assert manifest["tokenizer"] == "char" and not (out / "train-00001.bin").exists()
    # a failing run leaves the previous data folder as it was
    with pytest.raises(LmforgeError, match="does not exist"):
        prepare(PrepareConfig(str(tmp_path / "missing")), out, progress=False)
    assert json.loads((out / "manifest.json").read_text()) == manifest

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("precious")
    with pytest.raises(LmforgeError, match="not an lmforge data folder"):
        prepare(PrepareConfig(corpus, tokenizer="char"), other, progress=False)
    assert (other / "notes.txt").read_text() == "precious"


def test_chunking_does_not_change_bpe_tokens():
    text = "".join(
        f"line {i}:  some words,\n  indented {i}\n\n\tTabbed\nLast's word\n" for i in range(50)
    )
    tokenizer = train_tokenizer("bpe", [text], vocab_size=300)
    pieces = _chunks(text, size=40)
    assert len(pieces) > 10 and "".join(pieces) == text
    assert [t for p in pieces for t in tokenizer.encode(p)] == tokenizer.encode(text)


def test_prepare_config_validation():
    assert PrepareConfig("x").vocab_size == 8192
    assert (
        PrepareConfig("x", tokenizer="char", vocab_size=500).vocab_size is None
    )  # char ignores it
    config = from_dict(PrepareConfig, {"source": "x", "vocab_size": "512", "val_fraction": "0.05"})
    assert config.vocab_size == 512 and config.val_fraction == 0.05
    for kwargs, message in [
        (
            {"tokenizer": "sentencepiece"},
            "tokenizer='sentencepiece' is not valid; choose one of 'bpe', 'char', 'wordpiece'",
        ),
        ({"tokenizer": "wordpiece", "vocab_size": 5}, r"between 6 \(the special tokens \+ 1\)"),
        ({"vocab_size": 100}, "vocab_size must be between 257"),
        ({"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\)"),
        ({"shard_tokens": 0}, "shard_tokens must be >= 1"),
        ({"text_field": ""}, "text_field"),
    ]:
        with pytest.raises(LmforgeError, match=message):
            PrepareConfig("x", **kwargs)


def test_token_dtype():
    assert token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_prepare_with_a_given_tokenizer_keeps_its_ids(corpus, tmp_path):
    """A pretrained model's tokenizer is used as it is (no training): the stream is its ids of
    the documents, and DATA_DIR carries the same vocabulary."""
    given = train_tokenizer("bpe", ["a different text to learn merges from, " * 20], vocab_size=280)
    manifest = prepare(
        PrepareConfig(corpus, tokenizer=given.kind, tokenizer_from="some/checkpoint"),
        tmp_path / "data",
        progress=False,
        tokenizer=given,
    )
    saved = Tokenizer.load(tmp_path / "data")
    assert saved.backend.get_vocab() == given.backend.get_vocab()
    assert manifest["vocab_size"] == given.vocab_size and manifest["tokenizer_from"] == "some/checkpoint"
    assert manifest["documents"] == 3 and manifest["source_sha256"] == source_fingerprint(corpus)
    expected = [i for doc in read_documents(corpus) for i in [*given.encode(doc), given.eos_id]]
    assert stream(tmp_path / "data", manifest).tolist() == expected
