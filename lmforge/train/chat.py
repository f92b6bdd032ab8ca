"""`lmforge finetune --task chat`: supervised fine-tuning (SFT) of a GPT on conversations.

    load the base GPT; its chat template (tokenizer_config.json), else `SFT_CHAT_TEMPLATE`
    render + tokenize each conversation (`lmforge.chat.encode_chat`): labels are the assistant
        messages' tokens and their end-of-turn, IGNORE_INDEX elsewhere; cut to the context
    for each epoch:
        shuffled batches of similar lengths (seeded), right-padded; padding is never a target
        lr: linear warmup over warmup_ratio of all steps, then linear decay to 0
        forward under autocast, loss = mean over the labelled tokens, backward, clip, AdamW step
        dev loss (same mean over the assistant tokens); save `best` when it improved, and `last`

The loop is the BERT fine-tuning loop's (`lmforge.train.finetune`) in miniature, with the same
failure rules: checkpoints are written whole, a NaN/inf loss raises `TrainingDiverged` before the
optimizer step, Ctrl-C finishes the step, saves `last` and returns. It has no --resume.

With `lora` (a `LoraConfig`) only low-rank adapters train over the frozen GPT (never its tied
lm_head): `best`/`last` are written merged, ordinary checkpoints `lmforge chat`/`generate`/`serve`
load, and RUN_DIR/adapter holds best's adapter alone (last's without a dev file). The base may
then be an int8/int4 checkpoint from `lmforge quantize` (QLoRA): its integers stay frozen, every
quantized layer takes an adapter, and the merged checkpoints are float.

Every checkpoint stores the template in tokenizer_config.json (`chat_template`, HF's field), so
`lmforge chat`, `lmforge serve` and Hugging Face's `apply_chat_template` render the conversations
the model was trained on.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lmforge.chat import SFT_CHAT_TEMPLATE, ChatTemplate, encode_chat, read_chats
from lmforge.checkpoint import load_checkpoint, save_checkpoint
from lmforge.config import check, check_choice
from lmforge.data.tasks import IGNORE_INDEX
from lmforge.errors import LmforgeError
from lmforge.models.gpt import GPT
from lmforge.train.finetune import epoch_batches
from lmforge.train.lora import (
    ADAPTER_DIR,
    LoraConfig,
    apply_lora,
    count_parameters,
    merged_copy,
    save_adapter,
)
from lmforge.train.objectives import move_batch
from lmforge.train.optim import lr_at, make_optimizer
from lmforge.train.precision import PRECISIONS, autocast_context, resolve_precision
from lmforge.train.trainer import (
    METRICS_FILE,
    TrainingDiverged,
    _GracefulStop,
    diverged_message,
    resolve_device,
)


@dataclass
class ChatConfig:
    max_length: int | None = None  # tokens per conversation; None: the model's context
    epochs: int = 3
    batch_size: int = 8
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    grad_clip: float = 1.0  # 0 turns clipping off
    precision: str = "auto"
    seed: int = 1337
    device: str = "auto"

    def __post_init__(self) -> None:
        check_choice("precision", self.precision, PRECISIONS)
        for name in ("epochs", "batch_size"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_length is not None:
            check(self.max_length >= 2, f"max_length must be >= 2, got {self.max_length}")
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        check(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")


@dataclass
class ChatResult:
    out_dir: Path
    epochs: int  # epochs run
    steps: int  # optimizer steps done
    stop_reason: str  # epochs | interrupted
    conversations: int  # trained on
    dropped: int  # conversations whose assistant tokens were all cut off by max_length
    best_dev_loss: float | None
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics record per epoch
    seconds: float = 0.0


# --- data ------------------------------------------------------------------------------------------
def encode_chats(
    template: ChatTemplate, tokenizer, chats: list[list[dict[str, str]]], max_length: int
) -> tuple[list[dict[str, list[int]]], int]:
    """Features {"input_ids", "labels"} of the conversations, and how many were dropped because
    no assistant token survived the cut to `max_length`."""
    features = []
    for messages in chats:
        encoded = encode_chat(template, tokenizer, messages, max_length)
        if encoded is not None:
            features.append({"input_ids": encoded[0], "labels": encoded[1]})
    return features, len(chats) - len(features)


def collate_chat(features: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the batch's longest row; labels pad with IGNORE_INDEX. A causal model's
    tokens never see the padding after them, so no attention mask is needed."""
    B, T = len(features), max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
    return {"input_ids": input_ids, "labels": labels}


