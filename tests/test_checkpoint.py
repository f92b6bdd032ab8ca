import json

import pytest
import torch

from lmforge.checkpoint import (
    load_checkpoint,
    load_train_state,
    resolve_checkpoint_dir,
    save_checkpoint,
)
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_dir
from tests.conftest import tiny_gpt


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_round_trip(tmp_path, char_tokenizer, tie):
    model = tiny_gpt(char_tokenizer.vocab_size, tie_embeddings=tie, position="rotary")
    save_checkpoint(tmp_path / "ck", model, char_tokenizer, train_state={"iter": 3, "rng": torch.get_rng_state()})
    ckpt = load_checkpoint(tmp_path / "ck")
    x = torch.randint(0, char_tokenizer.vocab_size, (2, 8))
    assert torch.equal(ckpt.model(x), model(x))
    assert (ckpt.model.lm_head.weight is ckpt.model.transformer.wte.weight) == tie
    assert ckpt.tokenizer.encode("quick fox") == char_tokenizer.encode("quick fox")
    assert load_train_state(tmp_path / "ck")["iter"] == 3


def test_run_folder_resolves_best_then_last(tmp_path, char_tokenizer):
    model = tiny_gpt(char_tokenizer.vocab_size)
    save_checkpoint(tmp_path / "run" / "last", model, char_tokenizer)
    assert resolve_checkpoint_dir(tmp_path / "run") == tmp_path / "run" / "last"
    save_checkpoint(tmp_path / "run" / "best", model, char_tokenizer)
    assert resolve_checkpoint_dir(tmp_path / "run") == tmp_path / "run" / "best"


def test_failed_write_leaves_previous_checkpoint(tmp_path, char_tokenizer):
    model = tiny_gpt(char_tokenizer.vocab_size)
    save_checkpoint(tmp_path / "ck", model, char_tokenizer, extra={"iter": 1})
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "ck") as tmp:
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["iter"] == 1
    load_checkpoint(tmp_path / "ck")  # still loads
    # a crash between the two renames: only .ck.old is left, and loading restores it
    (tmp_path / "ck").rename(tmp_path / ".ck.old")
    assert load_checkpoint(tmp_path / "ck").meta["iter"] == 1


def test_incompatible_and_missing_checkpoints(tmp_path, char_tokenizer):
    model = tiny_gpt(char_tokenizer.vocab_size)
    save_checkpoint(tmp_path / "ck", model, char_tokenizer)
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    (tmp_path / "ck" / "config.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(LmforgeError, match="format version 99.*upgrade lmforge"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text(json.dumps({**meta, "model_type": "rnn"}))
    with pytest.raises(LmforgeError, match="model_type 'rnn'"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text(json.dumps({**meta, "model": {**meta["model"], "n_embd": 64}}))
    with pytest.raises(LmforgeError, match="shape"):
        load_checkpoint(tmp_path / "ck")
    with pytest.raises(LmforgeError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmforgeError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "empty")
    with pytest.raises(LmforgeError, match="cannot resume"):
        load_train_state(tmp_path / "ck")


def test_train_state_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "state.pt")
    with pytest.raises(LmforgeError, match="could not be read safely"):
        load_train_state(tmp_path)
