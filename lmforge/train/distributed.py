"""Data-parallel training (DDP) for the training loop: the process group, the rank's share of
the data, and the few collectives the loop needs to keep its ranks in step.

A run is distributed when it is started by `torchrun` (or `lmforge train --nproc N`, which
re-launches itself through `torch.distributed.run`): WORLD_SIZE > 1 in the environment. The
model stays single-device (see STYLE.md: parallelism lives out of the model); `wrap_model` puts
a `DistributedDataParallel` around it, which all-reduces (averages) the gradients in backward.

The data: every rank builds the same sampler from the same seed, that is one global stream of
micro-batches, and rank r keeps micro-batches r, r + W, r + 2W, ... (`RankBatches`). So one
optimizer step of W ranks x A accumulation steps trains on exactly the W * A micro-batches that
one process with W * A accumulation steps would, and the stream's position is one state for all
ranks: a checkpoint saved by rank 0 resumes on any number of ranks. The price is that each rank
draws (not trains on) W times the batches; drawing is cheap next to a forward and backward pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: rank in [0, world_size), local_rank on its node."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # this setup created the process group, so teardown destroys it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, evaluates-and-writes metrics, saves checkpoints and plots."""
        return self.rank == 0


def setup(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join the process group torchrun describes in the environment (nothing to do when
    WORLD_SIZE is 1 or unset); returns the ranks and this rank's device (cuda:LOCAL_RANK on
    GPUs). The backend follows the device: NCCL on CUDA, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Ranks(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type not in ("cpu", "cuda"):
        raise LmforgeError(
            f"distributed training runs on cpu (gloo) or cuda (NCCL), not {device.type}; "
            "set train.device=cpu or cuda"
        )
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per process
        torch.cuda.set_device(device)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Ranks(rank, local_rank, world_size, owns_group), device


def teardown(ranks: Ranks) -> None:
    if ranks.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(
    model: torch.nn.Module, ranks: Ranks, device: torch.device, probe_loss: Callable[[], torch.Tensor]
) -> torch.nn.Module:
    """The module the loop trains through: DDP around `model` when distributed, else `model`.
    DDP broadcasts rank 0's weights at construction, so all ranks start equal. `probe_loss()`
    is one batch's loss through `model`, for `freeze_unused`."""
    if not ranks.enabled:
        return model
    frozen = freeze_unused(model, probe_loss)
    if frozen and ranks.is_main:
        print(f"DDP: the objective gives no gradient to {', '.join(frozen)}; they stay as they are")
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def freeze_unused(model: torch.nn.Module, probe_loss: Callable[[], torch.Tensor]) -> list[str]:
    """Parameters the objective never gives a gradient (a BERT pretraining head's NSP layers
    under objective mlm) stop requiring one, since DDP would wait for their gradients forever;
    one process leaves them unchanged too (the optimizer skips a parameter without gradient).
    One forward and backward pass finds them; the RNG and the gradients are left as they were."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []):
        probe_loss().backward()
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for name, p in model.named_parameters():
        p.grad = None
        if name in frozen:
            p.requires_grad_(False)
    return frozen


def sync_context(train_model: torch.nn.Module, last_micro_step: bool):
    """No gradient all-reduce on accumulation micro-steps but the last: DDP keeps adding the
    local gradients, and the last backward all-reduces their sum once."""
    if isinstance(train_model, DistributedDataParallel) and not last_micro_step:
        return train_model.no_sync()
    return nullcontext()


class RankBatches:
    """Rank `rank`'s share of a sampler's stream: micro-batches rank, rank + W, rank + 2W, ...
    (W = world_size). Every rank's sampler has the same seed, so their states are one state."""

    def __init__(self, sampler: Any, rank: int, world_size: int):
        self.sampler, self.rank, self.world_size = sampler, rank, world_size

    def next_batch(self) -> Any:
        kept = None
        for r in range(self.world_size):
            batch = self.sampler.next_batch()
            if r == self.rank:
                kept = batch
        return kept

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def reduce_step(ranks: Ranks, loss: float, tokens: int) -> tuple[float, int]:
    """(mean loss over ranks, total tokens over ranks) of one optimizer step."""
    if not ranks.enabled:
        return loss, tokens
    t = torch.tensor([loss, float(tokens)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t[0].item() / ranks.world_size, int(t[1].item())


def any_rank(ranks: Ranks, *flags: bool) -> tuple[bool, ...]:
    """Each flag, true when it is true on some rank (a Ctrl-C or a clock seen by one rank stops
    all of them at the same step, so no rank waits forever in a collective)."""
    if not ranks.enabled:
        return flags
    t = torch.tensor([float(f) for f in flags], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


def from_main(ranks: Ranks, value: Any) -> Any:
    """Rank 0's `value` on every rank (a picklable object), so all ranks take the same decision
    (precision, best checkpoint, early stopping) even where their own numbers differ in the
    last bits."""
    if not ranks.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank_seed(seed: int, rank: int, iteration: int) -> int:
    """The seed of a rank's torch RNG (dropout) from a step on: different per rank, derived
    from the iteration so a resume on any number of ranks is deterministic."""
    return seed + 1_000_003 * (rank + 1) + iteration


def relaunch(nproc: int, lmforge_args: list[str]) -> None:
    """Run `python -m lmforge <lmforge_args>` as `nproc` ranks on this machine through
    torch.distributed.run (what `torchrun --standalone --nproc-per-node nproc` does)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "lmforge", *lmforge_args]
    process, interrupted = subprocess.Popen(command), False
    while True:
        try:
            code = process.wait()
            break
        except KeyboardInterrupt:  # torchrun passes the Ctrl-C on: wait while the ranks save
            interrupted = True
    if interrupted:
        raise KeyboardInterrupt
    if code != 0:
        raise LmforgeError(f"distributed training exited with code {code}; the ranks' messages are above")


def _comm_device() -> torch.device:
    """Where collective tensors live: NCCL only moves CUDA tensors, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
