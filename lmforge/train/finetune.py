"""Fine-tuning a BERT encoder for sentence classification or token classification (NER).

    load the base encoder (lmforge or Hugging Face BERT folder, any head)
    build a Bert with the task head, copy every encoder weight over; the new head starts fresh
    for each epoch:
        shuffled mini-batches (seeded), padded to the batch's longest row
        lr: linear warmup over warmup_ratio of all steps, then linear decay to 0 (Devlin et al. 2019)
        forward under autocast, cross-entropy, backward, clip, AdamW step
        score dev: accuracy + macro F1 (classification), entity P/R/F1 (IOB2 tags)
        save `best` when the dev metric improved, and `last`; stop after `patience` epochs without

With LoRA (`lora=LoraConfig(...)`, `lmforge.train.lora`) the encoder stays frozen and only
low-rank adapters and the head train; `best` and `last` are written merged (ordinary checkpoints)
and `RUN_DIR/adapter/` holds the best epoch's adapter alone.

Failure rules are the pretraining loop's (`lmforge.train.trainer`): checkpoints are written whole
by `save_checkpoint`, a NaN/inf loss raises `TrainingDiverged` before the optimizer step and saves
nothing, Ctrl-C finishes the step, scores dev, saves `last` and returns.

The label names are stored in the checkpoint (`BertConfig.labels`, ids in `label_list` order for
classification, sorted tags for token classification), so `lmforge.predict` can name them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lmforge.checkpoint import (
    STATE_FILE,
    load_checkpoint,
    load_train_state,
    read_meta,
    save_checkpoint,
)
from lmforge.config import check, check_choice, from_dict
from lmforge.data.tasks import (
    IGNORE_INDEX,
    align_labels,
    label_list,
    read_classification,
    read_conll,
)
from lmforge.errors import LmforgeError
from lmforge.eval.metrics import accuracy, entity_scores, macro_f1
from lmforge.models.bert import POOLED_HEADS, Bert, BertConfig
from lmforge.predict import class_probabilities, is_iob2, tag_words
from lmforge.tokenizer import Tokenizer
from lmforge.train.lora import (
    LoraConfig,
    apply_lora,
    count_parameters,
    load_lora_state_dict,
    lora_state_dict,
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
    _rng_state,
    diverged_message,
    resolve_device,
)

TASKS = ("classification", "token-classification")
# the encoder's weights, copied from the base model; everything else is a head
ENCODER_PREFIXES = ("embeddings.", "h.", "ln_f.", "pooler.")


@dataclass
class FinetuneConfig:
    task: Literal["classification", "token-classification"] = "classification"
    # classification files: None picks read_classification's defaults ("text", "sentence", ...)
    text_column: str | None = None
    pair_column: str | None = None
    label_column: str | None = None  # None: "label"
    max_length: int = 128  # tokens per example, [CLS] and [SEP] included; longer ones are cut
    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1  # fraction of all steps spent warming up, then linear decay to 0
    grad_clip: float = 1.0  # 0 turns clipping off
    patience: int = 0  # stop after this many epochs without a better dev score; 0 never stops
    precision: str = "auto"
    seed: int = 1337
    eval_batch_size: int = 64
    device: str = "auto"
    # batches of similar lengths (HF's group_by_length): less padding, same examples per epoch
    group_by_length: bool = True

    def __post_init__(self) -> None:
        check_choice("task", self.task, TASKS)
        check_training_settings(self, ("max_length", "epochs", "batch_size", "eval_batch_size"))
        if self.task == "token-classification":
            for name in ("text_column", "pair_column", "label_column"):
                check(
                    getattr(self, name) is None,
                    f"{name} is for classification files; token classification reads CoNLL files",
                )


def check_training_settings(config: Any, counts: tuple[str, ...]) -> None:
    """The checks of the settings fine-tuning configs share (this one's and the multi-task
    one's): precision, max_length, lr, weight_decay, warmup_ratio, grad_clip, patience, and
    `counts`, the fields that must be >= 1."""
    check_choice("precision", config.precision, PRECISIONS)
    for name in counts:
        check(getattr(config, name) >= 1, f"{name} must be >= 1, got {getattr(config, name)}")
    check(
        config.max_length >= 3,
        f"max_length must be >= 3 ([CLS], a token, [SEP]), got {config.max_length}",
    )
    check(config.lr > 0, f"lr must be > 0, got {config.lr}")
    check(config.weight_decay >= 0, f"weight_decay must be >= 0, got {config.weight_decay}")
    check(
        0.0 <= config.warmup_ratio < 1.0,
        f"warmup_ratio must be in [0, 1), got {config.warmup_ratio}",
    )
    check(config.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {config.grad_clip}")
    check(config.patience >= 0, f"patience must be >= 0 (0 = off), got {config.patience}")


@dataclass
class FinetuneResult:
    out_dir: Path
    epochs: int  # epochs run
    steps: int  # optimizer steps done
    stop_reason: str  # epochs | early_stopping | interrupted
    metric: str  # the dev metric `best` was chosen by
    best_score: float
    best_epoch: int
    labels: list[str]
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics record per epoch
    seconds: float = 0.0  # all of it
    train_seconds: float = 0.0  # in training steps (batching, forward, backward, optimizer)
    eval_seconds: float = 0.0  # scoring dev and saving checkpoints
    precision: str = "fp32"


# --- data --------------------------------------------------------------------------------------
def read_task_data(
    config: FinetuneConfig, train_file: str | Path, dev_file: str | Path
) -> tuple[list, list, list[str]]:
    """The train and dev examples and the label names (class id = position)."""
    if config.task == "classification":

        def read(path):
            return read_classification(
                path, config.text_column, config.pair_column, config.label_column or "label"
            )

        train, dev = read(train_file), read(dev_file)
        labels = label_list(train)
        dev_labels = {e.label for e in dev}
    else:
        train, dev = read_conll(train_file), read_conll(dev_file)
        labels = sorted({t for e in train for t in e.tags})
        dev_labels = {t for e in dev for t in e.tags}
    kind = "label" if config.task == "classification" else "tag"
    if len(labels) < 2:
        raise LmforgeError(
            f"{str(train_file)!r} has a single {kind} {labels[0]!r}; there is nothing to learn "
            f"(the model needs at least 2)"
        )
    unseen = sorted(dev_labels - set(labels))
    if unseen:
        raise LmforgeError(
            f"{str(dev_file)!r} has {kind}(s) the training file never uses: "
            f"{', '.join(map(repr, unseen))}; the model can only predict {', '.join(map(repr, labels))}"
        )
    return train, dev, labels


def encode_examples(
    config: FinetuneConfig,
    tokenizer: Tokenizer,
    examples: list,
    labels: list[str],
    max_length: int,
) -> list[dict[str, Any]]:
    """Unpadded features: `input_ids`, `token_type_ids` and `labels` (an id, or one per token)."""
    label_to_id = {label: i for i, label in enumerate(labels)}
    if config.task == "token-classification":
        return [align_labels(tokenizer, e.words, e.tags, label_to_id, max_length) for e in examples]
    if tokenizer.cls_id is None or tokenizer.sep_id is None:
        raise LmforgeError(
            f"classification needs a tokenizer with [CLS] and [SEP] (a WordPiece/BERT one); "
            f"this one is {tokenizer.kind!r}"
        )
    features = []
    for i in range(0, len(examples), 1024):  # chunks, so padding stays within 1024 rows
        chunk = examples[i : i + 1024]
        pairs = None if chunk[0].pair is None else [e.pair for e in chunk]
        enc = tokenizer.encode_for_encoder([e.text for e in chunk], pairs, max_length=max_length)
        for row, e in enumerate(chunk):
            n = int(enc["attention_mask"][row].sum())
            features.append(
                {
                    "input_ids": enc["input_ids"][row, :n].tolist(),
                    "token_type_ids": enc["token_type_ids"][row, :n].tolist(),
                    "labels": label_to_id[e.label],
                }
            )
    return features


def collate(features: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest row (dynamic padding); token labels pad with IGNORE_INDEX."""
    B, T = len(features), max(len(f["input_ids"]) for f in features)
    batch = {
        "input_ids": torch.full((B, T), pad_id, dtype=torch.long),
        "token_type_ids": torch.zeros(B, T, dtype=torch.long),
        "attention_mask": torch.zeros(B, T, dtype=torch.long),
    }
    token_labels = isinstance(features[0]["labels"], list)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long) if token_labels else None
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        batch["input_ids"][i, :n] = torch.tensor(f["input_ids"])
        batch["token_type_ids"][i, :n] = torch.tensor(f["token_type_ids"])
        batch["attention_mask"][i, :n] = 1
        if token_labels:
            labels[i, :n] = torch.tensor(f["labels"])
    batch["labels"] = labels if token_labels else torch.tensor([f["labels"] for f in features])
    return batch


