"""Data-parallel training for the training loop, DDP or FSDP2: the process group, the rank's
share of the data, and the few collectives the loop needs to keep its ranks in step.

    ddp  (train.parallel=ddp):  every rank holds the whole model, its gradients and its optimizer
                                state; backward all-reduces (averages) the gradients
    fsdp (train.parallel=fsdp): every rank holds 1/W of every parameter, of its gradient and of
                                its optimizer state (fully_shard per transformer block, then the
                                rest as the root group); a block's weights are all-gathered just
                                before its forward (and again for its backward), its gradients
                                reduce-scattered after its backward

A run is distributed when it is started by `torchrun` (or `lmforge train --nproc N`, which
re-launches itself through `torch.distributed.run`): WORLD_SIZE > 1 in the environment. The
model stays single-device code (see STYLE.md: parallelism lives out of the model): `wrap_model`
puts a `DistributedDataParallel` around it, or `shard_model` shards it in place (FSDP2 keeps the
module, its class and its parameter names; the parameters become DTensor shards), and the
optimizer is built after sharding, over the shards.

The data: every rank builds the same sampler from the same seed, that is one global stream of
micro-batches, and rank r keeps micro-batches r, r + W, r + 2W, ... (`RankBatches`). So one
optimizer step of W ranks x A accumulation steps trains on exactly the W * A micro-batches that
one process with W * A accumulation steps would, and the stream's position is one state for all
ranks: a checkpoint resumes on any number of ranks. The price is that each rank draws (not
trains on) W times the batches; drawing is cheap next to a forward and backward pass.

Checkpoints are gathered whole to rank 0 (`gather_state`: full state dicts, offloaded to CPU
tensor by tensor), not written as sharded DCP folders. Rank 0 writes the one checkpoint format
that every other command reads (generate, eval, serve, export, Hugging Face conversion), with the
optimizer state in the layout a single process writes, so a checkpoint resumes on any number of
ranks, under DDP, FSDP or in one process. The price is host memory: rank 0 holds the whole fp32
model and AdamW state (12 bytes per parameter) while saving, and every rank loads the whole model
into CPU memory before sharding it (at start and on resume). That is fine for models of up to a
few billion parameters on a usual GPU host; past that a sharded checkpoint (each rank writing its
own shards with torch.distributed.checkpoint) and meta-device initialisation would be needed.

Mixed precision: under DDP bf16 is autocast. Under FSDP it is a `MixedPrecisionPolicy`
(param_dtype bf16, reduce_dtype fp32): the sharded weights stay fp32 (the optimizer's master
copy), FSDP casts each shard to bf16 before the all-gather (half the bytes to send and to hold
gathered) and reduce-scatters the gradients in fp32, so averaging W ranks' gradients loses no
bits. Autocast would all-gather the fp32 weights and recast them at every matmul. Unlike
autocast the whole forward then runs in bf16, norms included; the losses upcast the logits.
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
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
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


def barrier(ranks: Ranks) -> None:
    """Wait until every rank gets here (after rank 0 wrote what the others then read)."""
    if ranks.enabled:
        dist.barrier()


def refuse_distributed(command: str) -> None:
    """Stop a command that is not distributed-aware when it runs under torchrun: its N copies
    would each do the whole job and write the same files."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        raise LmforgeError(
            f"{command} runs in one process, but WORLD_SIZE={world_size} (started by torchrun?): "
            f"its {world_size} copies would write the same files; run it without torchrun "
            "(distributed training: `lmforge train`, `lmforge finetune --task seq2seq`)"
        )


