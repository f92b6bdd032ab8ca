"""Knowledge distillation: train a small student to match a large teacher (Hinton et al. 2015).

    loss = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, labels)
           [+ hidden_weight * (1 - cos(h_s, h_t))   or   MSE(h_s, h_t)]

over the positions that carry a label: every next-token target of a GPT, the masked positions of
a BERT's masked LM, every sentence (or labelled token) of a fine-tuned BERT classifier. The
temperature T > 1 softens both distributions so that the teacher's "dark knowledge" (which wrong
answers it finds plausible) reaches the student; the T^2 factor keeps the soft term's gradients
the same size whatever T (Hinton et al. 2015, section 2). The optional hidden-state term pulls
the student's final hidden states towards the teacher's, as DistilBERT's cosine loss does (Sanh et
al. 2019); it needs equal widths.

The teacher runs in eval mode without gradients, inside the same autocast as the student. The
student is a preset (vocabulary and context taken from the teacher), a checkpoint sharing the
teacher's tokenizer, or - DistilBERT's initialisation - the teacher's own weights with every
other layer dropped (`every_other_layer`).

No training loop lives here: a `Distillation` objective wraps the usual one and the pretraining
loop (`lmforge.train.trainer.train`) or the fine-tuning loop (`lmforge.train.finetune.finetune`)
runs it, with their checkpoints, resume, NaN guard, evaluation and Ctrl-C handling. Checkpoints
are ordinary student checkpoints; config.json's "distill" section records the teacher and settings
(a resumed run reads the teacher's path from there).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F

from lmforge.checkpoint import Checkpoint, load_checkpoint, read_meta
from lmforge.config import check, check_choice, from_dict
from lmforge.data import open_data
from lmforge.data.tasks import IGNORE_INDEX
from lmforge.errors import LmforgeError
from lmforge.models.bert import BERT_PRESETS, Bert, BertConfig
from lmforge.models.gpt import GPT, GPT_PRESETS, GPTConfig
from lmforge.tokenizer import Tokenizer
from lmforge.train.config import DataConfig, TrainConfig
from lmforge.train.finetune import (
    FinetuneConfig,
    FinetuneResult,
    evaluate,
    finetune,
    model_for_task,
    read_task_data,
    task_logits_and_labels,
)
from lmforge.train.objectives import ppl
from lmforge.train.trainer import TrainResult, estimate_loss, make_objective, resolve_device, train

TASK_HEADS = ("classification", "token-classification")


@dataclass
class DistillConfig:
    alpha: float = 0.5  # weight of the teacher's soft targets; 1 - alpha goes to the true labels
    temperature: float = 2.0  # softens both distributions; the KL term is scaled by T^2
    hidden_weight: float = 0.0  # weight of the final-hidden-state term; 0 turns it off
    hidden_loss: Literal["cosine", "mse"] = "cosine"  # cosine: DistilBERT's 1 - cos(h_s, h_t)
    # the student is the teacher with every other layer (0, 2, 4, ...): DistilBERT's start
    init_from_teacher: bool = False

    def __post_init__(self) -> None:
        check(0.0 <= self.alpha <= 1.0, f"alpha must be in [0, 1], got {self.alpha}")
        check(
            self.temperature > 0 and self.temperature != float("inf"),
            f"temperature must be a number > 0, got {self.temperature}",
        )
        check(self.hidden_weight >= 0, f"hidden_weight must be >= 0, got {self.hidden_weight}")
        check_choice("hidden_loss", self.hidden_loss, ("cosine", "mse"))


# --- the loss ----------------------------------------------------------------------------------
class DistillLoss(NamedTuple):
    loss: torch.Tensor  # what is minimised: alpha * T^2 * kl + (1 - alpha) * ce (+ hidden term)
    kl: torch.Tensor  # mean KL(teacher || student) at temperature T, per labelled position
    ce: torch.Tensor  # mean cross-entropy of the student against the labels (at T = 1)
    count: int  # labelled positions the means are over
    hidden: torch.Tensor | None = None  # the hidden-state term before its weight, when on


def distillation_loss(
    student_logits: torch.Tensor,  # (..., V)
    teacher_logits: torch.Tensor,  # (..., V)
    labels: torch.Tensor,  # (...): class ids, IGNORE_INDEX where there is nothing to predict
    *,
    alpha: float,
    temperature: float,
) -> DistillLoss:
    """Hinton et al.'s loss, averaged over the positions whose label is not IGNORE_INDEX."""
    keep = labels != IGNORE_INDEX
    student, teacher, labels = student_logits[keep].float(), teacher_logits[keep].float(), labels[keep]
    count = labels.numel()
    if count == 0:  # nothing labelled in this batch: a zero that still reaches the graph
        zero = student_logits.sum() * 0.0
        return DistillLoss(zero, zero.detach(), zero.detach(), 0)
    T = temperature
    log_p_student = F.log_softmax(student / T, dim=-1)  # (N, V)
    log_p_teacher = F.log_softmax(teacher / T, dim=-1)
    # sum_v p_t (log p_t - log p_s), averaged over the N positions
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    ce = F.cross_entropy(student, labels)
    return DistillLoss(alpha * T * T * kl + (1 - alpha) * ce, kl, ce, count)


