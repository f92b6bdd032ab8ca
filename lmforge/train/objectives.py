"""Training objectives: what a batch is, and how a model's loss and metrics come from it.

The trainer is the same loop for every objective; an objective supplies
    sampler(split, batch_size, seed)  random batches with `next_batch()` and `state_dict()`
    loss(model, batch)                the scalar to minimise
    stats(model, batch)               sums for evaluation (losses, hits, counts)
    summarize(sums, split)            the metrics logged for a split; f"{split}_loss" is the one
                                      that picks the best checkpoint and drives early stopping
    tokens(batch)                     real (non-padding) tokens, for tokens/s and MFU

- "clm": causal language modelling (GPT): next-token cross-entropy over windows of the stream.
- "mlm": masked language modelling (BERT without NSP): cross-entropy on the masked tokens.
- "mlm_nsp": BERT pretraining, L = mlm_weight * L_MLM + nsp_weight * L_NSP.
- "seq2seq": an encoder-decoder on sentence pairs, teacher forcing, label-smoothed cross-entropy
  over the real target tokens (padding carries no loss).
- "span_corruption": T5 pretraining on a token stream (`lmforge.data.span_corruption`), the same
  loss as seq2seq.
"""


from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.data.loader import RandomBatches, TokenData
from lmforge.data.tasks import IGNORE_INDEX  # targets with this value carry no loss

OBJECTIVES = ("clm", "mlm", "mlm_nsp", "seq2seq", "span_corruption")
MAX_PPL_LOSS = 50.0  # perplexities are reported as exp(min(loss, this)), finite even when diverged


