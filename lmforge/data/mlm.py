"""BERT pretraining batches: sentence-pair examples for next-sentence prediction (NSP) and dynamic
masking for the masked-LM objective (MLM), drawn from a WordPiece data folder.

An example (Devlin et al. 2019, and Google's create_pretraining_data.py):

    pick a random sentence; gather it and the sentences after it in its document, up to the budget
    (max_length minus [CLS] and two [SEP]; 10% of examples get a shorter random budget, so the
    model also sees short inputs)
    segment A = the first k of those sentences, k random
    50%: B = the sentences after A (label 0, "B follows A")
    50%: B = sentences from a random other document (label 1, "B is random")
    trim the longer segment, from a random end, until the pair fits
    [CLS] A [SEP] B [SEP], token types 0 for "[CLS] A [SEP]" and 1 for "B [SEP]"

Without NSP (`nsp=False`) an example is one segment, "[CLS] A [SEP]", filled with consecutive
sentences of one document. The masking is dynamic, as in RoBERTa and HF's
DataCollatorForLanguageModeling: every time a batch is drawn, each ordinary token is chosen with
probability `mlm_probability` (special tokens and padding never are); a chosen token becomes
[MASK] 80% of the time, a random ordinary token 10%, and stays 10%; its label is the original id,
every other label is -100. With whole-word masking the choice is made per word (a token and the
"##" pieces after it) and covers all of its pieces. Every row gets at least one chosen token, so
no batch has an MLM loss over nothing.

All randomness comes from the sampler's own generator: a seed fixes the batches (so evaluation
always scores the same ones) and `state_dict` resumes the sequence exactly. The masking itself is
`MlmMasker`, which multi-task fine-tuning also uses on lines of a text file.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lmforge.config import check
from lmforge.data.loader import TokenData
from lmforge.data.tasks import IGNORE_INDEX
from lmforge.errors import LmforgeError
from lmforge.tokenizer import SPECIAL_ROLES, Tokenizer

SHORT_SEQ_PROBABILITY = 0.1  # create_pretraining_data.py's short_seq_prob
IS_NEXT, IS_RANDOM = 0, 1  # NSP labels, as HF's BertForPreTraining reads them


class PretrainingBatches:
    """Random masked (and, with `nsp`, sentence-pair) batches from one split of a WordPiece folder.

    `next_batch()` returns a dict of (B, T) int64 tensors `input_ids`, `token_type_ids`,
    `attention_mask`, `labels`, plus `next_sentence_label` (B,) when `nsp`; T is the longest
    row in the batch (at most `max_length`), padding on the right.
    """

    def __init__(
        self,
        data: TokenData,
        split: str,
        batch_size: int,
        max_length: int,
        seed: int,
        *,
        nsp: bool = True,
        mlm_probability: float = 0.15,
        whole_word_masking: bool = False,
        short_seq_probability: float = SHORT_SEQ_PROBABILITY,
    ):
        check(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
        specials = 3 if nsp else 2
        check(
            max_length > specials + (1 if nsp else 0),
            f"max_length must leave room for [CLS], [SEP] and text, got {max_length}",
        )
        tokenizer = data.tokenizer
        self.cls_id, self.sep_id, self.mask_id, self.pad_id = _special_ids(tokenizer)
        self.split, self.batch_size, self.max_length, self.nsp = split, batch_size, max_length, nsp
        self.budget = max_length - specials  # text tokens per example
        self.short_seq_probability = short_seq_probability
        self.stream = data.stream(split)
        self.sentence_starts, self.document_starts = data.sentence_index(split)
        self.n_sentences = len(self.sentence_starts) - 1
        if self.n_sentences == 0:
            raise LmforgeError(f"split {split!r} has no sentences; use more data or another split")
        if nsp and len(self.document_starts) - 1 < 2:
            raise LmforgeError(
                f"split {split!r} has {len(self.document_starts) - 1} document(s); next-sentence "
                "prediction draws random segments from other documents, so it needs at least 2 "
                "(train.objective=mlm needs none)"
            )
        self.masker = MlmMasker(tokenizer, mlm_probability, whole_word_masking)
        self.generator = torch.Generator().manual_seed(seed)  # never the global RNG
        self.batches_drawn = 0

    # --- examples ----------------------------------------------------------------------------
    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator))

    def _random(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def _document_of(self, sentence: int) -> tuple[int, int]:
        """(first sentence, end sentence) of the document holding `sentence`."""
        j = int(np.searchsorted(self.document_starts, sentence, side="right")) - 1
        return int(self.document_starts[j]), int(self.document_starts[j + 1])

    def _sentence(self, i: int) -> np.ndarray:
        return self.stream.read(int(self.sentence_starts[i]), int(self.sentence_starts[i + 1]))

    def _run(self, start: int, end: int, budget: int) -> list[np.ndarray]:
        """Sentences start, start+1, ... (before `end`) until they hold `budget` tokens; at least one."""
        run, size = [], 0
        for i in range(start, end):
            run.append(self._sentence(i))
            size += len(run[-1])
            if size >= budget:
                break
        return run

    def _example(self) -> tuple[list[int], list[int], int]:
        """One example: (token ids, token type ids, NSP label)."""
        budget = self.budget
        if self._random() < self.short_seq_probability:
            budget = 2 + self._randint(max(1, budget - 1))  # 2 .. budget
        first = self._randint(self.n_sentences)
        doc_start, doc_end = self._document_of(first)
        if not self.nsp:
            a = np.concatenate(self._run(first, doc_end, budget))[:budget]
            ids = [self.cls_id, *a.tolist(), self.sep_id]
            return ids, [0] * len(ids), IS_NEXT
        is_random = self._random() < 0.5
        if not is_random and first == doc_end - 1 and first > doc_start:
            first -= 1  # a true next segment needs a sentence after A
        run = self._run(first, doc_end, budget)
        if len(run) == 1:  # nothing can follow A inside this document
            is_random = True
        a_end = 1 if len(run) == 1 else 1 + self._randint(len(run) - 1)
        a = np.concatenate(run[:a_end])
        if is_random:
            # a random document other than this one: draw among the others, skipping ours
            n_docs = len(self.document_starts) - 1
            doc = int(np.searchsorted(self.document_starts, doc_start, side="right")) - 1
            other = self._randint(n_docs - 1)
            other += other >= doc
            other_start, other_end = self.document_starts[other], self.document_starts[other + 1]
            start = int(other_start) + self._randint(int(other_end - other_start))
            b = np.concatenate(self._run(start, int(other_end), max(1, budget - len(a))))
        else:
            b = np.concatenate(run[a_end:])
        a, b = a.tolist(), b.tolist()
        while len(a) + len(b) > budget:  # trim the longer one, at a random end
            longer = a if len(a) > len(b) else b
            del longer[0 if self._random() < 0.5 else -1]
        ids = [self.cls_id, *a, self.sep_id, *b, self.sep_id]
        types = [0] * (len(a) + 2) + [1] * (len(b) + 1)
        return ids, types, IS_RANDOM if is_random else IS_NEXT

    # --- batches -----------------------------------------------------------------------------
    def next_batch(self) -> dict[str, torch.Tensor]:
        examples = [self._example() for _ in range(self.batch_size)]
        B, T = len(examples), max(len(ids) for ids, _, _ in examples)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        token_type_ids = torch.zeros(B, T, dtype=torch.long)
        attention_mask = torch.zeros(B, T, dtype=torch.long)
        for i, (ids, types, _) in enumerate(examples):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            token_type_ids[i, : len(types)] = torch.tensor(types)
            attention_mask[i, : len(ids)] = 1
        input_ids, labels = self.mask(input_ids, attention_mask)
        batch = {
            "input_ids": input_ids,
            "token_type_ids": token_type_ids,
            "attention_mask": attention_mask,
            "labels": labels,
        }
        if self.nsp:
            batch["next_sentence_label"] = torch.tensor([label for _, _, label in examples])
        self.batches_drawn += 1
        return batch

    def mask(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dynamic MLM masking of a (B, T) batch; returns (masked input_ids, labels)."""
        return self.masker.mask(input_ids, attention_mask, self.generator)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.batches_drawn = int(state["batches_drawn"])


