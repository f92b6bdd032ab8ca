"""BERT pretraining through the shared trainer: MLM + NSP loss, metrics, resume, objective checks."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lmforge.checkpoint import load_checkpoint
from lmforge.data import TokenData
from lmforge.encoders import fill_mask
from lmforge.errors import LmforgeError
from lmforge.models import Bert, BertConfig, GPTConfig
from lmforge.train import DataConfig, TrainConfig, train
from lmforge.train.objectives import MaskedLM
from lmforge.train.trainer import resolve_objective
from tests.data.test_mlm import corpus, write_and_prepare


@pytest.fixture(scope="module")
def wp_data(tmp_path_factory):
    return write_and_prepare(tmp_path_factory.mktemp("bert-pretrain"), corpus() * 2).path


def tiny_bert(vocab_size: int, **kw) -> BertConfig:
    return BertConfig(**{**dict(n_layer=2, n_head=2, n_embd=32, max_position=64,
                                vocab_size=vocab_size, head="pretraining"), **kw})


def fast(**kw) -> TrainConfig:
    defaults = dict(batch_size=8, max_iters=12, eval_interval=4, eval_iters=2, log_interval=2,
                    warmup_iters=2, precision="fp32", lr=2e-3)
    return TrainConfig(**{**defaults, **kw})


def records(run_dir, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_pretraining_logs_mlm_and_nsp_metrics_and_saves_a_usable_model(tmp_path, wp_data):
    vocab = TokenData.open(wp_data).vocab_size
    result = train(tiny_bert(vocab), fast(), DataConfig(str(wp_data), max_length=32), tmp_path / "r",
                   progress=False)
    assert result.stop_reason == "max_iters" and result.iters == 12
    evals = records(tmp_path / "r", "eval")
    assert [r["iter"] for r in evals] == [0, 4, 8, 12]
    for r in evals:
        for key in ("val_loss", "val_mlm_loss", "val_mlm_acc", "val_mlm_ppl", "val_nsp_loss",
                    "val_nsp_acc", "train_mlm_acc", "train_nsp_acc"):
            assert key in r, key
        assert r["val_loss"] == pytest.approx(r["val_mlm_loss"] + r["val_nsp_loss"])
        assert 0 <= r["val_mlm_acc"] <= 1 and 0 <= r["val_nsp_acc"] <= 1
    assert evals[-1]["train_mlm_loss"] < evals[0]["train_mlm_loss"]
    assert all(r["tok_per_s"] > 0 for r in records(tmp_path / "r", "train"))
    assert (tmp_path / "r" / "loss.png").stat().st_size > 0
    ckpt = load_checkpoint(tmp_path / "r")
    assert isinstance(ckpt.model, Bert) and ckpt.model.config.head == "pretraining"
    assert ckpt.meta["train"]["objective"] == "auto"
    predictions = fill_mask(ckpt.model, ckpt.tokenizer, "the apple note [MASK] is about apple things.")
    assert len(predictions) == 1 and len(predictions[0]) == 5  # one list per [MASK]


def test_loss_is_weighted_sum_of_mlm_and_nsp(wp_data):
    data = TokenData.open(wp_data)
    torch.manual_seed(0)
    model = Bert(tiny_bert(data.vocab_size)).eval()
    objective = MaskedLM(data, 32, nsp=True, mlm_weight=2.0, nsp_weight=0.5)
    batch = objective.sampler("train", 4, seed=0).next_batch()
    out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    targets = batch["labels"] != -100
    mlm = F.cross_entropy(out.mlm_logits[targets], batch["labels"][targets])
    nsp = F.cross_entropy(out.nsp_logits, batch["next_sentence_label"])
    assert objective.loss(model, batch).item() == pytest.approx((2.0 * mlm + 0.5 * nsp).item(), rel=1e-5)
    mlm_only = MaskedLM(data, 32, nsp=False)
    assert mlm_only.nsp_weight == 0.0


def test_mlm_positions_score_only_the_masked_tokens(wp_data):
    torch.manual_seed(0)
    model = Bert(tiny_bert(TokenData.open(wp_data).vocab_size)).eval()
    ids = torch.randint(5, 60, (2, 10))
    positions = torch.rand(2, 10) < 0.3
    full = model(ids).mlm_logits
    torch.testing.assert_close(model(ids, mlm_positions=positions).mlm_logits, full[positions])


def test_resume_reproduces_the_uninterrupted_run(tmp_path, wp_data):
    vocab = TokenData.open(wp_data).vocab_size
    data = DataConfig(str(wp_data), max_length=32, whole_word_masking=True)
    train(tiny_bert(vocab), fast(max_iters=8), data, tmp_path / "straight", progress=False)
    train(tiny_bert(vocab), fast(max_iters=8, max_time=1e-9), data, tmp_path / "split",
          progress=False)  # stops after its first step
    train(None, fast(max_iters=8), data, tmp_path / "split", resume=True, progress=False)
    a, b = records(tmp_path / "straight", "train"), records(tmp_path / "split", "train")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    wa = load_checkpoint(tmp_path / "straight" / "last").model.state_dict()
    wb = load_checkpoint(tmp_path / "split" / "last").model.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_objective_must_match_the_model():
    bert = BertConfig(vocab_size=50, head="pretraining")
    assert resolve_objective("auto", bert) == "mlm_nsp"
    assert resolve_objective("auto", BertConfig(vocab_size=50, head="mlm")) == "mlm"
    assert resolve_objective("mlm", bert) == "mlm"
    assert resolve_objective("auto", GPTConfig(vocab_size=50)) == "clm"
    with pytest.raises(LmforgeError, match="objective='mlm' needs a BERT model"):
        resolve_objective("mlm", GPTConfig(vocab_size=50))
    with pytest.raises(LmforgeError, match="objective='clm' needs a GPT model"):
        resolve_objective("clm", bert)
    with pytest.raises(LmforgeError, match="needs model.head='pretraining', got 'mlm'"):
        resolve_objective("mlm_nsp", BertConfig(vocab_size=50, head="mlm"))
    with pytest.raises(LmforgeError, match="needs model.head='mlm', got 'classification'"):
        resolve_objective("mlm", BertConfig(vocab_size=50, head="classification"))


def test_bert_on_gpt_data_and_too_long_examples_are_refused(tmp_path, wp_data):
    (tmp_path / "t.txt").write_text("Plain text for a GPT. " * 200)
    from lmforge.data import PrepareConfig, prepare

    prepare(PrepareConfig(str(tmp_path / "t.txt"), tokenizer="char"), tmp_path / "gpt", progress=False)
    with pytest.raises(LmforgeError, match=r"\[CLS\].*prepare with --tokenizer wordpiece"):
        train(tiny_bert(64), fast(), DataConfig(str(tmp_path / "gpt"), max_length=32), tmp_path / "r1",
              progress=False)
    vocab = TokenData.open(wp_data).vocab_size
    with pytest.raises(LmforgeError, match="data.max_length=128 is longer than the model's max_position=64"):
        train(tiny_bert(vocab), fast(), DataConfig(str(wp_data)), tmp_path / "r2", progress=False)
