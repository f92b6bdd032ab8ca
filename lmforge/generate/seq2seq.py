"""Decoding for the encoder-decoder model (`lmforge.models.EncoderDecoder`): greedy, sampling and
beam search, on token ids (`generate_seq2seq_ids`) or text (`translate`).

The sources are right-padded into one batch with an attention mask, encoded once, and their
cross-attention keys/values projected once (`model.cross_kv`). The decoder then starts every row
from `decoder_start_token_id` and feeds one token per step through its self-attention KV cache.
Unlike a decoder-only prompt, the decoder's history is never padded: all rows start together at
position 0, so the cache's one write position fits every row as it is.

What Hugging Face does for encoder-decoders, and so this does too: the logits processors
(repetition penalty, n-gram ban) read the decoder's tokens, the start token included, never the
source; min_new_tokens and max_new_tokens count generated tokens; a beam's length for
length_penalty counts its new tokens and eos. Beam search is `lmforge.generate.beam`'s, with the
start token as every source's one-token "prompt".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from lmforge.errors import LmforgeError
from lmforge.generate.beam import Hypothesis, beam_search
from lmforge.generate.config import GenerationConfig
from lmforge.generate.engine import Generation, StepCallback, _decoding, _Detokenizer, fill_streams
from lmforge.generate.sampling import next_tokens, sequence_generator
from lmforge.models.encoder_decoder import EncoderDecoder
from lmforge.nn import CrossKV, KVCache


def generate_seq2seq_ids(
    model: EncoderDecoder,
    source_ids: list[list[int]],
    config: GenerationConfig,
    *,
    max_source_length: int | None = None,
) -> list[list[int]]:
    """The target ids for each source, `num_return_sequences` per source in source order (with
    beam search, each source's best hypotheses, best first); without the start token and eos.

    eos is `config.eos_token_id`, else the model's. Sources longer than `max_source_length` (or
    than the model's positions, unless they are relative) are refused, never truncated."""
    if config.num_beams > 1:
        hyps = generate_seq2seq_hypotheses(
            model, source_ids, config, max_source_length=max_source_length
        )
        return [h.tokens for h in hyps]
    config = _checked(model, source_ids, config, max_source_length)
    with _decoding(model):
        return _decode(model, source_ids, config, on_step=None)


def generate_seq2seq_hypotheses(
    model: EncoderDecoder,
    source_ids: list[list[int]],
    config: GenerationConfig,
    *,
    max_source_length: int | None = None,
) -> list[Hypothesis]:
    """Beam search (`num_beams > 1`): each source's `num_return_sequences` best hypotheses, best
    first, with their scores (HF's `sequences_scores`) and finish reasons."""
    if config.num_beams == 1:
        raise LmforgeError(
            "generate_seq2seq_hypotheses is beam search: set num_beams > 1, or use "
            "generate_seq2seq_ids for greedy decoding and sampling"
        )
    config = _checked(model, source_ids, config, max_source_length)
    with _decoding(model):
        return _beam_decode(model, source_ids, config)


# --- checks ---------------------------------------------------------------------------------------
def _check_model(model) -> None:
    if not isinstance(model, EncoderDecoder):
        raise LmforgeError(
            f"sequence-to-sequence decoding needs an encoder-decoder model (EncoderDecoder); this is "
            f"a {type(model).__name__}"
            + (
                " (decoder-only models continue text: use generate)"
                if hasattr(model, "new_kv_cache")
                else ""
            )
        )


def _checked(
    model: EncoderDecoder,
    source_ids: list[list[int]],
    config: GenerationConfig,
    max_source_length: int | None,
) -> GenerationConfig:
    """Refuse what the model cannot decode, naming the problem and the valid range; returns the
    config with the model's eos filled in when the config has none."""
    _check_model(model)
    c = model.config
    if not source_ids:
        raise LmforgeError("no sources given: pass at least one source")
    if max_source_length is not None and max_source_length < 1:
        raise LmforgeError(
            f"max_source_length must be >= 1 (or None for no limit), got {max_source_length}"
        )
    # learned and sinusoidal positions end at max_position; T5's relative bias has no end
    positions = None if c.position == "relative" else c.max_position
    for i, ids in enumerate(source_ids):
        if not ids:
            raise LmforgeError(f"source {i} is empty: a source needs at least one token")
        bad = [t for t in ids if not 0 <= t < c.vocab_size]
        if bad:
            raise LmforgeError(
                f"source {i} has token id {bad[0]}, outside the model's vocabulary [0, {c.vocab_size}) "
                "(is this the model's own tokenizer?)"
            )
        # too long: an error rather than a silent cut, which would translate part of the text
        if max_source_length is not None and len(ids) > max_source_length:
            raise LmforgeError(
                f"source {i} has {len(ids)} tokens, more than max_source_length={max_source_length}; "
                "sources are not truncated: shorten or split it"
            )
        if positions is not None and len(ids) > positions:
            raise LmforgeError(
                f"source {i} has {len(ids)} tokens, more than the model's {positions} positions "
                f"(max_position, {c.position}); sources are not truncated: shorten or split it"
            )
    # the decoder's sequence is the start token and then up to max_new_tokens tokens
    n_new = config.max_new_tokens
    if positions is not None and n_new + 1 > positions:
        raise LmforgeError(
            f"max_new_tokens ({n_new}) + the decoder start token = {n_new + 1} tokens exceeds the "
            f"model's {positions} positions (max_position, {c.position}); lower max_new_tokens to "
            f"at most {positions - 1}"
        )
    if config.eos_token_id is None and c.eos_token_id is not None:
        config = dataclasses.replace(config, eos_token_id=c.eos_token_id)
    return config


# --- decoding -------------------------------------------------------------------------------------
def _encode(
    model: EncoderDecoder, source_ids: list[list[int]]
) -> tuple[CrossKV, torch.Tensor | None]:
    """Right-pad and encode the sources once: every decoder layer's cross-attention keys/values
    and the source mask (B, S), None when no source is padded (the unmasked fast path)."""
    device = model.lm_head.weight.device
    B, S = len(source_ids), max(map(len, source_ids))
    ids = torch.full((B, S), model.config.pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, S), dtype=torch.long, device=device)
    for r, row in enumerate(source_ids):
        ids[r, : len(row)] = torch.tensor(row, device=device)
        mask[r, : len(row)] = 1
    mask = mask if any(len(row) < S for row in source_ids) else None
    return model.cross_kv(model.encode(ids, mask)), mask


