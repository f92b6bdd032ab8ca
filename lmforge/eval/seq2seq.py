"""Scoring generated text against references: corpus BLEU and chrF (sacrebleu), ROUGE (rouge-score).

Each library is used with its own defaults, so the numbers are the ones papers and leaderboards
report: sacrebleu's corpus BLEU with its 13a tokenizer and chrF (character 6-grams, beta 2) on
detokenized, cased text; ROUGE-1/2/L F1 from Google's `rouge-score` (its default tokenizer
lower-cases and keeps [a-z0-9] words; no stemming), averaged over sentences as `rouge-score`'s
users do. All scores are on a 0-100 scale.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from lmforge.errors import LmforgeError

METRICS = ("bleu", "chrf", "rouge")


def corpus_scores(
    hypotheses: Sequence[str], references: Sequence[str], metrics: Sequence[str] = METRICS
) -> dict[str, float]:
    """{"bleu": .., "chrf": .., "rouge1": .., "rouge2": .., "rougeL": ..} for the metrics asked."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise LmforgeError(f"unknown metric {unknown[0]!r}; choose from: {', '.join(METRICS)}")
    if len(hypotheses) != len(references):
        raise LmforgeError(
            f"{len(hypotheses)} outputs but {len(references)} references; they must pair up line by line"
        )
    if not references:
        raise LmforgeError("no references to score against")
    out: dict[str, float] = {}
    if "bleu" in metrics or "chrf" in metrics:
        import sacrebleu

        if "bleu" in metrics:
            out["bleu"] = sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score
        if "chrf" in metrics:
            out["chrf"] = sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score
    if "rouge" in metrics:
        from rouge_score import rouge_scorer

        types = ("rouge1", "rouge2", "rougeL")
        scorer = rouge_scorer.RougeScorer(list(types))
        sums = dict.fromkeys(types, 0.0)
        for hyp, ref in zip(hypotheses, references):
            for name, s in scorer.score(ref, hyp).items():  # score(target, prediction)
                sums[name] += s.fmeasure
        out.update({name: 100 * total / len(references) for name, total in sums.items()})
    return out


def evaluate_generation(
    model, tokenizer, sources: Sequence[str], references: Sequence[str], config, *,
    metrics: Sequence[str] = METRICS, batch_size: int = 32, source_tokenizer=None,
) -> dict:
    """Translate (or summarise) `sources` with an encoder-decoder and score the outputs."""
    from lmforge.generate.seq2seq import translate

    if len(sources) != len(references):
        raise LmforgeError(
            f"{len(sources)} sources but {len(references)} references; the files must align line by line"
        )
    start = time.perf_counter()
    outputs = translate(model, tokenizer, list(sources), config, batch_size=batch_size,
                        source_tokenizer=source_tokenizer)
    seconds = time.perf_counter() - start
    hypotheses = [o.text.strip() for o in outputs]
    return {
        **{k: round(v, 2) for k, v in corpus_scores(hypotheses, references, metrics).items()},
        "sentences": len(sources),
        "seconds": round(seconds, 2),
        "hypotheses": hypotheses,
    }
