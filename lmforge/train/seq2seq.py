"""`lmforge finetune --task seq2seq`: fine-tune a pretrained encoder-decoder (an lmforge run, a
Hugging Face T5 folder) on sentence pairs, with the same trainer as pretraining.

The pairs are tokenized with the base model's own tokenizer into RUN_DIR/data (a parallel data
folder, see `lmforge.data.parallel`), then `train` runs the seq2seq objective from the base
weights: epochs become steps, the dev set is scored (loss, token accuracy) after every epoch and
keeps `best/`, warmup then linear decay to 0 as in HF's `Seq2SeqTrainer`. Resuming, Ctrl-C and
the NaN guard are the trainer's, and so is distributed training: under torchrun rank 0 alone
tokenizes the pairs while the other ranks wait, then all of them train (DDP).

With `lora` (a `LoraConfig`) only low-rank adapters train over the frozen base (the trainer's
LoRA: `best`/`last` merged, RUN_DIR/adapter alone); a resumed run re-reads the base it records.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

from lmforge.checkpoint import load_checkpoint, read_meta
from lmforge.config import from_dict
from lmforge.data import open_data
from lmforge.data.parallel import prepare_parallel
from lmforge.data.prepare import PrepareConfig
from lmforge.errors import LmforgeError
from lmforge.models.encoder_decoder import EncoderDecoder
from lmforge.train import distributed
from lmforge.train.config import DataConfig, TrainConfig
from lmforge.train.lora import LoraConfig
from lmforge.train.trainer import TrainResult, resolve_device, train

DATA_SUBDIR = "data"


def finetune_seq2seq(
    base: str | Path | None,
    train_file: str | None,
    dev_file: str | None,
    out_dir: str | Path,
    *,
    train_target: str | None = None,
    dev_target: str | None = None,
    source_field: str | None = None,
    target_field: str | None = None,
    max_length: int = 256,
    epochs: int = 3,
    batch_size: int = 32,
    lr: float = 3e-4,
    weight_decay: float = 0.01,
    warmup_ratio: float = 0.1,
    label_smoothing: float = 0.1,
    grad_clip: float = 1.0,
    patience: int = 0,
    precision: str = "auto",
    seed: int = 1337,
    device: str = "auto",
    resume: bool = False,
    progress: bool = True,
    lora: LoraConfig | None = None,
) -> TrainResult:
    out_dir = Path(out_dir)
    data_dir = out_dir / DATA_SUBDIR
    if resume:
        last = out_dir / "last"
        if not (last / "config.json").is_file():
            raise LmforgeError(f"cannot resume: no checkpoint at {str(last)!r} (start without --resume)")
        meta = read_meta(last)
        return train(None, from_dict(TrainConfig, meta["train"], "train"),
                     from_dict(DataConfig, meta["data"], "data"), out_dir, resume=True, progress=progress)

    missing = [n for n, v in (("--base", base), ("--train", train_file), ("--dev", dev_file)) if v is None]
    if missing:
        raise LmforgeError(f"{', '.join(missing)} required (or --resume to continue the run in --out)")
    if (out_dir / "last").exists():
        raise LmforgeError(
            f"{str(out_dir)!r} already holds a run; pass --resume to continue it, or choose another --out"
        )
    for name, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1)):
        if value < low:
            raise LmforgeError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if not 0 <= warmup_ratio < 1:
        raise LmforgeError(f"--warmup-ratio must be in [0, 1), got {warmup_ratio}")
    ckpt = load_checkpoint(base)
    if not isinstance(ckpt.model, EncoderDecoder):
        raise LmforgeError(
            f"--task seq2seq needs an encoder-decoder base (an lmforge transformer/t5 run or a Hugging "
            f"Face T5 folder); {str(base)!r} is a {type(ckpt.model).__name__}"
        )
    if (train_target is None) != (dev_target is None):
        raise LmforgeError("give both --train-target and --dev-target (aligned files), or neither (pairs files)")
    pairs_file = train_target is None  # else two aligned files per split
    prepare_config = PrepareConfig(
        source=train_file, target=train_target, val_source=dev_file, val_target=dev_target,
        source_field=(source_field or "source") if pairs_file else None,
        target_field=(target_field or "target") if pairs_file else None, max_length=max_length,
    )
    # under torchrun: join the process group now, so that rank 0 alone writes RUN_DIR/data while
    # the others wait; `train` then runs in this group and leaves it to us to leave
    ranks, _ = distributed.setup(resolve_device(device))
    try:
        if ranks.is_main:
            prepare_parallel(prepare_config, data_dir, progress=progress, tokenizer=ckpt.tokenizer,
                             source_tokenizer=ckpt.source_tokenizer)
        distributed.barrier(ranks)
        data = open_data(data_dir)
        # an epoch: every pair once, over all ranks' batches
        steps_per_epoch = math.ceil(data.pairs("train") / (batch_size * ranks.world_size))
        max_iters = epochs * steps_per_epoch
        train_config = TrainConfig(
            objective="seq2seq", batch_size=batch_size, max_iters=max_iters, lr=lr, min_lr=0.0,
            lr_schedule="linear", warmup_iters=round(warmup_ratio * max_iters), weight_decay=weight_decay,
            beta2=0.999, grad_clip=grad_clip, label_smoothing=label_smoothing,
            eval_interval=steps_per_epoch, eval_iters=max(1, math.ceil(data.pairs("val") / batch_size)),
            patience=patience, precision=precision, seed=seed, device=device,
        )
        model_config = from_dict(type(ckpt.model.config), asdict(ckpt.model.config), "model")
        return train(model_config, train_config, DataConfig(path=str(data_dir)), out_dir,
                     progress=progress, init_model=ckpt.model, lora=lora, base=base)
    finally:
        distributed.teardown(ranks)
