"""T5's span corruption (Raffel et al. 2020, section 3.1.4): unsupervised encoder-decoder
pretraining on plain text.

A window of raw tokens is cut into alternating kept and noise spans: about `noise_density` (15%)
of the tokens are noise, in spans of `mean_noise_span_length` (3) tokens on average, the first
span always kept. The encoder reads the kept tokens with each noise span replaced by one sentinel
(<extra_id_0>, <extra_id_1>, ... in order), the decoder writes each sentinel followed by the span
it stands for; both end in </s>:

    raw      Thank you for inviting me to your party last week .
    inputs   Thank you <extra_id_0> me to your party <extra_id_1> week . </s>
    targets  <extra_id_0> for inviting <extra_id_1> last </s>

The span lengths follow T5's `random_spans_noise_mask` (a random segmentation of the noise and of
the kept tokens into the same number of spans), and `raw_length` the HF/T5 recipe that picks the
raw window so that the corrupted input is exactly `inputs_length` tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lmforge.data.loader import RandomBatches, TokenData
from lmforge.data.parallel import seq2seq_batch
from lmforge.errors import LmforgeError


def _lengths(raw: int, noise_density: float, mean_span: float) -> tuple[int, int, int]:
    """(noise tokens, noise spans, inputs length incl. </s>) for a raw window of `raw` tokens."""
    n_noise = min(max(int(round(raw * noise_density)), 1), raw - 1)
    n_spans = max(int(round(n_noise / mean_span)), 1)
    return n_noise, n_spans, raw - n_noise + n_spans + 1


def raw_length(inputs_length: int, noise_density: float = 0.15, mean_span: float = 3.0) -> int:
    """The longest raw window whose corrupted input (sentinels and </s> included) fits
    `inputs_length` tokens (T5's `compute_input_and_target_lengths`)."""
    raw = inputs_length
    while _lengths(raw + 1, noise_density, mean_span)[2] <= inputs_length:
        raw += 1
    while raw > 2 and _lengths(raw, noise_density, mean_span)[2] > inputs_length:
        raw -= 1
    return raw


def _segment(n_items: int, n_segments: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random split of n_items into n_segments non-empty parts (their lengths)."""
    cuts = np.sort(rng.choice(np.arange(1, n_items), n_segments - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [n_items]]))


def noise_mask(length: int, noise_density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    """(length,) bool, True for noise tokens; kept and noise spans alternate, kept first."""
    n_noise, n_spans, _ = _lengths(length, noise_density, mean_span)
    n_spans = min(n_spans, n_noise, length - n_noise)
    spans = np.stack(
        [_segment(length - n_noise, n_spans, rng), _segment(n_noise, n_spans, rng)], axis=1
    ).reshape(-1)  # kept, noise, kept, noise, ...
    return np.repeat(np.arange(len(spans)) % 2 == 1, spans)


def corrupt(
    tokens: np.ndarray, mask: np.ndarray, sentinels: list[int], eos_id: int
) -> tuple[list[int], list[int]]:
    """(inputs, targets) of one window, given its noise mask."""
    inputs, targets, span = [], [], -1
    for i, (tok, noise) in enumerate(zip(tokens.tolist(), mask.tolist())):
        if noise:
            if i == 0 or not mask[i - 1]:  # a noise span starts: one sentinel on each side
                span += 1
                if span >= len(sentinels):
                    raise LmforgeError(
                        f"span corruption needs {span + 1}+ sentinel tokens, the tokenizer has "
                        f"{len(sentinels)}; prepare the data with more --sentinels or shorten data.max_length"
                    )
                inputs.append(sentinels[span])
                targets.append(sentinels[span])
            targets.append(tok)
        else:
            inputs.append(tok)
    return inputs + [eos_id], targets + [eos_id]


class SpanCorruptionBatches:
    """Random raw windows of the token stream, corrupted; deterministic per seed and resumable
    (the noise of batch k comes from a generator seeded with (seed, k))."""

    def __init__(
        self, data: TokenData, split: str, batch_size: int, seed: int, *, inputs_length: int,
        sentinels: list[int], eos_id: int, pad_id: int, decoder_start_id: int,
        noise_density: float = 0.15, mean_span: float = 3.0,
    ):
        self.raw = raw_length(inputs_length, noise_density, mean_span)
        self.windows = RandomBatches(data, split, batch_size, self.raw - 1, seed)
        self.seed, self.sentinels, self.eos_id = seed, sentinels, eos_id
        self.pad_id, self.decoder_start_id = pad_id, decoder_start_id
        self.noise_density, self.mean_span = noise_density, mean_span

    def next_batch(self) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.windows.batches_drawn])
        x, y = self.windows.next_batch()
        rows = torch.cat([x, y[:, -1:]], dim=1).numpy()  # (B, raw) whole windows
        pairs = [
            corrupt(row, noise_mask(len(row), self.noise_density, self.mean_span, rng),
                    self.sentinels, self.eos_id)
            for row in rows
        ]
        return seq2seq_batch([s for s, _ in pairs], [t for _, t in pairs], self.pad_id, self.decoder_start_id)

    def state_dict(self) -> dict[str, Any]:
        return self.windows.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.windows.load_state_dict(state)