# --- model -------------------------------------------------------------------------------------
def task_logits_and_labels(model: Bert, batch: dict[str, torch.Tensor]):
    """The head's logits, (B, L) or (B, T, L), and the labels, (B,) or (B, T)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs).logits, batch["labels"]


def task_loss(model: Bert, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the head's logits: per sentence, or per labelled token (mean over them)."""
    logits, labels = task_logits_and_labels(model, batch)
    logits = logits.float()  # (B, L) or (B, T, L)
    if logits.dim() == 2:
        return F.cross_entropy(logits, labels)
    total = F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    # a batch whose tokens are all unlabelled gives 0, not the 0/0 of reduction="mean"
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def model_for_task(
    base: Bert, task: str, labels: list[str], keep_pooler: bool = False
) -> tuple[Bert, list[str]]:
    """A Bert with the task's head over a copy of `base`'s encoder; returns it and the names of
    the parameters that start fresh (the head, and a pooler the base lacked). A base that already
    has this task's head for the same labels keeps it (fine-tuning a classifier further, e.g. to
    recover after pruning). Task "mlm" (labels []) keeps the base's masked-LM head wherever it has
    one (heads "mlm" and "pretraining"); task "pretraining" (MLM + NSP, for `lmforge train
    --init-from` over an encoder without that head) keeps its masked-LM head too. `keep_pooler`
    keeps the base's pooler beside a head that does not read it (continued pretraining: the
    pooler is trained and a later classifier wants it)."""
    config = from_dict(
        BertConfig,
        {
            **asdict(base.config),
            "head": task,
            "num_labels": len(labels) or base.config.num_labels,
            "labels": list(labels),
            # sentence heads read the pooled [CLS]; HF's token classifier has no pooler
            "pooler": task in POOLED_HEADS or (keep_pooler and bool(base.config.pooler)),
        },
        section="model",
    )
    model = Bert(config)
    same_head = base.config.head == task and list(base.config.labels or []) == list(labels)
    kept = ENCODER_PREFIXES + (("mlm.",) if task in ("mlm", "pretraining") else ())
    encoder = {
        k: v
        for k, v in base.state_dict().items()
        if (same_head or k.startswith(kept)) and k in model.state_dict()
    }
    missing, unexpected = model.load_state_dict(encoder, strict=False)
    assert not unexpected, unexpected
    return model, sorted({k.rsplit(".", 1)[0] for k in missing})


