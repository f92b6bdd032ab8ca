"""`lmforge quantize` as a user runs it: quantize a trained GPT, then generate and eval on the
result as on any checkpoint; a quantized BERT embeds; bad input gets one line."""

import json

import pytest
import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.tokenizer import train_tokenizer
from tests.cli.test_cli import assert_one_line_error, lmforge
from tests.compress.test_quantize import train_tiny_gpt
from tests.conftest import SAMPLE_TEXT
from tests.models.test_bert import tiny_bert


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize-cli")
    model, tokenizer, _ = train_tiny_gpt()
    save_checkpoint(root / "float", model, tokenizer)
    (root / "eval.txt").write_text(SAMPLE_TEXT[:600])
    return root


def greedy(ckpt, prompt="The quick"):
    [row] = json.loads(lmforge("generate", ckpt, "--prompt", prompt, "--max-new-tokens", "12", "--greedy",
                               "--json").stdout)
    return row["token_ids"]


def perplexity(ckpt, text):
    return json.loads(lmforge("eval", ckpt, "--text", text, "--context", "32", "--json").stdout)["perplexity"]


def test_quantize_then_generate_and_eval(gpt):
    out = lmforge("quantize", gpt / "float", "--scheme", "int8-weight", "--out", gpt / "int8").stdout
    assert "quantized 8 Linear layers to int8-weight" in out, out
    assert "kept float: lm_head: tied to the token embedding" in out
    assert "model.safetensors:" in out and f"wrote {gpt / 'int8'}" in out
    meta = json.loads((gpt / "int8" / "config.json").read_text())
    assert meta["quantization"]["scheme"] == "int8-weight" and len(meta["quantization"]["modules"]) == 8
    assert greedy(gpt / "int8") == greedy(gpt / "float")
    assert perplexity(gpt / "int8", gpt / "eval.txt") == pytest.approx(perplexity(gpt / "float", gpt / "eval.txt"),
                                                                       rel=0.02)


@pytest.mark.parametrize("scheme", ["int8-dynamic", "int4-weight"])
def test_other_schemes_generate(gpt, scheme):
    group = ["--group-size", "32"] if scheme == "int4-weight" else []
    lmforge("quantize", gpt / "float", "--scheme", scheme, *group, "--out", gpt / scheme)
    assert len(greedy(gpt / scheme)) == 12
    assert (gpt / scheme / "model.safetensors").stat().st_size < (gpt / "float" / "model.safetensors").stat().st_size


def test_quantized_bert_embeds_like_float(tmp_path):
    tok = train_tokenizer("wordpiece", [SAMPLE_TEXT], vocab_size=120)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "bert", tiny_bert(vocab_size=tok.vocab_size), tok)
    lmforge("quantize", tmp_path / "bert", "--scheme", "int8-dynamic", "--out", tmp_path / "q")

    def embed(ckpt):
        rows = json.loads(lmforge("embed", ckpt, "--text", "the quick brown fox", "--json").stdout)
        return torch.tensor(rows[0]["embedding"])

    assert torch.dot(embed(tmp_path / "bert"), embed(tmp_path / "q")) > 0.99  # unit vectors: cosine


def test_bad_input_gets_one_line(gpt, tmp_path):
    src = gpt / "float"
    assert_one_line_error(lmforge("quantize", src, "--scheme", "int2", "--out", tmp_path / "a", check=False),
                          "unknown quantization scheme 'int2'", "int8-weight, int8-dynamic, int4-weight")
    assert_one_line_error(lmforge("quantize", src, "--scheme", "int4-weight", "--group-size", "48", "--out",
                                  tmp_path / "a", check=False), "must be one of 32, 64, 128, 256")
    lmforge("quantize", src, "--scheme", "int8-weight", "--out", tmp_path / "q")
    assert_one_line_error(lmforge("quantize", tmp_path / "q", "--scheme", "int4-weight", "--out", tmp_path / "b",
                                  check=False), "already quantized (int8-weight)", "float checkpoint")
    assert_one_line_error(lmforge("convert", tmp_path / "q", tmp_path / "hf", check=False),
                          "Hugging Face folders hold float weights")


def test_finetuning_a_quantized_bert_is_refused(tmp_path):
    from tests.train.test_finetune import _sentences, write_tsv

    tok = train_tokenizer("wordpiece", [SAMPLE_TEXT], vocab_size=120)
    save_checkpoint(tmp_path / "bert", tiny_bert(vocab_size=tok.vocab_size, head="mlm"), tok)
    lmforge("quantize", tmp_path / "bert", "--scheme", "int8-weight", "--out", tmp_path / "q")
    result = lmforge("finetune", "--base", tmp_path / "q", "--train", write_tsv(tmp_path / "t.tsv", _sentences(8, 1)),
                     "--dev", write_tsv(tmp_path / "d.tsv", _sentences(4, 2)), "--out", tmp_path / "run",
                     "--no-progress", check=False)
    assert_one_line_error(result, "cannot fine-tune a quantized model (int8-weight", "fine-tune the float checkpoint")
