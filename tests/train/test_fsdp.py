"""FSDP2 (train.parallel=fsdp) over gloo on CPU: 2 sharded ranks train what 1 process with the
same global batch trains, reduce-scatter gradients once per optimizer step, write ordinary
checkpoints (the weights and the optimizer state of a single process) that resume in 1 process
and back; bf16 is FSDP's mixed-precision policy. Also: the commands that are not distributed
refuse to run under torchrun."""

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lmforge.checkpoint import load_train_state
from lmforge.train import DataConfig, train
from tests.train.test_distributed import (
    MAX_ITERS,
    assert_same_curve,
    data_dir,
    model_config,
    spawn,
    train_config,
)
from tests.train.test_trainer import train_losses as losses

__all__ = ["data_dir"]  # the data folder fixture, shared with the DDP tests


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """1 process, 4 micro-batches of 4 rows per step: a whole run, and its first half alone."""
    root = tmp_path_factory.mktemp("fsdp_ref")
    mc, dc = model_config(data_dir), DataConfig(str(data_dir))
    train(mc, train_config(), dc, root / "whole", progress=False)
    train(mc, train_config(max_iters=3), dc, root / "half", progress=False)
    return root


def _fsdp_rank(rank, out_dir, mc, tc, dc, record_dir):
    """One rank: train with FSDP into `out_dir` (rank 1 gets a folder of its own, which must stay
    unwritten) and record what FSDP did: the groups sharded and their mixed-precision policy,
    the gradient reduce-scatters, the activation checkpoints, the autocast precision asked for."""
    import torch.distributed as dist
    import torch.distributed.fsdp as fsdp
    import torch.utils.checkpoint

    import lmforge.train.trainer as trainer

    seen = {"groups": [], "reduce_scatters": 0, "checkpoints": 0, "autocast": []}
    fully_shard, reduce_scatter = fsdp.fully_shard, dist.reduce_scatter_single
    checkpoint, autocast_context = torch.utils.checkpoint.checkpoint, trainer.autocast_context

    def spy_shard(module, **kw):
        policy = kw["mp_policy"]
        seen["groups"].append(
            [type(module).__name__, str(policy.param_dtype), str(policy.reduce_dtype)]
        )
        return fully_shard(module, **kw)

    def spy_reduce_scatter(*args, **kw):
        seen["reduce_scatters"] += 1
        return reduce_scatter(*args, **kw)

    def spy_checkpoint(*args, **kw):
        seen["checkpoints"] += 1
        return checkpoint(*args, **kw)

    def spy_autocast(device_type, precision):
        seen["autocast"].append(precision)
        return autocast_context(device_type, precision)

    fsdp.fully_shard, dist.reduce_scatter_single = spy_shard, spy_reduce_scatter
    torch.utils.checkpoint.checkpoint, trainer.autocast_context = spy_checkpoint, spy_autocast
    # the MFU denominator: timing bf16 matmuls takes minutes on a CPU without bf16 units
    trainer.measure_matmul_peak = lambda device, dtype: 1e12
    train(mc, tc, dc, out_dir if rank == 0 else record_dir / "rank1_out", progress=False)
    (record_dir / f"rank{rank}.json").write_text(json.dumps(seen))


