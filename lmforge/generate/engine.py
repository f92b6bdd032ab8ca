"""The decoding engine: batched, KV-cached generation around a model that knows nothing of decoding.

Prompts of different lengths are left-padded so that they all end at the same position, which
lets every row share the cache's one write position. The padded batch is prefilled in one forward
pass, then each step feeds one token per row (`last_only=True`). Positions count real tokens only
(cumsum of the mask - 1), so a padded prompt sees the same positions as it would alone. Each
output row samples from its own generator (seed + its index among its prompt's sequences), so a
row's tokens are those it would get alone, whatever else is in the batch.

With `num_beams > 1` the same prefill and incremental steps drive beam search
(`lmforge.generate.beam`), the cache's rows following the beams as they are reordered.

`generate_ids` works on token ids; `generate` wraps it with a tokenizer: text in, text out, stop
strings, and streaming of the text as it becomes final. Given a `draft_model`, both hand greedy
decoding to speculative decoding (`lmforge.generate.speculative`), whose tokens are the same.
With `config.compile` the one-token steps run compiled (`lmforge.generate.fast`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.generate.beam import Hypothesis, beam_search
from lmforge.generate.config import GenerationConfig
from lmforge.generate.fast import static_decode_step
from lmforge.generate.sampling import PAD, next_tokens, sequence_generator

if TYPE_CHECKING:
    from lmforge.generate.speculative import SpeculativeStats


@dataclass
class Generation:
    prompt: str
    text: str  # the continuation only, cut before a stop string
    token_ids: list[int]  # the continuation's ids, without eos; see `_Detokenizer._cut` for stops
    prompt_ids: list[int]
    finish_reason: str  # "length" | "eos" | "stop"


# on_step(new_ids) gets the token each row produced this step (None for rows already finished)
# and may return the rows to finish now; `generate` finishes rows whose text hit a stop string.
StepCallback = Callable[[list[int | None]], Iterable[int] | None]


def generate_ids(
    model: nn.Module,
    prompt_ids: list[list[int]],
    config: GenerationConfig,
    *,
    on_step: StepCallback | None = None,
    draft_model: nn.Module | None = None,
    speculative_stats: SpeculativeStats | None = None,
) -> list[list[int]]:
    """Continue each prompt; returns the continuations' ids, `num_return_sequences` per prompt in
    prompt order. A row ends at `config.eos_token_id` (not included), after `max_new_tokens`, or
    when `on_step` (called once per step, see `StepCallback`) returns its index.

    With `num_beams > 1`, the best hypotheses of a beam search, best first; `on_step` does not
    apply, since beams are reordered every step and no row keeps an identity.

    With a `draft_model` (greedy only), speculative decoding: the same ids, from fewer forward
    passes of `model`; its counts are added to `speculative_stats` when given."""
    if draft_model is not None:
        from lmforge.generate.speculative import speculative_generate_ids  # it imports this module

        return speculative_generate_ids(
            model, draft_model, prompt_ids, config, on_step=on_step, stats=speculative_stats
        )[0]
    if config.num_beams > 1:
        if on_step is not None:
            raise LmforgeError(
                "on_step is not available with beam search (num_beams > 1): beams are reordered "
                "every step, so a row is not one sequence"
            )
        return [h.tokens for h in _beam_decode(model, prompt_ids, config)]
    _check_prompts(model, prompt_ids, config)
    with _decoding(model):
        return _decode(model, prompt_ids, config, on_step)


@contextmanager
def _decoding(model: nn.Module) -> Iterator[None]:
    """Eval mode without autograd; the model's training mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _check_prompts(model: nn.Module, prompt_ids: list[list[int]], config: GenerationConfig) -> None:
    if not hasattr(model, "new_kv_cache") or not hasattr(model.config, "block_size"):
        raise LmforgeError(
            f"generation needs a decoder-only model (a GPT); this is a {type(model).__name__}"
            + (" (encoder models fill masks: use fill-mask)" if type(model).__name__ == "Bert" else "")
        )
    if not prompt_ids:
        raise LmforgeError("no prompts given: pass at least one prompt")
    vocab_size = model.config.vocab_size
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise LmforgeError(f"prompt {i} is empty: a prompt needs at least one token")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise LmforgeError(
                f"prompt {i} has token id {bad[0]}, outside the model's vocabulary of {vocab_size} "
                "(is this the model's own tokenizer?)"
            )
    longest = max(map(len, prompt_ids))
    n_new, context = config.max_new_tokens, model.config.block_size
    if longest + n_new > context:
        if longest < context:
            fix = f"lower max_new_tokens to {context - longest} or shorten the prompt"
        else:
            fix = f"shorten the prompt to fewer than {context} tokens"
        which = "the prompt" if len(prompt_ids) == 1 else "the longest prompt"
        raise LmforgeError(
            f"{which} ({longest} tokens) + max_new_tokens ({n_new}) = {longest + n_new} tokens exceeds "
            f"the model's context of {context} tokens (block_size); {fix}"
        )


