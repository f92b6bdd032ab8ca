"""Decoding settings: one dataclass with Hugging Face `GenerationConfig` names."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.config import check


@dataclass
class GenerationConfig:
    max_new_tokens: int = 100
    do_sample: bool = True  # False: greedy (argmax after the penalties; the warpers are unused)
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    # CTRL's penalty (Keskar et al. 2019) on every token already in prompt + continuation
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0  # 0: off
    stop: list[str] = field(default_factory=list)  # stop strings; the text is cut before them
    num_return_sequences: int = 1
    seed: int | None = None  # None: a fresh random seed per call
    eos_token_id: int | None = None  # None: the tokenizer's end-of-text token, if it has one
    use_cache: bool = True  # False recomputes the whole sequence each step (for testing)

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
