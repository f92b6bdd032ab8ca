"""Knowledge distillation: the loss against a hand computation, then GPT, BERT masked-LM and BERT
classification students distilled from tiny teachers through the shared training loops."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lmforge.checkpoint import load_checkpoint, save_checkpoint
from lmforge.compress.distill import (
    DistillConfig,
    distill,
    distillation_loss,
    every_other_layer,
    hidden_state_loss,
)
from lmforge.data import PrepareConfig, TokenData, prepare
from lmforge.data.tasks import IGNORE_INDEX
from lmforge.encoders import fill_mask
from lmforge.errors import LmforgeError
from lmforge.models import GPT, Bert, BertConfig, GPTConfig
from lmforge.predict import predict
from lmforge.tokenizer import train_tokenizer
from lmforge.train import DataConfig, TrainConfig, train
from lmforge.train.finetune import FinetuneConfig, finetune
from tests.conftest import SAMPLE_TEXT
from tests.data.test_mlm import corpus, write_and_prepare
from tests.train.test_finetune import _sentences, _tagged, write_conll, write_tsv


def fast_train(**kw) -> TrainConfig:
    defaults = dict(batch_size=4, max_iters=12, eval_interval=6, eval_iters=2, log_interval=1,
                    warmup_iters=2, precision="fp32", lr=3e-3, device="cpu")
    return TrainConfig(**{**defaults, **kw})


def evals(run_dir) -> list[dict]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r for r in records if r["kind"] == "eval"]


# --- the loss ----------------------------------------------------------------------------------
def hand_loss(s, t, y, alpha, T):
    """The formula written out with plain softmaxes, position by position."""
    kls, ces = [], []
    for i in range(len(y)):
        if y[i] == IGNORE_INDEX:
            continue
        p_t, p_s = torch.softmax(t[i] / T, -1), torch.softmax(s[i] / T, -1)
        kls.append(float((p_t * (p_t.log() - p_s.log())).sum()))
        ces.append(-float(torch.log_softmax(s[i], -1)[y[i]]))
    kl, ce = sum(kls) / len(kls), sum(ces) / len(ces)
    return alpha * T * T * kl + (1 - alpha) * ce, kl, ce


def test_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7) * 2, torch.randn(5, 7) * 2
    y = torch.tensor([3, IGNORE_INDEX, 0, 6, IGNORE_INDEX])
    for alpha, T in ((0.5, 2.0), (0.3, 1.0), (0.9, 4.0)):
        parts = distillation_loss(s, t, y, alpha=alpha, temperature=T)
        want, kl, ce = hand_loss(s, t, y, alpha, T)
        assert parts.count == 3
        assert parts.loss.item() == pytest.approx(want, rel=1e-5)
        assert parts.kl.item() == pytest.approx(kl, rel=1e-5)
        assert parts.ce.item() == pytest.approx(ce, rel=1e-5)


def test_loss_limits_and_temperature_scaling():
    torch.manual_seed(1)
    s, t = torch.randn(2, 6, 9), torch.randn(2, 6, 9)  # (B, T, V) as a GPT gives them
    y = torch.randint(0, 9, (2, 6))
    y[0, :2] = IGNORE_INDEX
    plain_ce = F.cross_entropy(s.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
    assert distillation_loss(s, t, y, alpha=0.0, temperature=3.0).loss.item() == pytest.approx(plain_ce.item())
    for T in (1.0, 2.0, 5.0):
        pure = distillation_loss(s, t, y, alpha=1.0, temperature=T)
        assert pure.loss.item() == pytest.approx(T * T * pure.kl.item(), rel=1e-6)  # the T^2 factor
        assert pure.kl.item() > 0
    same = distillation_loss(s, s.clone(), y, alpha=1.0, temperature=2.0)
    assert abs(same.kl.item()) < 1e-6 and abs(same.loss.item()) < 1e-5


def test_ignored_positions_carry_no_loss_and_no_gradient():
    torch.manual_seed(2)
    s, t = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5)
    y = torch.tensor([1, IGNORE_INDEX, 2, IGNORE_INDEX])
    parts = distillation_loss(s, t, y, alpha=0.5, temperature=2.0)
    parts.loss.backward()
    assert s.grad[1].abs().sum() == 0 and s.grad[3].abs().sum() == 0 and s.grad[0].abs().sum() > 0
    changed = t.clone()
    changed[1] += 10  # the teacher's view of an ignored position does not matter either
    again = distillation_loss(s, changed, y, alpha=0.5, temperature=2.0)
    assert again.loss.item() == pytest.approx(parts.loss.item())
    none = distillation_loss(s, t, torch.full((4,), IGNORE_INDEX), alpha=0.5, temperature=2.0)
    assert none.count == 0 and none.loss.item() == 0.0


def test_hidden_state_loss():
    torch.manual_seed(3)
    h = torch.randn(2, 4, 8)
    assert hidden_state_loss(h, h.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert hidden_state_loss(h, 3 * h).item() == pytest.approx(0.0, abs=1e-6)  # cosine ignores scale
    assert hidden_state_loss(h, -h).item() == pytest.approx(2.0)
    other = torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    want = (1 - F.cosine_similarity(h[mask.bool()], other[mask.bool()], dim=-1)).mean()
    assert hidden_state_loss(h, other, mask).item() == pytest.approx(want.item())
    assert hidden_state_loss(h, other, kind="mse").item() == pytest.approx(F.mse_loss(h, other).item())
    with pytest.raises(LmforgeError, match="equal widths"):
        hidden_state_loss(h, torch.randn(2, 4, 16))


@pytest.mark.parametrize("bad, match", [
    (dict(alpha=-0.1), "alpha must be in"), (dict(alpha=1.5), "alpha must be in"),
    (dict(temperature=0.0), "temperature must be"), (dict(temperature=-2.0), "temperature must be"),
    (dict(hidden_weight=-1.0), "hidden_weight"), (dict(hidden_loss="l1"), "hidden_loss"),
])
def test_config_is_validated(bad, match):
    with pytest.raises(LmforgeError, match=match):
        DistillConfig(**bad)


# --- GPT ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    """A char data folder and a 4-layer GPT teacher trained on it for a few dozen steps."""
    root = tmp_path_factory.mktemp("distill-gpt")
    (root / "corpus.txt").write_text(SAMPLE_TEXT * 3)
    prepare(PrepareConfig(source=str(root / "corpus.txt"), tokenizer="char"), root / "data", progress=False)
    vocab = TokenData.open(root / "data").vocab_size
    config = GPTConfig(n_layer=4, n_head=2, n_embd=32, block_size=32, vocab_size=vocab)
    train(config, fast_train(max_iters=60, eval_interval=60), DataConfig(str(root / "data")),
          root / "teacher", progress=False)
    return root


def test_gpt_student_moves_towards_the_teacher(gpt, tmp_path):
    result = distill(gpt / "teacher", "gpt-tiny", tmp_path / "run", data=gpt / "data",
                     config=DistillConfig(alpha=0.9), train_config=fast_train(max_iters=24, eval_interval=12),
                     progress=False)
    assert result.task == "clm" and result.training.iters == 24
    records = evals(tmp_path / "run")
    assert [r["iter"] for r in records] == [0, 12, 24]
    for r in records:
        assert r["val_loss"] == pytest.approx(0.9 * 4 * r["val_kl"] + 0.1 * r["val_ce"], rel=1e-4)
    assert records[-1]["val_kl"] < 0.5 * records[0]["val_kl"], records  # it learned the teacher
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    assert set(result.teacher_scores) == {"train_ce", "train_acc", "val_ce", "val_acc", "val_ppl"}
    assert result.student_scores["val_kl"] == pytest.approx(records[-1]["val_kl"], rel=1e-4)

    ckpt = load_checkpoint(tmp_path / "run")  # an ordinary GPT checkpoint
    teacher = load_checkpoint(gpt / "teacher").model
    assert isinstance(ckpt.model, GPT) and ckpt.model.config.n_embd == 128  # the gpt-tiny preset
    assert ckpt.model.config.block_size == teacher.config.block_size
    assert ckpt.model.config.vocab_size == teacher.config.vocab_size
    assert result.student_params == sum(p.numel() for p in ckpt.model.parameters())
    [out] = ckpt.generate("The quick", max_new_tokens=8, do_sample=False)
    assert len(out.token_ids) == 8
    meta = ckpt.meta["distill"]
    assert meta["teacher"] == str((gpt / "teacher").resolve()) and meta["student"] == "gpt-tiny"
    assert (meta["alpha"], meta["temperature"], meta["task"]) == (0.9, 2.0, "clm")


def test_a_checkpoint_student_that_is_the_teacher_starts_at_zero_kl(gpt, tmp_path):
    distill(gpt / "teacher", gpt / "teacher", tmp_path / "self", data=gpt / "data",
            train_config=fast_train(max_iters=2, eval_interval=2), progress=False)
    first = evals(tmp_path / "self")[0]
    assert abs(first["val_kl"]) < 1e-6 and first["val_loss"] == pytest.approx(0.5 * first["val_ce"], rel=1e-5)


def test_init_from_teacher_copies_every_other_layer():
    torch.manual_seed(0)
    teacher = GPT(GPTConfig(n_layer=5, n_head=2, n_embd=16, block_size=8, vocab_size=20))
    student = every_other_layer(teacher)
    assert student.config.n_layer == 3 and student.config.n_embd == 16
    t, s = teacher.state_dict(), student.state_dict()
    for name, tensor in s.items():
        source = name
        if name.startswith("transformer.h."):
            index = int(name.split(".")[2])
            source = name.replace(f"transformer.h.{index}.", f"transformer.h.{2 * index}.", 1)
        assert torch.equal(tensor, t[source]), name
    assert student.lm_head.weight is student.transformer.wte.weight  # still tied
    with pytest.raises(LmforgeError, match="1 layer"):
        every_other_layer(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20)))


def test_bert_init_from_teacher_drops_nsp_for_masked_lm():
    torch.manual_seed(0)
    teacher = Bert(BertConfig(n_layer=4, n_head=2, n_embd=16, max_position=16, vocab_size=30,
                              head="pretraining"))
    student = every_other_layer(teacher, head="mlm")
    assert student.config.n_layer == 2 and student.nsp is None and student.pooler is None
    t = teacher.state_dict()
    for name, tensor in student.state_dict().items():
        source = name
        if name.startswith("h."):
            index = int(name.split(".")[1])
            source = name.replace(f"h.{index}.", f"h.{2 * index}.", 1)
        assert torch.equal(tensor, t[source]), name


def test_resume_reproduces_the_uninterrupted_run(gpt, tmp_path):
    config = DistillConfig(init_from_teacher=True, hidden_weight=0.5)
    kw = dict(data=gpt / "data", progress=False)
    distill(gpt / "teacher", None, tmp_path / "a", config=config,
            train_config=fast_train(max_iters=10, lr_decay_iters=10, eval_interval=5), **kw)
    distill(gpt / "teacher", None, tmp_path / "b", config=config,
            train_config=fast_train(max_iters=5, lr_decay_iters=10, eval_interval=5), **kw)
    resumed = distill(None, None, tmp_path / "b", resume=True,
                      train_config=fast_train(max_iters=10, lr_decay_iters=10, eval_interval=5), **kw)
    assert resumed.training.iters == 10
    assert evals(tmp_path / "a") == evals(tmp_path / "b")  # exactly, hidden-state term included
    assert "val_hidden" in evals(tmp_path / "a")[-1]
    a, b = load_checkpoint(tmp_path / "a" / "last").model, load_checkpoint(tmp_path / "b" / "last").model
    assert a.config.n_layer == 2
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_user_errors(gpt, tmp_path):
    kw = dict(data=gpt / "data", train_config=fast_train(max_iters=2), progress=False)
    (tmp_path / "other.txt").write_text("completely different characters: 0123456789 XYZ\n" * 50)
    prepare(PrepareConfig(source=str(tmp_path / "other.txt"), tokenizer="char"), tmp_path / "other",
            progress=False)
    with pytest.raises(LmforgeError, match="different vocabulary"):
        distill(gpt / "teacher", "gpt-tiny", tmp_path / "r", **{**kw, "data": tmp_path / "other"})
    stranger = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=40))
    save_checkpoint(tmp_path / "stranger", stranger, train_tokenizer("char", ["0123456789 XYZ"]))
    with pytest.raises(LmforgeError, match="different vocabulary"):
        distill(gpt / "teacher", tmp_path / "stranger", tmp_path / "r", **kw)
    teacher = load_checkpoint(gpt / "teacher")
    for name, vocab, context, match in (("wider", 40, 32, "vocab_size 40, the teacher"),
                                        ("longer", teacher.model.config.vocab_size, 64, "context")):
        model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=context, vocab_size=vocab))
        save_checkpoint(tmp_path / name, model, teacher.tokenizer)
        with pytest.raises(LmforgeError, match=match):
            distill(gpt / "teacher", tmp_path / name, tmp_path / "r", **kw)
    with pytest.raises(LmforgeError, match="student preset must be one of"):
        distill(gpt / "teacher", "bert-mini", tmp_path / "r", **kw)
    with pytest.raises(LmforgeError, match="neither a preset"):
        distill(gpt / "teacher", tmp_path / "nowhere", tmp_path / "r", **kw)
    with pytest.raises(LmforgeError, match="give a student"):
        distill(gpt / "teacher", None, tmp_path / "r", **kw)
    with pytest.raises(LmforgeError, match="not both"):
        distill(gpt / "teacher", "gpt-tiny", tmp_path / "r", config=DistillConfig(init_from_teacher=True), **kw)
    with pytest.raises(LmforgeError, match="as wide as the teacher"):
        distill(gpt / "teacher", "gpt-tiny", tmp_path / "r", config=DistillConfig(hidden_weight=1.0), **kw)
    with pytest.raises(LmforgeError, match="not on --data|--train/--dev files are for"):
        distill(gpt / "teacher", "gpt-tiny", tmp_path / "r", train_file=tmp_path / "t.tsv", **kw)
    with pytest.raises(LmforgeError, match="cannot resume"):
        distill(None, None, tmp_path / "nothing", resume=True)
    assert not (tmp_path / "r").exists()


# --- BERT: masked LM ---------------------------------------------------------------------------
def test_bert_masked_lm_distillation(tmp_path):
    data = write_and_prepare(tmp_path, corpus() * 2).path
    vocab = TokenData.open(data).vocab_size
    torch.manual_seed(0)
    teacher = Bert(BertConfig(n_layer=2, n_head=2, n_embd=32, max_position=64, vocab_size=vocab,
                              head="pretraining"))
    save_checkpoint(tmp_path / "teacher", teacher, TokenData.open(data).tokenizer)
    result = distill(tmp_path / "teacher", None, tmp_path / "run", data=DataConfig(str(data), max_length=32),
                     config=DistillConfig(init_from_teacher=True, hidden_weight=1.0),
                     train_config=fast_train(batch_size=8, max_iters=6, eval_interval=3), progress=False)
    assert result.task == "mlm" and result.student_params < result.teacher_params
    records = evals(tmp_path / "run")
    assert {"val_kl", "val_ce", "val_acc", "val_hidden", "val_ppl"} <= set(records[0])
    # a copy of half the teacher starts with the teacher's embeddings: its hidden states are close
    assert records[0]["val_hidden"] < 1.0
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.model.config.head == "mlm" and ckpt.model.config.n_layer == 1 and ckpt.model.nsp is None
    assert ckpt.meta["train"]["objective"] == "mlm"
    [masks] = fill_mask(ckpt.model, ckpt.tokenizer, "the apple note [MASK] is about apple things.")
    assert len(masks) == 5
    with pytest.raises(LmforgeError, match="longer than the teacher's max_position"):
        distill(tmp_path / "teacher", "bert-mini", tmp_path / "r2", data=DataConfig(str(data), max_length=128),
                train_config=fast_train(max_iters=1), progress=False)


# --- BERT: classification ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A 2-layer BERT fine-tuned to tell "good" from "bad" sentences, and its files."""
    root = tmp_path_factory.mktemp("distill-cls")
    texts = [t for _, t in _sentences(50, 0)] + ["good bad"]
    tokenizer = train_tokenizer("wordpiece", texts, vocab_size=120)
    torch.manual_seed(0)
    base = Bert(BertConfig(n_layer=2, n_head=2, n_embd=32, max_position=64,
                           vocab_size=tokenizer.vocab_size, head="mlm"))
    save_checkpoint(root / "base", base, tokenizer)
    train_tsv, dev_tsv = write_tsv(root / "train.tsv", _sentences(64, 1)), write_tsv(root / "dev.tsv", _sentences(16, 2))
    config = FinetuneConfig(epochs=6, batch_size=8, lr=2e-3, precision="fp32", device="cpu")
    finetune(root / "base", train_tsv, dev_tsv, root / "teacher", config, progress=False)
    return root