# --- evaluation --------------------------------------------------------------------------------
def evaluate(
    model: Bert,
    tokenizer: Tokenizer,
    task: str,
    examples: list,
    labels: list[str],
    batch_size: int,
    max_length: int,
) -> dict[str, float]:
    """Dev scores: accuracy and macro F1 (classification); entity precision/recall/F1 when the
    tags are IOB2, and word accuracy (token classification)."""
    was_training = model.training
    model.eval()
    try:
        if task == "classification":
            pairs = None if examples[0].pair is None else [e.pair for e in examples]
            probs = class_probabilities(
                model, tokenizer, [e.text for e in examples], pairs, batch_size, max_length
            )
            preds = [labels[i] for i in probs.argmax(-1).tolist()]
            golds = [e.label for e in examples]
            return {"accuracy": accuracy(preds, golds), "macro_f1": macro_f1(preds, golds)}
        tagged = tag_words(model, tokenizer, [e.words for e in examples], batch_size, max_length)
        preds = [tags for tags, _ in tagged]
        golds = [e.tags for e in examples]
        scores = {"accuracy": accuracy(sum(preds, []), sum(golds, []))}
        if is_iob2(labels):
            scores.update(entity_scores(preds, golds))
        return scores
    finally:
        model.train(was_training)


def best_metric(task: str, labels: list[str]) -> str:
    return "f1" if task == "token-classification" and is_iob2(labels) else "accuracy"