def _run_fsdp(tmp_path, mc, data_dir, **tc) -> list[dict]:
    """2 FSDP ranks x 2 micro-batches for 3 steps into tmp_path/fsdp; what each rank recorded."""
    record = tmp_path / "record"
    record.mkdir()
    tc = train_config(**{"grad_accum_steps": 2, "max_iters": 3, "parallel": "fsdp", **tc})
    spawn(_fsdp_rank, 2, tmp_path / "fsdp", mc, tc, DataConfig(str(data_dir)), record)
    assert not (record / "rank1_out").exists()
    return [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_fsdp_ranks_train_what_one_process_trains_and_resume_in_one(
    tmp_path, data_dir, reference
):
    seen = _run_fsdp(tmp_path, model_config(data_dir), data_dir, activation_checkpointing=True)
    want = losses(reference / "whole")
    print(
        f"\n1 process x 4 micro-batches: {[want[i] for i in (1, 2, 3)]}"
        f"\n2 FSDP ranks x 2 micro-batches: {[losses(tmp_path / 'fsdp')[i] for i in (1, 2, 3)]}"
    )
    assert_same_curve(losses(tmp_path / "fsdp"), {it: want[it] for it in (1, 2, 3)})
    for rank in seen:
        # the tiny GPT's 2 blocks, then the root; fp32: no mixed-precision policy
        assert rank["groups"] == [["Block", "None", "None"]] * 2 + [["GPT", "None", "None"]]
        # one reduce-scatter per group and optimizer step, none on the first micro-step
        assert rank["reduce_scatters"] == 3 * 3
        assert rank["checkpoints"] > 0  # activation checkpointing inside the sharded blocks
        assert set(rank["autocast"]) == {"fp32"}

    # the checkpoint is the one a single process writes: same tensor names, and the same weights
    # and AdamW moments as 1 process after the same 3 steps
    got, ref = tmp_path / "fsdp" / "last", reference / "half" / "last"
    got_w, ref_w = load_file(got / "model.safetensors"), load_file(ref / "model.safetensors")
    assert sorted(got_w) == sorted(ref_w)
    for name in ref_w:
        torch.testing.assert_close(got_w[name], ref_w[name], rtol=1e-4, atol=1e-6)
    got_s, ref_s = load_train_state(got), load_train_state(ref)
    assert got_s["world_size"] == 2 and got_s["iter"] == ref_s["iter"] == 3
    got_o, ref_o = got_s["optimizer"], ref_s["optimizer"]
    assert [g["params"] for g in got_o["param_groups"]] == [
        g["params"] for g in ref_o["param_groups"]
    ]
    assert sorted(got_o["state"]) == sorted(ref_o["state"])
    for i, moments in ref_o["state"].items():
        for key, value in moments.items():
            torch.testing.assert_close(got_o["state"][i][key], value, rtol=1e-4, atol=1e-7)

    # the 2-rank checkpoint resumes in 1 process and continues the reference curve
    train(
        None,
        train_config(),
        DataConfig(str(data_dir)),
        tmp_path / "fsdp",
        resume=True,
        progress=False,
    )
    assert_same_curve(losses(tmp_path / "fsdp"), want)


def test_one_process_checkpoint_resumes_on_two_fsdp_ranks_through_the_cli(tmp_path, reference):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference / "half", run)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmforge",
            "train",
            "--out",
            str(run),
            "--resume",
            "--nproc",
            "2",
            "--no-progress",
            "--set",
            "train.parallel=fsdp",
            "train.grad_accum_steps=2",
            f"train.max_iters={MAX_ITERS}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 ranks (FSDP)" in result.stdout
    assert (
        result.stdout.count(f"stopped (max_iters) at iter {MAX_ITERS}") == 1
    )  # rank 0 alone reports
    assert load_train_state(run / "last")["world_size"] == 2
    assert_same_curve(losses(run), losses(reference / "whole"))


def test_bf16_is_a_mixed_precision_policy_under_fsdp(tmp_path, data_dir, reference):
    seen = _run_fsdp(tmp_path, model_config(data_dir), data_dir, precision="bf16")
    for rank in seen:
        # bf16 weights in forward and backward, fp32 gradient reduction; no autocast on top
        bf16 = ["torch.bfloat16", "torch.float32"]
        assert rank["groups"] == [["Block", *bf16]] * 2 + [["GPT", *bf16]]
        assert set(rank["autocast"]) == {"fp32"}
    got, want = losses(tmp_path / "fsdp"), losses(reference / "whole")
    print(
        f"\nfp32 (1 process): {[want[i] for i in (1, 2, 3)]}\nbf16 (2 FSDP ranks): {[got[i] for i in (1, 2, 3)]}"
    )
    assert sorted(got) == [1, 2, 3]
    for it in got:
        assert math.isfinite(got[it])
        assert math.isclose(got[it], want[it], rel_tol=1e-3), (it, got[it], want[it])
    assert got != {it: want[it] for it in got}  # bf16 rounding did take place
    # the master weights stay fp32, and so does the checkpoint
    weights = load_file(tmp_path / "fsdp" / "last" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}


