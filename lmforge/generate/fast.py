"""Faster decoding on one machine: a compiled decode step, and the dtype to decode in.

A compiled step (`GenerationConfig(compile=True)`). The engine's default step attends over the
cache's filled part, `k[:, :, :pos]`, whose length grows by one every step; under
`torch.compile` a new shape means a guard failure and a recompilation (or a dynamic-shape graph
with slower kernels). `static_decode_step` keeps every shape fixed instead: the new token's keys
and values are written at a tensor index (`index_copy_`) and attention runs over the whole
(B, H, max_len, D) slab, masked to the slots that hold real tokens. It computes the same logits
as the default step (padding and the slots ahead are masked out), pays attention over max_len
slots instead of pos (cheap next to the matmuls at these lengths), and compiles once per
(batch size, prompt + max_new_tokens) shape. Prefill stays eager: it runs once per call.

The dtype (`inference_dtype`): decoding one token at a time reads every weight for every token,
so bf16 weights halve the bytes moved; whether that is faster depends on the CPU having native
bf16 dot products (AVX512-BF16, AMX), without which bf16 matmuls are emulated. The README gives
the numbers measured on such a CPU.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from lmforge.config import check_choice
from lmforge.nn import KVCache

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def static_decode_step(model: nn.Module, cache: KVCache, tokens: torch.Tensor, t: int, *, compiled: bool = True) -> torch.Tensor:
    """Next-token logits (B, V) after tokens[:, :t] (B, S; PAD where padded and ahead), when
    `cache` (max_len S) holds tokens[:, :t-1]: the newest token goes through a static-shape step.

    `compiled=False` runs the same step eagerly (tests compare it with the default step)."""
    index = torch.tensor([t - 1], device=tokens.device)  # the newest token's slot
    step = _compiled_step() if compiled else _static_step
    logits = step(model, cache.k, cache.v, tokens, index)
    cache.advance(1)
    return logits


@functools.cache
def _compiled_step():
    # dynamic=False: one graph per shape, never a dynamic-shape one
    return torch.compile(_static_step, dynamic=False)


def _static_step(
    model: nn.Module,
    k_slab: torch.Tensor,  # (n_layer, B, H_kv, S, D)
    v_slab: torch.Tensor,
    tokens: torch.Tensor,  # (B, S)
    index: torch.Tensor,  # (1,) the newest token's position in `tokens`
) -> torch.Tensor:
    valid = tokens >= 0  # (B, S): slots that hold a real token (not padding, not yet ahead)
    # positions count real tokens only, as the default step's do (`engine._next_logits`)
    position_ids = (valid.cumsum(dim=1) - 1).clamp(min=0).index_select(1, index)  # (B, 1)
    idx = tokens.index_select(1, index).clamp(min=0)  # (B, 1)
    mask = valid[:, None, None, :]  # (B, 1, 1, S): True where the query may attend
    x, rope = model.embed(idx, position_ids)
    slab = _SlabAt(k_slab, v_slab, index)
    for i, block in enumerate(model.transformer.h):
        x = block(x, attn_mask=mask, rope=rope, kv_cache=slab, layer_idx=i)
    return model.head(x)[:, -1]


class _SlabAt:
    """What attention sees as its cache in a static step: `update` writes this step's keys and
    values at `index` and returns the whole slab, the same shape every step."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor):
        self.k, self.v, self.index = k, v, index

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (B, H_kv, 1, D) into the (B, H_kv, S, D) slab
        self.k[layer].index_copy_(2, self.index, k)
        self.v[layer].index_copy_(2, self.index, v)
        return self.k[layer], self.v[layer]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 dot products in hardware (AVX512-BF16 or AMX); without
    them PyTorch emulates bf16 matmuls, slower than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence the getattr
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def inference_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """"fp32", "bf16", or "auto": bf16 on a CUDA GPU that supports it or a CPU with native bf16
    (`cpu_has_native_bf16`), else fp32."""
    check_choice("dtype", name, ("auto", *DTYPES))
    if name != "auto":
        return DTYPES[name]
    device = torch.device(device)
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        native = device.type == "cpu" and cpu_has_native_bf16()
    return torch.bfloat16 if native else torch.float32