def fast_finetune(**kw) -> FinetuneConfig:
    return FinetuneConfig(**{**dict(epochs=3, batch_size=8, lr=2e-3, precision="fp32", device="cpu"), **kw})


def test_classifier_distillation_keeps_the_labels(classifier, tmp_path):
    root = classifier
    result = distill(root / "teacher", None, tmp_path / "run", train_file=root / "train.tsv",
                     dev_file=root / "dev.tsv", config=DistillConfig(init_from_teacher=True),
                     finetune_config=fast_finetune(), progress=False)
    assert result.task == "classification" and result.teacher_scores["accuracy"] == 1.0
    assert result.student_scores["accuracy"] >= 0.75, result.student_scores
    assert result.student_params < result.teacher_params
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.model.config.labels == ["neg", "pos"] and ckpt.model.config.n_layer == 1
    assert ckpt.meta["distill"]["task"] == "classification" and ckpt.meta["dev"] == result.student_scores
    preds = predict(ckpt.model, ckpt.tokenizer, ["we saw a good movie", "a bad film really"])
    assert {p["label"] for p in preds} <= {"neg", "pos"} and set(preds[0]["scores"]) == {"neg", "pos"}


def test_classifier_distillation_from_a_preset_and_resume(classifier, tmp_path):
    root = classifier
    kw = dict(train_file=root / "train.tsv", dev_file=root / "dev.tsv", progress=False)
    result = distill(root / "teacher", "bert-mini", tmp_path / "run", finetune_config=fast_finetune(epochs=1),
                     config=DistillConfig(alpha=1.0, temperature=4.0), **kw)
    assert result.training.epochs == 1
    model = load_checkpoint(tmp_path / "run").model
    assert model.config.n_embd == 256 and model.config.labels == ["neg", "pos"]
    assert model.config.max_position == 64  # the teacher's positions, not the preset's
    # resuming a finished run: the teacher comes from the run's config.json
    resumed = distill(None, None, tmp_path / "run", resume=True, **kw)
    assert resumed.training.epochs == 1 and resumed.teacher_scores == result.teacher_scores
    with pytest.raises(LmforgeError, match="own fine-tuning settings"):
        distill(None, None, tmp_path / "run", resume=True, finetune_config=fast_finetune(), **kw)
    # a checkpoint student without a classifier (the teacher's MLM base) gets the teacher's head
    from_base = distill(root / "teacher", root / "base", tmp_path / "base-run",
                        finetune_config=fast_finetune(epochs=1), **kw)
    model = load_checkpoint(tmp_path / "base-run").model
    assert model.config.head == "classification" and model.config.labels == ["neg", "pos"]
    assert from_base.student_params == from_base.teacher_params  # same shape, other weights
    with pytest.raises(LmforgeError, match="not on --data"):
        distill(root / "teacher", "bert-mini", tmp_path / "x", data=root, progress=False)
    (tmp_path / "odd.tsv").write_text("label\tsentence\nmeh\tthe movie\nneg\tbad film\n")
    with pytest.raises(LmforgeError, match="the model does not know"):
        distill(root / "teacher", "bert-mini", tmp_path / "y", train_file=tmp_path / "odd.tsv",
                dev_file=tmp_path / "odd.tsv", finetune_config=fast_finetune(epochs=1), progress=False)