def _next_logits(
    model: EncoderDecoder,
    history: torch.Tensor,  # (N, t) decoder tokens so far, from the start token
    cross: CrossKV,
    source_mask: torch.Tensor | None,  # (N, S)
    cache: KVCache | None,
) -> torch.Tensor:
    """Next-token logits (N, V): the decoder gets the tokens its cache lacks (all without one)."""
    start = cache.pos if cache is not None else 0
    logits = model.decode(
        history[:, start:], encoder_mask=source_mask, kv_cache=cache, cross_kv=cross, last_only=True
    )
    return logits[:, -1]


def _decode(
    model: EncoderDecoder,
    source_ids: list[list[int]],
    config: GenerationConfig,
    on_step: StepCallback | None,
) -> list[list[int]]:
    """Greedy decoding or sampling, `num_return_sequences` rows per source; `on_step` as in
    `lmforge.generate.engine.generate_ids`."""
    device = model.lm_head.weight.device
    n = config.num_return_sequences
    cross, source_mask = _encode(model, source_ids)
    if n > 1:  # a source's rows share its encoding: repeat the keys/values, not the encoder
        rows = torch.arange(len(source_ids), device=device).repeat_interleave(n)
        cross.reorder(rows)
        source_mask = None if source_mask is None else source_mask[rows]
    B, total = len(source_ids) * n, config.max_new_tokens + 1
    # the decoder's whole history: the start token, then each step's token
    tokens = torch.full(
        (B, total), model.config.decoder_start_token_id, dtype=torch.long, device=device
    )

    # one random stream per row (seed + its index among its source's rows), as offline decoder-only
    # generation does: a source's samples do not depend on the sources batched with it
    generators = [sequence_generator(config.seed, r % n, device) for r in range(B)] if config.do_sample else None
    cache = model.new_kv_cache(B, total) if config.use_cache else None

    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    eos = config.eos_token_id
    logits = _next_logits(model, tokens[:, :1], cross, source_mask, cache)  # (B, V)
    for t in range(1, total):  # t tokens in the history, t - 1 of them generated
        if t - 1 < config.min_new_tokens and eos is not None and eos < logits.shape[-1]:
            logits[:, eos] = float("-inf")  # HF's MinNewTokensLengthLogitsProcessor
        # finished rows are still fed (the start token), but sample nothing and stay frozen
        alive = torch.tensor([not d for d in done], device=device)
        new = tokens[:, t]  # a view: filling it writes the history
        live = [g for g, d in zip(generators, done) if not d] if generators else None
        # the start token opens every history and is not a generated token (presence/frequency)
        new[alive] = next_tokens(logits[alive], tokens[alive, :t], config, live, prompt_len=1)

        step: list[int | None] = [None if d else tok for d, tok in zip(done, new.tolist())]
        for r, tok in enumerate(step):
            if tok is None:
                continue
            if tok == eos:
                done[r] = True
            else:
                out[r].append(tok)
        for r in (on_step(step) if on_step else None) or ():
            done[r] = True
        if all(done) or t + 1 == total:
            break
        logits = _next_logits(model, tokens[:, : t + 1], cross, source_mask, cache)
    return out


