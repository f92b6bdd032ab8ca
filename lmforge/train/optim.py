"""AdamW with GPT-style weight-decay groups, and the learning-rate schedule as a pure function.

Weight decay goes on the weight matrices of Linear layers only; norms, biases and embedding
tables (including an output layer tied to the input embedding) are left undecayed, as in GPT-2
and most LM recipes since (Loshchilov & Hutter 2019 for decoupled decay).

`lr_at` depends on the iteration alone, so a resumed run recomputes its learning rate from the
step counter and needs no scheduler state in the checkpoint.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.config import check, check_choice

SCHEDULES = ("cosine", "linear", "constant")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed Linear weight matrices, and everything else undecayed.

    Parameters are collected by identity, so a tensor shared between modules (a tied `lm_head`
    and `wte`) lands in exactly one group; an embedding table is never decayed, even when a
    Linear layer shares it.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linear_weights = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, nn.Linear) and id(m.weight) not in embeddings
    }
    decay, no_decay = [], []
    for p in model.parameters():  # yields each shared parameter once
        if p.requires_grad:
            (decay if id(p) in linear_weights else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, weight_decay)`.

    `fused=None` picks the fused kernel wherever torch has one for the parameters' device (CPU
    and CUDA). On a 2-core Zen4 CPU one step over the 10.7M parameters of the 6-layer, 384-wide
    GPT takes ~6 ms fused against ~20 ms multi-tensor (foreach) or ~25 ms for the default
    per-parameter loop (0.6 ms against ~2.5 ms for the 0.8M-parameter 4-layer GPT).
    """
    check(lr > 0, f"lr must be > 0, got {lr}")
    check(weight_decay >= 0, f"weight_decay must be >= 0, got {weight_decay}")
    check(all(0.0 <= b < 1.0 for b in betas), f"betas must each be in [0, 1), got {betas}")
    if fused is None:
        fused = next(model.parameters()).device.type in ("cpu", "cuda")
    # fused=False leaves the flavour to torch: foreach on CUDA, a per-parameter loop on CPU
    return torch.optim.AdamW(
        param_groups(model, weight_decay), lr=lr, betas=betas, fused=fused or None
    )


def lr_at(
    it: int, *, schedule: str, lr: float, min_lr: float, warmup_iters: int, decay_iters: int
) -> float:
    """Learning rate at iteration `it` (0-based).

    Linear warmup from ~0 over `warmup_iters` (nanoGPT's lr * (it + 1) / (warmup_iters + 1)),
    then `cosine` or `linear` decay to `min_lr` at `decay_iters` and `min_lr` after, or
    `constant` at `lr`.
    """
    check_choice("schedule", schedule, SCHEDULES)
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    if schedule == "constant":
        return lr
    if it >= decay_iters:
        return min_lr
    progress = (it - warmup_iters) / max(1, decay_iters - warmup_iters)  # in [0, 1)
    if schedule == "cosine":
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    else:
        coeff = 1.0 - progress
    return min_lr + coeff * (lr - min_lr)
