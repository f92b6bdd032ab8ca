"""The training loop: loss falls on real text, exact resume, NaN guard, early stopping."""

import json

import pytest
import torch

import lmforge.train.objectives as objectives_module
import lmforge.train.trainer as trainer_module
from lmforge.checkpoint import load_checkpoint, load_train_state
from lmforge.data import PrepareConfig, prepare
from lmforge.models import GPTConfig
from lmforge.train import DataConfig, TrainConfig, TrainingDiverged, train
from tests.conftest import SAMPLE_TEXT


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "corpus.txt").write_text(SAMPLE_TEXT * 3)
    prepare(PrepareConfig(source=str(root / "corpus.txt"), tokenizer="char"), root / "prepared", progress=False)
    return root / "prepared"


def tiny_config(vocab_size: int, **kw) -> GPTConfig:
    return GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=vocab_size), **kw})


def fast_train_config(**kw) -> TrainConfig:
    defaults = dict(batch_size=4, max_iters=20, eval_interval=5, eval_iters=2, log_interval=1,
                    warmup_iters=2, precision="fp32", lr=3e-3)
    return TrainConfig(**{**defaults, **kw})


def train_losses(run_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iter"]: r["loss"] for r in records if r["kind"] == "train"}


def vocab_of(data_dir) -> int:
    return json.loads((data_dir / "manifest.json").read_text())["vocab_size"]


@pytest.mark.slow
def test_loss_falls_on_builtin_corpus(tmp_path):
    prepare(PrepareConfig(source="builtin:pydocs", tokenizer="bpe", vocab_size=512), tmp_path / "d", progress=False)
    config = tiny_config(512, n_embd=64, block_size=64)
    result = train(config, fast_train_config(max_iters=150, eval_interval=50, eval_iters=4, batch_size=8),
                   DataConfig(str(tmp_path / "d")), tmp_path / "run", progress=False)
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in evals if r["kind"] == "eval"]
    assert result.stop_reason == "max_iters" and result.iters == 150
    assert val[0] > 6.0  # ~ln(512) at random init
    assert val[-1] < val[0] - 1.0, val  # from ln(512) to well below: it learned the text
    assert val == sorted(val, reverse=True)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "run" / "best" / "model.safetensors").exists()


def test_resume_reproduces_the_uninterrupted_run(tmp_path, small_data):
    vocab = vocab_of(small_data)
    model_config = tiny_config(vocab, dropout=0.1)  # dropout exercises the saved RNG state
    data = DataConfig(str(small_data))
    full = train(model_config, fast_train_config(max_iters=20, lr_decay_iters=20), data, tmp_path / "a", progress=False)
    train(model_config, fast_train_config(max_iters=12, lr_decay_iters=20), data, tmp_path / "b", progress=False)
    assert load_train_state(tmp_path / "b" / "last")["iter"] == 12
    resumed = train(None, fast_train_config(max_iters=20, lr_decay_iters=20), data, tmp_path / "b",
                    resume=True, progress=False)
    assert full.iters == resumed.iters == 20
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")  # exactly equal, every step
    a, b = load_checkpoint(tmp_path / "a" / "last").model, load_checkpoint(tmp_path / "b" / "last").model
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_resume_errors(tmp_path, small_data):
    data = DataConfig(str(small_data))
    with pytest.raises(Exception, match="cannot resume"):
        train(None, fast_train_config(), data, tmp_path / "none", resume=True, progress=False)
    train(tiny_config(vocab_of(small_data)), fast_train_config(max_iters=5), data, tmp_path / "r", progress=False)
    with pytest.raises(Exception, match="already holds a run"):
        train(tiny_config(vocab_of(small_data)), fast_train_config(), data, tmp_path / "r", progress=False)
    with pytest.raises(Exception, match="cannot change the model config"):
        train(tiny_config(vocab_of(small_data), n_layer=3), fast_train_config(max_iters=8), data, tmp_path / "r",
              resume=True, progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, small_data, monkeypatch):
    calls = {"n": 0}
    real_loss = objectives_module.causal_lm_loss

    def loss_that_explodes(model, x, y):
        loss = real_loss(model, x, y)
        if model.training:
            calls["n"] += 1
            if calls["n"] == 8:  # the 8th training step
                return loss * float("nan")
        return loss

    monkeypatch.setattr(objectives_module, "causal_lm_loss", loss_that_explodes)
    with pytest.raises(TrainingDiverged, match=r"iter 7: loss is nan.*last good checkpoint .* is intact"):
        train(tiny_config(vocab_of(small_data)), fast_train_config(), DataConfig(str(small_data)), tmp_path / "r",
              progress=False)
    assert load_train_state(tmp_path / "r" / "last")["iter"] == 5
    load_checkpoint(tmp_path / "r" / "last")  # still complete and loadable


def test_early_stopping_keeps_best(tmp_path, small_data, monkeypatch):
    val_losses = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])

    def fake_estimate(*args, **kwargs):
        v = next(val_losses)
        return {"train_loss": v, "val_loss": v, "val_ppl": 1.0}

    monkeypatch.setattr(trainer_module, "estimate_loss", fake_estimate)
    result = train(tiny_config(vocab_of(small_data)), fast_train_config(max_iters=100, patience=2),
                   DataConfig(str(small_data)), tmp_path / "r", progress=False)
    assert result.stop_reason == "early_stopping"
    assert result.iters == 15  # evals at 0, 5, 10, 15: no improvement at 10 and 15
    assert result.best_val_loss == 2.0
    assert json.loads((tmp_path / "r" / "best" / "config.json").read_text())["iter"] == 5


def test_grad_accumulation_matches_bigger_batch(tmp_path, small_data):
    """Two micro-batches of 4 step the same as one batch of 8 (same windows, no dropout)."""
    vocab = vocab_of(small_data)
    cfg = dict(max_iters=3, eval_interval=100, warmup_iters=0, lr_schedule="constant")
    train(tiny_config(vocab), fast_train_config(batch_size=8, **cfg), DataConfig(str(small_data)), tmp_path / "big",
          progress=False)
    train(tiny_config(vocab), fast_train_config(batch_size=4, grad_accum_steps=2, **cfg),
          DataConfig(str(small_data)), tmp_path / "acc", progress=False)
    big, acc = train_losses(tmp_path / "big"), train_losses(tmp_path / "acc")
    assert big.keys() == acc.keys()
    for it in big:
        assert big[it] == pytest.approx(acc[it], rel=1e-4, abs=1e-5)
