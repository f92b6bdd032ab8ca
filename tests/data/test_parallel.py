"""Parallel text: reading pairs from aligned files and pairs files, prepare, bucketed batches."""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pytest
import torch

from lmforge.data import PrepareConfig, TokenData, open_data, prepare
from lmforge.data.parallel import BucketBatches, ParallelData, read_pairs, seq2seq_batch
from lmforge.data.tasks import IGNORE_INDEX
from lmforge.errors import LmforgeError

# a toy "German -> English" dictionary task: the target is the source word by word
LEXICON = {
    "ein": "a", "mann": "man", "hund": "dog", "frau": "woman", "kind": "child", "läuft": "runs",
    "spielt": "plays", "im": "in the", "park": "park", "schnee": "snow", "rot": "red", "blau": "blue",
    "groß": "big", "klein": "small", "sieht": "sees", "ball": "ball", "wasser": "water",
}


def toy_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    words = list(LEXICON)
    pairs = []
    for _ in range(n):
        src = [rng.choice(words) for _ in range(rng.randint(2, 8))]
        pairs.append((" ".join(src), " ".join(LEXICON[w] for w in src)))
    return pairs


def write_aligned(tmp_path, pairs, name="train", gz=False):
    opener = (lambda p: gzip.open(p, "wt", encoding="utf-8")) if gz else (lambda p: open(p, "w", encoding="utf-8"))
    paths = []
    for side, index in (("de", 0), ("en", 1)):
        path = tmp_path / (f"{name}.{side}" + (".gz" if gz else ""))
        with opener(path) as f:
            f.writelines(pair[index] + "\n" for pair in pairs)
        paths.append(path)
    return paths


def prepare_toy(tmp_path, n=400, **kw) -> ParallelData:
    src, tgt = write_aligned(tmp_path, toy_pairs(n))
    prepare(PrepareConfig(source=str(src), target=str(tgt), vocab_size=300, **kw), tmp_path / "data",
            progress=False)
    return open_data(tmp_path / "data")


def test_aligned_files_gzip_and_pairs_files_give_the_same_pairs(tmp_path):
    pairs = toy_pairs(20)
    src, tgt = write_aligned(tmp_path, pairs, gz=True)
    assert list(read_pairs(str(src), str(tgt))) == pairs
    (tmp_path / "p.tsv").write_text("de\ten\n" + "".join(f"{s}\t{t}\n" for s, t in pairs))
    assert list(read_pairs(str(tmp_path / "p.tsv"), None, "de", "en")) == pairs
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"de": s, "en": t}) + "\n" for s, t in pairs))
    assert list(read_pairs(str(tmp_path / "p.jsonl"), None, "de", "en")) == pairs
    (tmp_path / "p.csv").write_text("en,de\n" + "".join(f'"{t}","{s}"\n' for s, t in pairs))
    assert list(read_pairs(str(tmp_path / "p.csv"), None, "de", "en")) == pairs


def test_reading_errors_name_the_problem(tmp_path):
    (tmp_path / "a.txt").write_text("eins\nzwei\ndrei\n")
    (tmp_path / "b.txt").write_text("one\ntwo\n")
    with pytest.raises(LmforgeError, match="not aligned.*ends after 2 lines"):
        list(read_pairs(str(tmp_path / "a.txt"), str(tmp_path / "b.txt")))
    with pytest.raises(LmforgeError, match="does not exist"):
        list(read_pairs(str(tmp_path / "a.txt"), str(tmp_path / "missing.txt")))
    (tmp_path / "p.tsv").write_text("de\ten\nx\ty\n")
    with pytest.raises(LmforgeError, match="no field 'source'.*--source-field"):
        list(read_pairs(str(tmp_path / "p.tsv")))
    with pytest.raises(LmforgeError, match=r"\.tsv, \.csv or \.jsonl"):
        list(read_pairs(str(tmp_path / "a.txt")))
    with pytest.raises(LmforgeError, match="parallel text is prepared with --tokenizer bpe"):
        PrepareConfig(source="a", target="b", tokenizer="char")