def shard_model(model: torch.nn.Module, ranks: Ranks, device: torch.device, precision: str) -> None:
    """FSDP2, in place: each transformer block is one group (all-gathered and freed on its own),
    everything else (embeddings, final norm, heads) the root group. The module keeps its class
    (FSDP mixes itself in) and its parameter names; its parameters become this rank's DTensor
    shards, moved to `device` group by group, so a model built on CPU never sits whole on the GPU.
    All ranks must hold the same weights before (the same seed or the same checkpoint).
    A parameter no loss reaches needs nothing here: FSDP reduce-scatters only the gradients that
    exist, and every rank runs the same objective."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from lmforge.nn.block import Block, DecoderBlock

    mesh = init_device_mesh(device.type, (ranks.world_size,))
    policy = MixedPrecisionPolicy()
    if precision == "bf16":  # fp32 master weights and gradient reductions (module docstring)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    # a decoder block's cross-attention keys/values are projected outside its forward (once per
    # source, `EncoderDecoder.cross_kv`), where its own group would still be sharded; decoder
    # blocks stay in the root group, gathered for the whole forward
    blocks = [m for m in model.modules() if isinstance(m, Block) and not isinstance(m, DecoderBlock)]
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def wrap_model(
    model: torch.nn.Module, ranks: Ranks, device: torch.device, probe_loss: Callable[[], torch.Tensor]
) -> torch.nn.Module:
    """The module the loop trains through: DDP around `model` when distributed, else `model`
    (also when `shard_model` sharded it: FSDP needs no wrapper). DDP broadcasts rank 0's weights
    at construction, so all ranks start equal. `probe_loss()` is one batch's loss through
    `model`, for `freeze_unused`."""
    if not ranks.enabled or isinstance(model, FSDPModule):
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
    """No gradient communication on accumulation micro-steps but the last: DDP keeps adding the
    local gradients and the last backward all-reduces their sum once; FSDP keeps the unsharded
    gradients (the memory of a whole gradient, in fp32) and the last backward reduce-scatters
    their sum once."""
    if isinstance(train_model, FSDPModule):
        train_model.set_requires_gradient_sync(last_micro_step)
    elif isinstance(train_model, DistributedDataParallel) and not last_micro_step:
        return train_model.no_sync()
    return nullcontext()


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm; returns the norm before clipping, a plain tensor. Under
    FSDP the gradients are DTensor shards: torch sums their squares across ranks, and the norm
    comes back as a replicated DTensor (the same number on every rank)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def gather_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, ranks: Ranks
) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any] | None]:
    """(weights, optimizer state) to save, in the layout a single process writes. Without FSDP:
    (None: the model's own tensors, `optimizer.state_dict()`). Under FSDP every rank must call
    it (the shards are gathered tensor by tensor to rank 0's CPU); rank 0 gets the whole state,
    the others (None, None). `optimizer=None`: the weights alone."""
    if not isinstance(model, FSDPModule):
        return None, None if optimizer is None else optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    by_name = None
    if optimizer is not None and optimizer.state:
        # (not before the first step: there is nothing to gather, and DCP would create the state
        # with a zero-gradient step, which AdamW's bias correction would then count)
        by_name = get_optimizer_state_dict(model, optimizer, options=options)
    if not ranks.is_main:
        return None, None
    # each tensor once, as `checkpoint.weights_state_dict`: a tied lm_head is the embedding
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {
        n for n, _ in model.named_parameters()}
    weights = {n: t.contiguous() for n, t in weights.items() if n not in aliases}
    if by_name is None:
        return weights, None if optimizer is None else optimizer.state_dict()  # no moments yet
    # DCP keys the optimizer state by parameter name, `optimizer.state_dict()` by position
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    return weights, {
        "state": {index[name]: s for name, s in by_name["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]],
    }


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a saved `optimizer.state_dict()` (any world size wrote it, all in one layout). Under
    FSDP every rank passes the whole state it read and keeps its shard of each moment."""
    if not isinstance(model, FSDPModule) or not state["state"]:
        # (no moments yet, saved before the first step: DCP would create them with a zero-gradient
        # step, which AdamW's bias correction would count)
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model, optimizer)
    saved = [i for g in state["param_groups"] for i in g["params"]]
    if sorted(saved) != list(range(len(names))):
        raise LmforgeError(
            f"the saved optimizer state holds {len(saved)} parameters, the model {len(names)}; it "
            "belongs to another model"
        )
    by_name = {
        "state": {names[i]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }
    # every rank read the checkpoint already (the weights), so no broadcast from rank 0 is needed
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Each optimizer parameter's name, in `optimizer.state_dict()`'s order (a tied parameter
    under its first name, as `named_parameters` and DCP give it)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


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
