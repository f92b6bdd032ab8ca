"""Fine-tuning a tiny BERT on trivially learnable data: the dev score must reach the top."""

import json
import random

import pytest
import torch

from lmforge.checkpoint import load_checkpoint, save_checkpoint
from lmforge.errors import LmforgeError
from lmforge.models.bert import Bert, BertConfig
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.predict import predict
from lmforge.tokenizer import train_tokenizer
from lmforge.train.finetune import FinetuneConfig, finetune, model_for_task

FILLER = "the a movie was film it really quite story plot today we saw went to with and".split()
NAMES, PLACES = ["alice", "bob", "carol", "dave"], ["paris", "london", "rome", "berlin"]


def _sentences(n: int, seed: int) -> list[tuple[str, str]]:
    """(label, text): "pos" exactly when the text says "good", else it says "bad"."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        words = rng.sample(FILLER, 5)
        words.insert(rng.randrange(6), "good" if label == "pos" else "bad")
        out.append((label, " ".join(words)))
    return out


def _tagged(n: int, seed: int) -> list[list[tuple[str, str]]]:
    """Sentences with a PER name and a LOC place among filler words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [(w, "O") for w in rng.sample(FILLER, 4)]
        words.insert(rng.randrange(5), (rng.choice(NAMES), "B-PER"))
        words.insert(rng.randrange(6), (rng.choice(PLACES), "B-LOC"))
        out.append(words)
    return out


def write_tsv(path, rows):
    path.write_text("label\tsentence\n" + "".join(f"{label}\t{text}\n" for label, text in rows))
    return path


def write_conll(path, sentences):
    path.write_text("\n".join("".join(f"{w} {t}\n" for w, t in s) for s in sentences))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    texts = [t for _, t in _sentences(50, 0)] + [" ".join(NAMES + PLACES + ["good", "bad"])]
    tokenizer = train_tokenizer("wordpiece", texts, vocab_size=120)
    torch.manual_seed(0)
    # an MLM base: it has no pooler, so classification must create one
    base = Bert(
        BertConfig(
            n_layer=2,
            n_head=2,
            n_embd=32,
            max_position=64,
            vocab_size=tokenizer.vocab_size,
            head="mlm",
        )
    )
    save_checkpoint(root / "base", base, tokenizer)
    return {
        "root": root,
        "base": root / "base",
        "tokenizer": tokenizer,
        "train_tsv": write_tsv(root / "train.tsv", _sentences(64, 1)),
        "dev_tsv": write_tsv(root / "dev.tsv", _sentences(16, 2)),
        "train_conll": write_conll(root / "train.conll", _tagged(64, 3)),
        "dev_conll": write_conll(root / "dev.conll", _tagged(16, 4)),
    }


def fast(**overrides) -> FinetuneConfig:
    config = dict(epochs=6, batch_size=8, lr=2e-3, warmup_ratio=0.1, precision="fp32", device="cpu")
    return FinetuneConfig(**{**config, **overrides})


@pytest.fixture(scope="module")
def classified(files):
    out = files["root"] / "cls"
    result = finetune(
        files["base"], files["train_tsv"], files["dev_tsv"], out, fast(), progress=False
    )
    return out, result


def test_classification_learns_the_keyword(classified):
    out, result = classified
    assert result.metric == "accuracy" and result.labels == ["neg", "pos"]
    assert result.best_score == 1.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, 7))
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert {"dev_accuracy", "dev_macro_f1", "lr"} <= set(records[0])


def test_best_and_last_reload_with_labels(classified, files):
    out, result = classified
    for name in ("best", "last"):
        ckpt = load_checkpoint(out / name)
        assert ckpt.model.config.head == "classification"
        assert ckpt.model.config.labels == ["neg", "pos"] and ckpt.model.pooler is not None
        assert ckpt.meta["task"] == "classification" and ckpt.meta["finetune"]["epochs"] == 6
        assert "accuracy" in ckpt.meta["dev"] and ckpt.meta["epoch"] >= 1
    best = load_checkpoint(out / "best")
    assert best.meta["epoch"] == result.best_epoch
    preds = predict(best.model, best.tokenizer, ["we saw a good movie", "a bad film really"])
    assert [p["label"] for p in preds] == ["pos", "neg"]
    assert set(preds[0]["scores"]) == {"neg", "pos"}
    assert abs(sum(preds[0]["scores"].values()) - 1) < 1e-5
    assert preds[0]["score"] == max(preds[0]["scores"].values())


