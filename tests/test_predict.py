"""`predict` on hand-set models: output shapes, label names, entity chunking and errors."""

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.models.bert import Bert, BertConfig
from lmforge.predict import encode_words, is_iob2, predict
from lmforge.tokenizer import train_tokenizer

TEXTS = ["alice went to new york city today", "bob saw a film", "the quick brown fox"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer("wordpiece", TEXTS * 3, vocab_size=80)


def model(tokenizer, head, labels=(), num_labels=3):
    config = BertConfig(
        n_layer=1,
        n_head=2,
        n_embd=16,
        max_position=32,
        vocab_size=tokenizer.vocab_size,
        head=head,
        num_labels=num_labels,
        labels=list(labels),
    )
    return Bert(config).eval()


def test_classification_outputs(tokenizer):
    m = model(tokenizer, "classification", ["a", "b", "c"])
    out = predict(m, tokenizer, TEXTS, batch_size=2)
    assert len(out) == 3
    for r in out:
        assert set(r["scores"]) == {"a", "b", "c"}
        assert r["label"] == max(r["scores"], key=r["scores"].get)
        assert r["score"] == pytest.approx(max(r["scores"].values()))
        assert sum(r["scores"].values()) == pytest.approx(1.0)
    # batching and a single string give the same answer as one batch
    assert predict(m, tokenizer, TEXTS[0])[0]["scores"] == pytest.approx(out[0]["scores"], abs=1e-5)
    pairs = predict(m, tokenizer, TEXTS[:2], pairs=["x y", "z"])
    assert len(pairs) == 2


def test_unnamed_labels_are_hf_style(tokenizer):
    m = model(tokenizer, "classification", num_labels=2)
    assert set(predict(m, tokenizer, ["hi"])[0]["scores"]) == {"LABEL_0", "LABEL_1"}


def test_token_classification_chunks_iob2_entities(tokenizer):
    labels = ["B-LOC", "I-LOC", "B-PER", "O"]
    m = model(tokenizer, "token-classification", labels, num_labels=4)
    # force the tags: the classifier reads word identity through a bias-free lookup
    words = TEXTS[0].split()  # alice went to new york city today
    wanted = ["B-PER", "O", "O", "B-LOC", "I-LOC", "I-LOC", "O"]
    batch, firsts = encode_words(tokenizer, [words], 32)
    assert all(p is not None for p in firsts[0]) and firsts[0][0] == 1  # after [CLS]
    with torch.no_grad():
        logits = torch.zeros(1, batch["input_ids"].shape[1], 4)
        for w, p in enumerate(firsts[0]):
            logits[0, p, labels.index(wanted[w])] = 10.0
    m.classifier.forward = lambda x: logits[:, : x.shape[1]]
    [out] = predict(m, tokenizer, [TEXTS[0]])
    assert out["tags"] == wanted
    assert [(e["entity"], e["text"], e["start_word"], e["end_word"]) for e in out["entities"]] == [
        ("PER", "alice", 0, 0),
        ("LOC", "new york city", 3, 5),
    ]
    assert all(0.99 < e["score"] <= 1 for e in out["entities"])


def test_token_classification_empty_and_truncated(tokenizer):
    m = model(tokenizer, "token-classification", ["B-X", "O"], num_labels=2)
    long = " ".join(["fox"] * 40)
    empty, short, cut = predict(m, tokenizer, ["", "the fox", long], max_length=10)
    assert empty == {"entities": [], "tags": []}
    assert len(short["tags"]) == 2
    assert len(cut["tags"]) == 40 and cut["tags"][8:] == ["O"] * 32  # words past max_length


def test_non_iob2_tags_give_tags_only(tokenizer):
    m = model(tokenizer, "token-classification", ["NN", "VB"], num_labels=2)
    [out] = predict(m, tokenizer, ["bob saw"])
    assert out["entities"] == [] and set(out["tags"]) <= {"NN", "VB"}
    assert is_iob2(["O", "B-PER", "I-PER"]) and not is_iob2(["NN"]) and not is_iob2(["B-"])


@pytest.mark.parametrize("head", ["none", "mlm", "pretraining"])
def test_needs_a_task_head(tokenizer, head):
    with pytest.raises(LmforgeError, match=f"head '{head}'.*lmforge finetune"):
        predict(model(tokenizer, head), tokenizer, ["hi"])


def test_argument_errors(tokenizer):
    cls = model(tokenizer, "classification")
    with pytest.raises(LmforgeError, match="one pair per text"):
        predict(cls, tokenizer, ["a", "b"], pairs=["c"])
    with pytest.raises(LmforgeError, match="batch_size must be >= 1"):
        predict(cls, tokenizer, ["a"], batch_size=0)
    with pytest.raises(LmforgeError, match=r"max_length must be in \[3, 32\]"):
        predict(cls, tokenizer, ["a"], max_length=100)
    ner = model(tokenizer, "token-classification")
    with pytest.raises(LmforgeError, match="pairs are not supported"):
        predict(ner, tokenizer, ["a"], pairs=["b"])
