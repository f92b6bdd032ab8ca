"""Predictions of a fine-tuned BERT: sentence labels, or word tags and the entities they spell.

`predict` mirrors HF's text-classification and token-classification pipelines:
- classification: the label with the highest softmax probability, and every label's probability;
- token classification: the text is split on whitespace into words, each word is tagged by the
  prediction at its first WordPiece sub-token (the position its tag was trained on, see
  `lmforge.data.tasks.align_labels`), and IOB2 tags are chunked into entities the way the
  CoNLL scorer reads them (`lmforge.eval.metrics`). An entity's score is the mean probability of
  its words' tags. Words cut off by `max_length` get "O".

Labels are named by the checkpoint (`BertConfig.labels`), else "LABEL_0", "LABEL_1", ... as in HF.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmforge.encoders import model_device
from lmforge.errors import LmforgeError
from lmforge.eval.metrics import iob2_entities
from lmforge.models.bert import Bert
from lmforge.tokenizer import Tokenizer

TASK_HEADS = ("classification", "token-classification")


def label_names(model: Bert) -> list[str]:
    c = model.config
    return list(c.labels) if c.labels else [f"LABEL_{i}" for i in range(c.num_labels)]


def is_iob2(tags: Sequence[str]) -> bool:
    """True when every tag is "O", "B-TYPE" or "I-TYPE": the tags can be chunked into entities."""
    return all(t == "O" or (t[:2] in ("B-", "I-") and len(t) > 2) for t in tags)


def _check_model(model: Bert, batch_size: int, max_length: int | None) -> int:
    """Validate the arguments; returns the max_length to encode with."""
    head = getattr(getattr(model, "config", None), "head", None)
    if not isinstance(model, Bert) or head not in TASK_HEADS:
        raise LmforgeError(
            f"predict needs a fine-tuned BERT with a classification or token-classification head; "
            f"this checkpoint has {'head ' + repr(head) if isinstance(model, Bert) else type(model).__name__}"
            f" (fine-tune it first with `lmforge finetune`)"
        )
    if batch_size < 1:
        raise LmforgeError(f"batch_size must be >= 1, got {batch_size}")
    limit = model.config.max_position
    if max_length is not None and not 3 <= max_length <= limit:
        raise LmforgeError(
            f"max_length must be in [3, {limit}] (the model's positions), got {max_length}"
        )
    return max_length or limit


@torch.inference_mode()
def class_probabilities(
    model: Bert,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    pairs: Sequence[str] | None,
    batch_size: int,
    max_length: int,
) -> torch.Tensor:
    """(N, num_labels) float32 softmax probabilities on the CPU, one row per text."""
    out = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer.encode_for_encoder(
            texts[i : i + batch_size],
            None if pairs is None else pairs[i : i + batch_size],
            max_length=max_length,
        )
        batch = {k: v.to(model_device(model)) for k, v in batch.items()}
        out.append(model(**batch).logits.float().softmax(-1).cpu())  # (B, num_labels)
    return torch.cat(out) if out else torch.zeros(0, model.config.num_labels)


def encode_words(
    tokenizer: Tokenizer, sentences: Sequence[Sequence[str]], max_length: int
) -> tuple[dict[str, torch.Tensor], list[list[int | None]]]:
    """Encode pre-split words as "[CLS] ... [SEP]", right-padded; also, for each sentence, the
    position of each word's first sub-token (None for a word with no tokens or cut off)."""
    if tokenizer.cls_id is None or tokenizer.sep_id is None:
        raise LmforgeError(
            f"token classification needs a tokenizer with [CLS] and [SEP] (a WordPiece/BERT one); "
            f"this one is {tokenizer.kind!r}"
        )
    with tokenizer.bare_backend() as backend:
        # the backend's truncation leaves room for [CLS] and [SEP], so both are always kept
        backend.enable_truncation(max_length)
        encodings = backend.encode_batch(
            [list(words) for words in sentences], is_pretokenized=True, add_special_tokens=True
        )
    B, T = len(encodings), max(len(e.ids) for e in encodings)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    batch = {
        "input_ids": torch.full((B, T), pad, dtype=torch.long),
        "token_type_ids": torch.zeros(B, T, dtype=torch.long),
        "attention_mask": torch.zeros(B, T, dtype=torch.long),
    }
    firsts = []
    for i, (e, words) in enumerate(zip(encodings, sentences, strict=True)):
        n = len(e.ids)
        batch["input_ids"][i, :n] = torch.tensor(e.ids, dtype=torch.long)
        batch["attention_mask"][i, :n] = 1
        first: list[int | None] = [None] * len(words)
        for pos, word in enumerate(e.word_ids):
            if word is not None and first[word] is None:
                first[word] = pos
        firsts.append(first)
    return batch, firsts


