import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.models import GPT, GPTConfig
from lmforge.train.allocator import tune_cpu_allocator
from lmforge.train.precision import (
    autocast_context,
    measure_matmul_peak,
    resolve_precision,
)

TINY = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)


def test_fp32_context_does_not_autocast():
    a = torch.randn(4, 4)
    with autocast_context("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")
        assert (a @ a).dtype == torch.float32


def test_bf16_context_autocasts_matmuls():
    a = torch.randn(4, 4)
    with autocast_context("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (a @ a).dtype == torch.bfloat16


def test_context_rejects_auto_and_unknown():
    for bad in ("auto", "fp16"):
        with pytest.raises(LmforgeError, match="precision"):
            autocast_context("cpu", bad)


@pytest.mark.parametrize("requested", ["fp32", "bf16"])
def test_explicit_precision_is_kept_without_probing(requested):
    def no_batches():
        raise AssertionError("an explicit precision must not be measured")

    assert resolve_precision(requested, torch.nn.Linear(2, 2), no_batches, "cpu") == (requested, {})


def test_unknown_precision_is_a_user_error():
    with pytest.raises(LmforgeError, match="precision"):
        resolve_precision("fp8", torch.nn.Linear(2, 2), lambda: None, "cpu")


def test_auto_probe_leaves_model_grads_and_rng_alone():
    model = GPT(GPTConfig(**TINY, dropout=0.1)).train()  # dropout draws from the RNG too
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    marker = torch.full_like(model.lm_head.weight, 7.0)
    model.lm_head.weight.grad = marker
    calls = []

    def batch_fn():
        calls.append(1)
        return torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))

    rng = torch.get_rng_state()
    choice, timings = resolve_precision("auto", model, batch_fn, "cpu", budget_s=0.05)

    assert choice in ("fp32", "bf16")
    assert set(timings) == {"fp32_s", "bf16_s", "bf16_speedup"}
    assert timings["fp32_s"] > 0 and timings["bf16_s"] > 0
    assert (timings["bf16_speedup"] > 1.1) == (choice == "bf16")
    assert len(calls) == 1
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert model.lm_head.weight.grad is marker
    assert all(p.grad is None for p in model.parameters() if p is not model.lm_head.weight)


def test_matmul_peak_is_positive_cached_and_keeps_rng():
    rng = torch.get_rng_state()
    peak = measure_matmul_peak("cpu", torch.float32)
    assert peak > 1e8  # any CPU does 0.1 GFLOP/s
    assert measure_matmul_peak("cpu", torch.float32) == peak
    assert torch.equal(torch.get_rng_state(), rng)


def test_tune_cpu_allocator_reports_whether_it_applied():
    assert isinstance(tune_cpu_allocator(), bool)
