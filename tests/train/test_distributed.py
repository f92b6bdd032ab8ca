"""Data-parallel training over gloo on CPU: 2 ranks train exactly what 1 process with the same
global batch trains, checkpoints move between world sizes, only rank 0 writes, accumulation
micro-steps skip the gradient all-reduce, and activation checkpointing changes nothing."""

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from lmforge.checkpoint import load_train_state
from lmforge.data import PrepareConfig, prepare
from lmforge.models import GPTConfig
from lmforge.train import DataConfig, TrainConfig, train
from tests.conftest import SAMPLE_TEXT
from tests.train.test_trainer import tiny_config, vocab_of
from tests.train.test_trainer import train_losses as losses

MAX_ITERS = 6  # the reference run's length; the distributed runs do half, then resume


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_data")
    (root / "corpus.txt").write_text(SAMPLE_TEXT * 3)
    prepare(PrepareConfig(source=str(root / "corpus.txt"), tokenizer="char"), root / "prepared", progress=False)
    return root / "prepared"


def model_config(data_dir) -> GPTConfig:
    return tiny_config(vocab_of(data_dir))


def train_config(**kw) -> TrainConfig:
    defaults = dict(batch_size=4, grad_accum_steps=4, max_iters=MAX_ITERS, lr_decay_iters=MAX_ITERS,
                    eval_interval=3, eval_iters=2, log_interval=1, warmup_iters=2, lr=3e-3,
                    precision="fp32", device="cpu")
    return TrainConfig(**{**defaults, **kw})


def assert_same_curve(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want), (got, want)
    for it in want:
        assert math.isclose(got[it], want[it], rel_tol=1e-4), (it, got[it], want[it])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(target, world_size: int, *args) -> None:
    """Run `target(rank, *args)` in `world_size` fresh processes, each with the environment
    torchrun gives its ranks, so that `train` joins them into one gloo group."""
    mp.spawn(_as_rank, nprocs=world_size, args=(world_size, free_port(), target, args))


def _as_rank(rank, world_size, port, target, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    target(rank, *args)


def _rank_main(rank, out_dirs, mc, tc, dc, counts_dir):
    """One rank of a spawned run: train, and write how often DDP all-reduced gradients."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    import lmforge.train.distributed as distributed

    calls = []
    wrap_model = distributed.wrap_model

    def counting_wrap(*args):
        ddp = wrap_model(*args)

        def hook(process_group, bucket):
            calls.append(bucket.index())
            return default_hooks.allreduce_hook(process_group, bucket)

        ddp.register_comm_hook(None, hook)
        return ddp

    distributed.wrap_model = counting_wrap
    train(mc, tc, dc, out_dirs[rank], progress=False)
    (counts_dir / f"rank{rank}.json").write_text(json.dumps(calls))


def test_two_ranks_train_what_one_process_trains_and_checkpoints_move(tmp_path, data_dir):
    mc, dc = model_config(data_dir), DataConfig(str(data_dir))
    # reference: 1 process, 4 micro-batches of 4 rows per step
    train(mc, train_config(), dc, tmp_path / "ref", progress=False)
    want = losses(tmp_path / "ref")

    # 2 ranks x 2 micro-batches: the same 4 micro-batches per step; rank 1 gets its own out dir,
    # which must stay unwritten
    out_dirs = [tmp_path / "ddp", tmp_path / "rank1_out"]
    counts = tmp_path / "counts"
    counts.mkdir()
    spawn(_rank_main, 2, out_dirs, mc, train_config(grad_accum_steps=2, max_iters=3), dc, counts)
    assert not out_dirs[1].exists()
    assert load_train_state(tmp_path / "ddp" / "last")["world_size"] == 2
    # no_sync: one gradient all-reduce per optimizer step (the tiny model is one bucket), not
    # one per micro-step
    for rank in (0, 1):
        assert json.loads((counts / f"rank{rank}.json").read_text()) == [0, 0, 0]
    assert_same_curve(losses(tmp_path / "ddp"), {it: want[it] for it in (1, 2, 3)})

    # the 2-rank checkpoint resumes in 1 process and continues the reference curve
    train(None, train_config(), dc, tmp_path / "ddp", resume=True, progress=False)
    assert_same_curve(losses(tmp_path / "ddp"), want)


def test_one_process_checkpoint_resumes_on_two_ranks_through_the_cli(tmp_path, data_dir):
    mc, dc = model_config(data_dir), DataConfig(str(data_dir))
    train(mc, train_config(), dc, tmp_path / "ref", progress=False)
    train(mc, train_config(max_iters=3), dc, tmp_path / "run", progress=False)
    result = subprocess.run(
        [sys.executable, "-m", "lmforge", "train", "--out", str(tmp_path / "run"), "--resume",
         "--nproc", "2", "--no-progress", "--set", "train.grad_accum_steps=2",
         f"train.max_iters={MAX_ITERS}"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("stopped (max_iters) at iter 6") == 1  # rank 0 alone reports
    assert load_train_state(tmp_path / "run" / "last")["world_size"] == 2
    assert_same_curve(losses(tmp_path / "run"), losses(tmp_path / "ref"))


def test_nproc_errors(capsys, monkeypatch):
    from lmforge.cli import main

    assert main(["train", "--data", "x", "--out", "y", "--nproc", "0"]) == 2
    assert "--nproc must be >= 1, got 0" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--data", "x", "--out", "y", "--nproc", "2"]) == 2
    assert "drop it when running under torchrun" in capsys.readouterr().err


def test_activation_checkpointing_changes_memory_not_results(tmp_path, data_dir):
    mc, dc = model_config(data_dir), DataConfig(str(data_dir))
    tc = dict(max_iters=2, grad_accum_steps=1, eval_interval=2)
    train(mc, train_config(**tc), dc, tmp_path / "plain", progress=False)
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    torch.utils.checkpoint.checkpoint = counting
    try:
        train(mc, train_config(**tc, activation_checkpointing=True), dc, tmp_path / "ckpt", progress=False)
    finally:
        torch.utils.checkpoint.checkpoint = original
    assert calls  # the blocks did go through torch.utils.checkpoint
    assert_same_curve(losses(tmp_path / "ckpt"), losses(tmp_path / "plain"))


def test_freeze_unused_finds_what_the_loss_never_reaches():
    from lmforge.train.distributed import freeze_unused

    model = torch.nn.ModuleDict({"used": torch.nn.Linear(4, 4), "head": torch.nn.Linear(4, 2)})
    rng = torch.get_rng_state()

    def probe_loss():
        x = torch.randn(3, 4)  # draws from the RNG, which must be left as it was
        return torch.nn.functional.dropout(model["used"](x), 0.5).sum()

    assert freeze_unused(model, probe_loss) == ["head.weight", "head.bias"]
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == [True, True, False, False]
