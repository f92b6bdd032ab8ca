"""Speculative decoding, greedy (Leviathan et al. 2023; Chen et al. 2023): a small draft model
proposes the next K tokens, the target scores all of them in one forward pass, and the longest
run of proposals that the target's own choice agrees with is kept, plus the target's next token.

The output is the target's greedy output, token for token: every token kept is the one the
target picks after exactly that history (penalties and `min_new_tokens` included); the draft
only decides how many of them one target pass yields, 1 to K+1. It pays where a target pass over
K+1 tokens costs about what a pass over one costs (decoding that is bound by reading the weights)
and the draft is much cheaper than the target and often right. Sampling would need the
rejection scheme of Leviathan et al. to keep the target's distribution; it is not implemented,
so a draft with `do_sample=True` or beam search is an error.

Per step, for a sequence of t tokens whose last one the target has not read yet:
  draft:  reads what its cache lacks, then proposes d_1 .. d_k one token at a time;
  target: reads [x_t, d_1 .. d_k] in one pass, giving its choice c_0 .. c_k after each;
  keep:   d_1 .. d_n for the longest n with c_{j-1} = d_j, then c_n (the correction, or a bonus
          token when all k were right): n + 1 new tokens;
  caches: both roll back (`KVCache.truncate`) to the t + n tokens they have read correctly.
k is K, or fewer near max_new_tokens, so that no pass produces more than is asked for.

With `compile=True` the draft's one-token steps run compiled (`lmforge.generate.fast`): a small
draft's step is mostly per-op overhead, which compilation removes, and the draft steps are a
large part of each iteration. Its cache then spans the draft's whole context, so the step
compiles once per draft, whatever the prompt's length. The target's passes stay eager: their
length varies from pass to pass, and they are bound by reading the target's weights.

Rows are decoded one after another, each with a batch of one: rows accept different numbers of
tokens, which a cache with one write position for the whole batch cannot follow. Tokens still
reach `on_step` one at a time, so eos, max_new_tokens and stop strings end a row exactly where
plain greedy decoding does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.generate.config import GenerationConfig
from lmforge.generate.engine import (
    StepCallback,
    _check_prompts,
    _decoding,
    _next_logits,
    forbid_early_eos,
)
from lmforge.generate.fast import static_decode_step
from lmforge.generate.sampling import PAD, next_tokens
from lmforge.nn import KVCache


@dataclass
class SpeculativeStats:
    """Counts over one or more speculative decodes (the target's prefill passes not counted)."""

    target_passes: int = 0  # verification passes of the target
    drafted: int = 0  # tokens the draft proposed
    accepted: int = 0  # proposed tokens the target agreed with

    @property
    def tokens_per_pass(self) -> float:
        """Mean tokens a verification pass yields: the accepted proposals plus the target's own
        token (1 = no gain over plain decoding, K+1 = every proposal accepted)."""
        return (self.accepted + self.target_passes) / self.target_passes if self.target_passes else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def as_dict(self) -> dict[str, float]:
        """The counts and the two rates, for JSON reports."""
        return {**asdict(self), "tokens_per_pass": self.tokens_per_pass, "acceptance_rate": self.acceptance_rate}

    def __str__(self) -> str:
        return (
            f"{self.tokens_per_pass:.2f} tokens per target pass ({self.target_passes} passes); "
            f"{self.accepted} of {self.drafted} drafted tokens accepted ({self.acceptance_rate:.0%})"
        )


def check_draft(target: nn.Module, draft: nn.Module, config: GenerationConfig) -> None:
    """Raise a user-facing error unless `draft` can speed up `target` under `config`."""
    if config.do_sample or config.num_beams > 1:
        raise LmforgeError(
            "speculative decoding returns the target's greedy output and supports greedy decoding "
            f"only: set do_sample=False (--greedy) and num_beams=1 (got do_sample={config.do_sample}, "
            f"num_beams={config.num_beams})"
        )
    for role, model in (("target", target), ("draft", draft)):
        if not hasattr(model, "new_kv_cache") or not hasattr(model.config, "block_size"):
            raise LmforgeError(
                f"speculative decoding needs decoder-only models (GPTs); the {role} is a "
                f"{type(model).__name__}"
            )
    if draft.config.vocab_size != target.config.vocab_size:
        raise LmforgeError(
            f"the draft's vocabulary ({draft.config.vocab_size} tokens) differs from the target's "
            f"({target.config.vocab_size}): the draft must use the target's tokenizer"
        )
    target_device, draft_device = (next(m.parameters()).device for m in (target, draft))
    if draft_device != target_device:
        raise LmforgeError(
            f"the draft is on {draft_device} and the target on {target_device}: put both on one device"
        )


def check_draft_tokenizer(tokenizer, draft_tokenizer) -> None:
    """The draft reads and writes the target's token ids, so both must map the same strings to
    the same ids (`check_draft` can only compare vocabulary sizes)."""
    if draft_tokenizer.backend.get_vocab(with_added_tokens=True) != tokenizer.backend.get_vocab(
        with_added_tokens=True
    ):
        raise LmforgeError(
            f"the draft's tokenizer ({draft_tokenizer.kind}, {draft_tokenizer.vocab_size} tokens) "
            f"differs from the target's ({tokenizer.kind}, {tokenizer.vocab_size} tokens): "
            "speculative decoding needs a draft trained with the target's tokenizer"
        )


def speculative_generate_ids(
    target: nn.Module,
    draft: nn.Module,
    prompt_ids: list[list[int]],
    config: GenerationConfig,
    *,
    on_step: StepCallback | None = None,
    stats: SpeculativeStats | None = None,
) -> tuple[list[list[int]], SpeculativeStats]:
    """The target's greedy continuations (what `generate_ids(target, ...)` returns), decoded
    with `draft`'s proposals; and the counts, added to `stats` when given.

    `on_step` is called once per token of each row, rows one after another: the current row's
    entry holds its token, every other entry is None."""
    check_draft(target, draft, config)
    _check_prompts(target, prompt_ids, config)
    needed = max(map(len, prompt_ids)) + config.max_new_tokens
    if draft.config.block_size < needed:
        raise LmforgeError(
            f"the draft's context ({draft.config.block_size} tokens, block_size) is shorter than the "
            f"longest prompt + max_new_tokens ({needed}); use a draft with a longer context or "
            "lower max_new_tokens"
        )
    stats = stats if stats is not None else SpeculativeStats()
    rows = [ids for ids in prompt_ids for _ in range(config.num_return_sequences)]

    def emitter(r: int) -> Callable[[int], bool]:
        def emit(token: int) -> bool:  # True when on_step ends the row
            if on_step is None:
                return False
            step: list[int | None] = [None] * len(rows)
            step[r] = token
            return r in set(on_step(step) or ())

        return emit

    with _decoding(target), _decoding(draft):
        out = [_decode_row(target, draft, ids, config, emitter(r), stats) for r, ids in enumerate(rows)]
    return out, stats


def _decode_row(
    target: nn.Module,
    draft: nn.Module,
    prompt: list[int],
    config: GenerationConfig,
    emit: Callable[[int], bool],
    stats: SpeculativeStats,
) -> list[int]:
    L = len(prompt)
    total = L + config.max_new_tokens
    device = next(target.parameters()).device
    tokens = torch.zeros(1, total, dtype=torch.long, device=device)  # prompt, then continuation
    tokens[0, :L] = torch.tensor(prompt, device=device)
    target_cache = target.new_kv_cache(1, total)
    draft_logits = _DraftSteps(draft, total, config.compile, device)

    def choose(logits: torch.Tensor, t: int) -> int:
        """The greedy choice (with the configured penalties) after tokens[:, :t]."""
        forbid_early_eos(logits, config, t - L)
        return int(next_tokens(logits, tokens[:, :t], config, prompt_len=L)[0])

    out: list[int] = []
    t = L  # tokens so far
    new = [choose(_next_logits(target, tokens[:, :t], False, target_cache), t)]  # the prefill's token
    while True:
        for token in new:
            tokens[0, t] = token
            t += 1
            ended = token == config.eos_token_id
            if not ended:
                out.append(token)
            if emit(token) or ended:
                return out
        if t == total:
            return out
        # the target has read tokens[:, :t-1]; its pass yields at most k + 1 of the total - t left
        k = min(config.num_draft_tokens, total - t - 1)
        for j in range(k):  # the draft's proposals go where they would be kept: tokens[:, t:t+k]
            tokens[0, t + j] = choose(draft_logits(tokens, t + j), t + j)
        proposals = tokens[0, t : t + k].tolist()
        logits = _pass(target, tokens[:, : t + k], target_cache)  # (k + 1, V): after x_t, d_1 .. d_k
        new = []
        for j in range(k + 1):
            new.append(choose(logits[j : j + 1], t + j))  # the history up to here was accepted
            if j == k or new[j] != proposals[j]:
                break
        n = len(new) - 1  # proposals accepted
        stats.target_passes += 1
        stats.drafted += k
        stats.accepted += n
        # both caches keep what they read of x_1 .. x_t, d_1 .. d_n, the tokens that stay
        target_cache.truncate(t + n)
        draft_logits.cache.truncate(min(draft_logits.cache.pos, t + n))


class _DraftSteps:
    """`draft_logits(tokens, n)`: the draft's logits (1, V) after tokens[:, :n], from its cache.

    Eager, the draft reads what its cache lacks in one pass. Compiled, the newest token goes
    through the static-shape step (`static_decode_step`), which reads its own PAD-filled copy of
    the tokens, as long as the draft's cache (and so the compiled shape); a draft that lags by
    more than one token (all proposals accepted) first catches up eagerly."""

    def __init__(self, draft: nn.Module, total: int, compiled: bool, device: torch.device):
        self.draft, self.compiled = draft, compiled
        self.cache = draft.new_kv_cache(1, draft.config.block_size if compiled else total)
        if compiled:
            self.static_tokens = torch.full((1, self.cache.max_len), PAD, dtype=torch.long, device=device)

    def __call__(self, tokens: torch.Tensor, n: int) -> torch.Tensor:
        if not self.compiled:
            return _next_logits(self.draft, tokens[:, :n], False, self.cache)
        read = self.cache.pos  # static_tokens[:, :read] already hold what the cache has read
        if read < n - 1:
            self.draft(tokens[:, read : n - 1], kv_cache=self.cache, last_only=True)
        self.static_tokens[0, read:n] = tokens[0, read:n]
        self.static_tokens[0, n:] = PAD  # rejected proposals of earlier passes are no tokens
        return static_decode_step(self.draft, self.cache, self.static_tokens, n)


def _pass(model: nn.Module, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits (T, V) after each of tokens[0, cache.pos:], the tokens the cache lacks, in one
    forward pass (a batch of one, unpadded: the positions are the defaults)."""
    return model(tokens[:, cache.pos :], kv_cache=cache)[0]
