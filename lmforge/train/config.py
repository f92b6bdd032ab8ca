"""Training hyper-parameters: one dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmforge.config import check, check_choice
from lmforge.train.objectives import OBJECTIVES


@dataclass
class TrainConfig:
    # auto: clm for a GPT, mlm_nsp for a BERT (mlm when its head is "mlm"), seq2seq for an
    # encoder-decoder on sentence pairs, span_corruption on a token stream; see train.objectives
    objective: Literal["auto", "clm", "mlm", "mlm_nsp", "seq2seq", "span_corruption"] = "auto"
    mlm_weight: float = 1.0  # BERT pretraining loss: mlm_weight * L_MLM + nsp_weight * L_NSP
    nsp_weight: float = 1.0
    label_smoothing: float = 0.0  # encoder-decoders: the original Transformer used 0.1
    batch_size: int = 12
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    max_iters: int = 2000  # optimizer steps
    max_time: float | None = None  # seconds of training after which the run saves and stops
    lr: float = 1e-3
    min_lr: float | None = None  # default lr / 10
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # default max_iters; set it to train one schedule in chunks
    weight_decay: float = 0.1  # on weight matrices only, never on norms, biases or embeddings
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    eval_interval: int = 250  # also the checkpoint interval
    eval_iters: int = 20  # batches per split in each loss estimate
    log_interval: int = 10
    patience: int = 0  # early stopping: evals without a better val loss; 0 turns it off
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast when measured faster
    compile: bool = False  # torch.compile the model
    # recompute each transformer block's activations in backward: less memory, ~1/3 more compute
    activation_checkpointing: bool = False
    # under torchrun (WORLD_SIZE > 1): ddp replicates the model on every rank, fsdp shards its
    # weights, gradients and optimizer state across the ranks (see train.distributed)
    parallel: Literal["ddp", "fsdp"] = "ddp"
    device: str = "auto"  # auto: cuda when available, else cpu
    seed: int = 1337

    def __post_init__(self) -> None:
        check_choice("train.objective", self.objective, ("auto", *OBJECTIVES))
        for name in ("mlm_weight", "nsp_weight"):
            check(getattr(self, name) >= 0, f"train.{name} must be >= 0, got {getattr(self, name)}")
        check(
            self.mlm_weight + self.nsp_weight > 0,
            "train.mlm_weight and train.nsp_weight cannot both be 0",
        )
        check(
            0 <= self.label_smoothing < 1,
            f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}",
        )
        for name in (
            "batch_size",
            "grad_accum_steps",
            "max_iters",
            "eval_interval",
            "eval_iters",
            "log_interval",
        ):
            check(getattr(self, name) >= 1, f"train.{name} must be >= 1, got {getattr(self, name)}")
        check(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        check(
            0 <= self.min_lr <= self.lr,
            f"train.min_lr must be in [0, lr={self.lr}], got {self.min_lr}",
        )
        check_choice("train.lr_schedule", self.lr_schedule, ("cosine", "linear", "constant"))
        check(self.warmup_iters >= 0, f"train.warmup_iters must be >= 0, got {self.warmup_iters}")
        if self.lr_decay_iters is None:
            self.lr_decay_iters = self.max_iters
        check(
            self.lr_decay_iters >= 1,
            f"train.lr_decay_iters must be >= 1, got {self.lr_decay_iters}",
        )
        check(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            check(
                0 <= getattr(self, name) < 1,
                f"train.{name} must be in [0, 1), got {getattr(self, name)}",
            )
        check(self.grad_clip >= 0, f"train.grad_clip must be >= 0, got {self.grad_clip}")
        check(self.patience >= 0, f"train.patience must be >= 0, got {self.patience}")
        check(
            self.max_time is None or self.max_time > 0,
            f"train.max_time must be > 0 seconds, got {self.max_time}",
        )
        check_choice("train.precision", self.precision, ("auto", "fp32", "bf16"))
        check(
            isinstance(self.activation_checkpointing, bool),
            f"train.activation_checkpointing must be true or false, got {self.activation_checkpointing!r}",
        )
        check_choice("train.parallel", self.parallel, ("ddp", "fsdp"))
        check(
            self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"),
            f"train.device={self.device!r} is not valid; use auto, cpu, cuda, cuda:N or mps",
        )


@dataclass
class DataConfig:
    path: str = ""  # a folder written by `lmforge prepare`
    # BERT pretraining: tokens per example, [CLS] and [SEP] included; T5 span corruption: encoder
    # input tokens per example, sentinels and </s> included (a GPT's windows are model.block_size
    # long, sentence pairs as long as prepared)
    max_length: int = 128
    mlm_probability: float = 0.15  # share of tokens chosen for prediction
    whole_word_masking: bool = False  # choose whole words: a token with its "##" pieces
    noise_density: float = 0.15  # span corruption: share of tokens that are noise
    mean_noise_span_length: float = 3.0  # span corruption: average noise span, in tokens

    def __post_init__(self) -> None:
        check(
            bool(self.path),
            "data.path is empty: pass --data DATA_DIR (a folder made by `lmforge prepare`)",
        )
        check(self.max_length >= 5, f"data.max_length must be >= 5, got {self.max_length}")
        check(
            0 < self.mlm_probability < 1,
            f"data.mlm_probability must be in (0, 1), got {self.mlm_probability}",
        )
        check(
            0 < self.noise_density < 1,
            f"data.noise_density must be in (0, 1), got {self.noise_density}",
        )
        check(
            self.mean_noise_span_length >= 1,
            f"data.mean_noise_span_length must be >= 1, got {self.mean_noise_span_length}",
        )