def test_model_for_task_copies_the_encoder_and_makes_a_fresh_head(files):
    base = load_checkpoint(files["base"]).model
    model, fresh = model_for_task(base, "classification", ["neg", "pos"])
    assert fresh == ["classifier", "pooler"]  # the MLM base has no pooler
    ours = model.state_dict()
    for name, tensor in base.state_dict().items():
        if name.startswith(("embeddings.", "h.")):
            assert torch.equal(ours[name], tensor), name
    assert model.config.labels == ["neg", "pos"] and model.config.n_embd == base.config.n_embd
    _, fresh = model_for_task(base, "token-classification", ["B-X", "O"])
    assert fresh == ["classifier"]


def test_model_for_task_keeps_a_classifier_head_for_the_same_labels(files):
    base = load_checkpoint(files["base"]).model
    classifier, _ = model_for_task(base, "classification", ["neg", "pos"])
    torch.nn.init.normal_(classifier.classifier.weight)  # a head no fresh init would reproduce
    again, fresh = model_for_task(classifier, "classification", ["neg", "pos"])
    assert fresh == []
    for name, tensor in classifier.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    # other labels: the head cannot carry over
    _, fresh = model_for_task(classifier, "classification", ["a", "b", "c"])
    assert fresh == ["classifier"]


def test_token_classification_finds_entities(files):
    out = files["root"] / "ner"
    result = finetune(
        files["base"],
        files["train_conll"],
        files["dev_conll"],
        out,
        fast(task="token-classification", epochs=8),
        progress=False,
    )
    assert result.metric == "f1" and result.labels == ["B-LOC", "B-PER", "O"]
    assert result.best_score > 0.5
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"dev_precision", "dev_recall", "dev_f1", "dev_accuracy"} <= set(record)
    ckpt = load_checkpoint(out)
    assert ckpt.model.config.head == "token-classification"
    assert ckpt.model.config.labels == ["B-LOC", "B-PER", "O"] and ckpt.model.pooler is None
    [pred] = predict(ckpt.model, ckpt.tokenizer, ["yesterday alice went to rome"])
    assert len(pred["tags"]) == 5
    assert {(e["entity"], e["text"]) for e in pred["entities"]} == {
        ("PER", "alice"),
        ("LOC", "rome"),
    }
    per = next(e for e in pred["entities"] if e["entity"] == "PER")
    assert per["start_word"] == per["end_word"] == 1 and 0 < per["score"] <= 1


def test_early_stopping(files):
    # a tiny lr learns nothing, so dev accuracy stops improving and patience ends the run
    result = finetune(
        files["base"],
        files["train_tsv"],
        files["dev_tsv"],
        files["root"] / "patience",
        fast(lr=1e-9, epochs=10, patience=1),
        progress=False,
    )
    assert result.stop_reason == "early_stopping" and result.epochs < 10


def test_from_hf_bert_model_folder(files):
    transformers = pytest.importorskip("transformers")
    hf_dir = files["root"] / "hf"
    hf = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=files["tokenizer"].vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    )
    hf.save_pretrained(hf_dir)
    files["tokenizer"].save(hf_dir)
    result = finetune(
        hf_dir,
        files["train_tsv"],
        files["dev_tsv"],
        files["root"] / "from_hf",
        fast(epochs=6),
        progress=False,
    )
    assert result.best_score == 1.0
    # the pooler came from the HF file: fine-tuned weights differ from it, the shapes match
    ckpt = load_checkpoint(files["root"] / "from_hf" / "best")
    assert ckpt.model.pooler.weight.shape == hf.pooler.dense.weight.shape


def test_nan_loss_stops_and_names_the_step(files, monkeypatch):
    import lmforge.train.finetune as ft

    monkeypatch.setattr(
        ft, "task_loss", lambda model, batch: torch.tensor(float("nan"), requires_grad=True)
    )
    out = files["root"] / "nan"
    with pytest.raises(
        LmforgeError, match=r"step 0 \(epoch 1\): loss is nan; no checkpoint was written"
    ):
        finetune(files["base"], files["train_tsv"], files["dev_tsv"], out, fast(), progress=False)
    assert not (out / "last").exists()


