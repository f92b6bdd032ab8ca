"""`lmforge finetune --lora` and `lmforge lora merge` as a user runs them, on a tiny BERT."""

import json

import torch

from lmforge.checkpoint import load_checkpoint, save_checkpoint
from lmforge.tokenizer import train_tokenizer
from tests.cli.test_cli import assert_one_line_error, lmforge
from tests.models.test_bert import padded_batch, tiny_bert
from tests.train.test_finetune import NAMES, PLACES, _sentences, write_tsv


def test_finetune_lora_then_merge_cli(tmp_path):
    texts = [t for _, t in _sentences(50, 0)] + [" ".join(NAMES + PLACES + ["good", "bad"])]
    tok = train_tokenizer("wordpiece", texts, vocab_size=120)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "base", tiny_bert(vocab_size=tok.vocab_size, head="mlm"), tok)
    train, dev = write_tsv(tmp_path / "train.tsv", _sentences(64, 1)), write_tsv(tmp_path / "dev.tsv", _sentences(16, 2))
    run = ["finetune", "--base", tmp_path / "base", "--train", train, "--dev", dev]
    fast = ["--epochs", "4", "--batch-size", "8", "--lr", "2e-2", "--precision", "fp32", "--no-progress"]
    lora = ["--lora", "--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0.05", "--lora-targets", "c_attn,c_proj"]
    out = lmforge(*run, "--out", tmp_path / "cls", *fast, *lora)
    assert "best dev accuracy" in out.stdout, out.stdout
    assert "parameters (" in out.stdout + out.stderr  # "fine-tuning N of M parameters (x%)"

    # best/ is an ordinary checkpoint; adapter/ is the adapter alone, much smaller
    run_dir = tmp_path / "cls"
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["lora"]["rank"] == 4 and config["lora"]["target_modules"] == ["c_attn", "c_proj"]
    assert config["lora"]["dropout"] == 0.05 and "classifier" in config["lora"]["modules_to_save"]
    assert config["base"] == str(tmp_path / "base") and len(config["model_config_hash"]) == 16
    adapter_size = (run_dir / "adapter" / "adapter.safetensors").stat().st_size
    assert adapter_size < 0.5 * (run_dir / "best" / "model.safetensors").stat().st_size
    rows = json.loads(lmforge("predict", run_dir, "--text", "the movie was good", "--json").stdout)
    assert rows[0]["label"] in ("pos", "neg")

    # merge the adapter into the base: the same model as best/
    out = lmforge("lora", "merge", tmp_path / "base", run_dir / "adapter", "--out", tmp_path / "merged")
    assert "wrote" in out.stdout
    inputs = padded_batch(vocab_size=tok.vocab_size)
    merged, best = load_checkpoint(tmp_path / "merged").model, load_checkpoint(run_dir / "best").model
    torch.testing.assert_close(merged(**inputs).logits, best(**inputs).logits, atol=1e-5, rtol=0)

    # user errors: one line each, naming what is wrong
    assert_one_line_error(lmforge(*run, "--out", tmp_path / "x", *fast, "--lora", "--lora-rank", "0", check=False),
                          "rank must be an integer >= 1")
    assert_one_line_error(lmforge(*run, "--out", tmp_path / "y", *fast, "--lora", "--lora-targets", "q_proj,v_proj",
                                  check=False), "'q_proj'", "attn.c_attn", "mlp.c_fc")
    assert_one_line_error(lmforge(*run, "--out", tmp_path / "z", *fast, "--lora-rank", "4", check=False),
                          "add --lora")
    assert_one_line_error(lmforge("finetune", "--out", run_dir, "--resume", "--lora", check=False),
                          "--resume continues the run", "--lora")
    assert_one_line_error(lmforge("finetune", "--task", "seq2seq", "--out", tmp_path / "s", "--resume", "--lora",
                                  check=False), "--resume continues the run", "--lora")
    other = tmp_path / "other"
    save_checkpoint(other, tiny_bert(vocab_size=tok.vocab_size, n_embd=48, head="mlm"), tok)
    assert_one_line_error(lmforge("lora", "merge", other, run_dir / "adapter", "--out", tmp_path / "m2", check=False),
                          "is this the base the adapter was trained on")
    assert_one_line_error(lmforge("lora", "merge", tmp_path / "base", tmp_path, "--out", tmp_path / "m3", check=False),
                          "not a LoRA adapter folder")