def _decode(
    model: nn.Module,
    prompt_ids: list[list[int]],
    config: GenerationConfig,
    on_step: StepCallback | None,
) -> list[list[int]]:
    device = next(model.parameters()).device
    rows = [ids for ids in prompt_ids for _ in range(config.num_return_sequences)]
    B, L = len(rows), max(map(len, rows))
    total = L + config.max_new_tokens
    # the whole history, left-padded with PAD; the processors read it, the model reads its prefix
    tokens = _left_padded(rows, total, device)
    padded = any(len(ids) < L for ids in rows)

    # one random stream per row, seeded by its index among its prompt's sequences: a row's tokens
    # do not depend on the other prompts of the batch (the server batches strangers together)
    n = config.num_return_sequences
    generators = (
        [sequence_generator(config.seed, r % n, device) for r in range(B)] if config.do_sample else None
    )
    cache = model.new_kv_cache(B, total) if config.use_cache else None

    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    t = L  # tokens so far, padding included
    logits = _next_logits(model, tokens[:, :t], padded, cache)  # (B, V), the prefill
    for i in range(config.max_new_tokens):  # i tokens generated so far
        forbid_early_eos(logits, config, i)
        # finished rows are still fed (a 0), but sample nothing and their output is frozen
        alive = torch.tensor([not d for d in done], device=device)
        new = torch.zeros(B, dtype=torch.long, device=device)
        live = [g for g, d in zip(generators, done) if not d] if generators else None
        new[alive] = next_tokens(logits[alive], tokens[alive, :t], config, live, prompt_len=L)
        tokens[:, t] = new
        t += 1

        step: list[int | None] = [None if d else tok for d, tok in zip(done, new.tolist())]
        for r, tok in enumerate(step):
            if tok is None:
                continue
            if tok == config.eos_token_id:
                done[r] = True
            else:
                out[r].append(tok)
        for r in (on_step(step) if on_step else None) or ():
            done[r] = True
        if all(done) or t == total:
            break
        if config.compile:
            logits = static_decode_step(model, cache, tokens, t)
        else:
            logits = _next_logits(model, tokens[:, :t], padded, cache)
    return out


def forbid_early_eos(logits: torch.Tensor, config: GenerationConfig, n_generated: int) -> None:
    """HF's MinNewTokensLengthLogitsProcessor, in place on (B, V) logits: no eos before
    `min_new_tokens` tokens."""
    eos = config.eos_token_id
    if n_generated < config.min_new_tokens and eos is not None and eos < logits.shape[-1]:
        logits[:, eos] = float("-inf")


def _beam_decode(
    model: nn.Module, prompt_ids: list[list[int]], config: GenerationConfig
) -> list[Hypothesis]:
    """Beam search over a decoder-only LM: prefill the prompts once, then each step reorders the
    cache's rows to follow the beams and feeds every beam its newest token."""
    _check_prompts(model, prompt_ids, config)
    with _decoding(model):
        device = next(model.parameters()).device
        L = max(map(len, prompt_ids))
        prompts = _left_padded(prompt_ids, L, device)  # (B, L)
        padded = any(len(ids) < L for ids in prompt_ids)
        cache = (
            model.new_kv_cache(len(prompt_ids), L + config.max_new_tokens)
            if config.use_cache
            else None
        )

        def logits_for(rows: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
            if cache is not None:
                cache.reorder(rows)  # (B, ...) -> (B * num_beams, ...) at the first step
            return _next_logits(model, history, padded, cache)

        return beam_search(prompts, _next_logits(model, prompts, padded, cache), logits_for, config)


def _left_padded(rows: list[list[int]], width: int, device) -> torch.Tensor:
    """(len(rows), width) ids, PAD-filled, each row left-padded to end at the longest's end."""
    L = max(map(len, rows))
    tokens = torch.full((len(rows), width), PAD, dtype=torch.long, device=device)
    for r, ids in enumerate(rows):
        tokens[r, L - len(ids) : L] = torch.tensor(ids, device=device)
    return tokens


def _next_logits(model: nn.Module, tokens: torch.Tensor, padded: bool, cache) -> torch.Tensor:
    """Next-token logits (B, V) after `tokens` (B, t): the model gets what the cache lacks (all of
    it without a cache), with positions counting real tokens only."""
    start = cache.pos if cache is not None else 0
    mask = tokens >= 0  # (B, t)
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, start:]
    logits = model(
        tokens[:, start:].clamp(min=0),  # padding is masked out, any id will do
        attention_mask=mask if padded else None,  # without padding SDPA takes its causal fast path
        position_ids=position_ids,
        kv_cache=cache,
        last_only=True,
    )
    return logits[:, -1]


