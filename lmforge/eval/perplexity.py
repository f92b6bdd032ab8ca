"""Perplexity of a text file, computed so any other implementation can reproduce it.

The file is read as UTF-8 and tokenized as it is (the tokenizer's own normalizer only). Its tokens
are cut into consecutive, non-overlapping windows of `context` tokens (the last one may be
shorter); inside each window every token but the first is predicted from the tokens before it
in that window, the convention of Hugging Face's perplexity guide with stride == max_length.
The loss is the mean negative log-likelihood (nats) over all predicted tokens; perplexity is
exp(loss).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError


@torch.inference_mode()
def perplexity(model, token_ids: list[int], context: int | None = None, batch_size: int = 8) -> dict:
    block = model.config.block_size
    context = context or block
    if not 2 <= context <= block:
        raise LmforgeError(f"--context must be between 2 and the model's context {block}, got {context}")
    if len(token_ids) < 2:
        raise LmforgeError(f"the text has {len(token_ids)} token(s); at least 2 are needed to score one prediction")
    device = next(model.parameters()).device
    ids = torch.tensor(token_ids, dtype=torch.long)
    n_full = len(ids) // context
    windows = [ids[: n_full * context].view(n_full, context)] if n_full else []
    tail = ids[n_full * context :]
    was_training = model.training
    model.eval()
    total_nll, predicted = 0.0, 0
    # full windows in batches, then the shorter last window on its own
    chunks = [w for full in windows for w in full.split(batch_size)]
    if len(tail) >= 2:
        chunks.append(tail[None])
    for chunk in chunks:
        chunk = chunk.to(device)
        logits = model(chunk[:, :-1]).float()  # (B, T-1, V)
        nll = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum")
        total_nll += nll.item()
        predicted += chunk[:, 1:].numel()
    model.train(was_training)
    loss = total_nll / predicted
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "tokens": len(token_ids),
        "predicted_tokens": predicted,
        "windows": n_full + (1 if len(tail) >= 2 else 0),
        "context": context,
    }


def perplexity_of_file(model, tokenizer, path: str | Path, context: int | None = None, batch_size: int = 8) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"--text file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LmforgeError(f"--text file {str(path)!r} is not UTF-8 text: {e}") from e
    result = perplexity(model, tokenizer.encode(text), context, batch_size)
    return {"file": str(path), **result}
