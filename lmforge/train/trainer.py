"""The training loop, as one readable function, for every pretraining objective (GPT's causal LM,
BERT's masked LM with or without next-sentence prediction, an encoder-decoder's seq2seq or T5 span
corruption; see `lmforge.train.objectives`).

    for each optimizer step:
        every eval_interval steps: estimate train/val loss (and the objective's metrics), keep the
            best checkpoint, save `last`
        lr from the schedule (a pure function of the step, so resuming needs no scheduler state)
        grad_accum_steps micro-batches: forward under autocast, loss / accum, backward
        stop on a non-finite loss or gradient, before the optimizer can spread it into the weights
        clip the global gradient norm, step, log loss / tokens/s / MFU

Failure rules: a checkpoint folder is replaced only by a complete new one (see `checkpoint.atomic_dir`);
Ctrl-C (or SIGTERM) finishes the current step, saves `last` and returns; a second Ctrl-C aborts
at once, leaving the previous checkpoint as it was; a NaN/inf raises `TrainingDiverged` without saving.
Resuming restores weights, optimizer moments, the RNG and the data sampler, so a stopped and
resumed run reproduces the uninterrupted run's losses exactly.

Under torchrun (WORLD_SIZE > 1) the same loop runs data-parallel with DDP or FSDP
(train.parallel), rank 0 alone writing; `lmforge.train.distributed` holds the few pieces that
keep the ranks in step.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lmforge.checkpoint import load_checkpoint, load_train_state, save_checkpoint
from lmforge.data import TokenData, open_data
from lmforge.data.parallel import BucketBatches, ParallelData
from lmforge.errors import LmforgeError
from lmforge.models.bert import Bert, BertConfig
from lmforge.models.encoder_decoder import EncoderDecoder, EncoderDecoderConfig
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.train import distributed
from lmforge.train.allocator import tune_cpu_allocator
from lmforge.train.config import DataConfig, TrainConfig
from lmforge.train.lora import (
    ADAPTER_DIR,
    LoraConfig,
    apply_lora,
    count_parameters,
    frozen_matmul_weights,
    lora_state_dict,
    merged_state_dict,
    resume_lora,
    save_adapter,
)
from lmforge.train.objectives import CausalLM, MaskedLM, Seq2SeqLM, add_stats, move_batch
from lmforge.train.optim import lr_at, make_optimizer
from lmforge.train.precision import autocast_context, measure_matmul_peak, resolve_precision

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
EVAL_LOGITS_BUDGET = 1 << 25  # logits elements per evaluation forward pass (128 MiB in fp32)


class TrainingDiverged(LmforgeError):
    """The loss or gradient became NaN/inf; nothing was saved past the last good checkpoint."""


@dataclass
class TrainResult:
    run_dir: Path
    iters: int  # optimizer steps done in total
    stop_reason: str  # max_iters | max_time | early_stopping | interrupted
    best_val_loss: float | None
    last_eval: dict[str, float]
    seconds: float


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise LmforgeError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmforgeError("train.device=cuda but no CUDA device is available; use cpu or auto")
    return device


ModelConfig = GPTConfig | BertConfig | EncoderDecoderConfig
SEQ2SEQ_OBJECTIVES = ("seq2seq", "span_corruption")


def model_class(config: ModelConfig) -> type[torch.nn.Module]:
    if isinstance(config, EncoderDecoderConfig):
        return EncoderDecoder
    return Bert if isinstance(config, BertConfig) else GPT


def resolve_objective(requested: str, model_config: ModelConfig, parallel: bool = False) -> str:
    """The objective a run trains with: "auto" follows the model (and, for an encoder-decoder,
    the data: sentence pairs or a token stream); a mismatch is an error."""
    if isinstance(model_config, EncoderDecoderConfig):
        objective = requested if requested != "auto" else "seq2seq" if parallel else "span_corruption"
        if objective not in SEQ2SEQ_OBJECTIVES:
            raise LmforgeError(
                f"train.objective={requested!r} needs a GPT or BERT; an encoder-decoder trains with "
                "seq2seq (sentence pairs) or span_corruption (a token stream)"
            )
        if (objective == "seq2seq") != parallel:
            raise LmforgeError(
                "train.objective=seq2seq needs parallel data (prepare with --target or "
                "--source-field/--target-field)" if objective == "seq2seq" else
                "train.objective=span_corruption needs a token stream, but the data holds sentence "
                "pairs; use objective seq2seq"
            )
        return objective
    if parallel:
        raise LmforgeError(
            "the data holds sentence pairs, which train an encoder-decoder (e.g. --preset "
            "transformer-tiny or t5-tiny), not a GPT or BERT"
        )
    if requested in SEQ2SEQ_OBJECTIVES:
        raise LmforgeError(
            f"train.objective={requested!r} needs an encoder-decoder model (e.g. --preset t5-tiny)"
        )
    if isinstance(model_config, GPTConfig):
        if requested not in ("auto", "clm"):
            raise LmforgeError(
                f"train.objective={requested!r} needs a BERT model (e.g. --preset bert-mini); "
                "a GPT trains with objective clm"
            )
        return "clm"
    head = model_config.head
    objective = {"auto": "mlm" if head == "mlm" else "mlm_nsp"}.get(requested, requested)
    needed = {"clm": None, "mlm": ("mlm", "pretraining"), "mlm_nsp": ("pretraining",)}[objective]
    if needed is None:
        raise LmforgeError(
            "train.objective='clm' needs a GPT model (e.g. --preset gpt-tiny); a BERT pretrains with "
            "mlm or mlm_nsp"
        )
    if head not in needed:
        raise LmforgeError(
            f"train.objective={objective!r} needs model.head={needed[0]!r}, got {head!r} "
            "(fine-tune task heads with `lmforge finetune`)"
        )
    return objective


def make_objective(
    model_config: ModelConfig, tc: TrainConfig, dc: DataConfig, data: TokenData | ParallelData
) -> CausalLM | MaskedLM | Seq2SeqLM:
    name = resolve_objective(tc.objective, model_config, isinstance(data, ParallelData))
    if name in SEQ2SEQ_OBJECTIVES:
        return _seq2seq_objective(name, model_config, tc, dc, data)
    if name == "clm":
        return CausalLM(data, model_config.block_size)
    if dc.max_length > model_config.max_position:
        raise LmforgeError(
            f"data.max_length={dc.max_length} is longer than the model's "
            f"max_position={model_config.max_position}"
        )
    return MaskedLM(
        data, dc.max_length, nsp=name == "mlm_nsp", mlm_weight=tc.mlm_weight,
        nsp_weight=tc.nsp_weight, mlm_probability=dc.mlm_probability,
        whole_word_masking=dc.whole_word_masking,
    )


def _seq2seq_objective(
    name: str, c: EncoderDecoderConfig, tc: TrainConfig, dc: DataConfig, data
) -> Seq2SeqLM:
    pad, start = c.pad_token_id, c.decoder_start_token_id
    eos = c.eos_token_id if c.eos_token_id is not None else data.tokenizer.eos_id
    if name == "seq2seq":
        if data.source_tokenizer is not None and c.share_embeddings:
            raise LmforgeError(
                "the data has separate source and target vocabularies, so the model needs its own "
                "table for each: set model.share_embeddings=false"
            )
        if c.position != "relative":
            longest = max(int(lengths.max(initial=0)) for split in ("train", "val")
                          for lengths in data.lengths(split))
            if longest > c.max_position:
                raise LmforgeError(
                    f"the data has sequences of {longest} tokens but model.max_position is "
                    f"{c.max_position}; raise model.max_position or prepare with a lower --max-length"
                )

        def factory(split: str, batch_size: int, seed: int) -> BucketBatches:
            return BucketBatches(data, split, batch_size, seed, pad, start)

        return Seq2SeqLM(name, factory, tc.label_smoothing)
    from lmforge.data.span_corruption import SpanCorruptionBatches
    from lmforge.tokenizer import sentinel_ids

    sentinels = sentinel_ids(data.tokenizer)
    if not sentinels or eos is None:
        raise LmforgeError(
            "span corruption needs a tokenizer with sentinel tokens <extra_id_N> and </s>; prepare "
            "the data with `lmforge prepare --tokenizer bpe --sentinels 100`"
        )
    if c.position != "relative" and dc.max_length > c.max_position:
        raise LmforgeError(
            f"data.max_length={dc.max_length} is longer than the model's max_position={c.max_position}"
        )

    def factory(split: str, batch_size: int, seed: int) -> SpanCorruptionBatches:
        return SpanCorruptionBatches(
            data, split, batch_size, seed, inputs_length=dc.max_length, sentinels=sentinels,
            eos_id=eos, pad_id=pad, decoder_start_id=start, noise_density=dc.noise_density,
            mean_span=dc.mean_noise_span_length,
        )

    return Seq2SeqLM(name, factory, tc.label_smoothing)


def train(
    model_config: ModelConfig | None,
    train_config: TrainConfig,
    data_config: DataConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    init_model: torch.nn.Module | None = None,
    objective_wrapper: Callable[[Any], Any] | None = None,
    extra_meta: dict[str, Any] | None = None,
    on_step: Callable[[torch.nn.Module], None] | None = None,
    lora: LoraConfig | None = None,
    base: str | Path | None = None,
) -> TrainResult:
    """Train a GPT, a BERT or an encoder-decoder on a prepared data folder, writing checkpoints
    and logs into `out_dir`.

    With `resume=True` the model config and all training state come from `out_dir/last`. A new
    run starts from random weights, or from `init_model`'s (fine-tuning; its config is the run's).
    `objective_wrapper` turns the objective into another with the same methods (distillation,
    `lmforge.compress.distill`); `extra_meta` adds sections to every checkpoint's config.json.
    `on_step(model)` runs after every optimizer step (magnitude pruning re-applies its zeros).

    `lora` trains LoRA adapters over `init_model`'s frozen weights (`lmforge.train.lora`): `best`
    and `last` are written merged (ordinary checkpoints), RUN_DIR/adapter holds best's adapter
    alone, and last's state.pt the adapters unmerged. `base`, the checkpoint `init_model` was
    read from, is recorded in the checkpoints and the adapter; a resumed LoRA run puts it back
    under its adapters (or `init_model`, when given).
    """
    tc, run_dir = train_config, Path(out_dir)
    data = open_data(data_config.path)
    # under torchrun: join the process group; this rank's device (cuda:LOCAL_RANK on GPUs)
    ranks, device = distributed.setup(resolve_device(tc.device))
    fsdp = ranks.enabled and tc.parallel == "fsdp"
    if fsdp and tc.compile:
        raise LmforgeError("train.compile=true does not work with train.parallel=fsdp (untested); "
                           "drop one of them")
    # FSDP builds the model on CPU and moves each shard to the device as it shards
    init_device = torch.device("cpu") if fsdp else device
    if device.type == "cpu":
        tune_cpu_allocator()

    # ---- model, optimizer and state: fresh, or restored from the last checkpoint ---------------
    state: dict[str, Any] | None = None
    if resume:
        if not (run_dir / "last").exists():
            raise LmforgeError(
                f"cannot resume: {str(run_dir / 'last')!r} does not exist (start without --resume)"
            )
        ckpt = load_checkpoint(run_dir / "last", device=init_device)
        model, state = ckpt.model, load_train_state(ckpt.path)
        if model_config is not None and asdict(model_config) != asdict(model.config):
            raise LmforgeError(
                "cannot change the model config when resuming; drop the model overrides"
            )
        model_config = model.config
        if "lora" in ckpt.meta:  # `last` holds merged weights: the base goes back under the adapters
            base = base if base is not None else ckpt.meta.get("base")
            lora = resume_lora(model, {**ckpt.meta, "base": base}, state["lora"], lora, init_model,
                               where=f"resuming {str(run_dir / 'last')!r}")
        elif lora is not None:
            raise LmforgeError("cannot add LoRA to a run being resumed (it trains every weight); drop the "
                               "LoRA options")
    else:
        if model_config is None:
            raise LmforgeError("a model config is needed to start a new run")
        if (run_dir / "last").exists():
            raise LmforgeError(
                f"{str(run_dir)!r} already holds a run; pass --resume to continue it, or choose another --out"
            )
        torch.manual_seed(tc.seed)
        model = model_class(model_config)(model_config)
        if init_model is not None:
            # imported here: lmforge.compress imports this module
            from lmforge.compress.quantize import refuse_quantized

            refuse_quantized(init_model, "train")
            model.load_state_dict(init_model.state_dict())
        if lora is not None:
            if init_model is None:
                raise LmforgeError("LoRA trains adapters over a pretrained model, not random weights: give "
                                   "the model to start from (`lmforge train --init-from CKPT --lora`)")
            apply_lora(model, lora)  # the adapters' random A draws from the seeded RNG too
        model = model.to(init_device)
    if lora is not None and fsdp:
        raise LmforgeError("LoRA with train.parallel=fsdp is not supported (FSDP would shard a frozen base "
                           "with few trainable tensors); use train.parallel=ddp")
    if tc.activation_checkpointing:
        checkpoint_blocks(model)
    if data.vocab_size > model_config.vocab_size:
        raise LmforgeError(
            f"the data's tokenizer has {data.vocab_size} tokens but model.vocab_size is {model_config.vocab_size}"
        )
    objective = make_objective(model_config, tc, data_config, data)
    if objective_wrapper is not None:
        objective = objective_wrapper(objective)
    model.train()
    batches = objective.sampler("train", tc.batch_size, seed=tc.seed)
    if ranks.enabled:  # this rank's share of the one stream of micro-batches
        batches = distributed.RankBatches(batches, ranks.rank, ranks.world_size)
    has_val = data.tokens("val") > 0
    if has_val:  # fail now, not at the first eval, when val is smaller than the context
        objective.sampler("val", tc.batch_size, seed=tc.seed)

    meta = {"train": asdict(tc), "data": asdict(data_config), "data_manifest": data.manifest,
            **(extra_meta or {}), **({"base": str(base)} if base is not None else {}),
            **({"lora": asdict(lora)} if lora is not None else {})}
    start_iter, best_val, evals_since_best = 0, None, 0
    if state is not None:
        batches.load_state_dict(state["batches"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        start_iter, best_val, evals_since_best = (
            state["iter"],
            state["best_val_loss"],
            state["evals_since_best"],
        )
        precision = state["precision"]
        if ranks.is_main:
            _truncate_metrics(run_dir / METRICS_FILE, start_iter)
    else:
        probe = objective.sampler("train", tc.batch_size, seed=tc.seed + 1)
        precision, timings = resolve_precision(
            tc.precision, model, probe.next_batch, device, loss_fn=objective.loss
        )
        precision = distributed.from_main(ranks, precision)  # rank 0's measurement decides
        if timings and ranks.is_main:
            tqdm.write(
                f"precision auto: measured fp32 {timings['fp32_s'] * 1e3:.1f} ms, bf16 {timings['bf16_s'] * 1e3:.1f} ms "
                f"per forward+backward ({timings['bf16_speedup']:.2f}x) -> {precision}"
            )
    if ranks.enabled:  # dropout masks differ between ranks; resumable on any number of ranks
        torch.manual_seed(distributed.rank_seed(tc.seed, ranks.rank, start_iter))
    # FSDP runs bf16 through its mixed-precision policy instead of autocast (see distributed)
    ctx = autocast_context(device.type, "fp32" if fsdp else precision)
    if fsdp:
        distributed.shard_model(model, ranks, device, precision)
    # after sharding: under FSDP the optimizer holds and steps this rank's shards
    optimizer = make_optimizer(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2))
    if state is not None:
        distributed.load_optimizer_state(model, optimizer, state["optimizer"])

    def probe_loss() -> torch.Tensor:  # one batch's loss, for DDP to find unused parameters
        with ctx:
            probe = objective.sampler("train", tc.batch_size, seed=tc.seed + 1)
            return objective.loss(model, move_batch(probe.next_batch(), device))

    ddp_model = distributed.wrap_model(model, ranks, device, probe_loss)  # or `model` itself (FSDP)
    train_model = torch.compile(ddp_model) if tc.compile else ddp_model

    if isinstance(model, GPT):
        seq_len, flops_per_token = model_config.block_size, model.flops_per_token()
    elif isinstance(model, EncoderDecoder):
        if isinstance(data, ParallelData):  # the typical pair: mean of the longer side
            seq_len = max(1, round(float(np.maximum(*data.lengths("train")).mean())))
        else:
            seq_len = data_config.max_length
        flops_per_token = model.flops_per_token(seq_len)
    else:  # the MLM decoder scores only the masked positions
        seq_len = data_config.max_length
        flops_per_token = model.flops_per_token(seq_len, data_config.mlm_probability)
    flops_formula = "6N + 12LdT"
    if lora is not None:  # a frozen matrix gets no weight gradient: 4 FLOPs per weight, not 6
        flops_per_token -= 2 * frozen_matmul_weights(model)
        flops_formula += " - 2N_frozen"
    say = tqdm.write if ranks.is_main else _quiet
    say(
        f"model: {model_class(model_config).__name__}, {model.num_params() / 1e6:.2f}M parameters, "
        f"{flops_per_token / 1e6:.1f} MFLOPs per token ({flops_formula}), objective {objective.name}, "
        f"context {seq_len}, vocab {model_config.vocab_size}; up to "
        f"{tc.batch_size * tc.grad_accum_steps * ranks.world_size * seq_len:,} tokens per step, "
        f"precision {precision}" + (f", {ranks.world_size} ranks ({tc.parallel.upper()})" if ranks.enabled else "")
        + (f"; LoRA rank {lora.rank} on {','.join(lora.target_modules)}: training "
           + "{:,} of {:,} parameters".format(*count_parameters(model)) if lora is not None else "")
    )
    peak = measure_matmul_peak(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    metrics = None
    if ranks.is_main:  # only rank 0 writes files
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics = (run_dir / METRICS_FILE).open("a")

    def log(record: dict[str, Any]) -> None:
        if metrics is not None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

    def save(it: int, name: str = "last") -> None:
        # DDP replicates the weights and the optimizer, FSDP gathers its shards to rank 0 (all
        # ranks take part), and all ranks share one data stream state: rank 0 has the whole
        # state, in one process's layout, and it resumes on any number of ranks
        weights, optimizer_state = distributed.gather_state(
            model, optimizer if name == "last" else None, ranks)
        if not ranks.is_main:
            return
        if lora is not None:  # ordinary checkpoints, the adapters merged in; the model stays adapted
            weights = merged_state_dict(model)
        train_state = None
        if name == "last":
            train_state = {
                "iter": it,
                "optimizer": optimizer_state,
                "batches": batches.state_dict(),
                "rng": _rng_state(device),
                "best_val_loss": best_val,
                "evals_since_best": evals_since_best,
                "precision": precision,
                "world_size": ranks.world_size,  # for the record; resuming works on any
                **({"lora": lora_state_dict(model)} if lora is not None else {}),
            }
        save_checkpoint(
            run_dir / name,
            model,
            data.tokenizer,
            extra={**meta, "iter": it},
            train_state=train_state,
            source_tokenizer=getattr(data, "source_tokenizer", None),
            weights=weights,
        )
        if lora is not None and name == "best":
            save_adapter(model, run_dir / ADAPTER_DIR, base=base)

    # ---- the loop -----------------------------------------------------------------------------
    it, stop_reason, last_eval = start_iter, None, {}
    t_start = time.perf_counter()
    bar = tqdm(
        total=tc.max_iters,
        initial=start_iter,
        disable=not progress or not ranks.is_main,
        dynamic_ncols=True,
        desc="train",
    )
    with _GracefulStop(say) as stop:
        loss_acc, n_acc, tokens_acc = 0.0, 0, 0
        while True:
            out_of_time = tc.max_time is not None and time.perf_counter() - t_start > tc.max_time
            # all ranks stop at the same step, whichever rank saw the signal or the clock
            interrupted, out_of_time = distributed.any_rank(ranks, stop.requested, out_of_time)
            if it >= tc.max_iters:
                stop_reason = "max_iters"
            elif interrupted:
                stop_reason = "interrupted"
            elif out_of_time:
                stop_reason = "max_time"
            # evaluate and checkpoint on the interval and when stopping (a resumed step was done already)
            if (it % tc.eval_interval == 0 or stop_reason) and not (
                state is not None and it == start_iter
            ):
                # every rank evaluates the same batches; rank 0's numbers decide for all
                last_eval = distributed.from_main(
                    ranks, estimate_loss(model, objective, tc, ctx, has_val))
                key = "val_loss" if has_val else "train_loss"
                if not math.isfinite(last_eval[key]):
                    raise TrainingDiverged(
                        _diverged_message(f"{key} is {last_eval[key]}", it, run_dir)
                    )
                log({"iter": it, "kind": "eval", **last_eval})
                improved = best_val is None or last_eval[key] < best_val
                if improved:
                    best_val, evals_since_best = last_eval[key], 0
                    save(it, "best")
                else:
                    evals_since_best += 1
                save(it, "last")
                say(f"iter {it}: {_eval_line(last_eval)}" + (" *best*" if improved else ""))
                if tc.patience and evals_since_best >= tc.patience and not stop_reason:
                    stop_reason = "early_stopping"
                # evaluation time is not training throughput: restart the log window
                t_log, loss_acc, n_acc, tokens_acc = time.perf_counter(), 0.0, 0, 0
            if stop_reason:
                break
            if it == start_iter:
                t_log, tokens_acc = time.perf_counter(), 0

            lr = lr_at(
                it,
                schedule=tc.lr_schedule,
                lr=tc.lr,
                min_lr=tc.min_lr,
                warmup_iters=tc.warmup_iters,
                decay_iters=tc.lr_decay_iters,
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss, step_tokens = 0.0, 0
            for micro in range(tc.grad_accum_steps):
                batch = move_batch(batches.next_batch(), device, non_blocking=True)
                step_tokens += objective.tokens(batch)
                # DDP: all-reduce the gradients on the last micro-step only
                with distributed.sync_context(ddp_model, micro == tc.grad_accum_steps - 1):
                    with ctx:
                        loss = objective.loss(train_model, batch) / tc.grad_accum_steps
                    loss.backward()
                step_loss += loss.item()
            # the mean loss over ranks, the tokens of all ranks (one process: as they are)
            step_loss, step_tokens = distributed.reduce_step(ranks, step_loss, step_tokens)
            tokens_acc += step_tokens
            if not math.isfinite(step_loss):
                raise TrainingDiverged(_diverged_message(f"loss is {step_loss}", it, run_dir))
            if tc.grad_clip > 0:
                grad_norm = distributed.clip_grad_norm(model, tc.grad_clip)
                if not torch.isfinite(grad_norm):
                    raise TrainingDiverged(
                        _diverged_message(f"gradient norm is {grad_norm.item()}", it, run_dir)
                    )
            optimizer.step()
            if on_step is not None:
                on_step(model)
            optimizer.zero_grad(set_to_none=True)
            it += 1
            bar.update(1)
            loss_acc, n_acc = loss_acc + step_loss, n_acc + 1

            if it % tc.log_interval == 0:
                dt = time.perf_counter() - t_log
                tok_s = tokens_acc / dt
                mfu = flops_per_token * tok_s / (peak * ranks.world_size)  # peak is one device's
                record = {
                    "iter": it,
                    "kind": "train",
                    "loss": loss_acc / n_acc,
                    "lr": lr,
                    "tok_per_s": round(tok_s, 1),
                    "mfu": round(mfu, 4),
                }
                log(record)
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.1%}"
                )
                t_log, loss_acc, n_acc, tokens_acc = time.perf_counter(), 0.0, 0, 0
    bar.close()
    if metrics is not None:
        metrics.close()
        _plot(run_dir)
    distributed.teardown(ranks)
    return TrainResult(run_dir, it, stop_reason, best_val, last_eval, time.perf_counter() - t_start)


@torch.no_grad()
def estimate_loss(
    model: torch.nn.Module, objective: CausalLM | MaskedLM, tc: TrainConfig, ctx, has_val: bool
) -> dict[str, float]:
    """The objective's metrics over `eval_iters` batches of each split. The batches come from a
    fixed seed, so every evaluation scores the same examples (masks included), and the training
    RNG is left untouched. Equal-shaped batches (the GPT's) run several per forward pass, bounded
    so the logits stay small."""
    was_training = model.training
    model.eval()
    out = {}
    device = next(model.parameters()).device
    per_forward = 1
    if isinstance(objective, CausalLM):
        per_forward = max(1, min(tc.eval_iters, EVAL_LOGITS_BUDGET // (
            tc.batch_size * objective.block_size * model.config.vocab_size)))
    for split in ("train", "val") if has_val else ("train",):
        sampler = objective.sampler(split, tc.batch_size, seed=tc.seed + 1000)
        sums: dict[str, float] = {}
        remaining = tc.eval_iters
        while remaining:
            n = min(per_forward, remaining)
            drawn = [sampler.next_batch() for _ in range(n)]
            batch = drawn[0] if n == 1 else objective.merge(drawn)
            with ctx:
                add_stats(sums, objective.stats(model, move_batch(batch, device)))
            remaining -= n
        out.update(objective.summarize(sums, split))
    model.train(was_training)
    return out


def checkpoint_blocks(model: torch.nn.Module) -> None:
    """Activation checkpointing: each transformer block keeps only its input for backward and
    recomputes its activations there (about one more forward pass of compute, for the memory of
    the activations inside every block). Patches the blocks' forward, so parameter names and checkpoints stay
    as they are."""
    from torch.utils.checkpoint import checkpoint

    from lmforge.nn.block import Block

    for module in model.modules():
        if isinstance(module, Block):
            forward = module.forward
            module.forward = lambda *args, _f=forward, **kwargs: checkpoint(
                _f, *args, use_reentrant=False, **kwargs)


def _quiet(*args, **kwargs) -> None:
    """Where ranks other than 0 would print."""


def _eval_line(metrics: dict[str, float]) -> str:
    """"train loss 2.1, val loss 2.2 (ppl 9.0), ..." from an evaluation's metrics."""
    parts = [f"train loss {metrics['train_loss']:.4f}"]
    if "val_loss" in metrics:
        parts.append(f"val loss {metrics['val_loss']:.4f}")
        if "val_ppl" in metrics:
            parts[-1] += f" (ppl {metrics['val_ppl']:.2f})"
    split = "val" if "val_loss" in metrics else "train"
    for key, label in (("mlm_acc", "MLM acc"), ("mlm_ppl", "MLM ppl"), ("nsp_acc", "NSP acc"),
                       ("acc", "token acc")):
        if f"{split}_{key}" in metrics:
            value = metrics[f"{split}_{key}"]
            parts.append(f"{split} {label} {value:.3f}" if "acc" in key else f"{split} {label} {value:.2f}")
    return ", ".join(parts)


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def diverged_message(what: str, at: str, last: Path, hint: str) -> str:
    """One message for a NaN/inf stop, naming where it happened and what was kept."""
    where = f"the last good checkpoint {str(last)!r} is intact; {hint}" if last.exists() else "no checkpoint was written yet"
    return f"{at}: {what}; {where}"


def _diverged_message(what: str, it: int, run_dir: Path) -> str:
    return diverged_message(what, f"training stopped at iter {it}", run_dir / "last",
                            "resume with --resume, e.g. with a lower train.lr")


def _truncate_metrics(path: Path, up_to_iter: int) -> None:
    """Drop log records past the checkpoint being resumed (they belong to a run that died)."""
    if not path.exists():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line and json.loads(line)["iter"] <= up_to_iter
    ]
    # the eval record at up_to_iter is logged again by nobody: keep it
    path.write_text("".join(line + "\n" for line in kept))


def _plot(run_dir: Path) -> None:
    from lmforge.train.plots import plot_metrics

    plot_metrics(run_dir / METRICS_FILE, run_dir / PLOT_FILE)


class _GracefulStop:
    """First Ctrl-C/SIGTERM asks the loop to save and stop after the current step; a second
    Ctrl-C raises KeyboardInterrupt at once (atomic writes keep the last checkpoint whole)."""

    def __init__(self, say: Callable[[str], None] = tqdm.write):
        self.say = say  # ranks other than 0 stop as quietly

    def __enter__(self) -> _GracefulStop:
        self.requested = False
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.say(
            "stopping: finishing this step and saving a checkpoint (Ctrl-C again to abort without saving)"
        )

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
