"""BLEU / chrF / ROUGE scoring of generated text (sacrebleu and rouge-score defaults)."""

from __future__ import annotations

import pytest

from lmforge.errors import LmforgeError
from lmforge.eval import corpus_scores


def test_identical_outputs_score_100_and_unrelated_ones_near_0():
    refs = ["A man in an orange hat starring at something.", "Two dogs play in the snow."]
    perfect = corpus_scores(refs, refs)
    assert all(v == pytest.approx(100.0) for v in perfect.values())
    assert set(perfect) == {"bleu", "chrf", "rouge1", "rouge2", "rougeL"}
    bad = corpus_scores(["xyz qqq", "vvv www"], refs)
    assert bad["bleu"] < 1 and bad["rouge1"] == 0 and bad["chrf"] < 10


def test_rouge_is_the_mean_sentence_f1_and_bleu_is_corpus_level():
    # rouge1 F1: "a b c d" vs "a b e f" -> P = R = 0.5; identical -> 1; mean 0.75
    scores = corpus_scores(["a b c d", "x y"], ["a b e f", "x y"], metrics=["rouge"])
    assert scores == {"rouge1": pytest.approx(75.0), "rouge2": pytest.approx(50.0 * (1 / 3) + 50.0),
                      "rougeL": pytest.approx(75.0)}
    import sacrebleu  # the corpus statistic, not a mean of sentence BLEUs

    hyps, refs = ["the cat sat on a mat", "dogs run"], ["the cat sat on the mat", "the dogs run fast"]
    assert corpus_scores(hyps, refs, ["bleu"])["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert corpus_scores(hyps, refs, ["bleu"])["bleu"] != pytest.approx(
        sum(sacrebleu.sentence_bleu(h, [r]).score for h, r in zip(hyps, refs)) / 2)


def test_bad_inputs():
    with pytest.raises(LmforgeError, match="2 outputs but 1 references"):
        corpus_scores(["a", "b"], ["a"])
    with pytest.raises(LmforgeError, match="unknown metric 'meteor'"):
        corpus_scores(["a"], ["a"], ["bleu", "meteor"])
    with pytest.raises(LmforgeError, match="no references"):
        corpus_scores([], [])
