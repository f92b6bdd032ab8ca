"""Continuous batching: many requests decoded together, joining and leaving between steps.

One background thread owns the model and the KV cache; any thread (the web server's event loop)
hands it requests with `Engine.submit`, and hears back through an `on_event` callback, called from
the engine thread once per token and once at the end. Between two decode steps the scheduler

1. ends the sequences that were cancelled (the client left) or ran past their deadline;
2. admits waiting requests into free rows, up to `max_batch_size`: each prompt is prefilled
   alone (a batch of one, no padding: exactly what offline `generate` does for one prompt) and
   its keys/values are copied into the shared cache;
3. samples one token for every running sequence from its own logits, with its own settings,
   its own history for the penalties and its own `torch.Generator` (seeded as offline: seed +
   its index among a prompt's sequences), so its tokens are the ones offline `generate` gives
   it alone, whatever it is batched with;
4. lets finished sequences leave (end of text, stop string, `max_new_tokens`);
5. feeds every remaining sequence its new token in one forward pass.

The cache is one slab (n_layer, max_batch_size, H_kv, max_len, D). Running sequences occupy rows
0..n-1 (a leaving sequence's row is refilled with the last row, so the batch stays a prefix of the
slab and a forward pass reads a view of it). All rows share one write position `pos`, as in
offline batched decoding: a row's tokens are right-aligned, in columns [start, pos), and the left
padding before `start` is masked out, with positions counting real tokens only. A prompt longer
than `pos` shifts every row right to make room; when `pos` reaches the end of the slab, every row
shifts left by the padding they all share.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.generate.config import GenerationConfig
from lmforge.generate.engine import _check_prompts, _Detokenizer, _next_logits
from lmforge.generate.sampling import next_tokens, sequence_generator, token_logprobs
from lmforge.nn import KVCache

log = logging.getLogger(__name__)

# the reasons a sequence ends, in offline `generate`'s words plus the server's own; OpenAI's API
# knows "stop" (end of text or a stop string) and "length"
FINISH_REASONS = ("eos", "stop", "length", "cancelled", "timeout", "error")


def openai_finish_reason(reason: str) -> str:
    return "stop" if reason == "eos" else reason


class QueueFull(LmforgeError):
    """The engine holds as many requests as it may; `retry_after` estimates, in whole seconds,
    when a place should be free (HTTP 429 with a Retry-After header)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Event:
    """What a sequence produced: one event per new token, then a last one with `finish_reason`."""

    token_id: int | None  # the new token; None in the last event
    text: str  # the text that became final with this token (it may be "", see `_Detokenizer`)
    logprob: float | None = None  # the token's log-probability, when logprobs were asked for
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), most likely first
    finish_reason: str | None = None  # in the last event only: OpenAI's "stop" | "length", or
    # "cancelled" | "timeout" | "error"
    time: float = field(default_factory=time.perf_counter)  # perf_counter seconds, for latency metrics


class SequenceHandle:
    """A submitted request, as its submitter sees it. After the last event, `token_ids`, `text`
    and `finish_reason` are what offline `generate` returns for the same prompt and settings."""

    def __init__(
        self, engine: Engine, prompt_ids: list[int], config: GenerationConfig,
        on_event: Callable[[Event], None], choice: int, logprobs: int | None, timeout: float | None,
    ):
        self.prompt_ids, self.config, self.choice, self.logprobs = prompt_ids, config, choice, logprobs
        self.submitted_at = time.perf_counter()
        self.deadline = None if timeout is None else self.submitted_at + timeout
        self.first_token_at: float | None = None
        self.completion_tokens = 0  # tokens sampled, an end-of-text token included
        self.finish_reason: str | None = None  # one of FINISH_REASONS once finished
        self.error: str | None = None  # what went wrong, with finish_reason "error"
        self._engine, self._on_event = engine, on_event
        self._cancelled = False
        self._done = threading.Event()
        self._pieces: list[str] = []  # text the detokenizer made final since the last event
        self._detok = _Detokenizer(engine.tokenizer, config.stop, self._pieces.append)

    @property
    def token_ids(self) -> list[int]:
        """The continuation's ids, without end-of-text, cut after a stop string as offline."""
        return self._detok.ids

    @property
    def text(self) -> str:
        return self._detok.text

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """End the sequence (the client went away): it finishes with "cancelled" before the next
        step and frees its row."""
        self._cancelled = True
        self._engine._notify()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the sequence finishes; False when `timeout` seconds pass first."""
        return self._done.wait(timeout)

    def _take_text(self) -> str:
        text = "".join(self._pieces)
        self._pieces.clear()
        return text


@dataclass
class _Row:
    """A running sequence's decoding state."""

    seq: SequenceHandle
    start: int  # cache column of its first token: columns [start, pos) hold its keys/values
    logits: torch.Tensor  # (V,) next-token logits, not yet sampled from
    history: torch.Tensor  # (1, prompt + max_new_tokens) prompt and sampled tokens, for the processors
    generator: torch.Generator | None  # None when greedy
    n_new: int = 0  # tokens sampled so far

    @property
    def length(self) -> int:  # tokens so far, prompt included
        return len(self.seq.prompt_ids) + self.n_new