@torch.inference_mode()
def tag_words(
    model: Bert,
    tokenizer: Tokenizer,
    sentences: Sequence[Sequence[str]],
    batch_size: int,
    max_length: int,
) -> list[tuple[list[str], list[float]]]:
    """For each sentence of words: (tag per word, probability of that tag)."""
    names = label_names(model)
    outside = "O" if "O" in names else names[0]  # the tag of words the model never saw
    out: list[tuple[list[str], list[float]]] = []
    for i in range(0, len(sentences), batch_size):
        chunk = sentences[i : i + batch_size]
        nonempty = [s for s in chunk if s]
        results: list[tuple[list[str], list[float]]] = []
        if nonempty:  # an empty text has no words to tag, and the backend wants at least one
            batch, firsts = encode_words(tokenizer, nonempty, max_length)
            batch = {k: v.to(model_device(model)) for k, v in batch.items()}
            probs = model(**batch).logits.float().softmax(-1).cpu()  # (B, T, num_labels)
            best_p, best_id = probs.max(-1)  # (B, T)
            for j, first in enumerate(firsts):
                tags = [outside if p is None else names[best_id[j, p]] for p in first]
                scores = [0.0 if p is None else best_p[j, p].item() for p in first]
                results.append((tags, scores))
        done = iter(results)
        out.extend(next(done) if s else ([], []) for s in chunk)
    return out


def predict(
    model: Bert,
    tokenizer: Tokenizer,
    texts: str | Sequence[str],
    pairs: Sequence[str] | None = None,
    batch_size: int = 32,
    max_length: int | None = None,
) -> list[dict]:
    """One result per text (see the module docstring); `max_length` counts special tokens too
    (default: the model's position table)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    max_length = _check_model(model, batch_size, max_length)
    names = label_names(model)
    was_training = model.training
    model.eval()  # dropout off: predictions must not depend on a random draw
    try:
        if model.config.head == "classification":
            if pairs is not None and len(pairs) != len(texts):
                raise LmforgeError(
                    f"got {len(texts)} texts but {len(pairs)} pairs; give one pair per text"
                )
            probs = class_probabilities(model, tokenizer, texts, pairs, batch_size, max_length)
            return [
                {
                    "label": names[int(row.argmax())],
                    "score": row.max().item(),
                    "scores": dict(zip(names, row.tolist(), strict=True)),
                }
                for row in probs
            ]
        if pairs is not None:
            raise LmforgeError("token classification tags single texts; pairs are not supported")
        sentences = [text.split() for text in texts]
        tagged = tag_words(model, tokenizer, sentences, batch_size, max_length)
        chunkable = is_iob2(names)
        results = []
        for words, (tags, scores) in zip(sentences, tagged, strict=True):
            entities = []
            # entities only for IOB2 tag sets; other tag sets (e.g. POS tags) give tags alone
            for kind, first, last in (
                sorted(iob2_entities(tags), key=lambda s: s[1]) if chunkable else ()
            ):
                entities.append(
                    {
                        "entity": kind,
                        "text": " ".join(words[first : last + 1]),
                        "start_word": first,
                        "end_word": last,  # inclusive
                        "score": sum(scores[first : last + 1]) / (last - first + 1),
                    }
                )
            results.append({"entities": entities, "tags": tags})
        return results
    finally:
        model.train(was_training)