def test_prepare_writes_pairs_with_eos_and_t5_specials(tmp_path):
    data = prepare_toy(tmp_path, n=100)
    tok = data.tokenizer
    assert (tok.pad_id, tok.eos_id, tok.token_to_id("<unk>")) == (0, 1, 2)
    assert data.pairs("train") == 90 and data.pairs("val") == 10  # the last 10% is val
    pairs = toy_pairs(100)
    for i in (0, 5, 89):
        src, tgt = data.pair("train", i)
        assert src[-1] == tok.eos_id and tgt[-1] == tok.eos_id
        assert tok.decode(src[:-1].tolist()) == pairs[i][0]
        assert tok.decode(tgt[:-1].tolist()) == pairs[i][1]
    src, tgt = data.pair("val", 0)
    assert tok.decode(tgt[:-1].tolist()) == pairs[90][1]
    with pytest.raises(LmforgeError, match="parallel text"):  # not a token stream
        TokenData.open(tmp_path / "data")


def test_prepare_uses_a_separate_validation_set_and_filters_lengths(tmp_path):
    train_pairs = toy_pairs(50) + [("", "empty source"), ("ein " * 100, "a " * 100)]
    src, tgt = write_aligned(tmp_path, train_pairs)
    vsrc, vtgt = write_aligned(tmp_path, toy_pairs(7, seed=1), name="val")
    manifest = prepare(PrepareConfig(source=str(src), target=str(tgt), val_source=str(vsrc),
                                     val_target=str(vtgt), vocab_size=300, max_length=40),
                       tmp_path / "data", progress=False)
    assert manifest["splits"]["train"]["pairs"] == 50 and manifest["splits"]["val"]["pairs"] == 7
    assert manifest["dropped"]["train"] == {"empty": 1, "too_long": 1}
    src_len, tgt_len = open_data(tmp_path / "data").lengths("train")
    assert src_len.max() <= 40 and tgt_len.max() <= 40


def test_seq2seq_batch_is_teacher_forcing_with_padding_ignored():
    batch = seq2seq_batch([[5, 6, 1], [7, 1]], [[8, 9, 10, 1], [11, 1]], pad_id=0, decoder_start_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 1], [7, 1, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["decoder_input_ids"].tolist() == [[0, 8, 9, 10], [0, 11, 0, 0]]
    assert batch["labels"].tolist() == [[8, 9, 10, 1], [11, 1, IGNORE_INDEX, IGNORE_INDEX]]


def test_bucket_batches_cover_an_epoch_group_lengths_and_resume(tmp_path):
    data = prepare_toy(tmp_path, n=600)
    n = data.pairs("train")
    sampler = BucketBatches(data, "train", 16, seed=3, pad_id=0, decoder_start_id=0)
    per_epoch = -(-n // 16)
    seen, padding = 0, 0
    for _ in range(per_epoch):
        b = sampler.next_batch()
        seen += len(b["input_ids"])
        padding += int((b["attention_mask"] == 0).sum())
    assert seen == n and sampler.epoch == 0
    # grouped by length: far less source padding than random batches of the same pairs
    src_len, _ = data.lengths("train")
    rng = np.random.default_rng(0)
    random_padding = sum(
        int(src_len[idx].max() * len(idx) - src_len[idx].sum())
        for idx in np.array_split(rng.permutation(n), per_epoch)
    )
    assert padding < 0.5 * random_padding
    state = sampler.state_dict()
    expected = [sampler.next_batch() for _ in range(3)]  # crosses into epoch 1
    assert sampler.epoch == 1
    again = BucketBatches(data, "train", 16, seed=3, pad_id=0, decoder_start_id=0)
    again.load_state_dict(state)
    for a, b in zip(expected, (again.next_batch() for _ in range(3))):
        assert all(torch.equal(a[k], b[k]) for k in a)
