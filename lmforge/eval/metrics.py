"""Fine-tuning metrics: accuracy, macro F1 and CoNLL entity-level precision/recall/F1.

`macro_f1` matches `sklearn.metrics.f1_score(average="macro")`: the mean of per-label F1 over
every label seen in the gold or the predicted labels. `entity_scores` matches `conlleval` and
`seqeval.metrics` in their default mode: tags are IOB2 ("B-PER", "I-PER", "O"), an entity counts
as correct only if its type and its span are both exact, and an I- tag that does not continue an
entity of its own type starts a new one (so "O I-PER" still holds one PER), as conlleval does.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from lmforge.errors import LmforgeError


def _check_lengths(preds: Sequence, golds: Sequence, what: str) -> None:
    if len(preds) != len(golds):
        raise LmforgeError(f"got {len(preds)} predicted but {len(golds)} gold {what}")
    if not preds:
        raise LmforgeError(f"no {what} to score")


def accuracy(preds: Sequence[Hashable], golds: Sequence[Hashable]) -> float:
    """The fraction of predictions equal to their gold label."""
    _check_lengths(preds, golds, "labels")
    return sum(p == g for p, g in zip(preds, golds, strict=True)) / len(golds)


def macro_f1(preds: Sequence[Hashable], golds: Sequence[Hashable]) -> float:
    """The unweighted mean of per-label F1 over the labels in golds or preds."""
    _check_lengths(preds, golds, "labels")
    scores = []
    for label in set(golds) | set(preds):
        tp = sum(p == label and g == label for p, g in zip(preds, golds, strict=True))
        fp = sum(p == label and g != label for p, g in zip(preds, golds, strict=True))
        fn = sum(p != label and g == label for p, g in zip(preds, golds, strict=True))
        # F1 = 2PR / (P + R) = 2tp / (2tp + fp + fn); the label occurs, so the denominator is > 0
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def iob2_entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The (type, first, last) token spans of the entities in one IOB2-tagged sentence."""
    spans = set()
    current: tuple[str, int] | None = None  # (type, first index) of the entity being read
    for i, tag in enumerate([*tags, "O"]):  # the "O" closes an entity at the sentence end
        if tag == "O":
            prefix, kind = "O", ""
        elif tag[:2] in ("B-", "I-") and len(tag) > 2:
            prefix, kind = tag[0], tag[2:]
        else:
            raise LmforgeError(f"tag {tag!r} is not IOB2; use 'O' or 'B-TYPE' / 'I-TYPE'")
        # an entity goes on only through I- tags of its own type
        if current is not None and (prefix != "I" or kind != current[0]):
            spans.add((current[0], current[1], i - 1))
            current = None
        if prefix != "O" and current is None:
            current = (kind, i)
    return spans


def entity_scores(pred_tags: list[list[str]], gold_tags: list[list[str]]) -> dict[str, float]:
    """Micro-averaged entity precision, recall and F1 over tagged sentences (0.0 when undefined)."""
    _check_lengths(pred_tags, gold_tags, "sentences")
    n_pred = n_gold = n_correct = 0
    for i, (pred, gold) in enumerate(zip(pred_tags, gold_tags, strict=True)):
        if len(pred) != len(gold):
            raise LmforgeError(
                f"sentence {i}: {len(pred)} predicted tags but {len(gold)} gold tags"
            )
        pred_spans, gold_spans = iob2_entities(pred), iob2_entities(gold)
        n_pred += len(pred_spans)
        n_gold += len(gold_spans)
        n_correct += len(pred_spans & gold_spans)
    precision = n_correct / n_pred if n_pred else 0.0
    recall = n_correct / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
