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
    # --resume of a finished run does nothing more; settings cannot change on resume
    out = lmforge("finetune", "--out", tmp_path / "cls", "--resume", "--no-progress").stdout
    assert "stopped (epochs) after 6 epoch(s), 48 steps" in out, out
    assert_one_line_error(lmforge("finetune", "--out", tmp_path / "cls", "--resume", "--epochs", "9", check=False),
                          "drop --epochs")
    assert_one_line_error(lmforge("finetune", "--out", tmp_path / "y", check=False), "--base, --train, --dev required")


def test_bert_pretraining_cli(tmp_path):
    """prepare --tokenizer wordpiece, train --preset bert-mini (MLM + NSP), then fill-mask and a
    fine-tuning run on top of the pretrained encoder, as a user runs them."""
    from tests.data.test_mlm import corpus

    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus() * 3))
    out = lmforge("prepare", "--data", tmp_path / "docs.jsonl", "--tokenizer", "wordpiece", "--vocab-size", "150",
                  "--out", tmp_path / "data", "--no-progress")
    assert "wordpiece tokenizer" in out.stdout
    tiny = ["n_layer=1", "n_embd=32", "n_head=2", "max_position=64", "data.max_length=48", "max_iters=4",
            "eval_interval=2", "eval_iters=1", "batch_size=4", "precision=fp32"]
    out = lmforge("train", "--data", tmp_path / "data", "--out", tmp_path / "run", "--preset", "bert-mini",
                  "--no-progress", "--set", *tiny)
    assert "objective mlm_nsp" in out.stderr + out.stdout and "val NSP acc" in out.stderr + out.stdout
    config = json.loads((tmp_path / "run" / "last" / "config.json").read_text())
    assert config["model_type"] == "bert" and config["model"]["head"] == "pretraining"
    # MLM alone, chosen by the objective with no preset
    lmforge("train", "--data", tmp_path / "data", "--out", tmp_path / "mlm", "--no-progress",
            "--set", "objective=mlm", "whole_word_masking=true", *tiny)
    assert json.loads((tmp_path / "mlm" / "last" / "config.json").read_text())["model"]["head"] == "mlm"
    # resume continues the run
    lmforge("train", "--out", tmp_path / "run", "--resume", "--no-progress", "--set", "max_iters=6")
    assert json.loads((tmp_path / "run" / "last" / "config.json").read_text())["iter"] == 6
    masks = json.loads(lmforge("fill-mask", tmp_path / "run", "the apple note [MASK] is here.", "--json").stdout)
    assert len(masks[0]["masks"][0]) == 5
    assert_one_line_error(
        lmforge("train", "--data", tmp_path / "data", "--out", tmp_path / "bad", "--preset", "gpt-tiny",
                "--set", "objective=mlm", check=False),
        "objective='mlm' needs a BERT model",
    )