# --- the loss --------------------------------------------------------------------------------------
def chat_loss_sum(model: GPT, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of the labelled next tokens, and how many there are."""
    logits = model(batch["input_ids"])[:, :-1].float()  # (B, T-1, vocab): token t predicts t + 1
    targets = batch["labels"][:, 1:]  # (B, T-1)
    total = F.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total, (targets != IGNORE_INDEX).sum()


def chat_loss(model: GPT, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the assistant tokens. A batch with none gives 0 (and zero
    gradients), not the NaN of reduction="mean" over no tokens."""
    total, count = chat_loss_sum(model, batch)
    return total / count.clamp(min=1)


@torch.no_grad()
def dev_loss(model: GPT, features: list[dict[str, list[int]]], batch_size: int, pad_id: int,
             device: torch.device, ctx) -> float:
    """Mean loss over all the dev conversations' assistant tokens."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(features), batch_size):
            batch = move_batch(collate_chat(features[i : i + batch_size], pad_id), device)
            with ctx:
                s, n = chat_loss_sum(model, batch)
            total, count = total + s.item(), count + int(n)
    finally:
        model.train(was_training)
    return total / max(count, 1)


# --- the loop --------------------------------------------------------------------------------------
def finetune_chat(
    base: str | Path,
    train_file: str | Path,
    out_dir: str | Path,
    dev_file: str | Path | None = None,
    config: ChatConfig | None = None,
    *,
    chat_template: str | None = None,
    progress: bool = True,
    lora: LoraConfig | None = None,
) -> ChatResult:
    """Fine-tune the GPT checkpoint `base` on the conversations of `train_file` (JSONL, one
    `{"messages": [...]}` a line); writes `out_dir/last` (+ `out_dir/best`, by dev loss, with
    `dev_file`) and `out_dir/metrics.jsonl`. `chat_template` (Jinja2) replaces the base's own
    template and the default `SFT_CHAT_TEMPLATE`. `lora` trains adapters only (module docstring)."""
    config, out_dir = config or ChatConfig(), Path(out_dir)
    for name in ("best", "last"):
        if (out_dir / name).exists():
            raise LmforgeError(f"{str(out_dir)!r} already holds a run ({name}/ exists); choose another --out")
    ckpt = load_checkpoint(base)
    if not isinstance(ckpt.model, GPT):
        raise LmforgeError(
            f"--task chat needs a GPT base (an lmforge GPT run or a Hugging Face GPT-2 folder); "
            f"{str(base)!r} is a {type(ckpt.model).__name__}"
        )
    from lmforge.compress.quantize import refuse_quantized  # imported here: compress imports train

    if lora is None:  # with LoRA a quantized base is QLoRA's: apply_lora checks its layers
        refuse_quantized(ckpt.model, "fine-tune")
    model, tokenizer = ckpt.model, ckpt.tokenizer
    source = chat_template or tokenizer.chat_template or SFT_CHAT_TEMPLATE
    if source == SFT_CHAT_TEMPLATE and tokenizer.eos_token is None:
        raise LmforgeError(
            f"the default chat template ends each assistant turn with the end-of-text token, but this "
            f"{tokenizer.kind!r} tokenizer has none; use a base with a bpe tokenizer, or give a template"
        )
    tokenizer.chat_template = source  # saved with every checkpoint below
    template = ChatTemplate.for_tokenizer(tokenizer)
    max_length = min(config.max_length or model.config.block_size, model.config.block_size)
    train, dropped = encode_chats(template, tokenizer, read_chats(train_file), max_length)
    dev, dev_dropped = ([], 0) if dev_file is None else encode_chats(
        template, tokenizer, read_chats(dev_file), max_length)
    if not train:
        raise LmforgeError(
            f"no conversation of {str(train_file)!r} keeps an assistant token within {max_length} tokens"
        )
    if dropped or dev_dropped:
        tqdm.write(f"dropped {dropped} training and {dev_dropped} dev conversation(s) whose assistant "
                   f"messages all lie past {max_length} tokens")

    device = resolve_device(config.device)
    torch.manual_seed(config.seed)  # dropout (and the adapters' initialisation)
    if lora is not None:
        apply_lora(model, lora)
    model.to(device).train()
    optimizer = make_optimizer(model, config.lr, config.weight_decay, betas=(0.9, 0.999))
    pad_id = next((i for i in (tokenizer.pad_id, tokenizer.eos_id) if i is not None), 0)
    probe = collate_chat(train[: config.batch_size], pad_id)
    precision, _ = resolve_precision(config.precision, model, lambda: probe, device, loss_fn=chat_loss)
    ctx = autocast_context(device.type, precision)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = int(config.warmup_ratio * total_steps)
    generator = torch.Generator().manual_seed(config.seed)  # the shuffling order
    meta = {"chat_finetune": asdict(config), "task": "chat", "base": str(base),
            "train_file": str(train_file), "dev_file": None if dev_file is None else str(dev_file),
            **({"lora": asdict(lora)} if lora is not None else {})}
    trainable, total = count_parameters(model)
    shown = f"{model.num_params() / 1e6:.2f}M" if lora is None else f"{trainable:,} of {total:,} (LoRA)"
    tqdm.write(f"chat fine-tuning {shown} parameters on {len(train)} conversations ({precision})")

    step, epoch, stop_reason, history, best = 0, 0, "epochs", [], math.inf
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    bar = tqdm(total=total_steps, disable=not progress, dynamic_ncols=True, desc="finetune chat")
    try:
        with _GracefulStop() as stop, (out_dir / METRICS_FILE).open("a") as metrics_file:
            for epoch in range(1, config.epochs + 1):
                lengths = [len(f["input_ids"]) for f in train]
                loss_sum, n_steps = 0.0, 0
                for rows in epoch_batches(lengths, config.batch_size, generator, True):
                    batch = move_batch(collate_chat([train[j] for j in rows], pad_id), device, True)
                    lr = lr_at(step, schedule="linear", lr=config.lr, min_lr=0.0,
                               warmup_iters=warmup_steps, decay_iters=total_steps)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    with ctx:
                        loss = chat_loss(model, batch)
                    if not torch.isfinite(loss):
                        raise TrainingDiverged(_diverged(f"loss is {loss.item()}", step, epoch, out_dir))
                    loss.backward()
                    if config.grad_clip > 0:
                        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                        if not torch.isfinite(norm):
                            raise TrainingDiverged(_diverged(f"gradient norm is {norm.item()}", step, epoch, out_dir))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    step, loss_sum, n_steps = step + 1, loss_sum + loss.item(), n_steps + 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.4f}", epoch=epoch)
                    if stop.requested:
                        stop_reason = "interrupted"
                        break

                record = {"epoch": epoch, "step": step, "train_loss": loss_sum / max(1, n_steps), "lr": lr}
                if dev:
                    record["dev_loss"] = dev_loss(model, dev, config.batch_size, pad_id, device, ctx)
                record["seconds"] = round(time.perf_counter() - t_start, 2)
                history.append(record)
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                extra = {**meta, "epoch": epoch, "step": step}
                improved = dev and record["dev_loss"] < best
                # a LoRA model is saved merged (a quantized base's layers become float ones)
                saved = model if lora is None else merged_copy(model)
                if improved:
                    best = record["dev_loss"]
                    save_checkpoint(out_dir / "best", saved, tokenizer, extra=extra)
                save_checkpoint(out_dir / "last", saved, tokenizer, extra=extra)
                if lora is not None and (improved or not dev):
                    save_adapter(model, out_dir / ADAPTER_DIR, base=base)
                shown = f", dev loss {record['dev_loss']:.4f}" if dev else ""
                bar.write(f"epoch {epoch}: train loss {record['train_loss']:.4f}{shown}"
                          + (" *best*" if improved else ""))
                if stop_reason == "interrupted":
                    break
    finally:
        bar.close()
    model.eval()
    return ChatResult(
        out_dir=out_dir, epochs=epoch, steps=step, stop_reason=stop_reason, conversations=len(train),
        dropped=dropped, best_dev_loss=best if dev else None, history=history,
        seconds=time.perf_counter() - t_start,
    )


def _diverged(what: str, step: int, epoch: int, out_dir: Path) -> str:
    return diverged_message(what, f"chat fine-tuning stopped at step {step} (epoch {epoch})",
                            out_dir / "last", "it is from the end of an earlier epoch; try a lower lr")