class MlmMasker:
    """Dynamic masked-LM masking (see the module docstring) for a tokenizer's vocabulary; every
    random draw comes from the generator passed in, so the caller owns (and resumes) the sequence.

    Shared by BERT pretraining (`PretrainingBatches`) and the masked-LM task of multi-task
    fine-tuning (`lmforge.train.multitask`), which masks lines of a text file.
    """

    def __init__(
        self, tokenizer: Tokenizer, mlm_probability: float = 0.15, whole_word_masking: bool = False
    ):
        check(
            0 < mlm_probability < 1, f"mlm_probability must be in (0, 1), got {mlm_probability}"
        )
        _, _, self.mask_id, self.pad_id = _special_ids(tokenizer)
        self.mlm_probability, self.whole_word_masking = mlm_probability, whole_word_masking
        vocab_size = tokenizer.vocab_size
        special = torch.zeros(vocab_size, dtype=torch.bool)
        special[[i for i in _all_special_ids(tokenizer) if i < vocab_size]] = True
        self.ordinary_ids = (~special).nonzero().flatten()  # what a "random token" is drawn from
        self.special_table = special
        self.continuation = torch.zeros(vocab_size, dtype=torch.bool)  # "##" pieces
        for token, i in tokenizer.backend.get_vocab().items():
            if token.startswith("##") and i < vocab_size:
                self.continuation[i] = True

    def maskable(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Which tokens masking may choose: the ordinary ones (not [CLS], [SEP], [PAD], ...)."""
        return ~self.special_table[input_ids]

    def mask(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask a (B, T) batch; returns (masked input_ids, labels), labels -100 where not chosen."""
        g, p = generator, self.mlm_probability
        eligible = self.maskable(input_ids) & attention_mask.bool()
        # the units chosen from: tokens, or words (a first piece, or a "##" piece whose word
        # start was trimmed away, i.e. one right after a special token)
        units = eligible
        if self.whole_word_masking:
            after_eligible = torch.zeros_like(eligible)
            after_eligible[:, 1:] = eligible[:, :-1]
            units = eligible & (~self.continuation[input_ids] | ~after_eligible)
        chosen = units & (torch.rand(input_ids.shape, generator=g) < p)
        # rows where nothing was chosen get one unit, so every row has a target
        empty = ~chosen.any(dim=1) & units.any(dim=1)
        if empty.any():
            scores = torch.rand(input_ids.shape, generator=g).masked_fill(~units, -1.0)
            chosen[empty.nonzero().flatten(), scores.argmax(dim=1)[empty]] = True
        if self.whole_word_masking:  # copy each word's decision to its "##" pieces
            position = torch.arange(input_ids.shape[1]).expand_as(input_ids)
            word_start = torch.where(units, position, 0).cummax(dim=1).values
            chosen = chosen.gather(1, word_start) & eligible
        labels = torch.where(chosen, input_ids, IGNORE_INDEX)
        action = torch.rand(input_ids.shape, generator=g)
        to_mask = chosen & (action < 0.8)
        to_random = chosen & (action >= 0.8) & (action < 0.9)
        random_ids = self.ordinary_ids[
            torch.randint(len(self.ordinary_ids), input_ids.shape, generator=g)
        ]
        masked = input_ids.masked_fill(to_mask, self.mask_id)
        masked = torch.where(to_random, random_ids, masked)
        return masked, labels


def _special_ids(tokenizer: Tokenizer) -> tuple[int, int, int, int]:
    ids = {
        name: getattr(tokenizer, f"{name}_id") for name in ("cls", "sep", "mask", "pad")
    }
    missing = [f"[{name.upper()}]" for name, i in ids.items() if i is None]
    if missing:
        raise LmforgeError(
            f"masked-LM training needs a tokenizer with [CLS], [SEP], [MASK] and [PAD]; this "
            f"{tokenizer.kind} tokenizer lacks {', '.join(missing)} (prepare with --tokenizer wordpiece)"
        )
    return ids["cls"], ids["sep"], ids["mask"], ids["pad"]


def _all_special_ids(tokenizer: Tokenizer) -> list[int]:
    tokens = (getattr(tokenizer, role) for role in SPECIAL_ROLES)
    return sorted({i for i in map(tokenizer.token_to_id, tokens) if i is not None})
