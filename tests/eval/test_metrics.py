"""Accuracy, macro F1 (against scikit-learn) and CoNLL entity scores (against seqeval)."""

from __future__ import annotations

import random

import pytest

from lmforge.errors import LmforgeError
from lmforge.eval.metrics import accuracy, entity_scores, macro_f1


def test_accuracy():
    assert accuracy(["a", "b", "a", "c"], ["a", "b", "b", "b"]) == 0.5
    assert accuracy([1], [1]) == 1.0


def test_macro_f1_matches_sklearn():
    from sklearn.metrics import f1_score

    rng = random.Random(0)
    for n_labels in (2, 3, 5):
        golds = [rng.randrange(n_labels) for _ in range(50)]
        # a label that only the predictions use counts too, with F1 0
        preds = [rng.randrange(n_labels + 1) for _ in range(50)]
        assert macro_f1(preds, golds) == pytest.approx(f1_score(golds, preds, average="macro"))
    assert macro_f1(["a", "a"], ["a", "b"]) == pytest.approx((2 / 3 + 0) / 2)


@pytest.mark.parametrize("fn", [accuracy, macro_f1, entity_scores])
def test_length_errors(fn):
    with pytest.raises(LmforgeError, match="2 predicted but 1 gold"):
        fn([["O"], ["O"]], [["O"]])
    with pytest.raises(LmforgeError, match="no .* to score"):
        fn([], [])


def test_entity_scores_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "I-ORG"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "I-ORG", "O"]]
    # gold: PER, LOC, ORG; pred: PER (right), ORG (wrong type), ORG (wrong span)
    scores = entity_scores(pred, gold)
    assert scores["precision"] == pytest.approx(1 / 3)
    assert scores["recall"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(1 / 3)
    # conlleval: a stray I- starts an entity; a type change inside a run splits it
    assert entity_scores([["O", "I-PER", "I-PER"]], [["O", "B-PER", "I-PER"]])["f1"] == 1.0
    assert entity_scores([["B-PER", "I-LOC"]], [["B-PER", "B-LOC"]])["f1"] == 1.0
    assert entity_scores([["O"]], [["O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_entity_scores_errors():
    with pytest.raises(LmforgeError, match="sentence 0: 1 predicted tags but 2 gold"):
        entity_scores([["O"]], [["O", "O"]])
    with pytest.raises(LmforgeError, match="'E-PER' is not IOB2"):
        entity_scores([["E-PER"]], [["O"]])


HAND_MADE = [
    [["B-PER", "I-PER", "O"], ["B-PER", "I-PER", "O"]],
    [["I-PER", "I-PER", "B-PER"], ["B-PER", "I-PER", "B-PER"]],
    [["B-LOC", "I-PER", "I-PER"], ["B-LOC", "B-PER", "I-PER"]],
    [["O", "I-MISC", "O", "I-MISC"], ["B-MISC", "I-MISC", "O", "B-MISC"]],
    [["B-ORG", "B-ORG", "I-LOC"], ["B-ORG", "I-ORG", "I-ORG"]],
]


def _random_tags(rng: random.Random, n: int) -> list[str]:
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-A-B", "I-A-B"]
    return [rng.choice(tags) for _ in range(n)]


def test_entity_scores_match_seqeval():
    metrics = pytest.importorskip("seqeval.metrics")

    def check(pred, gold):
        ours = entity_scores(pred, gold)
        assert ours["precision"] == pytest.approx(
            metrics.precision_score(gold, pred, zero_division=0)
        )
        assert ours["recall"] == pytest.approx(metrics.recall_score(gold, pred, zero_division=0))
        assert ours["f1"] == pytest.approx(metrics.f1_score(gold, pred, zero_division=0))

    for pred, gold in HAND_MADE:
        check([pred], [gold])
    check([p for p, _ in HAND_MADE], [g for _, g in HAND_MADE])
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 8) for _ in range(rng.randint(1, 4))]
        gold = [_random_tags(rng, n) for n in lengths]
        if rng.random() < 0.5:  # a near-miss of the gold tags, as a trained model's
            pred = [
                [t if rng.random() < 0.8 else rng.choice(["O", "I-PER", "B-LOC"]) for t in s]
                for s in gold
            ]
        else:
            pred = [_random_tags(rng, n) for n in lengths]
        check(pred, gold)
