"""`lmforge fill-mask` and `lmforge embed` as a user runs them, on a tiny saved BERT."""

import json

import pytest

from lmforge.checkpoint import save_checkpoint
from lmforge.tokenizer import train_tokenizer
from tests.cli.test_cli import assert_one_line_error, lmforge
from tests.conftest import SAMPLE_TEXT
from tests.models.test_bert import tiny_bert


@pytest.fixture(scope="module")
def bert_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    tok = train_tokenizer("wordpiece", [SAMPLE_TEXT], vocab_size=120)
    save_checkpoint(root / "mlm", tiny_bert(vocab_size=tok.vocab_size, head="mlm"), tok)
    save_checkpoint(root / "plain", tiny_bert(vocab_size=tok.vocab_size), tok)
    return root


def test_fill_mask_cli(bert_ckpts):
    out = json.loads(lmforge("fill-mask", bert_ckpts / "mlm", "the quick [MASK] fox [MASK].", "--top-k", "3",
                             "--json").stdout)
    [item] = out
    assert len(item["masks"]) == 2 and all(len(c) == 3 for c in item["masks"])
    scores = [c["score"] for c in item["masks"][0]]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1
    text = lmforge("fill-mask", bert_ckpts / "mlm", "the quick [MASK] fox.").stdout
    assert text.startswith("the quick [MASK] fox.")
    assert_one_line_error(lmforge("fill-mask", bert_ckpts / "mlm", "no mask here", check=False), "[MASK]")
    assert_one_line_error(lmforge("fill-mask", bert_ckpts / "plain", "a [MASK]", check=False), "masked-LM head")


def test_embed_cli(bert_ckpts):
    rows = json.loads(lmforge("embed", bert_ckpts / "plain", "--text", "the quick fox", "--text", "a lazy dog",
                              "--json").stdout)
    assert [r["text"] for r in rows] == ["the quick fox", "a lazy dog"]
    for r in rows:
        assert sum(x * x for x in r["embedding"]) == pytest.approx(1.0, abs=1e-4)  # normalised by default
    out = lmforge("embed", bert_ckpts / "plain", "--text", "the quick fox", "--text", "a lazy dog").stdout
    assert "cosine similarity" in out
    assert_one_line_error(lmforge("embed", bert_ckpts / "plain", check=False), "--text")
