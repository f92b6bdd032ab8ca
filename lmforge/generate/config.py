"""Decoding settings: one dataclass with Hugging Face `GenerationConfig` names."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lmforge.config import check


@dataclass
class GenerationConfig:
    max_new_tokens: int = 100
    do_sample: bool = True  # False: greedy, or beam search with num_beams > 1 (the warpers are unused)
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    # CTRL's penalty (Keskar et al. 2019) on every token already in prompt + continuation
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0  # 0: off
    # OpenAI's penalties over the generated tokens only: logits[t] -= presence * (count[t] > 0)
    # + frequency * count[t]; > 0 discourages repeats, < 0 encourages them
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_new_tokens: int = 0  # eos is forbidden until this many tokens are generated
    stop: list[str] = field(default_factory=list)  # stop strings; the text is cut before them
    num_return_sequences: int = 1
    seed: int | None = None  # None: a fresh random seed per call
    eos_token_id: int | None = None  # None: the tokenizer's end-of-text token, if it has one
    use_cache: bool = True  # False recomputes the whole sequence each step (for testing)
    # beam search (`lmforge.generate.beam`): keeps the num_beams most likely sequences each step
    num_beams: int = 1  # 1: no beam search (greedy or sampling)
    # a finished hypothesis scores sum(log-probs) / length ** length_penalty: > 0 favours longer
    # ones, < 0 shorter ones, 0 scores by the plain sum
    length_penalty: float = 1.0
    # when a prompt's search ends: True as soon as it has num_beams finished hypotheses; False when
    # no running beam can still beat them, judged at the current length; "never" judged at the
    # best length possible (with length_penalty > 0, max_new_tokens): the exact search
    early_stopping: bool | str = False
    # speculative decoding (`lmforge.generate.speculative`, used when a draft model is given): the
    # tokens the draft proposes before each verification pass of the target
    num_draft_tokens: int = 4
    # compile the one-token decode step (`lmforge.generate.fast`): a static-shape step that pays a
    # compilation per batch shape; greedy decoding and sampling only
    compile: bool = False

    def __post_init__(self) -> None:
        check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None:
            check(self.top_k >= 1, f"top_k must be >= 1 (or None to disable), got {self.top_k}")
        if self.top_p is not None:
            check(
                0 < self.top_p <= 1,
                f"top_p must be in (0, 1] (or None to disable), got {self.top_p}",
            )
        if self.min_p is not None:
            check(
                0 <= self.min_p < 1,
                f"min_p must be in [0, 1) (or None to disable), got {self.min_p}",
            )
        check(
            self.repetition_penalty > 0,
            f"repetition_penalty must be > 0, got {self.repetition_penalty}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            check(-2.0 <= value <= 2.0, f"{name} must be in [-2, 2] (OpenAI's range), got {value}")
        check(
            self.no_repeat_ngram_size >= 0,
            f"no_repeat_ngram_size must be >= 0 (0 disables it), got {self.no_repeat_ngram_size}",
        )
        if isinstance(self.stop, str):  # a single stop string is a common way to write it
            self.stop = [self.stop]
        check(all(self.stop), f"stop strings must not be empty, got {self.stop!r}")
        check(
            self.num_return_sequences >= 1,
            f"num_return_sequences must be >= 1, got {self.num_return_sequences}",
        )
        if self.eos_token_id is not None:
            check(self.eos_token_id >= 0, f"eos_token_id must be >= 0, got {self.eos_token_id}")
        check(
            self.min_new_tokens >= 0,
            f"min_new_tokens must be >= 0 (0 disables it), got {self.min_new_tokens}",
        )
        check(self.num_beams >= 1, f"num_beams must be >= 1 (1: no beam search), got {self.num_beams}")
        check(
            math.isfinite(self.length_penalty),
            f"length_penalty must be a finite number, got {self.length_penalty}",
        )
        check(
            isinstance(self.early_stopping, bool) or self.early_stopping == "never",
            f"early_stopping must be True, False or 'never', got {self.early_stopping!r}",
        )
        check(
            self.num_draft_tokens >= 1,
            f"num_draft_tokens must be >= 1, got {self.num_draft_tokens}",
        )
        if self.compile:
            check(
                self.num_beams == 1 and self.use_cache,
                "compile applies to the cached one-token step of greedy decoding and sampling: "
                f"it needs num_beams=1 and use_cache=True (got num_beams={self.num_beams}, "
                f"use_cache={self.use_cache})",
            )
        if self.num_beams > 1:
            check(
                not self.do_sample,
                f"num_beams={self.num_beams} with do_sample=True (beam sampling) is not supported: "
                "set do_sample=False for beam search, or num_beams=1 to sample",
            )
            check(
                self.presence_penalty == 0.0 and self.frequency_penalty == 0.0,
                "presence_penalty and frequency_penalty apply to greedy decoding and sampling, "
                f"not to beam search (num_beams={self.num_beams}); use repetition_penalty",
            )
            check(
                self.num_return_sequences <= self.num_beams,
                f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams "
                f"({self.num_beams}): beam search returns its best num_beams hypotheses at most",
            )
