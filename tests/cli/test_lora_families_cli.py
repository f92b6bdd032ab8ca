"""`--lora` for the GPT and encoder-decoder families as a user runs it: `finetune --task chat
--lora`, `train --init-from CKPT --lora` (and its --resume), `lora merge` on their adapters, and
the one-line errors."""

import json

import pytest
import torch

from lmforge.checkpoint import load_checkpoint, save_checkpoint
from lmforge.cli import main
from lmforge.data import PrepareConfig, open_data, prepare
from lmforge.models import GPT, GPTConfig
from lmforge.tokenizer import train_tokenizer
from tests.cli.test_cli import assert_one_line_error, lmforge
from tests.conftest import SAMPLE_TEXT, tiny_gpt
from tests.train.test_chat_sft import CHATS, write_chats


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def error_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def same_weights(a, b) -> bool:
    sa, sb = load_checkpoint(a).model.state_dict(), load_checkpoint(b).model.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_chat_lora_cli(tmp_path):
    tok = train_tokenizer("bpe", [SAMPLE_TEXT], vocab_size=300)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "base", tiny_gpt(tok.vocab_size, block_size=96), tok)
    chats = write_chats(tmp_path / "chats.jsonl", CHATS * 2)
    chat = "finetune --task chat --precision fp32 --device cpu --no-progress --lora".split()
    chat += ["--base", tmp_path / "base", "--train", chats]
    fast = "--epochs 2 --batch-size 2 --lr 1e-2 --lora-rank 4".split()
    result = lmforge(*chat, "--dev", chats, "--out", tmp_path / "run", *fast)
    assert "(LoRA)" in result.stdout + result.stderr  # "chat fine-tuning N of M (LoRA) parameters"
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    # the generative families' default: every Linear layer of the blocks
    assert config["lora"]["target_modules"] == ["c_attn", "c_proj", "c_fc"]
    assert config["lora"]["rank"] == 4 and config["model_type"] == "gpt"
    assert config["base"] == str(tmp_path / "base")
    # best/ is an ordinary checkpoint `generate` (and `chat`, `serve`) loads
    out = lmforge(
        "generate", tmp_path / "run", "--prompt", "The", "--max-new-tokens", "5", "--greedy"
    )
    assert out.stdout.strip()
    lmforge(
        "lora", "merge", tmp_path / "base", tmp_path / "run" / "adapter", "--out", tmp_path / "m"
    )
    assert same_weights(tmp_path / "m", tmp_path / "run" / "best")
    # an unknown target: one line naming the GPT's Linear layers
    bad = lmforge(*chat, "--out", tmp_path / "bad", "--lora-targets", "q_proj", check=False)
    assert_one_line_error(bad, "'q_proj'", "attn.c_attn", "mlp.c_fc")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_lora_cli")
    (root / "corpus.txt").write_text(SAMPLE_TEXT * 3)
    prepare(
        PrepareConfig(source=str(root / "corpus.txt"), tokenizer="char"),
        root / "data",
        progress=False,
    )
    tokenizer = open_data(root / "data").tokenizer
    torch.manual_seed(0)
    config = GPTConfig(
        n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=tokenizer.vocab_size
    )
    save_checkpoint(root / "base", GPT(config), tokenizer)
    return root


FAST = ["--set", *("train.batch_size=4 train.eval_iters=2 train.eval_interval=2 train.lr=1e-2 "
                   "train.lr_decay_iters=6 train.precision=fp32 train.device=cpu").split()]  # fmt: skip


def test_train_init_from_lora_resume_and_merge(data, tmp_path):
    run, base = tmp_path / "run", data / "base"
    args = ["train", "--data", data / "data", "--init-from", base, "--no-progress", *FAST]
    lora = ["--lora", "--lora-rank", "2", "--lora-targets", "c_attn"]
    assert run_cli(*args, "train.max_iters=4", "--out", run, *lora) == 0
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["lora"]["target_modules"] == ["c_attn"] and config["base"] == str(base)
    meta = json.loads((run / "last" / "config.json").read_text())
    assert meta["base"] == str(base) and meta["lora"]["rank"] == 2 and meta["iter"] == 4
    # the run goes on with its base and adapters, to iter 6
    assert (
        run_cli("train", "--out", run, "--resume", "--no-progress", "--set", "train.max_iters=6")
        == 0
    )
    assert json.loads((run / "last" / "config.json").read_text())["iter"] == 6
    assert run_cli("lora", "merge", base, run / "adapter", "--out", tmp_path / "merged") == 0
    assert same_weights(tmp_path / "merged", run / "best")
    # without --lora, --init-from trains every weight from the checkpoint's
    assert run_cli(*args, "train.max_iters=1", "--out", tmp_path / "full") == 0
    assert not (tmp_path / "full" / "adapter").exists()
    assert load_checkpoint(tmp_path / "full").model.config == load_checkpoint(base).model.config


def test_lora_cli_errors(data, tmp_path, capsys):
    train = ["train", "--data", data / "data", "--out", tmp_path / "a"]
    init = [*train, "--init-from", data / "base"]
    resume = ["--out", tmp_path / "a", "--resume"]
    cases = [
        ([*train, "--lora"], ["--lora trains adapters", "--init-from CKPT"]),
        ([*train, "--lora-rank", "4"], ["--lora-rank", "add --lora"]),
        ([*init, "--preset", "gpt-mini"], ["takes the model from the checkpoint", "drop --preset"]),
        ([*init, "--set", "dropout=0.2"], ["drop model.dropout"]),
        (["train", *resume, "--lora"], ["--resume continues the run", "drop --lora"]),
        (["train", *resume, "--init-from", data / "base"], ["drop --init-from"]),
        (["finetune", "--task", "seq2seq", *resume, "--lora-rank", "4"],
         ["continues the run with its own settings (LoRA included)", "--lora-rank"]),
    ]  # fmt: skip
    for argv, fragments in cases:
        assert run_cli(*argv) == 2, argv
        line = error_line(capsys)
        assert line.startswith("lmforge: error:") and all(f in line for f in fragments), line
    # data prepared with another tokenizer: the checkpoint's embeddings would read other ids
    (tmp_path / "other.txt").write_text(SAMPLE_TEXT.upper() * 3)
    other = PrepareConfig(source=str(tmp_path / "other.txt"), tokenizer="char")
    prepare(other, tmp_path / "other", progress=False)
    assert run_cli(*init[:2], tmp_path / "other", *init[3:], "--lora") == 2
    assert "was prepared with another tokenizer" in error_line(capsys)