def test_token_classifier_distillation(tmp_path):
    tokenizer = train_tokenizer("wordpiece", [" ".join(w for w, _ in s) for s in _tagged(50, 0)], vocab_size=120)
    torch.manual_seed(0)
    base = Bert(BertConfig(n_layer=2, n_head=2, n_embd=32, max_position=64,
                           vocab_size=tokenizer.vocab_size, head="mlm"))
    save_checkpoint(tmp_path / "base", base, tokenizer)
    train_file = write_conll(tmp_path / "train.conll", _tagged(32, 1))
    dev_file = write_conll(tmp_path / "dev.conll", _tagged(8, 2))
    finetune(tmp_path / "base", train_file, dev_file, tmp_path / "teacher",
             fast_finetune(task="token-classification", epochs=2), progress=False)
    result = distill(tmp_path / "teacher", None, tmp_path / "run", train_file=train_file, dev_file=dev_file,
                     config=DistillConfig(init_from_teacher=True), finetune_config=fast_finetune(epochs=1),
                     progress=False)
    assert result.task == "token-classification"
    assert {"f1", "accuracy"} <= set(result.teacher_scores) and {"f1", "accuracy"} <= set(result.student_scores)
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.model.config.head == "token-classification" and ckpt.model.config.labels == ["B-LOC", "B-PER", "O"]
    [pred] = predict(ckpt.model, ckpt.tokenizer, ["yesterday alice went to rome"])
    assert len(pred["tags"]) == 5 and set(pred["tags"]) <= {"B-LOC", "B-PER", "O"}
