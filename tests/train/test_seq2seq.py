"""Encoder-decoder training through the shared trainer: seq2seq on pairs, T5 span corruption,
exact resume, fine-tuning from a checkpoint, objective/data mismatches."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lmforge.checkpoint import load_checkpoint, save_checkpoint
from lmforge.data import PrepareConfig, open_data, prepare
from lmforge.data.parallel import BucketBatches
from lmforge.errors import LmforgeError
from lmforge.generate import GenerationConfig, translate
from lmforge.models import ENCDEC_PRESETS, GPT, EncoderDecoder, EncoderDecoderConfig, GPTConfig
from lmforge.train import DataConfig, TrainConfig, train
from lmforge.train.objectives import Seq2SeqLM
from lmforge.train.seq2seq import finetune_seq2seq
from lmforge.train.trainer import resolve_objective
from tests.data.test_parallel import prepare_toy, toy_pairs, write_aligned


@pytest.fixture(scope="module")
def pairs_data(tmp_path_factory):
    return prepare_toy(tmp_path_factory.mktemp("pairs"), n=600).path


def tiny(data, preset="transformer-tiny", **kw) -> EncoderDecoderConfig:
    tok = data.tokenizer
    return EncoderDecoderConfig(**{
        **ENCDEC_PRESETS[preset], "n_layer": 2, "n_head": 2, "n_embd": 32, "mlp_hidden": 64,
        "max_position": 64, "dropout": 0.0, "vocab_size": data.vocab_size, "pad_token_id": tok.pad_id,
        "decoder_start_token_id": tok.pad_id, "eos_token_id": tok.eos_id, **kw,
    })


def fast(**kw) -> TrainConfig:
    defaults = dict(batch_size=16, max_iters=12, eval_interval=4, eval_iters=2, log_interval=2,
                    warmup_iters=2, precision="fp32", lr=3e-3)
    return TrainConfig(**{**defaults, **kw})


def evals(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "eval"]


def test_seq2seq_training_learns_and_the_checkpoint_translates(tmp_path, pairs_data):
    data = open_data(pairs_data)
    result = train(tiny(data), fast(max_iters=150, eval_interval=50, label_smoothing=0.1),
                   DataConfig(str(pairs_data)), tmp_path / "r", progress=False)
    assert result.stop_reason == "max_iters"
    records = evals(tmp_path / "r")
    assert records[-1]["val_loss"] < 0.5 * records[0]["val_loss"]
    assert records[-1]["val_acc"] > 0.6 and "val_ppl" in records[-1]
    ckpt = load_checkpoint(tmp_path / "r")
    assert isinstance(ckpt.model, EncoderDecoder) and ckpt.meta["model_type"] == "encoder-decoder"
    [out] = translate(ckpt.model, ckpt.tokenizer, "ein hund", GenerationConfig(do_sample=False, max_new_tokens=10))
    assert out.finish_reason == "eos" and out.text  # a learned end, some words


def test_eval_loss_is_the_unsmoothed_nll_per_target_token(pairs_data):
    data = open_data(pairs_data)
    torch.manual_seed(0)
    model = EncoderDecoder(tiny(data)).eval()
    c = model.config
    sampler = BucketBatches(data, "val", 4, 0, c.pad_token_id, c.decoder_start_token_id)
    objective = Seq2SeqLM("seq2seq", None, label_smoothing=0.2)
    batch = sampler.next_batch()
    logits = model(batch["input_ids"], batch["attention_mask"], decoder_input_ids=batch["decoder_input_ids"])
    real = batch["labels"] != -100
    nll = F.cross_entropy(logits[real], batch["labels"][real])
    stats = objective.stats(model, batch)
    assert stats["tokens"] == int(real.sum())
    assert stats["loss_sum"] / stats["tokens"] == pytest.approx(nll.item(), rel=1e-5)
    smoothed = F.cross_entropy(logits[real], batch["labels"][real], label_smoothing=0.2)
    assert objective.loss(model, batch).item() == pytest.approx(smoothed.item(), rel=1e-5)


@pytest.mark.parametrize("preset", ["transformer-tiny", "t5-tiny"])
def test_stopped_and_resumed_run_reproduces_the_uninterrupted_losses(tmp_path, pairs_data, preset):
    data = open_data(pairs_data)
    config = tiny(data, preset, dropout=0.1)
    train(config, fast(max_iters=12), DataConfig(str(pairs_data)), tmp_path / "full", progress=False)
    train(config, fast(max_iters=12, max_time=1e-9), DataConfig(str(pairs_data)), tmp_path / "part",
          progress=False)  # stops after its first step
    result = train(None, fast(max_iters=12), DataConfig(str(pairs_data)), tmp_path / "part", resume=True,
                   progress=False)
    assert result.iters == 12

    def train_losses(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return {r["iter"]: r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"}

    full, part = train_losses("full"), train_losses("part")
    assert set(full) == set(part) and all(full[i] == pytest.approx(part[i], abs=1e-6) for i in full)


def test_t5_span_corruption_pretraining(tmp_path):
    text = "Encoders read the whole input. Decoders write the output one token at a time. " * 200
    (tmp_path / "c.txt").write_text(text)
    prepare(PrepareConfig(source=str(tmp_path / "c.txt"), vocab_size=400, sentinels=30), tmp_path / "d",
            progress=False)
    data = open_data(tmp_path / "d")
    result = train(tiny(data, "t5-tiny"), fast(max_iters=40, eval_interval=20, lr=5e-3),
                   DataConfig(str(tmp_path / "d"), max_length=48), tmp_path / "r", progress=False)
    records = evals(tmp_path / "r")
    assert result.iters == 40 and records[-1]["val_loss"] < records[0]["val_loss"] - 1.0
    with pytest.raises(LmforgeError, match="sentinel"):  # a plain GPT corpus has no sentinels
        (tmp_path / "g.txt").write_text(text)
        prepare(PrepareConfig(source=str(tmp_path / "g.txt"), vocab_size=300), tmp_path / "g", progress=False)
        train(tiny(data, "t5-tiny"), fast(), DataConfig(str(tmp_path / "g")), tmp_path / "r2", progress=False)


def test_objective_and_data_must_match(pairs_data):
    data = open_data(pairs_data)
    encdec = tiny(data)
    assert resolve_objective("auto", encdec, parallel=True) == "seq2seq"
    assert resolve_objective("auto", encdec, parallel=False) == "span_corruption"
    with pytest.raises(LmforgeError, match="needs parallel data"):
        resolve_objective("seq2seq", encdec, parallel=False)
    with pytest.raises(LmforgeError, match="an encoder-decoder trains with seq2seq"):
        resolve_objective("clm", encdec, parallel=True)
    with pytest.raises(LmforgeError, match="sentence pairs, which train an encoder-decoder"):
        resolve_objective("auto", GPTConfig(vocab_size=300), parallel=True)
    with pytest.raises(LmforgeError, match="needs an encoder-decoder"):
        resolve_objective("span_corruption", GPTConfig(vocab_size=300))


def test_finetune_seq2seq_starts_from_the_base_weights_and_resumes(tmp_path, pairs_data):
    data = open_data(pairs_data)
    base = train(tiny(data), fast(max_iters=60, eval_interval=60), DataConfig(str(pairs_data)),
                 tmp_path / "base", progress=False)
    src, tgt = write_aligned(tmp_path, toy_pairs(64, seed=5))
    dsrc, dtgt = write_aligned(tmp_path, toy_pairs(16, seed=6), name="dev")
    result = finetune_seq2seq(base.run_dir, str(src), str(dsrc), tmp_path / "ft", train_target=str(tgt),
                              dev_target=str(dtgt), epochs=2, batch_size=16, lr=1e-3, precision="fp32",
                              progress=False)
    assert result.iters == 8  # 2 epochs of 4 batches
    records = evals(tmp_path / "ft")
    assert [r["iter"] for r in records] == [0, 4, 8]
    # the first evaluation scores the base model: far better than an untrained one
    assert records[0]["val_loss"] < 0.6 * evals(tmp_path / "base")[0]["val_loss"]
    ft = load_checkpoint(tmp_path / "ft" / "last")
    assert ft.tokenizer.backend.get_vocab() == data.tokenizer.backend.get_vocab()  # the base's
    again = finetune_seq2seq(None, None, None, tmp_path / "ft", resume=True, progress=False)
    assert again.iters == 8 and again.stop_reason == "max_iters"
    gpt = GPT(GPTConfig(vocab_size=data.vocab_size, n_layer=1, n_head=1, n_embd=8, block_size=8))
    save_checkpoint(tmp_path / "gpt", gpt, data.tokenizer)
    with pytest.raises(LmforgeError, match="needs an encoder-decoder base"):
        finetune_seq2seq(tmp_path / "gpt", str(src), str(dsrc), tmp_path / "ft2", train_target=str(tgt),
                         dev_target=str(dtgt), progress=False)


def test_separate_source_and_target_tokenizers(tmp_path):
    src, tgt = write_aligned(tmp_path, toy_pairs(300))
    prepare(PrepareConfig(source=str(src), target=str(tgt), vocab_size=280, separate_tokenizers=True),
            tmp_path / "d", progress=False)
    data = open_data(tmp_path / "d")
    source_tok, target_tok = data.source_tokenizer, data.tokenizer
    assert source_tok is not None and source_tok.backend.get_vocab() != target_tok.backend.get_vocab()
    assert "läuft" in source_tok.decode(source_tok.encode("läuft"))
    s, t = data.pair("train", 0)
    first = toy_pairs(300)[0]
    assert source_tok.decode(s[:-1].tolist()) == first[0] and target_tok.decode(t[:-1].tolist()) == first[1]
    with pytest.raises(LmforgeError, match="share_embeddings=false"):
        train(tiny(data), fast(max_iters=2), DataConfig(str(tmp_path / "d")), tmp_path / "bad", progress=False)
    train(tiny(data, share_embeddings=False), fast(max_iters=60, eval_interval=60), DataConfig(str(tmp_path / "d")),
          tmp_path / "r", progress=False)
    ckpt = load_checkpoint(tmp_path / "r")
    assert ckpt.source_tokenizer.backend.get_vocab() == source_tok.backend.get_vocab()
    [out] = translate(ckpt.model, ckpt.tokenizer, "ein hund", GenerationConfig(do_sample=False, max_new_tokens=8),
                      source_tokenizer=ckpt.source_tokenizer)
    assert out.prompt_ids == source_tok.encode("ein hund") + [source_tok.eos_id]
