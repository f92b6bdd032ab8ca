import pytest
import torch

from lmforge.nn import KVCache, attention_mask_for
from tests.conftest import tiny_gpt

VARIANTS = {
    "gpt2": dict(),
    "modern": dict(position="rotary", norm="rmsnorm", activation="swiglu", n_kv_head=1, bias=False, tie_embeddings=False),
    "sinusoidal-post": dict(position="sinusoidal", norm_position="post", activation="relu"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_future_leakage(variant):
    model = tiny_gpt(**VARIANTS[variant])
    x = torch.randint(0, 64, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 64, (2, 6))  # change only the future
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_matches_full_forward(variant):
    model = tiny_gpt(**VARIANTS[variant])
    x = torch.randint(0, 64, (3, 20))
    with torch.no_grad():
        full = model(x)
        cache = model.new_kv_cache(3)
        steps = [model(x[:, :7], kv_cache=cache)]
        steps += [model(x[:, t : t + 1], kv_cache=cache) for t in range(7, 20)]
    assert cache.pos == 20
    assert torch.allclose(full, torch.cat(steps, dim=1), atol=1e-5)


def test_left_padding_gives_same_logits_as_unpadded():
    model = tiny_gpt(position="rotary")
    seq = torch.randint(0, 64, (1, 9))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), seq], dim=1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 9)], dim=1).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(seq)
        out = model(padded, attention_mask=mask, position_ids=positions)
    assert torch.isfinite(out).all()  # padding rows must not produce NaN
    assert torch.allclose(ref, out[:, 4:], atol=1e-5)


def test_mask_shapes_and_causality():
    assert attention_mask_for(5, 0, None) is None  # SDPA's is_causal covers it
    assert attention_mask_for(1, 4, None) is None  # one new token sees everything before it
    m = attention_mask_for(2, 3, None)
    assert m.shape == (1, 1, 2, 5)
    assert m[0, 0].tolist() == [[True, True, True, True, False], [True] * 5]
    pad = torch.tensor([[0, 1, 1]])
    m = attention_mask_for(3, 0, pad)
    assert m.shape == (1, 1, 3, 3)
    assert m[0, 0].tolist() == [[True, False, False], [False, True, False], [False, True, True]]


def test_kv_cache_overflow_and_reorder():
    cache = KVCache(n_layer=1, batch_size=2, n_kv_head=1, max_len=4, head_dim=2)
    k = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 1, 3, 2)
    keys, _ = cache.update(0, k, k)
    assert keys.shape == (2, 1, 3, 2)
    cache.advance(3)
    with pytest.raises(ValueError, match="overflow"):
        cache.update(0, k, k)
    cache.reorder(torch.tensor([1, 1]))
    assert torch.equal(cache.k[0, 0, :, :3], k[1])


def test_gqa_has_fewer_kv_parameters():
    mha = tiny_gpt(n_head=4, n_embd=32)
    gqa = tiny_gpt(n_head=4, n_kv_head=1, n_embd=32)
    assert gqa.transformer.h[0].attn.c_attn.weight.shape == (32 + 2 * 8, 32)
    assert gqa.num_params() < mha.num_params()