# --- the loop ----------------------------------------------------------------------------------
def finetune(
    base: str | Path,
    train_file: str | Path,
    dev_file: str | Path,
    out_dir: str | Path,
    config: FinetuneConfig | None = None,
    progress: bool = True,
    *,
    resume: bool = False,
    init_model: Bert | None = None,
    loss_fn: Callable[[Bert, dict[str, torch.Tensor]], torch.Tensor] | None = None,
    extra_meta: dict[str, Any] | None = None,
    lora: LoraConfig | None = None,
) -> FinetuneResult:
    """Fine-tune the BERT checkpoint `base` on `train_file`, scoring `dev_file` after every epoch;
    writes `out_dir/best`, `out_dir/last` and `out_dir/metrics.jsonl`.

    With `resume=True` the run in `out_dir` continues from `last/` (weights, optimizer, RNG, its
    place in the epoch), with the config and files it was started with wherever these are None:
    a stopped and resumed run takes the same steps as an uninterrupted one.

    Hooks for distillation (`lmforge.compress.distill`): `init_model` is the model to train, its
    task head and label names included, instead of a fresh head over `base`'s encoder (`base`
    then supplies the tokenizer); `loss_fn(model, batch)` replaces the cross-entropy `task_loss`;
    `extra_meta` adds sections to the checkpoints' config.json.

    `lora` trains LoRA adapters (and the head, always in `modules_to_save`) over the frozen
    encoder; a resumed run takes it from its checkpoint, whose state.pt keeps the unmerged
    adapters.
    """
    out_dir, loss_fn = Path(out_dir), loss_fn or task_loss
    state = None
    if resume:
        if not (out_dir / "last" / STATE_FILE).is_file():
            raise LmforgeError(
                f"cannot resume: {str(out_dir / 'last')!r} holds no fine-tuning state (start without --resume)"
            )
        meta = read_meta(out_dir / "last")
        config = from_dict(FinetuneConfig, meta["finetune"], "finetune")
        lora = from_dict(LoraConfig, meta["lora"], "lora") if "lora" in meta else None
        base, train_file, dev_file = (
            given if given is not None else meta[key]
            for given, key in ((base, "base"), (train_file, "train_file"), (dev_file, "dev_file"))
        )
        state = load_train_state(out_dir / "last")
    else:
        config = config or FinetuneConfig()
        for name in ("best", "last"):
            if (out_dir / name).exists():
                raise LmforgeError(
                    f"{str(out_dir)!r} already holds a fine-tuning run ({name}/ exists); pass "
                    "--resume to continue it, or choose another output folder"
                )
    device = resolve_device(config.device)
    ckpt = load_checkpoint(base)
    if not isinstance(ckpt.model, Bert):
        raise LmforgeError(
            f"base {str(base)!r} is a {ckpt.meta.get('model_type', type(ckpt.model).__name__)!r} "
            f"checkpoint; fine-tuning needs a BERT encoder (an lmforge BERT checkpoint or a Hugging "
            f"Face BERT folder)"
        )
    tokenizer = ckpt.tokenizer
    train, dev, labels = read_task_data(config, train_file, dev_file)
    if init_model is not None:  # the model's label ids; the files may use only some of them
        unknown = sorted(set(labels) - set(init_model.config.labels))
        if unknown:
            raise LmforgeError(
                f"{str(train_file)!r} has label(s) {', '.join(map(repr, unknown))} the model does "
                f"not know; it predicts {', '.join(map(repr, init_model.config.labels))}"
            )
        labels = list(init_model.config.labels)
    max_length = min(config.max_length, (init_model or ckpt.model).config.max_position)
    train_features = encode_examples(config, tokenizer, train, labels, max_length)

    torch.manual_seed(config.seed)  # the fresh head's initialisation and dropout
    if init_model is None:
        # imported here: lmforge.compress imports this module
        from lmforge.compress.quantize import refuse_quantized

        refuse_quantized(ckpt.model, "fine-tune")
        model, fresh = model_for_task(ckpt.model, config.task, labels)
    else:
        model, fresh = init_model, ["nothing (a model was given)"]
    del ckpt
    if lora is not None:
        if init_model is not None:
            raise LmforgeError("LoRA fine-tuning starts from a base checkpoint, not from a given model")
        # the head (and a pooler the base lacked) cannot be low-rank: trained in full
        lora = replace(lora, modules_to_save=tuple(dict.fromkeys([*lora.modules_to_save, "classifier", *fresh])))
        apply_lora(model, lora)
    if state is not None and lora is not None:  # the frozen base is `base`'s; the rest is in state.pt
        load_lora_state_dict(model, state["lora"], f"{str(out_dir / 'last')!r}")
        fresh = ["nothing (resumed)"]
    elif state is not None:  # the run's own weights, head included
        model.load_state_dict(load_checkpoint(out_dir / "last").model.state_dict())
        fresh = ["nothing (resumed)"]
    model.to(device).train()
    trainable, total = count_parameters(model)
    tqdm.write(
        f"fine-tuning {trainable:,} of {total:,} parameters ({100 * trainable / total:.1f}%) for "
        f"{config.task} with "
        f"{len(labels)} labels ({', '.join(labels[:10])}{', ...' if len(labels) > 10 else ''}); "
        f"initialised fresh: {', '.join(fresh)}"
    )
    optimizer = make_optimizer(model, config.lr, config.weight_decay, betas=(0.9, 0.999))
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    probe = collate(train_features[: config.batch_size], pad_id)
    if state is not None:
        precision, timings = state["precision"], {}
    else:
        precision, timings = resolve_precision(
            config.precision, model, lambda: probe, device, loss_fn=loss_fn
        )
    if timings:
        tqdm.write(f"precision auto: bf16 {timings['bf16_speedup']:.2f}x fp32 -> {precision}")
    ctx = autocast_context(device.type, precision)

    steps_per_epoch = math.ceil(len(train_features) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = int(config.warmup_ratio * total_steps)
    generator = torch.Generator().manual_seed(config.seed)  # the shuffling order
    metric = best_metric(config.task, labels)
    meta = {
        "finetune": asdict(config), "task": config.task, "base": str(base),
        "train_file": str(train_file), "dev_file": str(dev_file), **(extra_meta or {}),
        **({"lora": asdict(lora)} if lora is not None else {}),
    }

    step, first_epoch, skip, stop_reason, history = 0, 1, 0, "epochs", []
    best_score, best_epoch, epochs_since_best = -math.inf, 0, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        step, best_score, best_epoch, epochs_since_best = (
            state["step"], state["best_score"], state["best_epoch"], state["epochs_since_best"]
        )
        # an epoch cut short is entered again: same shuffle, its finished batches skipped
        first_epoch = state["epoch"] + (1 if state["epoch_done"] else 0)
        generator.set_state(state["generator"] if state["epoch_done"] else state["epoch_generator"])
        skip = 0 if state["epoch_done"] else state["batches_done"]
        _truncate_history(out_dir / METRICS_FILE, state["epoch"], state["epoch_done"])
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_file = (out_dir / METRICS_FILE).open("a")
    epoch = first_epoch - 1
    t_start, train_seconds, eval_seconds = time.perf_counter(), 0.0, 0.0
    bar = tqdm(total=total_steps, initial=step, disable=not progress, dynamic_ncols=True, desc="finetune")
    try:
        with _GracefulStop() as stop:
            for epoch in range(first_epoch, config.epochs + 1):
                t_epoch = time.perf_counter()
                epoch_generator = generator.get_state()
                batches = epoch_batches(
                    [len(f["input_ids"]) for f in train_features], config.batch_size,
                    generator, config.group_by_length,
                )
                loss_sum, n_steps = 0.0, 0
                batches_done, skip = skip, 0
                for rows in batches[batches_done:]:
                    batch = move_batch(collate([train_features[j] for j in rows], pad_id), device, True)
                    lr = lr_at(
                        step,
                        schedule="linear",
                        lr=config.lr,
                        min_lr=0.0,
                        warmup_iters=warmup_steps,
                        decay_iters=total_steps,
                    )
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    with ctx:
                        loss = loss_fn(model, batch)
                    if not torch.isfinite(loss):
                        raise TrainingDiverged(
                            _diverged_message(f"loss is {loss.item()}", step, epoch, out_dir)
                        )
                    loss.backward()
                    if config.grad_clip > 0:
                        grad_norm = torch.nn.utils.clip_grad_norm_(
                            model.parameters(), config.grad_clip
                        )
                        if not torch.isfinite(grad_norm):
                            raise TrainingDiverged(
                                _diverged_message(
                                    f"gradient norm is {grad_norm.item()}", step, epoch, out_dir
                                )
                            )
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    step, loss_sum, n_steps = step + 1, loss_sum + loss.item(), n_steps + 1
                    batches_done += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.4f}", epoch=epoch)
                    if stop.requested:
                        stop_reason = "interrupted"
                        break

                train_seconds += time.perf_counter() - t_epoch
                t_eval = time.perf_counter()
                scores = evaluate(
                    model, tokenizer, config.task, dev, labels, config.eval_batch_size, max_length
                )
                record = {
                    "epoch": epoch,
                    "step": step,
                    "train_loss": loss_sum / max(1, n_steps),
                    "lr": lr,
                    **{f"dev_{k}": v for k, v in scores.items()},
                    "seconds": round(time.perf_counter() - t_start, 2),
                }
                history.append(record)
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                improved = scores[metric] > best_score
                epoch_done = batches_done == len(batches)
                extra = {**meta, "dev": scores, "epoch": epoch, "step": step}
                # a LoRA model is saved merged: checkpoints everything else loads
                saved_model = model if lora is None else merged_copy(model)
                if improved:
                    best_score, best_epoch, epochs_since_best = scores[metric], epoch, 0
                    save_checkpoint(out_dir / "best", saved_model, tokenizer, extra=extra)
                    if lora is not None:
                        save_adapter(model, out_dir / "adapter", base=base)
                elif epoch_done:
                    epochs_since_best += 1
                train_state = {
                    "step": step, "epoch": epoch, "epoch_done": epoch_done,
                    "batches_done": batches_done, "epoch_generator": epoch_generator,
                    "generator": generator.get_state(), "optimizer": optimizer.state_dict(),
                    "rng": _rng_state(device), "best_score": best_score, "best_epoch": best_epoch,
                    "epochs_since_best": epochs_since_best, "precision": precision,
                    **({"lora": lora_state_dict(model)} if lora is not None else {}),
                }
                save_checkpoint(out_dir / "last", saved_model, tokenizer, extra=extra, train_state=train_state)
                eval_seconds += time.perf_counter() - t_eval
                shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
                bar.write(
                    f"epoch {epoch}: train loss {record['train_loss']:.4f}, dev {shown}"
                    + (" *best*" if improved else "")
                )
                if stop_reason == "interrupted":
                    break
                if (
                    config.patience
                    and epochs_since_best >= config.patience
                    and epoch < config.epochs
                ):
                    stop_reason = "early_stopping"
                    break
    finally:
        bar.close()
        metrics_file.close()
    return FinetuneResult(
        out_dir=out_dir,
        epochs=epoch,
        steps=step,
        stop_reason=stop_reason,
        metric=metric,
        best_score=best_score,
        best_epoch=best_epoch,
        labels=labels,
        history=history,
        seconds=time.perf_counter() - t_start,
        train_seconds=train_seconds,
        eval_seconds=eval_seconds,
        precision=precision,
    )