def test_an_encoder_decoder_trains_under_fsdp_as_in_one_process(tmp_path):
    from tests.data.test_parallel import prepare_toy
    from tests.train.test_seq2seq import tiny

    data = prepare_toy(tmp_path, n=200)
    # no dropout: the ranks draw their own masks (see the README on DDP)
    mc, dc = tiny(data, "t5-tiny", activation_dropout=0.0), DataConfig(str(data.path))
    train(
        mc,
        train_config(max_iters=3, grad_accum_steps=4, batch_size=8),
        dc,
        tmp_path / "ref",
        progress=False,
    )
    seen = _run_fsdp(tmp_path, mc, data.path, batch_size=8)
    # the encoder's blocks shard on their own; the decoder's stay in the root group, since their
    # cross-attention keys/values are projected outside their forward
    assert seen[0]["groups"] == [["Block", "None", "None"]] * 2 + [
        ["EncoderDecoder", "None", "None"]
    ]
    assert_same_curve(losses(tmp_path / "fsdp"), losses(tmp_path / "ref"))


def test_seq2seq_finetuning_runs_under_torchrun(tmp_path):
    from lmforge.checkpoint import save_checkpoint
    from lmforge.models import EncoderDecoder
    from tests.data.test_parallel import prepare_toy, toy_pairs, write_aligned
    from tests.train.test_seq2seq import evals, tiny

    (tmp_path / "pretrain").mkdir()
    data = prepare_toy(tmp_path / "pretrain", n=100)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "base", EncoderDecoder(tiny(data)), data.tokenizer)
    src, tgt = write_aligned(tmp_path, toy_pairs(64, seed=5))
    dsrc, dtgt = write_aligned(tmp_path, toy_pairs(16, seed=6), name="dev")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "lmforge",
            "finetune",
            "--task",
            "seq2seq",
            "--base",
            str(tmp_path / "base"),
            "--train",
            str(src),
            "--train-target",
            str(tgt),
            "--dev",
            str(dsrc),
            "--dev-target",
            str(dtgt),
            "--out",
            str(tmp_path / "ft"),
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--precision",
            "fp32",
            "--device",
            "cpu",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # an epoch is 64 pairs in batches of 8 on each of 2 ranks; rank 0 alone reports
    assert result.stdout.count("stopped (max_iters) at step 4") == 1
    assert [r["iter"] for r in evals(tmp_path / "ft")] == [0, 4]
    assert load_train_state(tmp_path / "ft" / "last")["world_size"] == 2


@pytest.mark.parametrize(
    "argv, command",
    [
        (
            ["finetune", "--base", "b", "--train", "t.jsonl", "--dev", "d.jsonl", "--out", "o"],
            "lmforge finetune",
        ),
        (
            ["finetune", "--task", "chat", "--base", "b", "--train", "t.jsonl", "--out", "o"],
            "lmforge finetune --task chat",
        ),
        (
            ["finetune", "--task", "multitask", "--config", "c.toml", "--out", "o"],
            "lmforge finetune --task multitask",
        ),
        (
            ["distill", "--teacher", "t", "--student", "gpt-tiny", "--data", "d", "--out", "o"],
            "lmforge distill",
        ),
        (
            ["prune", "ckpt", "--method", "magnitude", "--amount", "0.5", "--out", "o"],
            "lmforge prune",
        ),
        (["prepare", "--data", "corpus.txt", "--out", "o"], "lmforge prepare"),
        (["quantize", "ckpt", "--scheme", "int8-weight", "--out", "o"], "lmforge quantize"),
        (["generate", "ckpt", "--prompt", "hi"], "lmforge generate"),
        (["chat", "ckpt"], "lmforge chat"),
        (["quickstart"], "lmforge quickstart"),
    ],
)
def test_commands_that_are_not_distributed_refuse_to_run_under_torchrun(
    argv, command, monkeypatch, capsys
):
    from lmforge.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"lmforge: error: {command} runs in one process, but WORLD_SIZE=2" in err
    assert "would write the same files" in err


def test_parallel_is_validated():
    from lmforge.errors import LmforgeError

    with pytest.raises(
        LmforgeError, match="train.parallel='zero' is not valid; choose one of 'ddp', 'fsdp'"
    ):
        train_config(parallel="zero")
