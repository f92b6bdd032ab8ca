"""`lmforge distill` as a user runs it: a GPT teacher on a data folder (then generate and resume
from the student's run), a fine-tuned BERT classifier on train/dev files (then predict), and the
one-line errors for bad settings."""

import json

import pytest
import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.data import PrepareConfig, TokenData, prepare
from lmforge.models import Bert, BertConfig, GPTConfig
from lmforge.tokenizer import train_tokenizer
from lmforge.train import DataConfig, TrainConfig, train
from lmforge.train.finetune import FinetuneConfig, finetune
from tests.cli.test_cli import assert_one_line_error, lmforge
from tests.conftest import SAMPLE_TEXT
from tests.train.test_finetune import _sentences, write_tsv


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill-cli")
    (root / "corpus.txt").write_text(SAMPLE_TEXT * 3)
    prepare(PrepareConfig(source=str(root / "corpus.txt"), tokenizer="char"), root / "data", progress=False)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32,
                       vocab_size=TokenData.open(root / "data").vocab_size)
    train(config, TrainConfig(batch_size=4, max_iters=20, eval_interval=20, eval_iters=2, precision="fp32",
                              device="cpu", warmup_iters=2), DataConfig(str(root / "data")), root / "teacher",
          progress=False)
    return root


FAST = ["--batch-size", "4", "--precision", "fp32", "--device", "cpu", "--no-progress"]


def test_distill_a_gpt_then_generate_and_resume(gpt):
    run = gpt / "student"
    out = lmforge("distill", "--teacher", gpt / "teacher", "--student", "gpt-tiny", "--data", gpt / "data",
                  "--out", run, "--iters", "6", "--eval-interval", "3", "--alpha", "0.7", "--temperature", "3",
                  "--set", "train.eval_iters=2", "train.warmup_iters=1", *FAST).stdout
    assert "objective distill-clm" in out
    assert "stopped (max_iters) after 6 steps" in out, out
    assert "teacher (eval batches): train_ce" in out and "val_kl" in out
    meta = json.loads((run / "last" / "config.json").read_text())
    assert meta["distill"]["alpha"] == 0.7 and meta["distill"]["temperature"] == 3.0
    assert meta["train"]["eval_iters"] == 2 and meta["model"]["n_embd"] == 128  # gpt-tiny
    [row] = json.loads(lmforge("generate", run, "--prompt", "The", "--max-new-tokens", "5", "--greedy",
                               "--json").stdout)
    assert len(row["token_ids"]) == 5
    # resume with more steps: the teacher and settings come from the run
    out = lmforge("distill", "--out", run, "--resume", "--iters", "9", "--no-progress").stdout
    assert "stopped (max_iters) after 9 steps" in out, out
    assert_one_line_error(lmforge("distill", "--out", run, "--resume", "--alpha", "0.2", check=False),
                          "drop --alpha")


def test_distill_errors(gpt, tmp_path):
    base = ["distill", "--teacher", gpt / "teacher", "--data", gpt / "data", "--out", tmp_path / "r"]
    assert_one_line_error(lmforge(*base, "--student", "gpt-tiny", "--alpha", "1.5", check=False),
                          "alpha must be in [0, 1], got 1.5")
    assert_one_line_error(lmforge(*base, "--init-from-teacher", "--temperature", "0", check=False),
                          "temperature must be a number > 0")
    assert_one_line_error(lmforge(*base, "--student", "gpt-tiny", "--epochs", "2", check=False),
                          "drop --epochs")
    (tmp_path / "other.txt").write_text("0123456789 XYZ\n" * 200)
    prepare(PrepareConfig(source=str(tmp_path / "other.txt"), tokenizer="char"), tmp_path / "other",
            progress=False)
    assert_one_line_error(lmforge("distill", "--teacher", gpt / "teacher", "--student", "gpt-tiny", "--data",
                                  tmp_path / "other", "--out", tmp_path / "r", check=False),
                          "different vocabulary")


def test_distill_a_classifier_then_predict(tmp_path):
    tokenizer = train_tokenizer("wordpiece", [t for _, t in _sentences(50, 0)] + ["good bad"], vocab_size=120)
    torch.manual_seed(0)
    base = Bert(BertConfig(n_layer=2, n_head=2, n_embd=32, max_position=64, vocab_size=tokenizer.vocab_size,
                           head="mlm"))
    save_checkpoint(tmp_path / "base", base, tokenizer)
    train_tsv = write_tsv(tmp_path / "train.tsv", _sentences(64, 1))
    dev_tsv = write_tsv(tmp_path / "dev.tsv", _sentences(16, 2))
    finetune(tmp_path / "base", train_tsv, dev_tsv, tmp_path / "teacher",
             FinetuneConfig(epochs=6, batch_size=8, lr=2e-3, precision="fp32", device="cpu"), progress=False)
    out = lmforge("distill", "--teacher", tmp_path / "teacher", "--init-from-teacher", "--train", train_tsv,
                  "--dev", dev_tsv, "--out", tmp_path / "student", "--epochs", "2", "--lr", "2e-3",
                  "--set", "finetune.eval_batch_size=16", *FAST).stdout
    assert "teacher (dev): accuracy 1.0000" in out, out
    assert "student (dev): accuracy" in out
    rows = json.loads(lmforge("predict", tmp_path / "student", "--text", "the movie was good", "--json").stdout)
    assert rows[0]["label"] in ("neg", "pos") and set(rows[0]["scores"]) == {"neg", "pos"}
    assert_one_line_error(lmforge("distill", "--teacher", tmp_path / "teacher", "--init-from-teacher", "--train",
                                  train_tsv, "--dev", dev_tsv, "--out", tmp_path / "x", "--iters", "5",
                                  check=False), "drop --iters")
    assert_one_line_error(lmforge("distill", "--teacher", tmp_path / "teacher", "--student", "bert-mini",
                                  "--data", tmp_path, "--out", tmp_path / "x", check=False), "not on --data")
