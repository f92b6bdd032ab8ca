"""Beam search: follow the `num_beams` most likely sequences of each prompt, step by step.

This reproduces Hugging Face's `generate(num_beams=N, do_sample=False)` token for token:

- Each step every running beam proposes every token. A candidate's score is the sum of its
  tokens' log-probabilities; the penalties (repetition, n-gram ban, min_new_tokens) act on those
  log-probs, not on logits as in greedy decoding or sampling, since that is what HF does here.
- The best 2 * num_beams candidates of each prompt are kept. Candidates that end (in eos, or at
  max_new_tokens) become finished *hypotheses*, scored sum / length ** length_penalty, with length
  counting the new tokens and eos (so that long hypotheses are not lost for their many terms;
  Wu et al. 2016, section 7, normalise by a length term too). Only the best
  num_beams candidates may finish: the other half are spares, so that num_beams candidates which
  did not end are always left to run on (one eos token ends at most one candidate per beam).
- A prompt keeps its num_beams best hypotheses. Its search ends (`early_stopping`) when it has
  num_beams of them and, for True, at once; for False, when the best running beam, scored at the
  current length, cannot beat the worst of them; for "never", the same judged at the length most
  favourable to the running beam (max_new_tokens when length_penalty > 0), which never stops a
  search that could still improve. The call ends when every prompt's search has, or at
  max_new_tokens.

The model is reached only through `logits_for`, so the search knows nothing of KV caches or
architectures: `lmforge.generate.engine` drives a decoder-only LM with it, and the decoder of an
encoder-decoder fits the same step (its history is the decoder's tokens, from the start token).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lmforge.errors import LmforgeError
from lmforge.generate.config import GenerationConfig
from lmforge.generate.sampling import PAD, process_logits

# The score of a beam that must not be extended yet (HF's -1e9): finite, so that a few log-probs
# added to it still rank below any real beam without turning every such candidate into a tie.
UNLIKELY = -1e9

# logits_for(rows, history) -> (N, V): the next-token logits of N = prompts * num_beams beams.
# history (N, t): each beam's tokens so far, its prompt (PAD-padded) first and its newest token last.
# rows (N,): the row of the previous call (of the prompts' logits, before the first call) whose
# sequence each beam continues, so that per-sequence state such as a KV cache can follow it.
LogitsFor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Hypothesis:
    tokens: list[int]  # the continuation, without eos
    score: float  # sum of the (penalised) log-probs / (new tokens, eos included) ** length_penalty
    finish_reason: str  # "eos" | "length"


def beam_search(
    prompts: torch.Tensor,  # (B, T0) token ids, left-padded with PAD
    logits: torch.Tensor,  # (B, V) next-token logits after each prompt
    logits_for: LogitsFor,
    config: GenerationConfig,
) -> list[Hypothesis]:
    """The `num_return_sequences` best hypotheses of each prompt, best first, in prompt order."""
    B, T0 = prompts.shape
    K, C, V = config.num_beams, 2 * config.num_beams, logits.shape[-1]
    n_new, eos, lp = config.max_new_tokens, config.eos_token_id, config.length_penalty
    device = prompts.device
    neg_inf = float("-inf")

    # Running beams: tokens (prompt, then continuation, PAD after) and the sum of their log-probs.
    # A prompt's K beams start as copies of it, and only the first may be extended: otherwise the
    # first step would choose the same best tokens K times over.
    seqs = torch.full((B, K, T0 + n_new), PAD, dtype=torch.long, device=device)
    seqs[:, :, :T0] = prompts[:, None]
    scores = torch.full((B, K), UNLIKELY, device=device)
    scores[:, 0] = 0.0
    # Finished hypotheses: the K best so far of each prompt, best first. Empty slots score -inf.
    fin_seqs = seqs.clone()
    fin_scores = torch.full((B, K), neg_inf, device=device)
    fin_len = torch.zeros((B, K), dtype=torch.long, device=device)  # new tokens, eos included
    fin = torch.zeros((B, K), dtype=torch.bool, device=device)  # the slot holds a hypothesis
    searching = torch.ones(B, dtype=torch.bool, device=device)  # per prompt; once False, stays so
    may_finish = torch.arange(C, device=device) < K  # (C,): the best K candidates, not the spares
    first_beam = torch.arange(B, device=device)[:, None] * K  # (B, 1) flat index of beam 0

    logits = logits.repeat_interleave(K, dim=0)  # (B*K, V): a prompt's beams share its logits
    for step in range(n_new):
        t = T0 + step  # tokens per beam so far, padding included
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        logprobs = process_logits(logprobs, seqs[:, :, :t].reshape(B * K, t), config)
        if step < config.min_new_tokens and eos is not None and eos < V:
            logprobs[:, eos] = neg_inf  # HF's MinNewTokensLengthLogitsProcessor

        # every one-token extension of every beam, scored by its log-prob sum; keep the best C
        totals = (logprobs.view(B, K, V) + scores[:, :, None]).view(B, K * V)
        cand_scores, flat = totals.topk(C)  # (B, C), best first
        parent, token = flat // V, flat % V  # the beam (0..K-1) each extends, and its new token
        cands = _take(seqs, parent)  # (B, C, T0 + n_new)
        cands[:, :, t] = token
        ends = torch.full_like(token, step + 1 == n_new, dtype=torch.bool)
        if eos is not None:
            ends |= token == eos

        # Candidates that end join the finished hypotheses, unless the prompt's search is over:
        # no running beam can beat its hypotheses any more, or early_stopping=True and it has K.
        length = step + 1
        closed = ~searching | (fin.all(dim=1) & (config.early_stopping is True))  # (B,)
        enter = ends & may_finish & ~closed[:, None]  # (B, C)
        new_scores = (cand_scores / length**lp).masked_fill(~enter, neg_inf)
        merged = torch.cat([fin_scores, new_scores], dim=1)  # (B, K + C)
        best = merged.topk(K).indices  # (B, K), best first
        fin_scores = merged.gather(1, best)
        fin_seqs = _take(torch.cat([fin_seqs, cands], dim=1), best)
        fin_len = torch.cat([fin_len, torch.full_like(token, length)], dim=1).gather(1, best)
        fin = torch.cat([fin, enter], dim=1).gather(1, best)

        # the K best candidates that did not end run on
        live = cand_scores.masked_fill(ends, neg_inf)
        keep = live.topk(K).indices  # (B, K), best first
        seqs, scores, parent = _take(cands, keep), live.gather(1, keep), parent.gather(1, keep)

        # A prompt keeps searching while it has fewer than K hypotheses, or while its best running
        # beam, scored at the length most favourable to it that we consider, would beat the worst
        # of them: the current length (HF's heuristic: log-prob sums only fall as beams grow), or
        # with early_stopping="never" and length_penalty > 0, where a longer beam could rise,
        # max_new_tokens (an exact bound).
        best_length = n_new if config.early_stopping == "never" and lp > 0 else length
        best_possible = scores[:, 0] / best_length**lp
        searching &= ~fin.all(dim=1) | (best_possible > fin_scores.min(dim=1).values)
        if length == n_new or not searching.any() or (config.early_stopping is True and fin.all()):
            break

        # each kept beam continues its parent's sequence: tell the model which row that was
        rows = (parent + first_beam).view(-1)  # (B*K,) flat index of the parent beam
        if step == 0:
            rows = rows // K  # the state still has one row per prompt (its beams were copies)
        logits = logits_for(rows, seqs[:, :, : t + 1].reshape(B * K, t + 1))

    if not fin[:, : config.num_return_sequences].all():
        # only when the penalties ban nearly everything: continuations of score -inf lose to
        # empty slots
        raise LmforgeError(
            f"beam search found fewer than num_return_sequences={config.num_return_sequences} "
            f"hypotheses: every continuation is banned (no_repeat_ngram_size={config.no_repeat_ngram_size} "
            "over a small vocabulary?); lower no_repeat_ngram_size or num_return_sequences"
        )
    return _hypotheses(fin_seqs, fin_len, fin_scores, T0, config)


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` (B, k) of each prompt's beams in `x` (B, n, ...) -> (B, k, ...), copied."""
    return torch.take_along_dim(x, index.view(*index.shape, *[1] * (x.dim() - 2)), dim=1)


def _hypotheses(
    seqs: torch.Tensor, lengths: torch.Tensor, scores: torch.Tensor, T0: int, config: GenerationConfig
) -> list[Hypothesis]:
    out = []
    n, eos = config.num_return_sequences, config.eos_token_id
    for row_seqs, row_lens, row_scores in zip(
        seqs[:, :n].tolist(), lengths[:, :n].tolist(), scores[:, :n].tolist()
    ):
        for ids, length, score in zip(row_seqs, row_lens, row_scores):
            tokens = ids[T0 : T0 + length]
            if eos is not None and tokens[-1] == eos:
                out.append(Hypothesis(tokens[:-1], score, "eos"))
            else:
                out.append(Hypothesis(tokens, score, "length"))
    return out
