"""Logits processors and the choice of the next token.

Each processor is a small pure function over next-token logits (B, V), plus the token history
(B, T) where it needs one. They reproduce Hugging Face's processors and warpers of the same names
(`transformers.generation.logits_process`) exactly, and `process_logits` applies them in HF's
order: the penalties first, then the sampling warpers (temperature, top-k, top-p, min-p).
OpenAI's presence and frequency penalties (which HF lacks) join the penalties, as in vLLM.

The history may be left-padded: ids below 0 (`PAD`) are padding and never count as a token.

Sampling draws every output sequence from its own `torch.Generator` (`sequence_generator`), so
that a sequence's tokens depend on its prompt, its settings and its seed, never on the other
sequences it happens to be batched with (offline, or in the server's running batch).
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


def apply_presence_frequency_penalty(
    logits: torch.Tensor, generated: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's penalties over the tokens generated so far (the prompt does not count):
    logits[t] -= presence * (count[t] > 0) + frequency * count[t]."""
    V = logits.shape[-1]
    ids = generated.masked_fill(generated < 0, V).clamp(max=V)  # (B, T); padding -> spare column V
    counts = torch.zeros(logits.shape[0], V + 1, dtype=logits.dtype, device=logits.device)
    counts = counts.scatter_add(1, ids, torch.ones_like(ids, dtype=logits.dtype))[:, :V]  # (B, V)
    return logits - presence * (counts > 0) - frequency * counts


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
    logits: torch.Tensor, ids: torch.Tensor, config: GenerationConfig, prompt_len: int = 0
) -> torch.Tensor:
    """All processors `config` asks for, in HF's order. Greedy decoding skips the warpers, whose
    filtering and rescaling cannot change the argmax. `ids[:, prompt_len:]` are the generated
    tokens, the ones the presence and frequency penalties count (left-padded prompts all end at
    `prompt_len`)."""
    if config.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, ids, config.repetition_penalty)
    if config.presence_penalty != 0.0 or config.frequency_penalty != 0.0:
        logits = apply_presence_frequency_penalty(
            logits, ids[:, prompt_len:], config.presence_penalty, config.frequency_penalty
        )
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


def sequence_generator(
    seed: int | None, choice: int = 0, device: torch.device | str = "cpu"
) -> torch.Generator:
    """The random stream of one output sequence: seeded with `seed + choice` for the choice-th of a
    prompt's `num_return_sequences` (so one sequence with a seed draws exactly as a plain seeded
    generator), fresh entropy without a seed; the global RNG is left alone either way."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed + choice)
    return generator


def next_tokens(
    logits: torch.Tensor,  # (B, V) logits for the next position
    ids: torch.Tensor,  # (B, T) history, prompt included, PAD where padded
    config: GenerationConfig,
    generator: torch.Generator | list[torch.Generator] | None = None,
    *,
    prompt_len: int = 0,  # ids[:, prompt_len:] are the generated tokens
) -> torch.Tensor:
    """The next token of every row, (B,): argmax, or a draw from the processed distribution.

    `generator` is one generator for the whole batch, or one per row: each row then draws
    exactly as a batch of one would with its generator, whatever the other rows are."""
    logits = process_logits(logits.float(), ids, config, prompt_len)
    if torch.isneginf(logits).all(dim=-1).any():
        raise LmforgeError(
            f"every token is banned for the next position (no_repeat_ngram_size={config.no_repeat_ngram_size} "
            "over a small vocabulary); lower no_repeat_ngram_size or max_new_tokens"
        )
    if not config.do_sample:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    if isinstance(generator, list):
        draws = [torch.multinomial(probs[r : r + 1], 1, generator=g) for r, g in enumerate(generator)]
        return torch.cat(draws)[:, 0]
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def token_logprobs(
    logits: torch.Tensor, chosen: torch.Tensor, top: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the `chosen` tokens (B,) and of each row's `top` most likely tokens,
    under the model's own distribution: log_softmax of the raw logits (B, V), before any penalty,
    temperature or filter (vLLM's default "raw" logprobs). Returns (B,), (B, top) values and
    (B, top) ids, best first."""
    logprobs = logits.float().log_softmax(dim=-1)
    best = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
    return logprobs.gather(1, chosen[:, None])[:, 0], best.values, best.indices
