"""BERT pretraining data: the sentence index `prepare` writes for WordPiece, NSP pairs and dynamic
masking in `PretrainingBatches`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmforge.data import PrepareConfig, TokenData, prepare
from lmforge.data.mlm import IGNORE_INDEX, IS_NEXT, IS_RANDOM, PretrainingBatches
from lmforge.data.sources import split_sentences
from lmforge.errors import LmforgeError

TOPICS = ["apple", "river", "engine", "garden", "planet", "violin", "castle"]


def corpus() -> list[str]:
    """Documents of numbered sentences, so every sentence can be told apart after tokenizing."""
    return [
        " ".join(f"The {topic} note {i} is about {topic} things." for i in range(8))
        for topic in TOPICS
    ]


def write_and_prepare(root, documents, vocab_size=200, val_fraction=0.2):
    source = root / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    config = PrepareConfig(str(source), tokenizer="wordpiece", vocab_size=vocab_size,
                           val_fraction=val_fraction)
    prepare(config, root / "data", progress=False)
    return TokenData.open(root / "data")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_and_prepare(tmp_path_factory.mktemp("wp"), corpus())


def original_ids(batch) -> torch.Tensor:
    """The unmasked ids: masking only changes positions that carry a label."""
    return torch.where(batch["labels"] != IGNORE_INDEX, batch["labels"], batch["input_ids"])


# --- sentences and the index prepare writes --------------------------------------------------
def test_split_sentences():
    text = 'It works. "Quoted." Next one! e.g. stays whole. Done?  Yes\n\n    code = 1.\n    more\n\nEnd.'
    assert split_sentences(text) == [
        "It works.", '"Quoted."', "Next one! e.g. stays whole.", "Done?", "Yes",
        "code = 1.\n    more", "End.",
    ]
    assert split_sentences("  \n\n \n") == []
    assert split_sentences("one line\nwrapped here. Two.") == ["one line wrapped here.", "Two."]


def test_prepare_wordpiece_writes_a_sentence_index(data):
    manifest = data.manifest
    assert manifest["tokenizer"] == "wordpiece" and data.has_sentences
    sentences = [s for d in corpus() for s in split_sentences(d)]
    counts = {split: manifest["sentences"][split]["sentences"] for split in ("train", "val")}
    assert counts["train"] + counts["val"] == len(sentences) and counts["val"] > 0
    decoded = []
    for split in ("train", "val"):
        starts, documents = data.sentence_index(split)
        stream = data.stream(split)
        assert starts[0] == 0 and starts[-1] == len(stream) == data.tokens(split)
        assert np.all(np.diff(starts) > 0) and documents[0] == 0 and documents[-1] == len(starts) - 1
        decoded += [data.tokenizer.decode(stream.read(starts[i], starts[i + 1]).tolist())
                    for i in range(len(starts) - 1)]
    assert decoded == [s.lower() for s in sentences]
    # the split cuts a document in two: 7 documents become 8 pieces
    assert manifest["sentences"]["train"]["documents"] + manifest["sentences"]["val"]["documents"] == 8


def test_gpt_data_has_no_sentence_index(tmp_path):
    (tmp_path / "a.txt").write_text("Some text. More text.\n" * 50)
    prepare(PrepareConfig(str(tmp_path / "a.txt"), tokenizer="char"), tmp_path / "d", progress=False)
    with pytest.raises(LmforgeError, match="no sentence index.*--tokenizer wordpiece"):
        TokenData.open(tmp_path / "d").sentence_index("train")
    with pytest.raises(LmforgeError, match=r"needs a tokenizer with \[CLS\].*--tokenizer wordpiece"):
        PretrainingBatches(TokenData.open(tmp_path / "d"), "train", 2, 32, seed=0)


# --- NSP pairs --------------------------------------------------------------------------------
def test_pair_layout(data):
    tok = data.tokenizer
    batch = PretrainingBatches(data, "train", 16, 48, seed=0).next_batch()
    ids, types, mask = original_ids(batch), batch["token_type_ids"], batch["attention_mask"]
    assert ids.shape == types.shape == mask.shape == batch["labels"].shape and ids.shape[1] <= 48
    for row in range(16):
        n = int(mask[row].sum())
        seps = (ids[row, :n] == tok.sep_id).nonzero().flatten().tolist()
        assert ids[row, 0] == tok.cls_id and len(seps) == 2 and seps[1] == n - 1
        assert types[row, : seps[0] + 1].eq(0).all() and types[row, seps[0] + 1 : n].eq(1).all()
        assert ids[row, n:].eq(tok.pad_id).all() and types[row, n:].eq(0).all()
        special = (ids[row] == tok.cls_id) | (ids[row] == tok.sep_id) | (mask[row] == 0)
        assert batch["labels"][row][special].eq(IGNORE_INDEX).all()
        assert batch["labels"][row].ne(IGNORE_INDEX).any()  # every row has a target


def test_next_segments_follow_and_random_ones_come_from_other_documents(data):
    # long enough, and no short examples, so nothing is trimmed: A + B is a run of whole sentences
    sampler = PretrainingBatches(data, "train", 64, 512, seed=1, short_seq_probability=0.0)
    starts, documents = data.sentence_index("train")
    stream = data.stream("train")
    sentence_at = {int(s): i for i, s in enumerate(starts[:-1])}
    read = lambda start, n: stream.read(start, min(start + n, len(stream))).tolist()  # noqa: E731
    tok = data.tokenizer
    doc_of = lambda i: int(np.searchsorted(documents, i, side="right")) - 1  # noqa: E731
    labels = []
    for _ in range(4):
        batch = sampler.next_batch()
        for row, label in zip(original_ids(batch), batch["next_sentence_label"].tolist()):
            tokens = row[row != tok.pad_id].tolist()
            sep = tokens.index(tok.sep_id)
            a, b = tokens[1:sep], tokens[sep + 1 : -1]
            # A is a run of sentences starting at a sentence start
            a_start = next(s for s in sentence_at if read(s, len(a)) == a)
            a_end = a_start + len(a)
            labels.append(label)
            if label == IS_NEXT:
                assert read(a_end, len(b)) == b
                assert doc_of(sentence_at[a_start]) == doc_of(sentence_at[a_end])
            else:
                assert label == IS_RANDOM
                b_start = [s for s in sentence_at if read(s, len(b)) == b]
                assert b_start and all(
                    doc_of(sentence_at[s]) != doc_of(sentence_at[a_start]) for s in b_start
                )
    share = np.mean(np.array(labels) == IS_RANDOM)
    assert 0.35 < share < 0.65, share


def test_pairs_fit_max_length(data):
    sampler = PretrainingBatches(data, "train", 32, 16, seed=2)
    for _ in range(5):
        batch = sampler.next_batch()
        lengths = batch["attention_mask"].sum(1)
        assert lengths.max() <= 16 and lengths.min() >= 5  # [CLS] a [SEP] b [SEP] at least


def test_mlm_only_single_segment(data):
    batch = PretrainingBatches(data, "train", 8, 32, seed=0, nsp=False).next_batch()
    assert "next_sentence_label" not in batch and batch["token_type_ids"].eq(0).all()
    ids = original_ids(batch)
    sep = data.tokenizer.sep_id
    assert ((ids == sep).sum(1) == 1).all()


# --- masking ----------------------------------------------------------------------------------
def test_masking_rates(data):
    tok = data.tokenizer
    sampler = PretrainingBatches(data, "train", 64, 64, seed=3)
    chosen = masked = kept = randomised = eligible = 0
    specials = {tok.cls_id, tok.sep_id, tok.pad_id, tok.mask_id, tok.token_to_id("[UNK]")}
    for _ in range(10):
        batch = sampler.next_batch()
        target = batch["labels"] != IGNORE_INDEX
        original = original_ids(batch)
        eligible += int((batch["attention_mask"].bool() & ~torch.isin(original, torch.tensor(list(specials)))).sum())
        chosen += int(target.sum())
        now = batch["input_ids"][target]
        masked += int((now == tok.mask_id).sum())
        kept += int((now == batch["labels"][target]).sum())
        replaced = now[(now != tok.mask_id) & (now != batch["labels"][target])]
        randomised += len(replaced)
        assert not torch.isin(replaced, torch.tensor(list(specials))).any()
    assert chosen / eligible == pytest.approx(0.15, abs=0.02)
    assert masked / chosen == pytest.approx(0.8, abs=0.04)
    # a random replacement may draw the original token: those count as kept
    assert kept / chosen == pytest.approx(0.1, abs=0.03)
    assert randomised / chosen == pytest.approx(0.1, abs=0.03)


def test_every_row_gets_a_target_even_at_low_probability(data):
    batch = PretrainingBatches(data, "train", 32, 24, seed=0, mlm_probability=0.001).next_batch()
    assert (batch["labels"] != IGNORE_INDEX).sum(1).ge(1).all()


def test_whole_word_masking_takes_all_pieces(tmp_path):
    # a tiny vocabulary splits most words into "##" pieces
    words = ["alphabetical", "mountaineering", "quarterback", "zigzagging", "bookkeeper"]
    documents = [" ".join(f"{w} {v} {i}." for i, v in enumerate(words)) for w in words]
    data = write_and_prepare(tmp_path, documents, vocab_size=60, val_fraction=0.0)
    vocab = data.tokenizer.backend.get_vocab()
    continuation = torch.zeros(len(vocab), dtype=torch.bool)
    continuation[[i for t, i in vocab.items() if t.startswith("##")]] = True
    sampler = PretrainingBatches(data, "train", 32, 64, seed=0, whole_word_masking=True,
                                 mlm_probability=0.3)
    pieces_seen = 0
    for _ in range(5):
        batch = sampler.next_batch()
        target = batch["labels"] != IGNORE_INDEX
        ids = original_ids(batch)
        ordinary = batch["attention_mask"].bool() & (ids >= 5)  # the 5 specials come first
        is_piece = continuation[ids] & ordinary
        is_piece[:, 1:] &= ordinary[:, :-1]  # a piece right after [SEP] starts a trimmed word
        pieces_seen += int(is_piece.sum())
        # a "##" piece is chosen exactly when the token before it (same word) is
        assert torch.equal(target[:, 1:][is_piece[:, 1:]], target[:, :-1][is_piece[:, 1:]])
    assert pieces_seen > 100


def test_same_seed_same_batches_and_exact_resume(data):
    a = PretrainingBatches(data, "train", 4, 32, seed=7)
    b = PretrainingBatches(data, "train", 4, 32, seed=7)
    first = [a.next_batch() for _ in range(3)]
    for batch in first:
        other = b.next_batch()
        assert all(torch.equal(batch[k], other[k]) for k in batch)
    state = a.state_dict()
    expected = a.next_batch()
    resumed = PretrainingBatches(data, "train", 4, 32, seed=999)
    resumed.load_state_dict(state)
    got = resumed.next_batch()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert not torch.equal(first[0]["input_ids"], first[1]["input_ids"])


def test_nsp_needs_two_documents(tmp_path):
    data = write_and_prepare(tmp_path, [corpus()[0]], val_fraction=0.0)
    with pytest.raises(LmforgeError, match=r"1 document\(s\); next-sentence prediction.*objective=mlm"):
        PretrainingBatches(data, "train", 2, 32, seed=0)
    PretrainingBatches(data, "train", 2, 32, seed=0, nsp=False).next_batch()  # MLM alone is fine
