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


def test_finetune_and_predict_cli(tmp_path):
    """Classification and NER fine-tuning through the CLI, then predictions from the best checkpoint."""
    from tests.train.test_finetune import NAMES, PLACES, _sentences, _tagged, write_conll, write_tsv

    texts = [t for _, t in _sentences(50, 0)] + [" ".join(NAMES + PLACES + ["good", "bad"])]
    tok = train_tokenizer("wordpiece", texts, vocab_size=120)
    save_checkpoint(tmp_path / "base", tiny_bert(vocab_size=tok.vocab_size, head="mlm"), tok)
    fast = ["--epochs", "6", "--batch-size", "8", "--lr", "2e-3", "--precision", "fp32", "--no-progress"]
    out = lmforge("finetune", "--task", "classification", "--base", tmp_path / "base",
                  "--train", write_tsv(tmp_path / "train.tsv", _sentences(64, 1)),
                  "--dev", write_tsv(tmp_path / "dev.tsv", _sentences(16, 2)), "--out", tmp_path / "cls", *fast)
    assert "best dev accuracy 1.0000" in out.stdout, out.stdout
    rows = json.loads(lmforge("predict", tmp_path / "cls", "--text", "the movie was good", "--text",
                              "the plot was bad", "--json").stdout)
    assert [r["label"] for r in rows] == ["pos", "neg"]

    lmforge("finetune", "--task", "token-classification", "--base", tmp_path / "base",
            "--train", write_conll(tmp_path / "train.conll", _tagged(64, 3)),
            "--dev", write_conll(tmp_path / "dev.conll", _tagged(16, 4)), "--out", tmp_path / "ner", *fast,
            "--epochs", "10")
    [row] = json.loads(lmforge("predict", tmp_path / "ner", "--text", "we saw alice in rome", "--json").stdout)
    assert {(e["entity"], e["text"]) for e in row["entities"]} == {("PER", "alice"), ("LOC", "rome")}
    assert_one_line_error(lmforge("finetune", "--base", tmp_path / "base", "--train", tmp_path / "nope.tsv",
                                  "--dev", tmp_path / "dev.tsv", "--out", tmp_path / "x", check=False), "nope.tsv")