def causal_lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; x, y are (B, T) with y[t] = x[t + 1]."""
    logits = model(x)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX)


def ppl(loss: float) -> float:
    return math.exp(min(loss, MAX_PPL_LOSS))


class CausalLM:
    name = "clm"

    def __init__(self, data: TokenData, block_size: int):
        self.data, self.block_size = data, block_size

    def sampler(self, split: str, batch_size: int, seed: int) -> RandomBatches:
        return RandomBatches(self.data, split, batch_size, self.block_size, seed=seed)

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return causal_lm_loss(model, *batch)

    @staticmethod
    def logits_and_labels(model: torch.nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits and the targets they are scored against, (B, T, V) and (B, T) (for
        objectives built on top of this one, such as distillation)."""
        x, y = batch
        return model(x), y

    def stats(self, model: torch.nn.Module, batch) -> dict[str, float]:
        n = batch[1].numel()
        return {"loss_sum": self.loss(model, batch).item() * n, "tokens": n}

    def summarize(self, sums: dict[str, float], split: str) -> dict[str, float]:
        loss = sums["loss_sum"] / sums["tokens"]
        return {f"{split}_loss": loss, **({"val_ppl": ppl(loss)} if split == "val" else {})}

    def tokens(self, batch) -> int:
        return batch[0].numel()

    @staticmethod
    def merge(batches: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Several equal-shaped batches as one, for fewer, larger evaluation forward passes."""
        return tuple(torch.cat(t) for t in zip(*batches))


class MaskedLM:
    """BERT pretraining: masked-LM loss, plus weighted next-sentence prediction when `nsp`."""

    def __init__(
        self,
        data: TokenData,
        max_length: int,
        *,
        nsp: bool,
        mlm_weight: float = 1.0,
        nsp_weight: float = 1.0,
        mlm_probability: float = 0.15,
        whole_word_masking: bool = False,
    ):
        self.data, self.max_length, self.nsp = data, max_length, nsp
        self.name = "mlm_nsp" if nsp else "mlm"
        self.mlm_weight, self.nsp_weight = mlm_weight, nsp_weight if nsp else 0.0
        self.mlm_probability, self.whole_word_masking = mlm_probability, whole_word_masking

    def sampler(self, split: str, batch_size: int, seed: int):
        from lmforge.data.mlm import PretrainingBatches

        return PretrainingBatches(
            self.data, split, batch_size, self.max_length, seed, nsp=self.nsp,
            mlm_probability=self.mlm_probability, whole_word_masking=self.whole_word_masking,
        )

    def _output(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        targets = batch["labels"] != IGNORE_INDEX  # the masked positions
        out = model(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
            mlm_positions=targets,
        )
        return out, targets

    def logits_and_labels(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        """The masked-LM logits of the masked positions and their labels, (N, V) and (N,)."""
        out, targets = self._output(model, batch)
        return out.mlm_logits, batch["labels"][targets]

    def _forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        out, targets = self._output(model, batch)
        mlm = F.cross_entropy(out.mlm_logits.float(), batch["labels"][targets])
        nsp = None
        if self.nsp:
            nsp = F.cross_entropy(out.nsp_logits.float(), batch["next_sentence_label"])
        return out, targets, mlm, nsp

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        _, _, mlm, nsp = self._forward(model, batch)
        return self.mlm_weight * mlm + (self.nsp_weight * nsp if nsp is not None else 0.0)

    def stats(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        out, targets, mlm, nsp = self._forward(model, batch)
        n_masked = int(targets.sum())
        sums = {
            "mlm_loss_sum": mlm.item() * n_masked,
            "mlm_correct": (out.mlm_logits.argmax(-1) == batch["labels"][targets]).sum().item(),
            "mlm_count": n_masked,
        }
        if nsp is not None:
            n = len(batch["next_sentence_label"])
            sums["nsp_loss_sum"] = nsp.item() * n
            sums["nsp_correct"] = (out.nsp_logits.argmax(-1) == batch["next_sentence_label"]).sum().item()
            sums["nsp_count"] = n
        return sums

    def summarize(self, sums: dict[str, float], split: str) -> dict[str, float]:
        mlm_loss = sums["mlm_loss_sum"] / sums["mlm_count"]
        out = {
            f"{split}_loss": self.mlm_weight * mlm_loss,
            f"{split}_mlm_loss": mlm_loss,
            f"{split}_mlm_acc": sums["mlm_correct"] / sums["mlm_count"],
            f"{split}_mlm_ppl": ppl(mlm_loss),
        }
        if self.nsp:
            nsp_loss = sums["nsp_loss_sum"] / sums["nsp_count"]
            out[f"{split}_loss"] += self.nsp_weight * nsp_loss
            out[f"{split}_nsp_loss"] = nsp_loss
            out[f"{split}_nsp_acc"] = sums["nsp_correct"] / sums["nsp_count"]
        return out

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    @staticmethod
    def merge(batches: list) -> Any:
        return None  # rows have different lengths per batch: evaluate them one at a time


class Seq2SeqLM:
    """Encoder-decoder training on (source, target) batches from `sampler_factory`: the loss is
    cross-entropy with `label_smoothing` (Szegedy et al. 2016; 0.1 in Vaswani et al.), while
    evaluations report the plain negative log-likelihood per target token, its perplexity and the
    token accuracy, so that val loss means the same whatever the smoothing."""

    def __init__(self, name: str, sampler_factory, label_smoothing: float = 0.0):
        self.name, self.sampler_factory, self.label_smoothing = name, sampler_factory, label_smoothing

    def sampler(self, split: str, batch_size: int, seed: int):
        return self.sampler_factory(split, batch_size, seed)

    def _logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(
            batch["input_ids"], batch["attention_mask"], decoder_input_ids=batch["decoder_input_ids"]
        )  # (B, T, V)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self._logits(model, batch)
        return F.cross_entropy(
            logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE_INDEX,
            label_smoothing=self.label_smoothing,
        )

    def stats(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        logits = self._logits(model, batch).float()
        labels = batch["labels"]
        real = labels != IGNORE_INDEX
        nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                              reduction="sum")
        return {
            "loss_sum": nll.item(),
            "correct": (logits.argmax(-1)[real] == labels[real]).sum().item(),
            "tokens": int(real.sum()),
        }

    def summarize(self, sums: dict[str, float], split: str) -> dict[str, float]:
        loss = sums["loss_sum"] / sums["tokens"]
        out = {f"{split}_loss": loss, f"{split}_acc": sums["correct"] / sums["tokens"]}
        if split == "val":
            out["val_ppl"] = ppl(loss)
        return out

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    @staticmethod
    def merge(batches: list) -> Any:
        return None  # rows have different lengths per batch: evaluate them one at a time


def move_batch(batch, device: torch.device | str, non_blocking: bool = False):
    """A batch (a tensor, or a tuple/list/dict of tensors) on `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: move_batch(v, device, non_blocking) for k, v in batch.items()}
    return type(batch)(move_batch(v, device, non_blocking) for v in batch)


def add_stats(total: dict[str, float], more: dict[str, float]) -> dict[str, float]:
    for key, value in more.items():
        total[key] = total.get(key, 0) + value
    return total
