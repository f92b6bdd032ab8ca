"""Multi-task fine-tuning: one shared BERT encoder, one head per task, L_MTL = sum_t λ_t L_t.

    load the base encoder (lmforge or Hugging Face BERT folder, any head)
    one Bert per task (finetune's `model_for_task`), tied so that all of them share the
    embeddings, the blocks and the pooler: one encoder, a head per task
    each optimizer step:
        draw a task t (seeded): proportional p_t ∝ n_t, temperature p_t ∝ n_t^(1/T), or the
        tasks in turn (round-robin)
        the next batch of t (each task reads its own shuffled epochs, again and again)
        loss = λ_t · L_t under autocast; NaN/inf stops before the step; backward, clip, AdamW
        lr: linear warmup over warmup_ratio of `steps`, then linear decay to 0
    every eval_every steps and at the end: score every task's dev file, log them all; save
    best/ when the weighted score sum_t λ_t s_t / sum_t λ_t improved, and last/ (+ resume state)

Why one task per step, weighted: the expected update is E[g] = sum_t p_t λ_t ∇L_t, so the sampling
rule sets how often a task is seen and λ_t how hard it pulls when it is. With p_t ∝ n_t and
λ_t = 1 this is training on the pooled examples (MT-DNN, Liu et al. 2019). Temperature T > 1
flattens p towards uniform, so small tasks are seen more than their share of the examples (T = 1
is proportional, T -> inf uniform); multilingual BERT and T5 (Raffel et al. 2020, 3.5.2) mix
languages and tasks this way. Round-robin visits the tasks in config order whatever their sizes.
n_t counts a task's training examples; a task with λ_t = 0 is never drawn (it would only add
steps that change nothing): it is scored and saved, its head stays as initialised.

The run is `steps` optimizer steps, not epochs: under sampling each task gets a different number
of passes over its data (about p_t * steps * batch_size / n_t).

Task types: "classification" and "token-classification" read finetune's files (TSV/CSV/JSONL with
a header; CoNLL) and score accuracy + macro F1, or entity precision/recall/F1 (IOB2 tags) + word
accuracy; "mlm" reads a text file, one example a line, masked dynamically as in BERT pretraining
(`lmforge.data.mlm.MlmMasker`), and scores masked-LM loss, perplexity and masked-token accuracy
(dev masking drawn from the seed, the same at every evaluation). A task's score s_t, in [0, 1], is
its accuracy, its entity F1 (IOB2 tags) or its masked-token accuracy.

    RUN_DIR/
      best/<task>/, last/<task>/   ordinary checkpoints, the shared encoder + that task's head
                                   (labels in config.json): `lmforge predict`, `fill-mask` take them
      best/multitask.json, last/multitask.json   the run's config, step, dev scores
      last/state.pt                optimizer, sampler, batch orders, RNG: what `resume` needs
      metrics.jsonl, loss.png      one record per evaluation; per-task loss and score curves

Failure rules are fine-tuning's: best/ and last/ are each written whole (every task's checkpoint
in one atomic folder), a NaN/inf loss raises `TrainingDiverged` before the optimizer step and
saves nothing, Ctrl-C finishes the step, scores dev, saves last/ and returns; a resumed run takes
exactly the steps the uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from lmforge.checkpoint import STATE_FILE, load_checkpoint, load_train_state, save_checkpoint
from lmforge.config import check, check_choice, from_dict, load_config_file
from lmforge.data.mlm import MlmMasker
from lmforge.data.tasks import IGNORE_INDEX
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_dir, recover_dir
from lmforge.models.bert import Bert
from lmforge.tokenizer import Tokenizer
from lmforge.train.finetune import (
    FinetuneConfig,
    best_metric,
    check_training_settings,
    collate,
    encode_examples,
    epoch_batches,
    evaluate,
    model_for_task,
    read_task_data,
    task_loss,
)
from lmforge.train.objectives import MaskedLM, add_stats, move_batch
from lmforge.train.optim import lr_at, make_optimizer
from lmforge.train.precision import autocast_context, resolve_precision
from lmforge.train.trainer import (
    METRICS_FILE,
    PLOT_FILE,
    TrainingDiverged,
    _GracefulStop,
    _rng_state,
    diverged_message,
    resolve_device,
)

TASK_TYPES = ("classification", "token-classification", "mlm")
SAMPLING = ("proportional", "temperature", "round-robin")
DEFAULT_TEMPERATURE = 2.0
DEFAULT_MLM_PROBABILITY = 0.15
RUN_FILE = "multitask.json"  # in best/ and last/: the config, step and scores of that save
# task names become folder names: no dots or slashes, so they never clash with RUN_FILE/STATE_FILE
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
CLASSIFICATION_ONLY = ("text_column", "pair_column", "label_column")
MLM_ONLY = ("mlm_probability", "whole_word_masking")


@dataclass
class TaskSpec:
    name: str = ""
    type: Literal["classification", "token-classification", "mlm"] = "classification"
    train_file: str = ""
    dev_file: str = ""
    weight: float = 1.0  # λ_t: the task's loss is multiplied by it; 0 = scored, never trained
    # classification files: None picks read_classification's defaults ("text", "sentence", ...)
    text_column: str | None = None
    pair_column: str | None = None
    label_column: str | None = None  # None: "label"
    max_length: int | None = None  # None: the run's max_length
    mlm_probability: float | None = None  # mlm: share of tokens chosen for masking; None: 0.15
    whole_word_masking: bool | None = None  # mlm: mask all pieces of a word together

    def __post_init__(self) -> None:
        check(
            bool(TASK_NAME.fullmatch(self.name)),
            f"task name {self.name!r} is not valid: every task needs a name of letters, digits, "
            "'_' and '-' (it names the task's checkpoint folder)",
        )
        where = f"task {self.name!r}"
        check_choice(f"{where}: type", self.type, TASK_TYPES)
        for key in ("train_file", "dev_file"):
            check(bool(getattr(self, key)), f"{where}: {key} is required")
        check(
            math.isfinite(self.weight) and self.weight >= 0,
            f"{where}: weight must be a number >= 0, got {self.weight}",
        )
        if self.max_length is not None:
            check(
                self.max_length >= 3,
                f"{where}: max_length must be >= 3 ([CLS], a token, [SEP]), got {self.max_length}",
            )
        wrong = [
            k
            for k in CLASSIFICATION_ONLY
            if self.type != "classification" and getattr(self, k) is not None
        ]
        wrong += [k for k in MLM_ONLY if self.type != "mlm" and getattr(self, k) is not None]
        check(not wrong, f"{where}: {', '.join(wrong)} do(es) not apply to type {self.type!r}")
        if self.mlm_probability is not None:
            check(
                0 < self.mlm_probability < 1,
                f"{where}: mlm_probability must be in (0, 1), got {self.mlm_probability}",
            )


@dataclass
class MultitaskConfig:
    base: str = ""  # lmforge or Hugging Face BERT folder (any head)
    tasks: list[TaskSpec] = field(default_factory=list)
    steps: int = 1000  # optimizer steps in all; each trains one task's batch
    sampling: Literal["proportional", "temperature", "round-robin"] = "proportional"
    temperature: float | None = None  # sampling="temperature": p_t ∝ n_t^(1/T); None: 2.0
    eval_every: int = 200  # steps between dev evaluations; the last step is always scored
    batch_size: int = 32
    eval_batch_size: int = 64
    max_length: int = 128  # tokens per example, [CLS] and [SEP] included; a task may set its own
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1  # fraction of the steps spent warming up, then linear decay to 0
    grad_clip: float = 1.0  # 0 turns clipping off
    patience: int = 0  # stop after this many evaluations without a better score; 0 never stops
    precision: str = "auto"
    seed: int = 1337
    device: str = "auto"
    group_by_length: bool = True  # each task's batches hold examples of similar lengths

    def __post_init__(self) -> None:
        check(bool(self.base), "base is required: the BERT checkpoint (folder) to start from")
        check(
            isinstance(self.tasks, list) and len(self.tasks) >= 1,
            "tasks must list at least one task ([[tasks]] in TOML, a `tasks:` list in YAML)",
        )
        self.tasks = [
            t if isinstance(t, TaskSpec) else _task_from_dict(t, i)
            for i, t in enumerate(self.tasks)
        ]
        names = [t.name for t in self.tasks]
        repeated = sorted({n for n in names if names.count(n) > 1})
        check(not repeated, f"task name(s) {', '.join(map(repr, repeated))} used more than once")
        check(
            any(t.weight > 0 for t in self.tasks),
            "every task has weight 0: at least one task must have weight > 0 to train anything",
        )
        check_choice("sampling", self.sampling, SAMPLING)
        if self.sampling == "temperature":
            if self.temperature is None:
                self.temperature = DEFAULT_TEMPERATURE
            check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        else:
            check(
                self.temperature is None,
                f"temperature applies to sampling='temperature' only (sampling is {self.sampling!r})",
            )
        check_training_settings(self, ("steps", "eval_every", "batch_size", "eval_batch_size"))


def _task_from_dict(data: Any, index: int) -> TaskSpec:
    check(
        isinstance(data, dict),
        f"tasks[{index}] must be a table of task settings (name, type, train_file, ...), got {data!r}",
    )
    return from_dict(TaskSpec, data, section=f"tasks[{index}]")


def load_multitask_config(path: str | Path) -> MultitaskConfig:
    """The config of a TOML/YAML/JSON file: the run's settings at the top level and a list of
    `tasks` (`[[tasks]]` tables in TOML). Unknown keys are errors that list the valid ones."""
    data = load_config_file(path)
    try:
        return from_dict(MultitaskConfig, data)
    except LmforgeError as e:
        raise LmforgeError(f"config file {str(path)!r}: {e}") from e


def check_files(config: MultitaskConfig) -> None:
    """Every task's files exist (all missing ones named at once, before the base is loaded)."""
    missing = [
        f"{t.name}.{key} = {getattr(t, key)!r}"
        for t in config.tasks
        for key in ("train_file", "dev_file")
        if not Path(getattr(t, key)).is_file()
    ]
    if missing:
        raise LmforgeError(f"data file(s) not found: {'; '.join(missing)}")


