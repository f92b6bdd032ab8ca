"""`lmforge finetune --task chat` and `lmforge chat` as a user runs them: a tiny GPT fine-tuned on
conversations, then a chat over piped stdin that answers as offline generation does."""

import json
import os
import subprocess
import sys

import pytest
import torch

from lmforge.chat import SFT_CHAT_TEMPLATE, ChatTemplate
from lmforge.checkpoint import load_checkpoint, save_checkpoint
from lmforge.generate import GenerationConfig, generate
from lmforge.tokenizer import train_tokenizer
from tests.cli.test_cli import assert_one_line_error, lmforge
from tests.conftest import SAMPLE_TEXT, tiny_gpt
from tests.train.test_chat_sft import CHATS, write_chats


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_cli")
    tok = train_tokenizer("bpe", [SAMPLE_TEXT], vocab_size=300)
    torch.manual_seed(0)
    save_checkpoint(root / "base", tiny_gpt(tok.vocab_size, block_size=96), tok)
    write_chats(root / "chats.jsonl", CHATS * 2)
    result = lmforge("finetune", "--task", "chat", "--base", root / "base", "--train", root / "chats.jsonl",
                     "--dev", root / "chats.jsonl", "--out", root / "run", "--epochs", "10", "--batch-size", "2",
                     "--lr", "1e-2", "--warmup-ratio", "0", "--precision", "fp32", "--device", "cpu",
                     "--no-progress")
    assert "8 conversations (0 dropped" in result.stdout and "best dev loss" in result.stdout
    return root


def chat(*args, stdin: str):
    return subprocess.run([sys.executable, "-m", "lmforge", "chat", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_finetune_writes_the_chat_template(run):
    config = json.loads((run / "run" / "best" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == SFT_CHAT_TEMPLATE
    assert [json.loads(line)["epoch"] for line in (run / "run" / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, 11))


def test_chat_over_piped_stdin_answers_as_offline_generation(run):
    result = chat(run / "run", "--greedy", "--max-new-tokens", "20", "--device", "cpu", "--system", "Be brief.",
                  stdin="Pack my box\n/reset\nThe quick brown fox\n/exit\nnever read\n")
    assert result.returncode == 0, result.stderr
    # the same template (read from the checkpoint) and greedy decoding, in-process
    ckpt = load_checkpoint(run / "run")
    template = ChatTemplate.for_checkpoint(ckpt)
    expected = []
    for user in ("Pack my box", "The quick brown fox"):
        prompt = template.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": user}])
        (g,) = generate(ckpt.model, ckpt.tokenizer, prompt, GenerationConfig(max_new_tokens=20, do_sample=False))
        assert g.finish_reason == "eos" and g.text.strip()  # the fine-tuned model ends its turn
        expected.append(f"assistant:{g.text}\n")
    assert result.stdout == expected[0] + "(history cleared)\n" + expected[1]


def test_bad_conversation_file_is_one_line_error(run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": CHATS[0]}) + "\n" + json.dumps({"messages": [{"role": "bot"}]}) + "\n")
    result = lmforge("finetune", "--task", "chat", "--base", run / "base", "--train", bad, "--out", tmp_path / "r",
                     "--no-progress", check=False)
    assert_one_line_error(result, "bad.jsonl:2", "role 'bot'", "system, user, assistant")
