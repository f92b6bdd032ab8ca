"""`lmforge generate` with --draft (speculative decoding), --dtype and --compile, as a user runs it,
on tiny saved checkpoints."""

import json
import shutil

import pytest
import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.models.encoder_decoder import EncoderDecoder, EncoderDecoderConfig
from lmforge.tokenizer import train_tokenizer
from tests.cli.test_cli import assert_one_line_error, lmforge
from tests.conftest import SAMPLE_TEXT, tiny_gpt

PROMPTS = ["--prompt", "The quick", "--prompt", "Pack my box with"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("draft")
    tok = train_tokenizer("char", [SAMPLE_TEXT])
    torch.manual_seed(0)
    save_checkpoint(root / "target", tiny_gpt(tok.vocab_size, n_layer=3), tok)
    save_checkpoint(root / "draft", tiny_gpt(tok.vocab_size, n_layer=1), tok)
    save_checkpoint(root / "short-draft", tiny_gpt(tok.vocab_size, n_layer=1, block_size=8), tok)
    # another tokenizer, the model's vocabulary the same size: only the tokenizers tell them apart
    other = train_tokenizer("char", [SAMPLE_TEXT.upper()])
    assert other.vocab_size <= tok.vocab_size
    save_checkpoint(root / "other-tokenizer-draft", tiny_gpt(tok.vocab_size, n_layer=1), other)
    encdec = EncoderDecoder(EncoderDecoderConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32))
    save_checkpoint(root / "encdec", encdec.eval(), tok)
    return root


def generate_json(*args):
    result = lmforge("generate", *args, "--json")
    return json.loads(result.stdout), result.stderr


def test_draft_gives_the_greedy_output(ckpts):
    plain, _ = generate_json(ckpts / "target", *PROMPTS, "--max-new-tokens", "12", "--greedy")
    for k in ("1", "4"):
        spec, stderr = generate_json(ckpts / "target", *PROMPTS, "--max-new-tokens", "12",
                                     "--draft", ckpts / "draft", "--num-draft-tokens", k)
        assert spec == plain  # --draft implies --greedy
        [line] = [line for line in stderr.splitlines() if line.startswith("speculative decoding:")]
        assert "tokens per target pass" in line and "drafted tokens accepted" in line
    # streaming one prompt, and the default max_new_tokens (what fits the draft's context too)
    streamed = lmforge("generate", ckpts / "target", "--prompt", "The", "--draft", ckpts / "draft")
    assert streamed.stdout.startswith("The") and "speculative decoding:" in streamed.stderr


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("c++") is None,
                    reason="inductor's CPU backend needs a C++ compiler")
def test_draft_with_compile_gives_the_greedy_output(ckpts):
    plain, _ = generate_json(ckpts / "target", *PROMPTS, "--max-new-tokens", "8", "--greedy")
    spec, _ = generate_json(ckpts / "target", *PROMPTS, "--max-new-tokens", "8", "--draft", ckpts / "draft",
                            "--compile")
    assert spec == plain


def test_dtype_and_compile_flags(ckpts):
    for dtype in ("bf16", "auto"):
        out, _ = generate_json(ckpts / "target", *PROMPTS, "--max-new-tokens", "6", "--greedy", "--dtype", dtype)
        assert [len(r["token_ids"]) for r in out] == [6, 6]
    bad = lmforge("generate", ckpts / "target", "--prompt", "a", "--dtype", "fp16", check=False)
    assert bad.returncode == 2 and "invalid choice: 'fp16'" in bad.stderr  # argparse's own message
    assert_one_line_error(lmforge("generate", ckpts / "target", "--prompt", "a", "--compile", "--num-beams", "2",
                                  check=False), "compile", "num_beams=1")


def test_draft_errors(ckpts):
    def error(*args, fragments):
        assert_one_line_error(lmforge("generate", ckpts / "target", "--prompt", "a", "--max-new-tokens", "5",
                                      *args, check=False), *fragments)

    error("--draft", ckpts / "draft", "--num-beams", "2", fragments=["greedy decoding only"])
    error("--draft", ckpts / "other-tokenizer-draft", fragments=["tokenizer"])
    error("--draft", ckpts / "encdec", fragments=["decoder-only"])
    error("--draft", ckpts / "short-draft", "--max-new-tokens", "20", fragments=["draft's context"])
    error("--draft", ckpts / "missing", fragments=["does not exist"])
    error("--draft", ckpts / "draft", "--num-draft-tokens", "0", fragments=["num_draft_tokens"])
    assert_one_line_error(lmforge("generate", ckpts / "encdec", "--prompt", "a", "--draft", ckpts / "draft",
                                  check=False), "decoder-only")