def hidden_state_loss(
    student: torch.Tensor,  # (B, T, C) the student's final hidden states
    teacher: torch.Tensor,  # (B, T, C) the teacher's
    mask: torch.Tensor | None = None,  # (B, T): 1 for the positions to match, 0 for padding
    kind: str = "cosine",
) -> torch.Tensor:
    """Mean over the (unmasked) positions of 1 - cos(h_s, h_t) (DistilBERT's cosine-embedding loss
    with target 1), or of the squared error per dimension ("mse")."""
    if student.shape[-1] != teacher.shape[-1]:
        raise LmforgeError(
            f"hidden-state matching needs equal widths; the student's hidden states have "
            f"{student.shape[-1]} dimensions, the teacher's {teacher.shape[-1]}"
        )
    s, t = student.float(), teacher.float()
    if mask is not None:
        s, t = s[mask.bool()], t[mask.bool()]  # (N, C)
    if kind == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    return F.mse_loss(s, t)


def final_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose output is the hidden state a model's heads read: the final norm of a
    pre-norm stack, else the last layer (post-norm layers end normalised)."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model's own module
    if isinstance(model, GPT):
        stack = model.transformer
        return stack["ln_f"] if "ln_f" in stack else stack.h[-1]
    return model.ln_f if model.ln_f is not None else model.h[-1]


@contextlib.contextmanager
def final_hidden_states(model: torch.nn.Module, enabled: bool = True):
    """Yields a list that holds the model's final hidden states, (B, T, C), once it has run."""
    captured: list[torch.Tensor] = []
    handle = None
    if enabled:
        handle = final_layer(model).register_forward_hook(lambda m, args, out: captured.append(out))
    try:
        yield captured
    finally:
        if handle is not None:
            handle.remove()


# --- the objective -----------------------------------------------------------------------------
class Distillation:
    """A training objective that distils `teacher` into the model being trained.

    Batches, token counts and merging are the base objective's; the loss is `distillation_loss`
    between the logits the base's `logits_and_labels(model, batch)` gives for the student (one
    forward pass, with gradients) and for the teacher (without). Evaluations report the
    combined loss as `{split}_loss` (it picks the best checkpoint), its parts `{split}_kl` and
    `{split}_ce`, the student's accuracy on the labelled positions `{split}_acc` and `val_ppl`
    = exp(val CE).
    """

    def __init__(self, base: Any, teacher: torch.nn.Module, config: DistillConfig):
        self.base, self.config = base, config
        self.teacher = teacher.eval().requires_grad_(False)
        self.name = f"distill-{base.name}"

    def sampler(self, split: str, batch_size: int, seed: int):
        return self.base.sampler(split, batch_size, seed)

    def tokens(self, batch) -> int:
        return self.base.tokens(batch)

    def merge(self, batches: list):
        return self.base.merge(batches)

    def _forward(self, model: torch.nn.Module, batch) -> tuple[DistillLoss, torch.Tensor, torch.Tensor]:
        c = self.config
        hidden = c.hidden_weight > 0
        with final_hidden_states(model, hidden) as student_hidden:
            logits, labels = self.base.logits_and_labels(model, batch)
        with torch.no_grad(), final_hidden_states(self.teacher, hidden) as teacher_hidden:
            teacher_logits, _ = self.base.logits_and_labels(self.teacher, batch)
        parts = distillation_loss(logits, teacher_logits, labels, alpha=c.alpha, temperature=c.temperature)
        if hidden:
            mask = batch.get("attention_mask") if isinstance(batch, dict) else None  # GPT: all
            term = hidden_state_loss(student_hidden[0], teacher_hidden[0], mask, c.hidden_loss)
            parts = parts._replace(loss=parts.loss + c.hidden_weight * term, hidden=term)
        return parts, logits, labels

    def loss(self, model: torch.nn.Module, batch) -> torch.Tensor:
        return self._forward(model, batch)[0].loss

    def stats(self, model: torch.nn.Module, batch) -> dict[str, float]:
        parts, logits, labels = self._forward(model, batch)
        keep = labels != IGNORE_INDEX
        n = parts.count
        sums = {
            "loss_sum": parts.loss.item() * n,
            "kl_sum": parts.kl.item() * n,
            "ce_sum": parts.ce.item() * n,
            "correct": (logits.argmax(-1)[keep] == labels[keep]).sum().item(),
            "count": n,
        }
        if parts.hidden is not None:
            sums["hidden_sum"] = parts.hidden.item() * n
        return sums

    def summarize(self, sums: dict[str, float], split: str) -> dict[str, float]:
        n = max(sums["count"], 1)
        out = {
            f"{split}_loss": sums["loss_sum"] / n,
            f"{split}_kl": sums["kl_sum"] / n,
            f"{split}_ce": sums["ce_sum"] / n,
            f"{split}_acc": sums["correct"] / n,
        }
        if "hidden_sum" in sums:
            out[f"{split}_hidden"] = sums["hidden_sum"] / n
        if split == "val":
            out["val_ppl"] = ppl(out["val_ce"])
        return out


