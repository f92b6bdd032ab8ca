import pytest

from lmforge.errors import LmforgeError
from lmforge.tokenizer import EOS_TOKEN, Tokenizer, train_tokenizer
from tests.conftest import SAMPLE_TEXT

TRICKY = ["Hello, world!\n\tindented", "café naïve 😀 — ünïcödé", "   leading spaces", "x", "line1\n\nline3\n"]


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_round_trip_and_reload(tmp_path, kind):
    tok = train_tokenizer(kind, [SAMPLE_TEXT, *TRICKY], vocab_size=300)
    for text in TRICKY:
        assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.kind == kind and loaded.vocab_size == tok.vocab_size
    assert loaded.encode_batch(TRICKY) == tok.encode_batch(TRICKY)


def test_bpe_byte_fallback_covers_unseen_text():
    tok = train_tokenizer("bpe", [SAMPLE_TEXT], vocab_size=300)
    unseen = "Ωμέγα ∑ 数学 🚀"  # no such characters in training: byte-level BPE still encodes them
    assert tok.decode(tok.encode(unseen)) == unseen
    assert tok.eos_id == tok.token_to_id(EOS_TOKEN) and tok.decode([tok.eos_id]) == EOS_TOKEN
    assert tok.vocab_size <= 300


def test_char_tokenizer_vocabulary_is_sorted_characters():
    tok = train_tokenizer("char", ["hello world"])
    assert tok.vocab_size == len(set("hello world"))
    assert tok.encode(" dehlorw") == list(range(8))  # sorted order, as nanoGPT's char prep
    assert tok.eos_id is None


def test_tokenizer_errors(tmp_path):
    tok = train_tokenizer("char", ["abc"])
    with pytest.raises(LmforgeError, match=r"never seen \('z'\)"):
        tok.encode("abz")
    with pytest.raises(LmforgeError, match="unknown tokenizer 'wordpiece2'; choose one of: bpe, char"):
        train_tokenizer("wordpiece2", ["abc"])
    with pytest.raises(LmforgeError, match=">= 257"):
        train_tokenizer("bpe", ["abc"], vocab_size=100)
    with pytest.raises(LmforgeError, match="empty text"):
        train_tokenizer("char", [""])
    with pytest.raises(LmforgeError, match="no tokenizer"):
        Tokenizer.load(tmp_path)


def test_gpt2_style_vocab_and_merges_load(tmp_path):
    """Old GPT-2 folders carry vocab.json + merges.txt instead of tokenizer.json."""
    tok = train_tokenizer("bpe", [SAMPLE_TEXT], vocab_size=300)
    tok.backend.model.save(str(tmp_path))  # writes vocab.json and merges.txt
    loaded = Tokenizer.load(tmp_path)
    assert loaded.encode("The quick brown fox") == tok.encode("The quick brown fox")
    assert loaded.decode(tok.encode("The quick brown fox")) == "The quick brown fox"