def test_errors(files, tmp_path):
    root = files["root"]
    gpt = tmp_path / "gpt"
    save_checkpoint(
        gpt,
        GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=200)),
        files["tokenizer"],
    )
    with pytest.raises(LmforgeError, match="'gpt' checkpoint; fine-tuning needs a BERT encoder"):
        finetune(gpt, files["train_tsv"], files["dev_tsv"], tmp_path / "o1", fast(), progress=False)
    with pytest.raises(LmforgeError, match="does not exist"):
        finetune(
            files["base"],
            tmp_path / "nope.tsv",
            files["dev_tsv"],
            tmp_path / "o2",
            fast(),
            progress=False,
        )
    (tmp_path / "empty.tsv").write_text("label\tsentence\n")
    with pytest.raises(LmforgeError, match="has no examples"):
        finetune(
            files["base"],
            tmp_path / "empty.tsv",
            files["dev_tsv"],
            tmp_path / "o3",
            fast(),
            progress=False,
        )
    dev = write_tsv(tmp_path / "dev.tsv", [("pos", "good"), ("meh", "so so"), ("zzz", "what")])
    with pytest.raises(LmforgeError, match="never uses: 'meh', 'zzz'"):
        finetune(files["base"], files["train_tsv"], dev, tmp_path / "o4", fast(), progress=False)
    with pytest.raises(LmforgeError, match="already holds a fine-tuning run"):
        finetune(
            files["base"],
            files["train_tsv"],
            files["dev_tsv"],
            root / "cls_exists_check",
            fast(epochs=1),
            progress=False,
        )
        finetune(
            files["base"],
            files["train_tsv"],
            files["dev_tsv"],
            root / "cls_exists_check",
            fast(epochs=1),
            progress=False,
        )


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (dict(task="ner"), "task='ner' is not valid"),
        (dict(epochs=0), "epochs must be >= 1"),
        (dict(warmup_ratio=1.0), "warmup_ratio must be in [0, 1)"),
        (dict(precision="fp8"), "precision='fp8' is not valid"),
        (dict(task="token-classification", text_column="x"), "text_column is for classification"),
    ],
)
def test_config_validation(overrides, fragment):
    with pytest.raises(LmforgeError) as e:
        FinetuneConfig(**overrides)
    assert fragment in str(e.value)


def test_epoch_batches_group_by_length():
    from lmforge.train.finetune import epoch_batches

    lengths = [int(x) for x in torch.randint(2, 60, (1000,), generator=torch.Generator().manual_seed(0))]
    for grouped in (False, True):
        batches = epoch_batches(lengths, 8, torch.Generator().manual_seed(1), grouped)
        assert sorted(i for b in batches for i in b) == list(range(1000))  # each example once
        assert len(batches) == 125 and all(len(b) == 8 for b in batches)
        again = epoch_batches(lengths, 8, torch.Generator().manual_seed(1), grouped)
        assert again == batches
        padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        if grouped:
            assert padded < 1.1 * sum(lengths)  # similar lengths: little padding
        else:
            assert padded > 1.3 * sum(lengths)
    # the order of batches is shuffled, not longest first
    firsts = [max(lengths[i] for i in b) for b in epoch_batches(lengths, 8, torch.Generator().manual_seed(2), True)]
    assert firsts != sorted(firsts, reverse=True)


class _StopAfter:
    """Stands in for the Ctrl-C handler: asks the loop to stop once it has checked `n` times
    (once per training step)."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    @property
    def requested(self) -> bool:
        self.n -= 1
        return self.n < 0


@pytest.mark.parametrize("stop_after", [3, 7])  # mid-epoch, and at the end of epoch 1 (8 steps)
def test_interrupted_run_resumes_exactly(files, tmp_path, monkeypatch, stop_after):
    import lmforge.train.finetune as finetune_module

    config = fast(epochs=3)
    straight = finetune(files["base"], files["train_tsv"], files["dev_tsv"], tmp_path / "a", config,
                        progress=False)
    with monkeypatch.context() as m:
        m.setattr(finetune_module, "_GracefulStop", lambda: _StopAfter(stop_after))
        stopped = finetune(files["base"], files["train_tsv"], files["dev_tsv"], tmp_path / "b", config,
                           progress=False)
    assert stopped.stop_reason == "interrupted" and stopped.steps == stop_after + 1
    resumed = finetune(None, None, None, tmp_path / "b", progress=False, resume=True)
    assert resumed.steps == straight.steps == 24 and resumed.best_score == straight.best_score
    wa = load_checkpoint(tmp_path / "a" / "last").model.state_dict()
    wb = load_checkpoint(tmp_path / "b" / "last").model.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    with pytest.raises(LmforgeError, match="holds no fine-tuning state"):
        finetune(None, None, None, tmp_path / "nothing", progress=False, resume=True)