# --- sampling ----------------------------------------------------------------------------------
def task_probabilities(
    sizes: list[int], weights: list[float], sampling: str, temperature: float | None = None
) -> list[float]:
    """p_t, the chance that a step trains task t: ∝ n_t (proportional), ∝ n_t^(1/T)
    (temperature), or uniform (round-robin, its long-run share); 0 for tasks with weight 0."""
    check_choice("sampling", sampling, SAMPLING)
    active = [w > 0 for w in weights]
    if sampling == "round-robin":
        mass = [1.0 if a else 0.0 for a in active]
    else:
        exponent = 1.0 if sampling == "proportional" else 1.0 / temperature
        mass = [n**exponent if a else 0.0 for n, a in zip(sizes, active, strict=True)]
    total = sum(mass)
    return [m / total for m in mass]


class TaskSampler:
    """The task each step trains: drawn from `probabilities` with its own seeded generator, or
    (round-robin) the tasks with p > 0 in turn. `state_dict` resumes the sequence exactly."""

    def __init__(self, probabilities: list[float], round_robin: bool, seed: int):
        self.p = torch.tensor(probabilities, dtype=torch.float64)
        self.active = [t for t, p in enumerate(probabilities) if p > 0]
        self.round_robin = round_robin
        self.generator = torch.Generator().manual_seed(seed)
        self.counts = [0] * len(probabilities)  # steps each task has had

    def next(self) -> int:
        if self.round_robin:
            t = self.active[sum(self.counts) % len(self.active)]
        else:
            t = int(torch.multinomial(self.p, 1, generator=self.generator))
        self.counts[t] += 1
        return t

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "counts": list(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.counts = [int(c) for c in state["counts"]]


class TaskBatches:
    """Endless batches of one task's examples: shuffled epochs (finetune's `epoch_batches`), a
    fresh shuffle each time one is used up. The state is the generator at the start of the
    current epoch and the batches taken from it, as in finetune's resume."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool):
        self.lengths, self.batch_size, self.group_by_length = lengths, batch_size, group_by_length
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self._new_epoch()

    def _new_epoch(self) -> None:
        self.epoch_state = self.generator.get_state()
        self.batches = epoch_batches(
            self.lengths, self.batch_size, self.generator, self.group_by_length
        )
        self.epoch, self.position = self.epoch + 1, 0

    def next(self) -> list[int]:
        if self.position == len(self.batches):
            self._new_epoch()
        self.position += 1
        return self.batches[self.position - 1]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_generator": self.epoch_state, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["epoch_generator"])
        self.epoch = int(state["epoch"]) - 1
        self._new_epoch()  # the same shuffle again; its first `position` batches are done
        self.position = int(state["position"])


# --- tasks -------------------------------------------------------------------------------------
def read_lines(path: str | Path) -> list[str]:
    """An mlm task's examples: the non-blank lines of a UTF-8 text file."""
    path = Path(path)
    if path.suffix.lower() in (".tsv", ".csv", ".jsonl"):
        raise LmforgeError(
            f"{str(path)!r}: an mlm task reads plain text, one example a line (e.g. a .txt "
            f"file), not a {path.suffix} table"
        )
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{str(path)!r} is not UTF-8 text ({e.reason}); convert it first") from e
    lines = [line for line in lines if line]
    if not lines:
        raise LmforgeError(f"{str(path)!r} has no text (every line is blank)")
    return lines


def encode_lines(
    tokenizer: Tokenizer, lines: list[str], max_length: int, masker: MlmMasker
) -> list[dict[str, Any]]:
    """Unpadded "[CLS] line [SEP]" features, cut at max_length; lines with nothing to mask (only
    special tokens, e.g. all [UNK]) are left out. `labels` is all -100 until a batch is masked."""
    features = []
    for i in range(0, len(lines), 1024):  # chunks, so padding stays within 1024 rows
        enc = tokenizer.encode_for_encoder(lines[i : i + 1024], max_length=max_length)
        for row in range(len(enc["input_ids"])):
            n = int(enc["attention_mask"][row].sum())
            ids = enc["input_ids"][row, :n]
            if masker.maskable(ids).any():
                features.append(
                    {
                        "input_ids": ids.tolist(),
                        "token_type_ids": enc["token_type_ids"][row, :n].tolist(),
                        "labels": [IGNORE_INDEX] * n,
                    }
                )
    return features


@dataclass
class Task:
    """One task of the run: its settings, model (a head over the shared encoder) and data."""

    spec: TaskSpec
    model: Bert
    train: list[dict[str, Any]]  # encoded training features
    dev: list  # examples (classification, token classification) or encoded features (mlm)
    labels: list[str]  # [] for mlm
    max_length: int
    masker: MlmMasker | None = None  # mlm only
    mask_generator: torch.Generator | None = None  # mlm only: the training batches' masking

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def metric(self) -> str:
        """The dev score s_t of this task (one of `evaluate_task`'s keys)."""
        return "accuracy" if self.spec.type == "mlm" else best_metric(self.spec.type, self.labels)

    def batch(
        self, rows: list[int], pad_id: int, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """The padded batch of training examples `rows`; an mlm batch masked with `generator`
        (default: the task's own)."""
        batch = collate([self.train[i] for i in rows], pad_id)
        if self.masker is not None:
            batch["input_ids"], batch["labels"] = self.masker.mask(
                batch["input_ids"], batch["attention_mask"], generator or self.mask_generator
            )
        return batch

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """L_t of a batch, unweighted: cross-entropy of the head (mean over sentences, labelled
        tokens or masked tokens)."""
        if self.spec.type == "mlm":
            return _MLM.loss(self.model, batch)
        return task_loss(self.model, batch)


# The mlm task's loss and dev statistics are BERT pretraining's masked-LM objective; its batches
# come from the task's text file, not from a prepared data folder
_MLM = MaskedLM(None, 0, nsp=False)


def weighted_loss(task: Task, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ_t · L_t, L_t): what one step backpropagates, and the task's own loss for the logs."""
    loss = task.loss(batch)
    return task.spec.weight * loss, loss


def read_task(
    spec: TaskSpec, tokenizer: Tokenizer, max_length: int
) -> tuple[list, list, list[str], MlmMasker | None]:
    """Train features, dev examples (features for mlm), labels and, for mlm, the masker."""
    try:
        if spec.type == "mlm":
            masker = MlmMasker(
                tokenizer,
                spec.mlm_probability or DEFAULT_MLM_PROBABILITY,
                bool(spec.whole_word_masking),
            )
            train, dev = (
                encode_lines(tokenizer, read_lines(path), max_length, masker)
                for path in (spec.train_file, spec.dev_file)
            )
            for split, features in (("train_file", train), ("dev_file", dev)):
                if not features:
                    raise LmforgeError(f"{split} has no line with an ordinary token to mask")
            return train, dev, [], masker
        ft = FinetuneConfig(
            task=spec.type,
            text_column=spec.text_column,
            pair_column=spec.pair_column,
            label_column=spec.label_column,
            max_length=max_length,
        )
        train, dev, labels = read_task_data(ft, spec.train_file, spec.dev_file)
        return encode_examples(ft, tokenizer, train, labels, max_length), dev, labels, None
    except LmforgeError as e:
        raise LmforgeError(f"task {spec.name!r}: {e}") from e


def task_models(base: Bert, specs: list[TaskSpec], labels: list[list[str]]) -> list[Bert]:
    """One Bert per task, each with its head (fresh, or the base's for the same task and labels)
    over ONE encoder: the models share the embeddings, blocks and final norm of the first, and
    the sentence-level tasks share one pooler (as MT-DNN's shared BERT layers include it)."""
    models = [
        model_for_task(base, spec.type, names)[0] for spec, names in zip(specs, labels, strict=True)
    ]
    first = models[0]
    pooler = next((m.pooler for m in models if m.pooler is not None), None)
    for m in models:
        m.embeddings, m.h, m.ln_f = first.embeddings, first.h, first.ln_f
        if m.pooler is not None:
            m.pooler = pooler
    return models


@torch.inference_mode()
def evaluate_mlm(
    task: Task, batch_size: int, pad_id: int, seed: int, device: torch.device
) -> dict[str, float]:
    """Masked-LM loss, perplexity and masked-token accuracy on the dev lines, masked with a
    generator seeded afresh each time: every evaluation scores the same masked tokens."""
    generator = torch.Generator().manual_seed(seed)
    sums: dict[str, float] = {}
    for i in range(0, len(task.dev), batch_size):
        batch = collate(task.dev[i : i + batch_size], pad_id)
        batch["input_ids"], batch["labels"] = task.masker.mask(
            batch["input_ids"], batch["attention_mask"], generator
        )
        add_stats(sums, _MLM.stats(task.model, move_batch(batch, device)))
    scores = _MLM.summarize(sums, "dev")
    return {
        "loss": scores["dev_mlm_loss"],
        "perplexity": scores["dev_mlm_ppl"],
        "accuracy": scores["dev_mlm_acc"],
    }


def evaluate_task(
    task: Task, tokenizer: Tokenizer, config: MultitaskConfig, device: torch.device
) -> dict[str, float]:
    """The task's dev scores (see the module docstring); `task.metric` names its score s_t."""
    if task.spec.type != "mlm":
        return evaluate(
            task.model, tokenizer, task.spec.type, task.dev, task.labels,
            config.eval_batch_size, task.max_length,
        )  # fmt: skip
    was_training = task.model.training
    task.model.eval()
    try:
        return evaluate_mlm(task, config.eval_batch_size, _pad_id(tokenizer), config.seed, device)
    finally:
        task.model.train(was_training)


def overall_score(tasks: list[Task], scores: dict[str, dict[str, float]]) -> float:
    """sum_t λ_t s_t / sum_t λ_t: what picks `best`."""
    total = sum(t.spec.weight for t in tasks)
    return sum(t.spec.weight * scores[t.name][t.metric] for t in tasks) / total


def _pad_id(tokenizer: Tokenizer) -> int:
    return tokenizer.pad_id if tokenizer.pad_id is not None else 0


# --- the loop ----------------------------------------------------------------------------------
@dataclass
class MultitaskResult:
    out_dir: Path
    steps: int  # optimizer steps done
    stop_reason: str  # steps | early_stopping | interrupted
    best_score: float  # the weighted dev score of best/
    best_step: int
    task_steps: dict[str, int]  # steps each task trained
    history: list[dict[str, Any]] = field(default_factory=list)  # this call's metrics records
    models: dict[str, Bert] = field(default_factory=dict)  # the trained models (last), by task
    seconds: float = 0.0
    precision: str = "fp32"


def finetune_multitask(
    config: MultitaskConfig | None,
    out_dir: str | Path,
    progress: bool = True,
    *,
    resume: bool = False,
) -> MultitaskResult:
    """Train every task of `config` over one encoder for `config.steps` steps; writes
    `out_dir/best/<task>/`, `out_dir/last/<task>/`, `metrics.jsonl` and `loss.png`.

    With `resume=True` (and config None) the run in `out_dir` continues from `last/` with its
    own config: weights, optimizer, sampler, batch orders and RNG, so that a stopped and resumed
    run takes the same steps as an uninterrupted one.
    """
    out_dir, state = Path(out_dir), None
    if resume:
        recover_dir(out_dir / "last")
        if (
            not (out_dir / "last" / STATE_FILE).is_file()
            or not (out_dir / "last" / RUN_FILE).is_file()
        ):
            raise LmforgeError(
                f"cannot resume: {str(out_dir / 'last')!r} holds no multi-task state "
                "(start without --resume)"
            )
        if config is not None:
            raise LmforgeError("a resumed run continues with its own config; pass config=None")
        saved = json.loads((out_dir / "last" / RUN_FILE).read_text())
        config = from_dict(MultitaskConfig, saved["config"])
        state = load_train_state(out_dir / "last")
    else:
        if config is None:
            raise LmforgeError("a multi-task run needs a MultitaskConfig (or resume=True)")
        for name in ("best", "last"):
            if (out_dir / name).exists():
                raise LmforgeError(
                    f"{str(out_dir)!r} already holds a fine-tuning run ({name}/ exists); pass "
                    "--resume to continue it, or choose another output folder"
                )
    check_files(config)
    device = resolve_device(config.device)
    ckpt = load_checkpoint(config.base)
    if not isinstance(ckpt.model, Bert):
        raise LmforgeError(
            f"base {config.base!r} is a {ckpt.meta.get('model_type', type(ckpt.model).__name__)!r} "
            f"checkpoint; multi-task fine-tuning needs a BERT encoder (an lmforge BERT checkpoint "
            f"or a Hugging Face BERT folder)"
        )
    from lmforge.compress.quantize import refuse_quantized  # it imports lmforge.train

    refuse_quantized(ckpt.model, "fine-tune")
    tokenizer, pad_id = ckpt.tokenizer, _pad_id(ckpt.tokenizer)
    read = []
    for spec in config.tasks:
        max_length = min(spec.max_length or config.max_length, ckpt.model.config.max_position)
        read.append((max_length, *read_task(spec, tokenizer, max_length)))

    torch.manual_seed(config.seed)  # the fresh heads' initialisation and dropout
    models = task_models(ckpt.model, config.tasks, [labels for _, _, _, labels, _ in read])
    del ckpt
    tasks = [
        Task(spec, model, train, dev, labels, max_length, masker,
             None if masker is None else torch.Generator().manual_seed(config.seed + 1000 + i))
        for i, (spec, model, (max_length, train, dev, labels, masker))
        in enumerate(zip(config.tasks, models, read, strict=True))
    ]  # fmt: skip
    if state is not None:  # the run's own weights: every checkpoint holds the shared encoder too
        for task in tasks:
            task.model.load_state_dict(
                load_checkpoint(out_dir / "last" / task.name).model.state_dict()
            )
    container = nn.ModuleDict({t.name: t.model for t in tasks}).to(device).train()
    probabilities = task_probabilities(
        [len(t.train) for t in tasks], [t.spec.weight for t in tasks], config.sampling,
        config.temperature,
    )  # fmt: skip
    sampler = TaskSampler(probabilities, config.sampling == "round-robin", config.seed)
    streams = [
        TaskBatches([len(f["input_ids"]) for f in t.train], config.batch_size, config.seed + 1 + i,
                    config.group_by_length)
        for i, t in enumerate(tasks)
    ]  # fmt: skip
    for task, p in zip(tasks, probabilities, strict=True):
        shown = f", labels {', '.join(task.labels[:8])}{', ...' if len(task.labels) > 8 else ''}"
        tqdm.write(
            f"task {task.name}: {task.spec.type}, {len(task.train):,} training examples"
            f"{shown if task.labels else ''}; weight {task.spec.weight:g}, p {p:.3f}"
        )
    optimizer = make_optimizer(container, config.lr, config.weight_decay, betas=(0.9, 0.999))

    first = tasks[sampler.active[0]]
    if state is not None:
        precision, timings = state["precision"], {}
    else:  # timed on a batch of the first trained task, masked by a throwaway generator
        probe = first.batch(list(range(min(config.batch_size, len(first.train)))), pad_id,
                            torch.Generator().manual_seed(0))  # fmt: skip
        precision, timings = resolve_precision(
            config.precision, container, lambda: probe, device,
            loss_fn=lambda _model, batch: first.loss(batch),
        )  # fmt: skip
    if timings:
        tqdm.write(f"precision auto: bf16 {timings['bf16_speedup']:.2f}x fp32 -> {precision}")
    ctx = autocast_context(device.type, precision)
    warmup_steps = int(config.warmup_ratio * config.steps)

    step, best_score, best_step, evals_since_best = 0, -math.inf, 0, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        sampler.load_state_dict(state["sampler"])
        for task, stream in zip(tasks, streams, strict=True):
            stream.load_state_dict(state["batches"][task.name])
            if task.mask_generator is not None:
                task.mask_generator.set_state(state["mask_generators"][task.name])
        step, best_score, best_step, evals_since_best = (
            state["step"], state["best_score"], state["best_step"], state["evals_since_best"]
        )  # fmt: skip
        _truncate_history(out_dir / METRICS_FILE, step)
    run_meta = {"config": asdict(config), "tasks": {t.name: _task_meta(t) for t in tasks}}

    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_file = (out_dir / METRICS_FILE).open("a")
    stop_reason, history, lr = "steps", [], 0.0
    loss_sums, loss_counts = [0.0] * len(tasks), [0] * len(tasks)  # since the last evaluation
    t_start = time.perf_counter()
    bar = tqdm(total=config.steps, initial=step, disable=not progress, dynamic_ncols=True,
               desc="multitask")  # fmt: skip
    try:
        with _GracefulStop() as stop:
            while step < config.steps:
                t = sampler.next()
                task = tasks[t]
                batch = move_batch(task.batch(streams[t].next(), pad_id), device, True)
                lr = lr_at(
                    step, schedule="linear", lr=config.lr, min_lr=0.0,
                    warmup_iters=warmup_steps, decay_iters=config.steps,
                )  # fmt: skip
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with ctx:
                    loss, task_value = weighted_loss(task, batch)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        _diverged_message(f"loss is {loss.item()}", step, task.name, out_dir)
                    )
                loss.backward()
                if config.grad_clip > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(
                        container.parameters(), config.grad_clip
                    )
                    if not torch.isfinite(grad_norm):
                        raise TrainingDiverged(
                            _diverged_message(
                                f"gradient norm is {grad_norm.item()}", step, task.name, out_dir
                            )
                        )
                optimizer.step()
                # set_to_none: heads of tasks not drawn keep grad None, so AdamW skips them
                # (no weight decay, no momentum step on a head that saw no data)
                optimizer.zero_grad(set_to_none=True)
                step += 1
                loss_sums[t] += task_value.item()
                loss_counts[t] += 1
                bar.update(1)
                bar.set_postfix(task=task.name, loss=f"{task_value.item():.4f}")
                interrupted = stop.requested
                scheduled = step % config.eval_every == 0 or step == config.steps
                if not (interrupted or scheduled):
                    continue

                scores = {
                    task.name: evaluate_task(task, tokenizer, config, device) for task in tasks
                }
                score = overall_score(tasks, scores)
                record = {
                    "step": step,
                    "lr": lr,
                    "tasks": {
                        task.name: {
                            "train_steps": sampler.counts[i],
                            "train_loss": loss_sums[i] / loss_counts[i] if loss_counts[i] else None,
                            "score": scores[task.name][task.metric],
                            **{f"dev_{k}": v for k, v in scores[task.name].items()},
                        }
                        for i, task in enumerate(tasks)
                    },
                    "score": score,
                    "seconds": round(time.perf_counter() - t_start, 2),
                }
                loss_sums, loss_counts = [0.0] * len(tasks), [0] * len(tasks)
                history.append(record)
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                improved = score > best_score
                meta = {**run_meta, "step": step, "score": score, "dev": scores}
                if improved:
                    best_score, best_step, evals_since_best = score, step, 0
                    _save(out_dir / "best", tasks, tokenizer, meta)
                elif scheduled:  # an evaluation forced by Ctrl-C does not count towards patience
                    evals_since_best += 1
                train_state = {
                    "step": step, "optimizer": optimizer.state_dict(), "rng": _rng_state(device),
                    "sampler": sampler.state_dict(),
                    "batches": {task.name: s.state_dict() for task, s in zip(tasks, streams, strict=True)},
                    "mask_generators": {
                        task.name: task.mask_generator.get_state()
                        for task in tasks if task.mask_generator is not None
                    },
                    "best_score": best_score, "best_step": best_step,
                    "evals_since_best": evals_since_best, "precision": precision,
                }  # fmt: skip
                _save(out_dir / "last", tasks, tokenizer, meta, train_state)
                shown = "; ".join(
                    f"{name} " + ", ".join(f"{k} {v:.4f}" for k, v in s.items())
                    for name, s in scores.items()
                )
                bar.write(
                    f"step {step}: dev {shown}; score {score:.4f}" + (" *best*" if improved else "")
                )
                if interrupted:
                    stop_reason = "interrupted"
                    break
                if config.patience and evals_since_best >= config.patience and step < config.steps:
                    stop_reason = "early_stopping"
                    break
    finally:
        bar.close()
        metrics_file.close()
    from lmforge.train.plots import plot_multitask

    plot_multitask(out_dir / METRICS_FILE, out_dir / PLOT_FILE)
    return MultitaskResult(
        out_dir=out_dir,
        steps=step,
        stop_reason=stop_reason,
        best_score=best_score,
        best_step=best_step,
        task_steps={task.name: sampler.counts[i] for i, task in enumerate(tasks)},
        history=history,
        models={task.name: task.model for task in tasks},
        seconds=time.perf_counter() - t_start,
        precision=precision,
    )


def _task_meta(task: Task) -> dict[str, Any]:
    return {"type": task.spec.type, "labels": task.labels, "metric": task.metric,
            "train_examples": len(task.train)}  # fmt: skip


def _save(
    directory: Path,
    tasks: list[Task],
    tokenizer: Tokenizer,
    meta: dict[str, Any],
    train_state: dict[str, Any] | None = None,
) -> None:
    """best/ or last/ in one atomic write: a checkpoint per task, the run file, the state."""
    with atomic_dir(directory) as tmp:
        for task in tasks:
            spec = task.spec
            save_checkpoint(
                tmp / task.name, task.model, tokenizer,
                extra={
                    "task": spec.type, "task_name": spec.name, "base": meta["config"]["base"],
                    "train_file": spec.train_file, "dev_file": spec.dev_file,
                    "multitask": meta["config"], "dev": meta["dev"][spec.name],
                    "step": meta["step"],
                },
            )  # fmt: skip
        (tmp / RUN_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if train_state is not None:
            torch.save(train_state, tmp / STATE_FILE)


def _truncate_history(path: Path, step: int) -> None:
    """Keep the metrics records up to the checkpoint being resumed."""
    if not path.exists():
        return
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    path.write_text("".join(json.dumps(r) + "\n" for r in records if r["step"] <= step))


def _diverged_message(what: str, step: int, task: str, out_dir: Path) -> str:
    return diverged_message(
        f"{what} (task {task!r})", f"multi-task fine-tuning stopped at step {step}",
        out_dir / "last", "it is from the last evaluation; try a lower lr",
    )  # fmt: skip
