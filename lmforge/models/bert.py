"""BERT (Devlin et al. 2019): a bidirectional Transformer encoder and its task heads.

Choices, as in the original BERT unless a config field says otherwise:
- embeddings: word + learned position + token type (segment A/B), then LayerNorm and dropout;
- norm placement: post-norm (`x = LN(x + sublayer(x))`, the shared `Block` with
  norm_position="post"); pre-norm is an option, and then a final LayerNorm `ln_f` closes the stack;
- attention: bidirectional, every token sees every non-padding token (attention_mask 1 = token,
  0 = padding); LayerNorm eps 1e-12 and exact (erf) GELU;
- pooler: dense + tanh on the first token ([CLS]), the input of the sentence-level heads;
- heads, one per config (`head`): masked-LM (dense + GELU + LayerNorm, then a decoder whose
  weight IS the word embedding matrix, plus an output-only bias), MLM + next-sentence prediction
  ("pretraining"), sequence classification on the pooled [CLS], token classification on every
  position.

Module names are lmforge's own (the shared blocks' `c_attn`, `c_proj`, `ln_1`, ...);
`lmforge.interop.hf_bert` maps them to Hugging Face's names. The model computes no losses:
objectives (MLM, NSP, classification) are functions in the training code that call it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import check, check_choice
from lmforge.nn import Block, make_norm
from lmforge.nn.config import TransformerConfig

HEADS = ("none", "mlm", "pretraining", "classification", "token-classification")
POOLED_HEADS = ("pretraining", "classification")  # heads that read the pooled [CLS] vector


@dataclass
class BertConfig(TransformerConfig):
    vocab_size: int = 30522
    max_position: int = 512  # size of the learned position table: the longest input
    type_vocab_size: int = 2  # segments A and B
    pad_token_id: int | None = 0  # its embedding row starts at zero and gets no gradient
    head: Literal["none", "mlm", "pretraining", "classification", "token-classification"] = "none"
    num_labels: int = 2  # outputs of the classification heads
    labels: list[str] = field(default_factory=list)  # label names in id order; [] for unnamed
    classifier_dropout: float | None = None  # None: the model's dropout, as in HF
    # None: a pooler exactly when the head reads it or there is no head (HF's BertForMaskedLM and
    # BertForTokenClassification have none); True keeps one beside an MLM head (bert-base's files)
    pooler: bool | None = None
    # BERT's own defaults where they differ from the shared ones
    dropout: float = 0.1
    norm_position: Literal["pre", "post"] = "post"
    norm_eps: float = 1e-12
    activation: Literal["gelu", "gelu_tanh", "relu", "swiglu"] = "gelu"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.vocab_size >= 1, f"vocab_size must be >= 1, got {self.vocab_size}")
        check(self.max_position >= 1, f"max_position must be >= 1, got {self.max_position}")
        check(
            self.type_vocab_size >= 1, f"type_vocab_size must be >= 1, got {self.type_vocab_size}"
        )
        check(
            self.position == "learned",
            f"position={self.position!r}: BERT uses learned positions only",
        )
        check(
            self.pad_token_id is None or 0 <= self.pad_token_id < self.vocab_size,
            f"pad_token_id must be in [0, vocab_size={self.vocab_size}) or None, got {self.pad_token_id}",
        )
        check_choice("head", self.head, HEADS)
        check(self.num_labels >= 1, f"num_labels must be >= 1, got {self.num_labels}")
        check(
            not self.labels or len(self.labels) == self.num_labels,
            f"labels has {len(self.labels)} names but num_labels={self.num_labels}; give one name per label or none",
        )
        if self.classifier_dropout is not None:
            check(
                0.0 <= self.classifier_dropout < 1.0,
                f"classifier_dropout must be in [0, 1) or None, got {self.classifier_dropout}",
            )
        if self.pooler is None:
            self.pooler = self.head in ("none", *POOLED_HEADS)
        check(
            self.pooler or self.head not in POOLED_HEADS,
            f"head={self.head!r} reads the pooled [CLS]: pooler must be true",
        )


# Google's BERT miniatures (Turc et al. 2019, "Well-Read Students Learn Better"). The vocabulary
# comes from the tokenizer.
BERT_PRESETS: dict[str, dict] = {
    "bert-mini": dict(n_layer=4, n_head=4, n_embd=256),
    "bert-small": dict(n_layer=4, n_head=8, n_embd=512),
}


@dataclass
class BertOutput:
    hidden_states: torch.Tensor  # (B, T, C) the last layer's output
    pooled: torch.Tensor | None = None  # (B, C) tanh(dense([CLS])), when the model has a pooler
    # (B, T, vocab) heads "mlm" and "pretraining"; (N, vocab) for the N `mlm_positions` if given
    mlm_logits: torch.Tensor | None = None
    nsp_logits: torch.Tensor | None = None  # (B, 2) head "pretraining": 0 = B follows A, 1 = random
    # (B, num_labels) for "classification", (B, T, num_labels) for "token-classification"
    logits: torch.Tensor | None = None


class BertEmbeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word = nn.Embedding(c.vocab_size, c.n_embd, padding_idx=c.pad_token_id)
        self.position = nn.Embedding(c.max_position, c.n_embd)
        self.token_type = nn.Embedding(c.type_vocab_size, c.n_embd)
        self.ln = make_norm(c.norm, c.n_embd, c.norm_eps, c.bias)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        positions = torch.arange(T, device=input_ids.device)[None]  # (1, T)
        x = self.word(input_ids) + self.token_type(token_type_ids)  # (B, T, C)
        x = x + self.position(positions)
        return self.drop(self.ln(x))


# The MLM head's activation follows the encoder's (HF's `hidden_act`); a gated MLP's SwiGLU has no
# single-matrix form, so such models use GELU there.
HEAD_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "relu": F.relu,
}


class MaskedLMHead(nn.Module):
    """dense + activation + LayerNorm, then scores against the word embeddings (+ a bias per token).

    The decoder weight is passed in rather than held, so it is the embedding matrix by
    construction (Press & Wolf 2017) and a checkpoint stores it once.
    """

    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.activation = c.activation
        self.ln = make_norm(c.norm, c.n_embd, c.norm_eps, c.bias)
        self.bias = nn.Parameter(torch.zeros(c.vocab_size))

    def forward(self, x: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        h = HEAD_ACTIVATIONS.get(self.activation, F.gelu)(self.dense(x))  # (B, T, C)
        return F.linear(self.ln(h), word_embeddings, self.bias)  # (B, T, vocab)


class Bert(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = c = config
        self.embeddings = BertEmbeddings(c)
        self.h = nn.ModuleList([Block(c) for _ in range(c.n_layer)])
        # post-norm layers already end normalised; pre-norm ones leave the residual stream raw
        self.ln_f = (
            make_norm(c.norm, c.n_embd, c.norm_eps, c.bias) if c.norm_position == "pre" else None
        )
        self.pooler = nn.Linear(c.n_embd, c.n_embd) if c.pooler else None
        self.mlm = MaskedLMHead(c) if c.head in ("mlm", "pretraining") else None
        self.nsp = nn.Linear(c.n_embd, 2) if c.head == "pretraining" else None
        self.classifier = None
        if c.head in ("classification", "token-classification"):
            self.classifier_drop = nn.Dropout(
                c.dropout if c.classifier_dropout is None else c.classifier_dropout
            )
            self.classifier = nn.Linear(c.n_embd, c.num_labels)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # BERT's initializer_range 0.02 for every matrix and table; norms start as the identity
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int, mlm_fraction: float = 1.0) -> int:
        """Training FLOPs per token, 6N + 12*L*d*T as for the GPT, where N leaves out the lookup
        tables and the MLM decoder (the tied word embeddings) counts only on the `mlm_fraction`
        of positions it scores (pretraining scores the masked ones alone)."""
        c = self.config
        tables = sum(t.weight.numel() for t in (self.embeddings.position, self.embeddings.token_type))
        word = self.embeddings.word.weight.numel()
        body = self.num_params() - tables - word
        decoder = word * mlm_fraction if self.mlm is not None else 0
        return int(6 * (body + decoder) + 12 * c.n_layer * c.n_head * c.head_dim * seq_len)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T) token ids
        attention_mask: torch.Tensor | None = None,  # (B, T): 1 for tokens, 0 for padding
        token_type_ids: torch.Tensor | None = None,  # (B, T): 0 for segment A, 1 for B
        mlm_positions: torch.Tensor | None = None,  # (B, T) bool: score only these positions
    ) -> BertOutput:
        T = input_ids.shape[1]
        if T > self.config.max_position:
            raise ValueError(
                f"sequence of {T} tokens is longer than the model's {self.config.max_position} positions"
            )
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, C)

        # Every query sees the same keys, so a (B, 1, 1, T) key mask suffices. Unlike the causal
        # `attention_mask_for`, padding queries are not special-cased: with right padding each row
        # keeps real keys, and padding positions then attend to the tokens exactly as in HF BERT.
        attn_mask = None if attention_mask is None else attention_mask[:, None, None, :].bool()
        for block in self.h:
            x = block(x, attn_mask=attn_mask)
        if self.ln_f is not None:
            x = self.ln_f(x)

        out = BertOutput(hidden_states=x)
        if self.pooler is not None:
            out.pooled = torch.tanh(self.pooler(x[:, 0]))  # (B, C) from [CLS]
        if self.mlm is not None:
            # pretraining scores the ~15% masked positions only: (N, vocab), and saves the rest
            # of the vocabulary-sized matmul
            selected = x if mlm_positions is None else x[mlm_positions]
            out.mlm_logits = self.mlm(selected, self.embeddings.word.weight)
        if self.nsp is not None:
            out.nsp_logits = self.nsp(out.pooled)
        if self.config.head == "classification":
            out.logits = self.classifier(self.classifier_drop(out.pooled))  # (B, num_labels)
        elif self.config.head == "token-classification":
            out.logits = self.classifier(self.classifier_drop(x))  # (B, T, num_labels)
        return out