def generate(
    model: nn.Module,
    tokenizer,
    prompts: str | list[str],
    config: GenerationConfig,
    *,
    on_text: Callable[[int, str], None] | None = None,
    draft_model: nn.Module | None = None,
    speculative_stats: SpeculativeStats | None = None,
) -> list[Generation]:
    """Continue each prompt as text; `num_return_sequences` results per prompt, in prompt order
    (with beam search, each prompt's best hypotheses, best first). A `draft_model` sharing the
    tokenizer turns on speculative decoding (see `generate_ids`).

    `on_text(index, piece)` streams result `index`'s text as it becomes final: pieces are held
    back while they end in an incomplete UTF-8 character or could begin a stop string, and joined
    they equal the result's `text`. Beam search has no final text before the search ends, so its
    results stream only then.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise LmforgeError("no prompts given: pass at least one prompt")
    if config.eos_token_id is None and tokenizer.eos_id is not None:
        config = dataclasses.replace(config, eos_token_id=tokenizer.eos_id)
    if draft_model is not None:  # before any decoding, beam search included
        from lmforge.generate.speculative import check_draft

        check_draft(model, draft_model, config)
    prompt_ids = [
        ids or _empty_prompt(tokenizer, i) for i, ids in enumerate(tokenizer.encode_batch(prompts))
    ]

    n = config.num_return_sequences
    streams = [
        _Detokenizer(
            tokenizer, config.stop, (lambda piece, r=r: on_text(r, piece)) if on_text else None
        )
        for r in range(len(prompts) * n)
    ]

    fill_streams(
        streams, config,
        beams=lambda: _beam_decode(model, prompt_ids, config),
        decode=lambda on_step: generate_ids(
            model, prompt_ids, config, on_step=on_step, draft_model=draft_model,
            speculative_stats=speculative_stats,
        ),
    )
    results = []
    for r, s in enumerate(streams):
        if s.finish_reason is None:
            s.finish("length")
        results.append(
            Generation(prompts[r // n], s.text, s.ids, prompt_ids[r // n], s.finish_reason)
        )
    return results


def fill_streams(
    streams: list[_Detokenizer],
    config: GenerationConfig,
    *,
    beams: Callable[[], list[Hypothesis]],
    decode: Callable[[StepCallback], object],
) -> None:
    """Feed one decoded batch into its `streams` (one per output row), which track text, stop
    strings and finish reasons. With beam search `beams()` gives the hypotheses, which stream only
    once the search is over (no text is final before) and which stop strings cut afterwards;
    otherwise `decode(on_step)` runs the step loop, and rows end at eos or a stop string."""
    if config.num_beams > 1:
        for stream, hyp in zip(streams, beams(), strict=True):
            for tok in hyp.tokens:
                if stream.add(tok):  # the text now holds a stop string and is cut before it
                    break
            else:
                stream.finish(hyp.finish_reason)
        return

    def on_step(step: list[int | None]) -> list[int]:
        stopped = []
        for r, tok in enumerate(step):
            if tok is None:
                continue
            if tok == config.eos_token_id:
                streams[r].finish("eos")
            elif streams[r].add(tok):
                stopped.append(r)
        return stopped

    decode(on_step)


def _empty_prompt(tokenizer, i: int) -> list[int]:
    # a document boundary is the natural start of unconditioned text (GPT-2 samples this way)
    if tokenizer.eos_id is None:
        raise LmforgeError(
            f"prompt {i} is empty and the tokenizer has no end-of-text token to start from; give some text"
        )
    return [tokenizer.eos_id]


class _Detokenizer:
    """One sequence's text as its tokens arrive: finds stop strings and emits the text that can no
    longer change.

    The continuation is decoded whole each step, since a byte-level token may hold part of a UTF-8
    character (decoded as '\\ufffd' until the rest arrives) and decoders may join tokens.
    """

    def __init__(self, tokenizer, stop: list[str], emit: Callable[[str], None] | None):
        self.tokenizer, self.stop, self.emit = tokenizer, stop, emit
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of `text` handed to `emit`
        self.finish_reason: str | None = None

    def add(self, token: int) -> bool:
        """Append a token; True when the text now holds a stop string (the sequence is finished)."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self._cut(min(hits))
            self.finish("stop")
            return True
        final = len(self.text.rstrip("\ufffd"))  # an incomplete character may still change
        final -= _stop_prefix_len(self.text[:final], self.stop)
        self._send(final)
        return False

    def finish(self, reason: str) -> None:
        self.finish_reason = reason
        self._send(len(self.text))

    def _cut(self, at: int) -> None:
        """Cut the text before a stop string, and the ids to the fewest that still cover that text:
        exactly the text when the stop string starts on a token boundary, else up to the token that
        holds the boundary."""
        self.text = self.text[:at]
        while self.ids and self.tokenizer.decode(self.ids[:-1]).startswith(self.text):
            self.ids.pop()

    def _send(self, end: int) -> None:
        if end > self.sent:
            if self.emit:
                self.emit(self.text[self.sent : end])
            self.sent = end


def _stop_prefix_len(text: str, stop: list[str]) -> int:
    """Length of the longest end of `text` that could begin a stop string."""
    return max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