class TaskLabels:
    """Fine-tuning batches (`lmforge.train.finetune.collate`) as the base of a `Distillation`:
    the task head's logits and the labels."""

    name = "task"
    logits_and_labels = staticmethod(task_logits_and_labels)


# --- the student -------------------------------------------------------------------------------
LAYER_KEY = re.compile(r"^((?:transformer\.)?h\.)(\d+)\.(.*)$")  # GPT's and BERT's layer weights


def every_other_layer(teacher: GPT | Bert, head: str | None = None) -> GPT | Bert:
    """A student as wide as the teacher with its layers 0, 2, 4, ...: embeddings, norms, those
    layers and the heads are copied (DistilBERT's initialisation, Sanh et al. 2019). `head`
    changes a BERT's head (masked-LM distillation drops a pretraining teacher's NSP head and
    pooler, which DistilBERT does not have)."""
    c = teacher.config
    if c.n_layer < 2:
        raise LmforgeError("--init-from-teacher halves the teacher's depth, but it has 1 layer")
    changes: dict[str, Any] = {"n_layer": (c.n_layer + 1) // 2}
    if isinstance(teacher, Bert) and head is not None and head != c.head:
        changes.update(head=head, pooler=None)
    student = type(teacher)(from_dict(type(c), {**asdict(c), **changes}, section="model"))
    wanted = student.state_dict()
    copied = {}
    for name, tensor in teacher.state_dict().items():
        layer = LAYER_KEY.match(name)
        if layer:
            index = int(layer[2])
            if index % 2:
                continue
            name = f"{layer[1]}{index // 2}.{layer[3]}"
        if name in wanted:
            copied[name] = tensor
    student.load_state_dict(copied)  # strict: every student weight comes from the teacher
    return student


def preset_config(teacher: GPT | Bert, preset: str, head: str | None) -> GPTConfig | BertConfig:
    """A preset's shape with the teacher's vocabulary, context and (BERT) head and labels."""
    c = teacher.config
    family, presets = ("GPT", GPT_PRESETS) if isinstance(teacher, GPT) else ("BERT", BERT_PRESETS)
    if preset not in presets:
        raise LmforgeError(
            f"the teacher is a {family}: the student preset must be one of {', '.join(presets)}, "
            f"got {preset!r}"
        )
    if isinstance(teacher, GPT):
        return GPTConfig(**{**presets[preset], "vocab_size": c.vocab_size, "block_size": c.block_size})
    values = {
        **presets[preset], "vocab_size": c.vocab_size, "max_position": c.max_position,
        "type_vocab_size": c.type_vocab_size, "pad_token_id": c.pad_token_id, "head": head,
    }
    if head in TASK_HEADS:
        values.update(num_labels=c.num_labels, labels=list(c.labels))
    return BertConfig(**values)


def checkpoint_student(teacher_ckpt: Checkpoint, path: str | Path, head: str | None) -> GPT | Bert:
    """A student checkpoint, checked against the teacher; a BERT gets the teacher's task head
    (a fresh one over its encoder) unless it has it already."""
    teacher = teacher_ckpt.model
    ckpt = load_checkpoint(path)
    model = ckpt.model
    if type(model) is not type(teacher):
        raise LmforgeError(
            f"the student {str(path)!r} is a {type(model).__name__} but the teacher is a "
            f"{type(teacher).__name__}; distil into the same family"
        )
    check_same_vocabulary(teacher_ckpt.tokenizer, ckpt.tokenizer, f"the student {str(path)!r}")
    if model.config.vocab_size != teacher.config.vocab_size:
        raise LmforgeError(
            f"the student {str(path)!r} has vocab_size {model.config.vocab_size}, the teacher "
            f"{teacher.config.vocab_size}: their logits must cover the same tokens"
        )
    if isinstance(model, GPT) and model.config.block_size > teacher.config.block_size:
        raise LmforgeError(
            f"the student's context ({model.config.block_size}) is longer than the teacher's "
            f"({teacher.config.block_size}); the teacher must see the student's whole windows"
        )
    if head == "mlm" and model.config.head not in ("mlm", "pretraining"):
        raise LmforgeError(
            f"masked-LM distillation needs a student with a masked-LM head; {str(path)!r} has "
            f"head {model.config.head!r} (use a bert-* preset or --init-from-teacher)"
        )
    if head in TASK_HEADS and (model.config.head, model.config.labels) != (head, teacher.config.labels):
        model, _ = model_for_task(model, head, teacher.config.labels)
    return model


def make_student(
    teacher_ckpt: Checkpoint, student: str | Path | None, init_from_teacher: bool, head: str | None
) -> tuple[GPTConfig | BertConfig, GPT | Bert | None]:
    """The student's config, and its weights unless it is a preset (random, seeded by the run)."""
    if init_from_teacher:
        model = every_other_layer(teacher_ckpt.model, head)
        return model.config, model
    if str(student) in GPT_PRESETS or str(student) in BERT_PRESETS:
        return preset_config(teacher_ckpt.model, str(student), head), None
    if not Path(student).exists():
        raise LmforgeError(
            f"student {str(student)!r} is neither a preset ({', '.join([*GPT_PRESETS, *BERT_PRESETS])}) "
            "nor a checkpoint folder"
        )
    model = checkpoint_student(teacher_ckpt, student, head)
    return model.config, model


def check_same_vocabulary(teacher: Tokenizer, other: Tokenizer, what: str) -> None:
    """Distillation compares logits token by token: both sides must use the same token ids."""
    if teacher.backend.get_vocab(with_added_tokens=True) != other.backend.get_vocab(with_added_tokens=True):
        raise LmforgeError(
            f"{what} uses a different vocabulary ({other.kind}, {other.vocab_size} tokens) than the "
            f"teacher ({teacher.kind}, {teacher.vocab_size} tokens); teacher and student must share "
            "the tokenizer: use the data the teacher was trained on, or data prepared like it"
        )


def check_widths(teacher: GPT | Bert, student: GPTConfig | BertConfig, config: DistillConfig) -> None:
    if config.hidden_weight > 0 and student.n_embd != teacher.config.n_embd:
        raise LmforgeError(
            f"hidden_weight > 0 matches hidden states, which needs the student as wide as the "
            f"teacher (n_embd {student.n_embd} vs {teacher.config.n_embd}); use --init-from-teacher, "
            "a student of the teacher's width, or hidden_weight 0"
        )


# --- the runs ----------------------------------------------------------------------------------
@dataclass
class DistillResult:
    run_dir: Path
    task: str  # clm | mlm | classification | token-classification
    teacher_params: int
    student_params: int
    # the same measurements of both, on the same examples: for language models the eval batches'
    # cross-entropy, accuracy (and perplexity) plus the student's KL to the teacher; for tasks the
    # dev scores (accuracy, macro F1 / entity F1) of the teacher and of the best student
    teacher_scores: dict[str, float]
    student_scores: dict[str, float]
    training: TrainResult | FinetuneResult


def distill(
    teacher: str | Path | None,
    student: str | Path | None,
    out_dir: str | Path,
    *,
    data: str | Path | DataConfig | None = None,
    train_file: str | Path | None = None,
    dev_file: str | Path | None = None,
    config: DistillConfig | None = None,
    train_config: TrainConfig | None = None,
    finetune_config: FinetuneConfig | None = None,
    resume: bool = False,
    progress: bool = True,
) -> DistillResult:
    """Distil the checkpoint `teacher` into `student` (a preset name, a checkpoint, or None with
    `config.init_from_teacher`), writing an ordinary run folder `out_dir` (best/, last/,
    metrics.jsonl) of student checkpoints.

    A GPT teacher (causal LM) or a BERT teacher with a masked-LM head distils on `data`, a prepared
    data folder, through the pretraining loop with `train_config`. A fine-tuned BERT classifier
    (or token classifier) distils on `train_file`, scored on `dev_file` after every epoch, through
    the fine-tuning loop with `finetune_config`; the student gets the teacher's label names.
    With `resume=True` the run in `out_dir` continues with its own teacher and settings; a
    `train_config` (language models) may extend it, e.g. with a larger max_iters.
    """
    out_dir = Path(out_dir)
    if resume:
        if config is not None or student is not None:
            raise LmforgeError("resuming continues with the run's own student and settings; drop them")
        if not (out_dir / "last" / "config.json").is_file():
            raise LmforgeError(
                f"cannot resume: {str(out_dir / 'last')!r} does not exist (start without --resume)"
            )
        saved = read_meta(out_dir / "last").get("distill")
        if saved is None:
            raise LmforgeError(f"cannot resume: {str(out_dir)!r} is not a distillation run")
        teacher = teacher if teacher is not None else saved["teacher"]
        config = from_dict(DistillConfig, {f.name: saved[f.name] for f in dataclasses.fields(DistillConfig)})
        student = saved["student"]
    else:
        if teacher is None:
            raise LmforgeError("a teacher checkpoint is needed (--teacher CKPT)")
        config = config or DistillConfig()
        if (student is None) != config.init_from_teacher:
            raise LmforgeError(
                "give either a student (a preset such as gpt-tiny or bert-mini, or a checkpoint) "
                "or init_from_teacher (--init-from-teacher), not both"
                if student is not None else
                "give a student (a preset such as gpt-tiny or bert-mini, or a checkpoint) or "
                "init_from_teacher (--init-from-teacher)"
            )
        student = "init-from-teacher" if student is None else str(student)
    teacher_ckpt = load_checkpoint(teacher)
    task = teacher_task(teacher_ckpt.model, teacher)
    meta = {"teacher": str(Path(teacher).resolve()), "student": student, "task": task, **asdict(config)}
    if task in TASK_HEADS:
        if data is not None or train_config is not None:
            raise LmforgeError(
                f"the teacher is a fine-tuned {task} model: distil it on --train/--dev files "
                "(finetune options), not on --data"
            )
        return _distill_task(teacher_ckpt, teacher, student, out_dir, config, meta, train_file,
                             dev_file, finetune_config, resume, progress)
    if train_file is not None or dev_file is not None or finetune_config is not None:
        raise LmforgeError(
            f"the teacher is a language model ({task}): distil it on --data DATA_DIR, a prepared "
            "data folder; --train/--dev files are for fine-tuned classifiers"
        )
    if isinstance(data, (str, Path)):
        data = DataConfig(path=str(data))
    return _distill_lm(teacher_ckpt, student, out_dir, config, meta, data, train_config, resume, progress)


def teacher_task(model: torch.nn.Module, path: str | Path) -> str:
    """What a teacher is distilled on: clm (GPT), mlm (BERT with a masked-LM head), or its task."""
    if isinstance(model, GPT):
        return "clm"
    if not isinstance(model, Bert):
        raise LmforgeError(
            f"the teacher {str(path)!r} is a {type(model).__name__}; distillation takes a GPT or "
            "a BERT teacher"
        )
    head = model.config.head
    if head in ("mlm", "pretraining"):
        return "mlm"
    if head in TASK_HEADS:
        if not model.config.labels:
            raise LmforgeError(
                f"the teacher {str(path)!r} has no label names; fine-tune it with `lmforge finetune`"
            )
        return head
    raise LmforgeError(
        f"the BERT teacher {str(path)!r} has head {head!r}; distillation needs a masked-LM head "
        "(pretraining or mlm) or a fine-tuned classification head"
    )


def _distill_lm(
    teacher_ckpt: Checkpoint, student: str, out_dir: Path, config: DistillConfig, meta: dict,
    data_config: DataConfig | None, tc: TrainConfig | None, resume: bool, progress: bool,
) -> DistillResult:
    teacher, task = teacher_ckpt.model, meta["task"]
    if resume:
        saved = read_meta(out_dir / "last")
        data_config = data_config or from_dict(DataConfig, saved["data"], "data")
        tc = tc or from_dict(TrainConfig, saved["train"], "train")
    elif data_config is None:
        raise LmforgeError("--data DATA_DIR is required (a folder made by `lmforge prepare`)")
    tc = tc or TrainConfig()
    if tc.objective not in ("auto", task):
        raise LmforgeError(
            f"train.objective={tc.objective!r}: a {type(teacher).__name__} teacher distils with "
            f"objective {task!r} (next-sentence prediction is not distilled)"
        )
    tc = dataclasses.replace(tc, objective=task)
    data = open_data(data_config.path)
    check_same_vocabulary(teacher_ckpt.tokenizer, data.tokenizer, f"the data in {data_config.path!r}")
    if task == "mlm" and data_config.max_length > teacher.config.max_position:
        raise LmforgeError(
            f"data.max_length={data_config.max_length} is longer than the teacher's "
            f"max_position={teacher.config.max_position}"
        )
    model_config = init_model = None
    if not resume:
        head = "mlm" if task == "mlm" else None
        model_config, init_model = make_student(teacher_ckpt, student, config.init_from_teacher, head)
        check_widths(teacher, model_config, config)
    device = resolve_device(tc.device)
    teacher.to(device)
    result = train(
        model_config, tc, data_config, out_dir, resume=resume, progress=progress,
        init_model=init_model, objective_wrapper=partial(Distillation, teacher=teacher, config=config),
        extra_meta={"distill": meta},
    )
    # teacher and best student, measured alike on the evaluation batches (fixed seed)
    best = load_checkpoint(out_dir, device=device).model
    objective = Distillation(make_objective(best.config, tc, data_config, data), teacher, config)
    has_val = data.tokens("val") > 0
    scores = [estimate_loss(m, objective, tc, contextlib.nullcontext(), has_val) for m in (teacher, best)]
    wanted = ("_ce", "_acc", "_ppl")
    return DistillResult(
        out_dir, task, num_params(teacher), num_params(best),
        teacher_scores={k: v for k, v in scores[0].items() if k.endswith(wanted)},
        student_scores={k: v for k, v in scores[1].items() if k.endswith((*wanted, "_kl"))},
        training=result,
    )


def _distill_task(
    teacher_ckpt: Checkpoint, teacher_path: str | Path, student: str, out_dir: Path,
    config: DistillConfig, meta: dict, train_file: str | Path | None, dev_file: str | Path | None,
    fc: FinetuneConfig | None, resume: bool, progress: bool,
) -> DistillResult:
    teacher, task = teacher_ckpt.model, meta["task"]
    if resume:
        if fc is not None:
            raise LmforgeError("resuming a classifier's distillation continues with the run's own "
                               "fine-tuning settings; drop them")
        init_model = load_checkpoint(out_dir / "last").model  # finetune loads its weights again
        device = resolve_device(read_meta(out_dir / "last")["finetune"]["device"])
    else:
        fc = dataclasses.replace(fc or FinetuneConfig(), task=task)
        model_config, init_model = make_student(teacher_ckpt, student, config.init_from_teacher, task)
        check_widths(teacher, model_config, config)
        if init_model is None:  # a preset: random weights from the run's seed
            torch.manual_seed(fc.seed)
            init_model = Bert(model_config)
        device = resolve_device(fc.device)
    teacher.to(device)
    result = finetune(
        teacher_path, train_file, dev_file, out_dir, fc, progress, resume=resume,
        init_model=init_model, loss_fn=Distillation(TaskLabels(), teacher, config).loss,
        extra_meta={"distill": meta},
    )
    # the teacher scored on the same dev file, as the student was after every epoch
    saved = read_meta(out_dir / "last")
    fc = from_dict(FinetuneConfig, saved["finetune"], "finetune")
    _, dev, _ = read_task_data(fc, saved["train_file"], saved["dev_file"])
    max_length = min(fc.max_length, teacher.config.max_position)
    teacher_scores = evaluate(teacher, teacher_ckpt.tokenizer, task, dev, teacher.config.labels,
                              fc.eval_batch_size, max_length)
    return DistillResult(
        out_dir, task, num_params(teacher), num_params(init_model), teacher_scores,
        read_meta(out_dir / "best")["dev"], result,
    )


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied weight once
