"""What an encoder checkpoint is used for: sentence embeddings and masked-token filling.

`embed` follows sentence-transformers' mean pooling (Reimers & Gurevych 2019): the average of
the last hidden states over real tokens (padding excluded by the attention mask), then optionally
L2-normalised so that a dot product is the cosine similarity. `fill_mask` mirrors HF's
fill-mask pipeline: one ranked list of candidates per [MASK] in the text.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.models.bert import Bert
from lmforge.tokenizer import Tokenizer


def model_device(model: Bert) -> torch.device:
    return model.embeddings.word.weight.device


@torch.inference_mode()
def embed(
    model: Bert,
    tokenizer: Tokenizer,
    texts: str | Sequence[str],
    *,
    normalize: bool = True,
    batch_size: int = 32,
    max_length: int | None = None,
) -> torch.Tensor:
    """(N, C) float32 embeddings on the CPU, one row per text, in input order.

    `max_length` counts tokens with [CLS] and [SEP], longer texts are cut (default: the model's
    position table; sentence-transformers models often use less, e.g. 256 for all-MiniLM-L6-v2).
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    if batch_size < 1:
        raise LmforgeError(f"batch_size must be >= 1, got {batch_size}")
    limit = model.config.max_position
    if max_length is not None and not 1 <= max_length <= limit:
        raise LmforgeError(
            f"max_length must be in [1, {limit}] (the model's positions), got {max_length}"
        )
    was_training = model.training
    model.eval()  # dropout off: embeddings must not depend on a random draw
    try:
        out = []
        for i in range(0, len(texts), batch_size):
            batch = tokenizer.encode_for_encoder(
                texts[i : i + batch_size], max_length=max_length or limit
            )
            batch = {k: v.to(model_device(model)) for k, v in batch.items()}
            h = model(**batch).hidden_states.float()  # (B, T, C)
            mask = batch["attention_mask"][..., None].float()  # (B, T, 1)
            pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, C)
            out.append(F.normalize(pooled, p=2, dim=1) if normalize else pooled)
    finally:
        model.train(was_training)
    return torch.cat(out).cpu() if out else torch.empty(0, model.config.n_embd)


@torch.inference_mode()
def fill_mask(model: Bert, tokenizer: Tokenizer, text: str, top_k: int = 5) -> list[list[dict]]:
    """For each mask token in `text`, the `top_k` most likely tokens, best first.

    Each candidate is {"token", "token_id", "score" (probability), "sequence" (the text with this
    mask filled; any other masks stay)}. Masks are predicted independently, in one forward pass.
    """
    if model.mlm is None:
        raise LmforgeError(
            f"fill_mask needs a masked-LM head, but this model has head={model.config.head!r}; "
            f"use a checkpoint with head 'mlm' or 'pretraining'"
        )
    if tokenizer.mask_id is None:
        raise LmforgeError(
            "the tokenizer has no mask token; fill_mask needs a BERT-style (WordPiece) tokenizer"
        )
    if top_k < 1:
        raise LmforgeError(f"top_k must be >= 1, got {top_k}")
    batch = tokenizer.encode_for_encoder([text], max_length=model.config.max_position)
    ids = batch["input_ids"][0]  # (T,)
    positions = (ids == tokenizer.mask_id).nonzero().flatten().tolist()
    if not positions:
        raise LmforgeError(f"text has no {tokenizer.mask_token} token to fill: {text!r}")
    was_training = model.training
    model.eval()
    try:
        logits = (
            model(**{k: v.to(model_device(model)) for k, v in batch.items()}).mlm_logits[0].float().cpu()
        )  # (T, vocab)
    finally:
        model.train(was_training)
    framing = {tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id} - {None}
    results = []
    for pos in positions:
        probs = logits[pos].softmax(-1)
        scores, candidates = probs.topk(min(top_k, probs.numel()))
        row = []
        for score, token_id in zip(scores.tolist(), candidates.tolist(), strict=True):
            filled = ids.clone()
            filled[pos] = token_id
            kept = [i for i in filled.tolist() if i not in framing]
            row.append(
                dict(
                    token=tokenizer.backend.id_to_token(token_id),
                    token_id=token_id,
                    score=score,
                    sequence=tokenizer.decode(kept),
                )
            )
        results.append(row)
    return results


__all__ = ["embed", "fill_mask"]
