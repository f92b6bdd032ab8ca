import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.models import GPT, GPT_PRESETS, GPTConfig


@pytest.mark.parametrize("name", GPT_PRESETS)
def test_presets_are_valid_configs(name):
    config = GPTConfig(vocab_size=100, **GPT_PRESETS[name])
    assert config.n_embd % config.n_head == 0


def test_forward_shapes_and_last_only():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50))
    x = torch.randint(0, 50, (3, 10))
    assert model(x).shape == (3, 10, 50)
    assert model(x, last_only=True).shape == (3, 1, 50)
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_param_count_and_flops():
    c = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50)
    model = GPT(c)
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params(matmul_only=False) == total
    assert model.num_params() == total - 16 * 32  # learned positions are a lookup, not a matmul
    assert model.flops_per_token() == 6 * model.num_params() + 12 * 2 * 32 * 16
    # per layer: qkv + proj + 2 MLP matrices (+ biases) + 2 LayerNorms
    per_layer = (32 * 96 + 96) + (32 * 32 + 32) + (32 * 128 + 128) + (128 * 32 + 32) + 4 * 32
    assert total == 50 * 32 + 16 * 32 + 2 * per_layer + 2 * 32


def test_tied_and_untied_embeddings():
    tied = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=10))
    assert tied.lm_head.weight is tied.transformer.wte.weight
    untied = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=10, tie_embeddings=False))
    assert untied.lm_head.weight is not untied.transformer.wte.weight


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n_embd=30, n_head=4), "n_embd"),
        (dict(n_head=4, n_kv_head=3), "n_kv_head"),
        (dict(dropout=1.5), "dropout"),
        (dict(norm="batchnorm"), "norm"),
        (dict(position="alibi"), "position"),
        (dict(activation="tanh"), "activation"),
        (dict(vocab_size=0), "vocab_size"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(LmforgeError, match=field):
        GPTConfig(**kwargs)


def test_post_norm_model_has_no_final_norm():
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=10, norm_position="post"))
    assert "ln_f" not in model.transformer
