import math

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.models import GPT, GPTConfig
from lmforge.train.optim import lr_at, make_optimizer, param_groups

TINY = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)


def _names_by_group(model, groups) -> list[set[str]]:
    name_of = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        name_of.setdefault(id(p), name)
    return [{name_of[id(p)] for p in g["params"]} for g in groups]


def test_groups_decay_linear_matrices_only():
    model = GPT(GPTConfig(**TINY))
    groups = param_groups(model, weight_decay=0.1)
    decay, no_decay = _names_by_group(model, groups)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    # every Linear weight matrix except the tied lm_head, which is the embedding table
    for name in decay:
        assert name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")), name
    assert len(decay) == 4 * TINY["n_layer"]
    assert "transformer.wte.weight" in no_decay and "transformer.wpe.weight" in no_decay
    assert all(n.endswith((".bias", "wte.weight", "wpe.weight")) or "ln_" in n for n in no_decay)


def test_groups_hold_each_parameter_exactly_once():
    model = GPT(GPTConfig(**TINY))  # lm_head tied to wte: one tensor, two names
    params = [p for g in param_groups(model, 0.1) for p in g["params"]]
    assert len({id(p) for p in params}) == len(params)
    assert {id(p) for p in params} == {id(p) for p in model.parameters()}


def test_untied_output_layer_is_decayed_but_embedding_is_not():
    model = GPT(GPTConfig(**TINY, tie_embeddings=False))
    decay, no_decay = _names_by_group(model, param_groups(model, 0.1))
    assert "lm_head.weight" in decay
    assert "transformer.wte.weight" in no_decay


def test_groups_skip_frozen_parameters():
    model = GPT(GPTConfig(**TINY))
    model.transformer.wpe.weight.requires_grad_(False)
    params = [p for g in param_groups(model, 0.1) for p in g["params"]]
    assert all(p is not model.transformer.wpe.weight for p in params)


def test_make_optimizer_is_fused_adamw_on_cpu_and_steps():
    model = GPT(GPTConfig(**TINY))
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99))
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["fused"] is True and opt.defaults["betas"] == (0.9, 0.99)
    before = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    model(torch.randint(0, 50, (2, 8))).sum().backward()
    opt.step()
    assert not torch.equal(before, model.transformer.h[0].attn.c_attn.weight)


def test_make_optimizer_rejects_bad_values():
    model = GPT(GPTConfig(**TINY))
    with pytest.raises(LmforgeError, match="lr"):
        make_optimizer(model, lr=0.0)
    with pytest.raises(LmforgeError, match="betas"):
        make_optimizer(model, lr=1e-3, betas=(0.9, 1.0))


SCHED = dict(lr=1e-3, min_lr=1e-4, warmup_iters=100, decay_iters=2000)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_is_linear_from_near_zero(schedule):
    assert lr_at(0, schedule=schedule, **SCHED) == pytest.approx(1e-3 / 101)
    assert lr_at(49, schedule=schedule, **SCHED) == pytest.approx(1e-3 * 50 / 101)
    assert lr_at(99, schedule=schedule, **SCHED) == pytest.approx(1e-3 * 100 / 101)
    assert lr_at(100, schedule=schedule, **SCHED) == pytest.approx(1e-3)


def test_cosine_decays_to_min_lr():
    mid = (100 + 2000) // 2
    assert lr_at(mid, schedule="cosine", **SCHED) == pytest.approx((1e-3 + 1e-4) / 2)
    quarter = 100 + (2000 - 100) // 4  # a quarter of the way: cos(pi / 4)
    expected = 1e-4 + 0.5 * (1 + math.cos(math.pi / 4)) * (1e-3 - 1e-4)
    assert lr_at(quarter, schedule="cosine", **SCHED) == pytest.approx(expected)
    assert lr_at(2000, schedule="cosine", **SCHED) == pytest.approx(1e-4)
    assert lr_at(5000, schedule="cosine", **SCHED) == pytest.approx(1e-4)


def test_linear_decays_to_min_lr():
    assert lr_at(1050, schedule="linear", **SCHED) == pytest.approx((1e-3 + 1e-4) / 2)
    assert lr_at(2000, schedule="linear", **SCHED) == pytest.approx(1e-4)
    assert lr_at(3000, schedule="linear", **SCHED) == pytest.approx(1e-4)


def test_constant_stays_at_lr():
    assert (
        lr_at(1000, schedule="constant", **SCHED)
        == lr_at(10_000, schedule="constant", **SCHED)
        == 1e-3
    )


def test_schedules_are_monotone_after_warmup():
    for schedule in ("cosine", "linear"):
        values = [lr_at(it, schedule=schedule, **SCHED) for it in range(100, 2001)]
        assert all(a >= b for a, b in zip(values, values[1:]))


def test_no_warmup_starts_at_lr():
    assert lr_at(0, schedule="cosine", lr=1e-3, min_lr=0.0, warmup_iters=0, decay_iters=10) == 1e-3


def test_unknown_schedule_is_a_user_error():
    with pytest.raises(LmforgeError, match="schedule"):
        lr_at(0, schedule="step", **SCHED)
