"""Numeric precision for training: autocast contexts, choosing fp32 or bf16 by measurement, and
the matmul peak that model FLOPs utilisation (MFU) is measured against.

Whether bf16 autocast pays off on a CPU depends on the CPU (native bf16 dot products such as
AVX512-BF16 or AMX, or none) and on the model's shapes (small matmuls are dominated by the cost
of casting), so `resolve_precision("auto", ...)` times both on the real model and batch rather
than guessing. On a 2-core Zen4 (AVX512-BF16) bf16 autocast trains the 6-layer, 384-wide GPT
about 1.7x faster than fp32; for the 4-layer, 128-wide one the gain is small and comes only
because attention itself stays in fp32 on CPU (see `lmforge.nn.attention._sdpa`).

`torch.compile` is deliberately not offered for CPU training: on these models it gained under
10% per step on that CPU, after 10-40 s of compilation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from lmforge.config import check_choice
from lmforge.train.objectives import causal_lm_loss, move_batch

PRECISIONS = ("auto", "fp32", "bf16")

# bf16 must beat fp32 by this factor in step time before "auto" picks it, so that noise or a
# marginal gain does not buy bf16's rounding error
BF16_MIN_SPEEDUP = 1.1

_MATMUL_PEAK: dict[tuple[str, torch.dtype], float] = {}


def autocast_context(device_type: str, precision: str) -> AbstractContextManager:
    """The context to run forward passes (and the loss) in: nothing for fp32, bf16 autocast."""
    check_choice("precision", precision, ("fp32", "bf16"))
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)


def _causal_lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return causal_lm_loss(model, *batch)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_precision(
    requested: str,
    model: nn.Module,
    batch_fn: Callable[[], Any],  # a batch: a tuple or dict of tensors, as loss_fn takes it
    device: torch.device | str,
    *,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] = _causal_lm_loss,
    budget_s: float = 2.0,
) -> tuple[str, dict[str, float]]:
    """Turn "auto" into "fp32" or "bf16"; returns the choice and the timings it was based on.

    On CUDA, "auto" means bf16 where the GPU supports it. On CPU it times forward+backward steps
    (no optimizer step) of `model` on one batch from `batch_fn` under both precisions: one
    warm-up step each, then alternating timed steps for about `budget_s` seconds, keeping each
    precision's fastest step (the least disturbed by other work on the machine). The probe
    leaves the model's parameters and gradients, and torch's global RNG, as it found them.
    The timings dict holds seconds per step ("fp32_s", "bf16_s") and "bf16_speedup".
    """
    check_choice("precision", requested, PRECISIONS)
    device = torch.device(device)
    if requested != "auto":
        return requested, {}
    if device.type == "cuda":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp32"), {}
    if device.type != "cpu":
        return "fp32", {}

    params = [p for p in model.parameters() if p.requires_grad]
    saved_grads = [p.grad for p in params]
    best = {"fp32": float("inf"), "bf16": float("inf")}
    # forked RNG: batch_fn and dropout draw random numbers that training must not see consumed
    with torch.random.fork_rng(devices=[]):
        batch = move_batch(batch_fn(), device)

        def step(precision: str) -> float:
            for p in params:
                p.grad = None
            _sync(device)
            t0 = time.perf_counter()
            with autocast_context(device.type, precision):
                loss = loss_fn(model, batch)
            loss.backward()
            _sync(device)
            return time.perf_counter() - t0

        for precision in best:  # warm-up: allocator, oneDNN primitives, weight layouts
            step(precision)
        start = time.perf_counter()
        while True:  # alternate, so that a burst of other load hits both precisions alike
            for precision in best:
                best[precision] = min(best[precision], step(precision))
            if time.perf_counter() - start >= budget_s:
                break
    for p, g in zip(params, saved_grads):
        p.grad = g
    speedup = best["fp32"] / best["bf16"]
    choice = "bf16" if speedup > BF16_MIN_SPEEDUP else "fp32"
    return choice, {"fp32_s": best["fp32"], "bf16_s": best["bf16"], "bf16_speedup": speedup}


def measure_matmul_peak(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> float:
    """Achievable matmul FLOP/s: the best of a few timed square matmuls, cached per process.

    This is the denominator of MFU (model FLOPs utilisation = achieved FLOP/s / peak). It is a
    measured peak, not the datasheet's, so MFU near 1 means the model runs at matmul speed.
    """
    device = torch.device(device)
    key = (str(device), dtype)
    if key not in _MATMUL_PEAK:
        n = 2048 if device.type == "cuda" else 1024
        gen = torch.Generator(device).manual_seed(0)  # leaves the global RNG alone
        a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        for _ in range(3):
            a @ b
        best = float("inf")
        for _ in range(20):  # many short trials: on a shared machine some run undisturbed
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(2):
                a @ b
            _sync(device)
            best = min(best, (time.perf_counter() - t0) / 2)
        _MATMUL_PEAK[key] = 2 * n**3 / best
    return _MATMUL_PEAK[key]