class _Rows(KVCache):
    """The first n rows of the engine's cache, as the KVCache a forward pass writes into: views,
    so that the model's writes land in the engine's slab."""

    def __init__(self, slab: KVCache, n: int, pos: int):  # no super().__init__: it would allocate
        self.k, self.v = slab.k[:, :n], slab.v[:, :n]  # (n_layer, n, H_kv, max_len, D)
        self.max_len, self.pos = slab.max_len, pos


class Engine:
    """Continuous batching over a decoder-only model (a GPT); see the module docstring.

    `max_len` bounds prompt + new tokens per sequence (default and at most the model's context);
    at most `max_batch_size` sequences decode together, and at most `max_queue` more wait for a
    row, beyond which `submit` raises `QueueFull`. `start=False` leaves the decode thread to
    `start()` (tests fill the queue deterministically that way).
    """

    def __init__(
        self, model: nn.Module, tokenizer, *, max_batch_size: int = 16, max_queue: int = 64,
        max_len: int | None = None, start: bool = True,
    ):
        if not hasattr(model, "new_kv_cache") or not hasattr(model.config, "block_size"):
            raise LmforgeError(
                f"the serving engine decodes decoder-only models (a GPT); this is a {type(model).__name__}, "
                "which it does not serve yet"
            )
        if max_batch_size < 1:
            raise LmforgeError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue < 0:
            raise LmforgeError(f"max_queue must be >= 0, got {max_queue}")
        context = model.config.block_size
        if max_len is not None and not 2 <= max_len <= context:
            raise LmforgeError(f"max_len must be in [2, {context}] (the model's context), got {max_len}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.max_len = max_len or context
        self.device = next(model.parameters()).device
        self._slab = model.new_kv_cache(max_batch_size, self.max_len)
        self._pos = 0  # the shared write position: every row's tokens end here
        self._rows: list[_Row] = []  # running sequences, row r of the slab is self._rows[r]
        self._waiting: collections.deque[SequenceHandle] = collections.deque()
        self._lock = threading.Condition()  # guards _waiting and _closed; wakes the idle loop
        self._closed = False
        self.tokens_generated = 0  # counters for metrics
        self.requests_finished = 0
        self._seconds_per_request: float | None = None  # moving average, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
        if start:
            self.start()

    # --- the submitter's side (any thread) -----------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._rows)

    def submit(
        self,
        prompt_ids: list[int],
        config: GenerationConfig,
        on_event: Callable[[Event], None],
        *,
        choice: int = 0,
        logprobs: int | None = None,
        timeout: float | None = None,
    ) -> SequenceHandle:
        """Queue one sequence: `prompt_ids` continued under `config`, as the `choice`-th of the
        prompt's sequences (seeded `config.seed + choice`; `num_return_sequences` is ignored:
        submit one per choice). `logprobs` (an int k >= 0) adds the token's log-probability and
        the k most likely alternatives to each event. `timeout` (seconds from now) ends it with
        "timeout". Raises LmforgeError for a request that cannot run, QueueFull when full."""
        if config.num_beams > 1:
            raise LmforgeError(
                "the serving engine samples or decodes greedily; beam search (num_beams > 1) is offline only"
            )
        _check_prompts(self.model, [prompt_ids], config)
        if len(prompt_ids) + config.max_new_tokens > self.max_len:
            raise LmforgeError(
                f"the prompt ({len(prompt_ids)} tokens) + max_new_tokens ({config.max_new_tokens}) = "
                f"{len(prompt_ids) + config.max_new_tokens} tokens exceeds the server's limit of "
                f"{self.max_len} tokens"
            )
        if config.eos_token_id is None and self.tokenizer.eos_id is not None:  # as offline `generate`
            config = dataclasses.replace(config, eos_token_id=self.tokenizer.eos_id)
        handle = SequenceHandle(self, list(prompt_ids), config, on_event, choice, logprobs, timeout)
        with self._lock:
            if self._closed:
                raise LmforgeError("the engine is closed")
            # requests that will get a free row at the next step do not count as queued
            free = self.max_batch_size - len(self._rows)
            if len(self._waiting) >= self.max_queue + max(free, 0):
                raise QueueFull(
                    f"the server is busy: {len(self._rows)} sequences running and {len(self._waiting)} "
                    "waiting; retry later",
                    self._retry_after(),
                )
            self._waiting.append(handle)
            self._lock.notify()
        return handle

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop the decode thread; unfinished sequences end with "cancelled" (their last events
        come from the thread that calls `close`)."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        if self._thread.is_alive():
            self._thread.join()
        for seq in [row.seq for row in self._rows] + list(self._waiting):
            self._finish(seq, "cancelled")
        self._rows.clear()
        self._waiting.clear()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _notify(self) -> None:
        with self._lock:
            self._lock.notify()

    def _retry_after(self) -> int:
        # the waiting requests ahead are served max_batch_size at a time, each batch taking
        # about one request's recent duration
        per_request = self._seconds_per_request or 1.0
        return max(1, math.ceil(per_request * (1 + len(self._waiting) / self.max_batch_size)))

    # --- the engine thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not (self._closed or self._waiting or self._rows):
                        self._lock.wait()
                    if self._closed:
                        return
                try:
                    self._step()
                except Exception as e:  # a failed step ends what it touched, never the engine
                    log.exception("decoding step failed")
                    for row in self._rows:
                        self._finish(row.seq, "error", error=f"{type(e).__name__}: {e}")
                    self._rows.clear()
                    self._pos = 0

    def _step(self) -> None:
        now = time.perf_counter()
        # 1. the client left, or the deadline passed
        for row in list(self._rows):
            reason = _ended(row.seq, now)
            if reason:
                self._leave(row, reason)
        with self._lock:
            ended = [(s, _ended(s, now)) for s in self._waiting]
            self._waiting = collections.deque(s for s, reason in ended if not reason)
        for seq, reason in ended:
            if reason:
                self._finish(seq, reason)
        # 2. admit waiting requests into free rows
        while len(self._rows) < self.max_batch_size:
            with self._lock:
                if not self._waiting:
                    break
                seq = self._waiting.popleft()
            try:
                self._admit(seq)
            except Exception as e:
                log.exception("prefill failed")
                self._finish(seq, "error", error=f"{type(e).__name__}: {e}")
        # 3. and 4. one token each; the finished leave
        for row in list(self._rows):
            reason = self._sample(row)
            if reason:
                self._leave(row, reason)
        # 5. feed the new tokens
        if self._rows:
            self._feed()

    def _admit(self, seq: SequenceHandle) -> None:
        """Prefill `seq`'s prompt alone, then copy its keys/values into the next free row so that
        they end at `pos`, shifting the other rows right first if the prompt is longer."""
        P = len(seq.prompt_ids)
        prompt = torch.tensor([seq.prompt_ids], device=self.device)  # (1, P)
        cache = self.model.new_kv_cache(1, P)
        logits = _next_logits(self.model, prompt, False, cache)  # (1, V), as offline for one prompt
        if not self._rows:
            self._pos = P
        elif P > self._pos:
            self._shift(P - self._pos)
        r, pos = len(self._rows), self._pos
        self._slab.k[:, r, :, pos - P : pos] = cache.k[:, 0]  # (n_layer, H_kv, P, D)
        self._slab.v[:, r, :, pos - P : pos] = cache.v[:, 0]
        history = torch.zeros(1, P + seq.config.max_new_tokens, dtype=torch.long, device=self.device)
        history[0, :P] = prompt[0]
        generator = None
        if seq.config.do_sample:
            generator = sequence_generator(seq.config.seed, seq.choice, self.device)
        self._rows.append(_Row(seq, pos - P, logits[0], history, generator))

    def _sample(self, row: _Row) -> str | None:
        """Draw `row`'s next token exactly as offline decoding does for one sequence, and tell
        the submitter; returns the finish reason when the sequence is done."""
        seq, config, t = row.seq, row.seq.config, row.length
        raw = row.logits[None]  # (1, V)
        logits = raw.clone()
        eos = config.eos_token_id
        if row.n_new < config.min_new_tokens and eos is not None and eos < logits.shape[-1]:
            logits[:, eos] = float("-inf")  # as offline (HF's MinNewTokensLengthLogitsProcessor)
        generators = [row.generator] if row.generator is not None else None
        token = next_tokens(logits, row.history[:, :t], config, generators, prompt_len=len(seq.prompt_ids))
        row.history[0, t] = token[0]
        row.n_new += 1
        seq.completion_tokens += 1
        self.tokens_generated += 1
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        tok = int(token[0])
        if tok == eos:  # end of text: not part of the continuation, as offline
            return "eos"
        logprob = top = None
        if seq.logprobs is not None:
            chosen, values, ids = token_logprobs(raw, token, seq.logprobs)
            logprob = float(chosen[0])
            top = list(zip(ids[0].tolist(), values[0].tolist(), strict=True))
        stopped = seq._detok.add(tok)  # True: the text now holds a stop string, cut before it
        _emit(seq, Event(tok, seq._take_text(), logprob, top))
        if stopped:
            return "stop"
        if row.n_new == config.max_new_tokens:
            return "length"
        return None

    def _feed(self) -> None:
        """One forward pass over every running row's newest token, (n, 1) -> logits (n, V)."""
        if self._pos == self.max_len:
            # Every row holds at most max_len - 2 tokens here (submit keeps prompt + new tokens
            # within max_len, and the last token is sampled, never fed), so all share some padding.
            self._shift(-min(row.start for row in self._rows))
        n, pos = len(self._rows), self._pos
        starts = torch.tensor([row.start for row in self._rows], device=self.device)  # (n,)
        new = torch.stack([row.history[0, row.length - 1] for row in self._rows])[:, None]  # (n, 1)
        # each row attends to its own tokens and the new one; positions count its real tokens
        mask = torch.arange(pos + 1, device=self.device)[None] >= starts[:, None]  # (n, pos + 1)
        logits = self.model(
            new, attention_mask=mask, position_ids=(pos - starts)[:, None],
            kv_cache=_Rows(self._slab, n, pos), last_only=True,
        )[:, -1]  # (n, V)
        self._pos = pos + 1
        for row, row_logits in zip(self._rows, logits, strict=True):
            row.logits = row_logits

    def _shift(self, by: int) -> None:
        """Move every running row's keys/values `by` columns (right > 0, left < 0); `pos` and the
        rows' starts follow."""
        n, lo, pos = len(self._rows), min(row.start for row in self._rows), self._pos
        for t in (self._slab.k, self._slab.v):
            # a copy first: the source and destination columns overlap
            t[:, :n, :, lo + by : pos + by] = t[:, :n, :, lo:pos].clone()
        for row in self._rows:
            row.start += by
        self._pos += by

    def _leave(self, row: _Row, reason: str) -> None:
        """Finish `row`'s sequence and free its row: the last row moves into its place."""
        r, last = self._rows.index(row), len(self._rows) - 1
        if r != last:
            for t in (self._slab.k, self._slab.v):
                t[:, r, :, : self._pos] = t[:, last, :, : self._pos]
            self._rows[r] = self._rows[last]
        self._rows.pop()
        if not self._rows:
            self._pos = 0
        self._finish(row.seq, reason)

    def _finish(self, seq: SequenceHandle, reason: str, error: str | None = None) -> None:
        if seq.finished:
            return
        seq._detok.finish(reason)  # the text held back (a possible stop string) is final now
        seq.finish_reason, seq.error = reason, error
        self.requests_finished += 1
        seconds = time.perf_counter() - seq.submitted_at
        avg = self._seconds_per_request
        self._seconds_per_request = seconds if avg is None else 0.9 * avg + 0.1 * seconds
        _emit(seq, Event(None, seq._take_text(), finish_reason=openai_finish_reason(reason)))
        seq._done.set()


def _ended(seq: SequenceHandle, now: float) -> str | None:
    if seq._cancelled:
        return "cancelled"
    if seq.deadline is not None and now >= seq.deadline:
        return "timeout"
    return None


def _emit(seq: SequenceHandle, event: Event) -> None:
    try:
        seq._on_event(event)
    except Exception:  # the submitter's callback failing must not stop the other sequences
        log.exception("on_event callback failed")
