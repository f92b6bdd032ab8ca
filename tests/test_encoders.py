"""Encoder-side tokenization (WordPiece, [CLS]/[SEP], pairs) and the `embed`/`fill_mask` helpers."""

import pytest
import torch

from lmforge.encoders import embed, fill_mask
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer, train_tokenizer
from tests.conftest import SAMPLE_TEXT
from tests.models.test_bert import tiny_bert

TEXTS = [
    "The quick brown fox.",
    "Pack my box with five dozen liquor jugs!",
    "x",
    "How vexingly quick daft zebras jump?",
]


@pytest.fixture(scope="module")
def wordpiece():
    return train_tokenizer("wordpiece", [SAMPLE_TEXT], vocab_size=120)


# --- tokenizer -----------------------------------------------------------------------------------
def test_wordpiece_specials_and_lowercasing(wordpiece):
    assert [wordpiece.pad_id, wordpiece.cls_id, wordpiece.sep_id, wordpiece.mask_id] == [0, 2, 3, 4]
    assert wordpiece.encode("THE Quick") == wordpiece.encode(
        "the quick"
    )  # no [CLS]/[SEP] in encode
    assert wordpiece.decode(wordpiece.encode("The quick [MASK] fox.")) == "the quick [MASK] fox."


def test_encode_for_encoder_pairs_padding_and_truncation(wordpiece):
    batch = wordpiece.encode_for_encoder(
        ["the quick fox", "a"], pairs=["lazy dog", "jumps over the lazy dog"]
    )
    ids, types, mask = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
    assert ids.shape == types.shape == mask.shape and ids.dtype == torch.long
    n0 = int(mask[0].sum())
    row = ids[0, :n0].tolist()
    assert (
        row[0] == wordpiece.cls_id
        and row[-1] == wordpiece.sep_id
        and row.count(wordpiece.sep_id) == 2
    )
    assert types[0, : row.index(wordpiece.sep_id) + 1].eq(0).all() and types[0, n0 - 1] == 1
    assert ids[0, n0:].eq(wordpiece.pad_id).all() and mask[1].all()  # padded to the longest row
    short = wordpiece.encode_for_encoder(
        ["the quick brown fox jumps over the lazy dog"] * 2, max_length=6
    )
    assert short["input_ids"].shape == (2, 6) and short["input_ids"][0, -1] == wordpiece.sep_id
    with pytest.raises(LmforgeError, match="2 texts but 1 pairs"):
        wordpiece.encode_for_encoder(["a", "b"], pairs=["c"])
    assert (
        wordpiece.backend.truncation is None and wordpiece.backend.padding is None
    )  # left as found


def test_wordpiece_save_load_and_vocab_txt(tmp_path, wordpiece):
    wordpiece.save(tmp_path)
    assert (tmp_path / "vocab.txt").read_text().splitlines()[:5] == [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
    ]
    loaded = Tokenizer.load(tmp_path)
    assert loaded.kind == "wordpiece" and loaded.mask_id == wordpiece.mask_id
    assert torch.equal(
        loaded.encode_for_encoder(TEXTS)["input_ids"],
        wordpiece.encode_for_encoder(TEXTS)["input_ids"],
    )
    (tmp_path / "tokenizer.json").unlink()  # a BERT folder with vocab.txt only
    vocab_only = Tokenizer.load(tmp_path)
    assert torch.equal(
        vocab_only.encode_for_encoder(TEXTS)["input_ids"],
        wordpiece.encode_for_encoder(TEXTS)["input_ids"],
    )


def test_wordpiece_vocab_size_is_checked():
    with pytest.raises(LmforgeError, match="WordPiece must be >= 6"):
        train_tokenizer("wordpiece", ["abc"], vocab_size=5)


# --- embed ---------------------------------------------------------------------------------------
def test_embed_is_mean_pooled_normalised_and_batch_independent(wordpiece):
    model = tiny_bert(wordpiece.vocab_size)
    vectors = embed(model, wordpiece, TEXTS)
    assert vectors.shape == (4, 32) and torch.allclose(vectors.norm(dim=1), torch.ones(4))
    one_by_one = torch.cat([embed(model, wordpiece, t) for t in TEXTS])
    torch.testing.assert_close(vectors, one_by_one, atol=1e-5, rtol=0)  # padding never leaks in
    torch.testing.assert_close(
        embed(model, wordpiece, TEXTS, batch_size=3), vectors, atol=1e-5, rtol=0
    )
    raw = embed(model, wordpiece, TEXTS[:1], normalize=False)
    batch = wordpiece.encode_for_encoder(TEXTS[:1])
    with torch.no_grad():
        expected = model(**batch).hidden_states.mean(1)  # no padding in a batch of one
    torch.testing.assert_close(raw, expected, atol=1e-6, rtol=0)


def test_embed_restores_training_mode_and_checks_max_length(wordpiece):
    model = tiny_bert(wordpiece.vocab_size).train()
    torch.testing.assert_close(
        embed(model, wordpiece, TEXTS), embed(model, wordpiece, TEXTS)
    )  # no dropout
    assert model.training
    assert embed(model, wordpiece, TEXTS, max_length=4).shape == (4, 32)
    with pytest.raises(LmforgeError, match=r"max_length must be in \[1, 64\]"):
        embed(model, wordpiece, TEXTS, max_length=65)


# --- fill_mask -----------------------------------------------------------------------------------
def test_fill_mask_one_ranked_list_per_mask(wordpiece):
    model = tiny_bert(wordpiece.vocab_size, head="mlm")
    [first, second] = fill_mask(model, wordpiece, "The quick [MASK] fox [MASK] over.", top_k=3)
    assert len(first) == len(second) == 3
    scores = [c["score"] for c in first]
    assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1
    c = first[0]
    assert wordpiece.token_to_id(c["token"]) == c["token_id"]
    assert c["sequence"].count("[MASK]") == 1 and "[CLS]" not in c["sequence"]
    # the score is the softmax over the vocabulary at the mask position
    batch = wordpiece.encode_for_encoder(["The quick [MASK] fox [MASK] over."])
    pos = batch["input_ids"][0].tolist().index(wordpiece.mask_id)
    with torch.no_grad():
        probs = model(**batch).mlm_logits[0, pos].softmax(-1)
    assert (
        abs(probs[c["token_id"]].item() - c["score"]) < 1e-6
        and probs.argmax().item() == c["token_id"]
    )


def test_fill_mask_errors(wordpiece):
    with pytest.raises(LmforgeError, match=r"no \[MASK\] token"):
        fill_mask(tiny_bert(wordpiece.vocab_size, head="mlm"), wordpiece, "nothing to fill")
    with pytest.raises(LmforgeError, match="needs a masked-LM head.*head='classification'"):
        fill_mask(tiny_bert(wordpiece.vocab_size, head="classification"), wordpiece, "a [MASK]")