def _beam_decode(
    model: EncoderDecoder, source_ids: list[list[int]], config: GenerationConfig
) -> list[Hypothesis]:
    """`beam_search` over the decoder: every source's "prompt" is the start token, and the state
    that must follow the beams is the self-attention cache and, once, the source's encoding."""
    cross, source_mask = _encode(model, source_ids)
    B, device = len(source_ids), model.lm_head.weight.device
    start = torch.full((B, 1), model.config.decoder_start_token_id, dtype=torch.long, device=device)
    cache = model.new_kv_cache(B, config.max_new_tokens + 1) if config.use_cache else None
    expanded = False

    def logits_for(rows: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        nonlocal source_mask, expanded
        if cache is not None:
            cache.reorder(rows)  # (B, ...) -> (B * num_beams, ...) at the first step
        if not expanded:
            # Each source's one row becomes its num_beams beams. Later reorders move beams only
            # among the same source's beams, whose cross keys/values and mask are all the same,
            # so there is nothing to copy again (HF reorders its cross-attention cache anyway).
            cross.reorder(rows)
            source_mask = None if source_mask is None else source_mask[rows]
            expanded = True
        return _next_logits(model, history, cross, source_mask, cache)

    return beam_search(
        start, _next_logits(model, start, cross, source_mask, cache), logits_for, config
    )


# --- text -----------------------------------------------------------------------------------------
class _SpecialTokensSkipped:
    """A tokenizer whose `decode` drops special tokens (T5's padding, unknown, sentinels), as
    translation output should; `_Detokenizer` only calls `decode`."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def translate(
    model: EncoderDecoder,
    tokenizer,
    texts: str | list[str],
    config: GenerationConfig,
    *,
    batch_size: int = 32,
    max_source_length: int | None = None,
    source_tokenizer=None,
) -> list[Generation]:
    """Decode each text into its target text; `num_return_sequences` results per text, in input
    order (with beam search, each text's best hypotheses, best first).

    Each source ends in eos (the model's, else the tokenizer's), as T5 and Marian were trained.
    Texts run in batches of `batch_size`, sorted by length so that a batch pads little. Stop
    strings cut the text before them (finish_reason "stop"); with beam search they cut the
    chosen hypotheses and do not end hypotheses during the search. `tokenizer` writes the
    targets; `source_tokenizer` (a checkpoint's, when its sides have separate vocabularies)
    reads the sources, else `tokenizer` does both."""
    _check_model(model)
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise LmforgeError("no texts given: pass at least one text")
    if batch_size < 1:
        raise LmforgeError(f"batch_size must be >= 1, got {batch_size}")
    eos = model.config.eos_token_id if model.config.eos_token_id is not None else tokenizer.eos_id
    if config.eos_token_id is None and eos is not None:
        config = dataclasses.replace(config, eos_token_id=eos)
    # a model trained with separate vocabularies reads its sources with the source side's own
    encoded = (source_tokenizer or tokenizer).encode_batch(texts)
    sources = [ids + [eos] if eos is not None else ids for ids in encoded]
    # check every source before the first batch runs, so that a bad text late in the list fails fast
    config = _checked(model, sources, config, max_source_length)

    n, decoder = config.num_return_sequences, _SpecialTokensSkipped(tokenizer)
    results: list[list[Generation]] = [[] for _ in texts]
    order = sorted(range(len(texts)), key=lambda i: len(sources[i]))
    with _decoding(model):
        for first in range(0, len(order), batch_size):
            batch = order[first : first + batch_size]
            streams = [_Detokenizer(decoder, config.stop, None) for _ in range(len(batch) * n)]
            rows = [sources[i] for i in batch]
            fill_streams(
                streams,
                config,
                beams=lambda rows=rows: _beam_decode(model, rows, config),
                decode=lambda on_step, rows=rows: _decode(model, rows, config, on_step),
            )
            for j, i in enumerate(batch):
                for s in streams[j * n : (j + 1) * n]:
                    results[i].append(
                        Generation(texts[i], s.text, s.ids, sources[i], s.finish_reason or "length")
                    )
    return [g for per_text in results for g in per_text]
