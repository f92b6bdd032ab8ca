"""The encoder-decoder workflow through the CLI: prepare pairs, train, translate, score, fine-tune."""

from __future__ import annotations

import json

import pytest

from tests.cli.test_cli import assert_one_line_error, lmforge
from tests.data.test_parallel import toy_pairs, write_aligned

TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.mlp_hidden=64", "model.max_position=64",
        "model.dropout=0.0", "train.batch_size=16", "train.eval_iters=2", "train.precision=fp32",
        "train.warmup_iters=5", "train.log_interval=10", "train.lr=3e-3"]


@pytest.fixture(scope="module")
def seq2seq_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-seq2seq")
    src, tgt = write_aligned(root, toy_pairs(500), gz=True)
    out = lmforge("prepare", "--data", src, "--target", tgt, "--vocab-size", 300, "--out", root / "data",
                  "--no-progress")
    assert "450 train + 50 val sentence pairs" in out.stdout
    out = lmforge("train", "--data", root / "data", "--out", root / "run", "--preset", "transformer-tiny",
                  "--no-progress", "--set", *TINY, "train.max_iters=300", "train.eval_interval=150")
    assert "objective seq2seq" in out.stdout and "stopped (max_iters) at iter 300" in out.stdout
    test_pairs = toy_pairs(12, seed=9)
    (root / "test.de").write_text("".join(s + "\n" for s, _ in test_pairs))
    (root / "test.en").write_text("".join(t + "\n" for _, t in test_pairs))
    return root


def test_pairs_train_an_encoder_decoder_without_a_preset(tmp_path, seq2seq_run):
    out = lmforge("train", "--data", seq2seq_run / "data", "--out", tmp_path / "r", "--no-progress",
                  "--set", *TINY, "train.max_iters=2", "train.eval_interval=2")
    assert "EncoderDecoder" in out.stdout and "objective seq2seq" in out.stdout


def test_translate_generate_and_eval(seq2seq_run):
    run = seq2seq_run / "run"
    out = lmforge("translate", run, "--text", "ein hund", "--text", "eine frau sieht", "--num-beams", 3)
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and all(lines)
    out = lmforge("translate", run, "--file", seq2seq_run / "test.de", "--json")
    results = json.loads(out.stdout)
    assert len(results) == 12 and all(r["finish_reason"] in ("eos", "length") for r in results)
    assert results[0]["source"] == (seq2seq_run / "test.de").read_text().splitlines()[0]
    out = lmforge("generate", run, "--prompt", "ein hund", "--greedy")  # generate translates, too
    assert out.stdout.strip() == lmforge("translate", run, "--text", "ein hund").stdout.strip()
    out = lmforge("eval", run, "--source", seq2seq_run / "test.de", "--reference", seq2seq_run / "test.en",
                  "--num-beams", 2, "--json", "--output", seq2seq_run / "hyp.txt")
    scores = json.loads(out.stdout)
    assert scores["sentences"] == 12 and scores["decoding"] == "beam 2"
    for key in ("bleu", "chrf", "rouge1", "rouge2", "rougeL"):
        assert 0 <= scores[key] <= 100
    assert scores["bleu"] > 5  # the toy task is being learned (16 here); an untrained model scores ~0
    assert len((seq2seq_run / "hyp.txt").read_text().splitlines()) == 12


def test_finetune_seq2seq_from_the_cli(tmp_path, seq2seq_run):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("de\ten\n" + "".join(f"{s}\t{t}\n" for s, t in toy_pairs(40, seed=3)))
    out = lmforge("finetune", "--task", "seq2seq", "--base", seq2seq_run / "run", "--train", tsv, "--dev", tsv,
                  "--source-field", "de", "--target-field", "en", "--epochs", 1, "--batch-size", 20,
                  "--precision", "fp32", "--out", tmp_path / "ft", "--no-progress")
    assert "stopped (max_iters) at step 2" in out.stdout
    assert lmforge("translate", tmp_path / "ft", "--text", "ein ball").stdout.strip()


def test_seq2seq_bad_input_gets_one_line(tmp_path, seq2seq_run):
    (tmp_path / "a.txt").write_text("eins\nzwei\n")
    (tmp_path / "b.txt").write_text("one\n")
    result = lmforge("prepare", "--data", tmp_path / "a.txt", "--target", tmp_path / "b.txt", "--out",
                     tmp_path / "d", check=False)
    assert_one_line_error(result, "not aligned")
    result = lmforge("train", "--data", seq2seq_run / "data", "--out", tmp_path / "r", "--preset", "gpt-tiny",
                     check=False)
    assert_one_line_error(result, "sentence pairs", "encoder-decoder")
    result = lmforge("eval", seq2seq_run / "run", "--source", seq2seq_run / "test.de", check=False)
    assert_one_line_error(result, "--reference")
    result = lmforge("eval", seq2seq_run / "run", "--source", seq2seq_run / "test.de", "--reference",
                     seq2seq_run / "test.de", "--metrics", "meteor", check=False)
    assert_one_line_error(result, "unknown metric 'meteor'")
    result = lmforge("translate", seq2seq_run / "run", "--text", "ein hund", "--max-new-tokens", 500,
                     check=False)
    assert_one_line_error(result, "max_new_tokens", "positions")


def test_separate_tokenizers_from_the_cli(tmp_path):
    src, tgt = write_aligned(tmp_path, toy_pairs(200))
    out = lmforge("prepare", "--data", src, "--target", tgt, "--separate-tokenizers", "--vocab-size", 280,
                  "--out", tmp_path / "d", "--no-progress")
    assert "bpe vocab 280 source + 280 target" in out.stdout, out.stdout
    lmforge("train", "--data", tmp_path / "d", "--out", tmp_path / "r", "--no-progress",
            "--set", *TINY, "train.max_iters=2", "train.eval_interval=2")
    assert (tmp_path / "r" / "last" / "source_tokenizer" / "tokenizer.json").is_file()
    out = lmforge("translate", tmp_path / "r", "--text", "ein hund", "--max-new-tokens", 5, "--json")
    assert json.loads(out.stdout)[0]["source_ids"][-1] == 1  # </s>
