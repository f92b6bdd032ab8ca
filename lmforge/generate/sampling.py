"""Logits processors and the choice of the next token.

Each processor is a small pure function over next-token logits (B, V), plus the token history
(B, T) where it needs one. They reproduce Hugging Face's processors and warpers of the same names
(`transformers.generation.logits_process`) exactly, and `process_logits` applies them in HF's
order: the penalties first, then the sampling warpers (temperature, top-k, top-p, min-p).

The history may be left-padded: ids below 0 (`PAD`) are padding and never count as a token.
"""

from __future__ import annotations

import torch

from lmforge.errors import LmforgeError
from lmforge.generate.config import GenerationConfig

PAD = -1  # history ids below zero are padding, never a real token


def apply_repetition_penalty(
    logits: torch.Tensor, ids: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019) on tokens present in `ids`: divide positive logits by
    `penalty`, multiply negative ones, so a penalty > 1 always lowers the token's probability."""
    V = logits.shape[-1]
    # padding and ids the output layer cannot produce go to a spare column that is dropped at the end
    ids = ids.masked_fill(ids < 0, V).clamp(max=V)  # (B, T)
    logits = torch.nn.functional.pad(logits, (0, 1))  # (B, V + 1)
    seen = logits.gather(1, ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, ids, seen)[:, :V]


def ban_repeated_ngrams(logits: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Forbid every token that would complete an n-gram already present in `ids`."""
    T = ids.shape[1]
    if T < n:
        return logits
    # A token completes a repeat when the last n-1 ids equal the first n-1 ids of an earlier
    # window; that window's last id is banned. A window holding padding never matches, since
    # padding (< 0) equals no real id and the last n-1 ids always end in a real one.
    prefix = ids[:, T + 1 - n :]  # (B, n-1)
    windows = ids.unfold(1, n, 1)  # (B, T-n+1, n)
    matches = (windows[..., :-1] == prefix[:, None]).all(dim=-1)  # (B, T-n+1)
    V = logits.shape[-1]
    banned = torch.zeros(logits.shape[0], V + 1, dtype=torch.bool, device=logits.device)
    # non-matching windows scatter into a spare column V, dropped below
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=V), V), True)
    return logits.masked_fill(banned[:, :V], float("-inf"))


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest logits (and any tied with the k-th)."""
    kth = torch.topk(logits, min(k, logits.shape[-1])).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2019): keep the smallest set of most likely tokens whose
    probabilities sum to at least p; the most likely token is always kept."""
    sorted_logits, order = torch.sort(logits, descending=False)
    cum_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # ascending order: drop the unlikely head whose mass is at most 1 - p
    drop = cum_probs <= (1 - p)
    drop[:, -1] = False
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Min-p sampling (Nguyen et al. 2024): drop tokens less likely than min_p times the top one."""
    probs = logits.softmax(dim=-1)
    drop = probs < min_p * probs.amax(dim=-1, keepdim=True)
    drop.scatter_(1, probs.argmax(dim=-1, keepdim=True), False)  # keep the top token whatever min_p
    return logits.masked_fill(drop, float("-inf"))


def process_logits(
    logits: torch.Tensor, ids: torch.Tensor, config: GenerationConfig
) -> torch.Tensor:
    """All processors `config` asks for, in HF's order. Greedy decoding skips the warpers, whose
    filtering and rescaling cannot change the argmax."""
    if config.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, ids, config.repetition_penalty)
    if config.no_repeat_ngram_size > 0:
        logits = ban_repeated_ngrams(logits, ids, config.no_repeat_ngram_size)
    if not config.do_sample:
        return logits
    if config.temperature != 1.0:
        logits = apply_temperature(logits, config.temperature)
    if config.top_k is not None:
        logits = top_k_filter(logits, config.top_k)
    if config.top_p is not None and config.top_p < 1.0:
        logits = top_p_filter(logits, config.top_p)
    if config.min_p is not None and config.min_p > 0:
        logits = min_p_filter(logits, config.min_p)
    return logits


def next_tokens(
    logits: torch.Tensor,  # (B, V) logits for the next position
    ids: torch.Tensor,  # (B, T) history, prompt included, PAD where padded
    config: GenerationConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token of every row, (B,): argmax, or a draw from the processed distribution."""
    logits = process_logits(logits.float(), ids, config)
    if torch.isneginf(logits).all(dim=-1).any():
        raise LmforgeError(
            f"every token is banned for the next position (no_repeat_ngram_size={config.no_repeat_ngram_size} "
            "over a small vocabulary); lower no_repeat_ngram_size or max_new_tokens"
        )
    if not config.do_sample:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