def _truncate_history(path: Path, epoch: int, epoch_done: bool) -> None:
    """Keep the metrics records up to the checkpoint being resumed: a record for an epoch that
    was cut short is dropped, since the resumed run writes that epoch's record when it ends."""
    if not path.exists():
        return
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in records if r["epoch"] < epoch or (r["epoch"] == epoch and epoch_done)]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def epoch_batches(
    lengths: list[int], batch_size: int, generator: torch.Generator, group_by_length: bool
) -> list[list[int]]:
    """One epoch's batches of example indices, in a random order drawn from `generator`.

    With `group_by_length`, as HF's LengthGroupedSampler: the shuffled examples are cut into
    "mega-batches" of 50 batches, each sorted by length and cut into batches, so a batch holds
    examples of similar length and pads little; the batches are then shuffled again. Every
    example is still seen once per epoch.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if group_by_length:
        mega = 50 * batch_size
        order = [i for k in range(0, len(order), mega)
                 for i in sorted(order[k : k + mega], key=lambda i: -lengths[i])]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def _diverged_message(what: str, step: int, epoch: int, out_dir: Path) -> str:
    return diverged_message(what, f"fine-tuning stopped at step {step} (epoch {epoch})", out_dir / "last",
                            "it is from the end of an earlier epoch; try a lower lr")
