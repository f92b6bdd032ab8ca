"""Data-parallel scaling: training tokens/s of `lmforge train` on 1 process against N processes.

Every setting trains the same model on the same global batch (batch_size x grad_accum x ranks),
from the same seed, for the same number of steps, through the real CLI (`lmforge train
--nproc N`, i.e. torchrun): 1 process with N-fold gradient accumulation against N ranks (DDP,
or FSDP2 with `--parallel fsdp`) with none. Throughput is the median `tok_per_s` the run
logged, warm-up intervals left out; the loss curves are compared too (they should agree to
float tolerance, which is what makes the comparison fair).

On a CPU machine the ranks share its cores: with 2 cores, 1 process uses 2 threads and each of
2 ranks uses 1, so the ideal is 1.0x, not 2x; what the ratio shows is the communication and
duplicated work that data parallelism costs. On a machine with N GPUs the ideal is N x.

    python bench/ddp_scaling.py                       # tiny Shakespeare, char-level, ~4 minutes
    python bench/ddp_scaling.py --nproc 2 --iters 60 --device cuda --preset gpt-small
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def lmforge(*args: str, threads: int | None = None) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    subprocess.run([sys.executable, "-m", "lmforge", *args], check=True, env=env)


def run(data: Path, out: Path, nproc: int, args: argparse.Namespace) -> dict:
    accum = args.global_accum // nproc
    sets = [
        f"train.batch_size={args.batch_size}", f"train.grad_accum_steps={accum}",
        f"train.max_iters={args.iters}", f"train.eval_interval={args.iters}", "train.eval_iters=2",
        "train.log_interval=5", "train.precision=fp32", f"train.device={args.device}",
        "train.warmup_iters=10", f"model.block_size={args.block_size}", "model.dropout=0.0",
    ]
    if nproc > 1 and args.parallel != "ddp":
        sets.append(f"train.parallel={args.parallel}")
    cmd = ["train", "--data", str(data), "--out", str(out), "--preset", args.preset, "--no-progress",
           "--set", *sets]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    # the cores are split between the ranks: each rank gets its share of the threads
    threads = max(1, (os.cpu_count() or 1) // nproc) if args.device == "cpu" else None
    t0 = time.perf_counter()
    lmforge(*cmd, threads=threads)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r.get("kind") == "train"]
    timed = train_records[args.skip_logs:] or train_records
    return {
        "nproc": nproc,
        "grad_accum": accum,
        "tok_per_s": statistics.median(r["tok_per_s"] for r in timed),
        "losses": [round(r["loss"], 5) for r in train_records],
        "wall_s": round(wall, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="ranks to compare with 1 process (default 2)")
    p.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp")
    p.add_argument("--preset", default="gpt-tiny")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16, help="micro-batch per rank")
    p.add_argument("--global-accum", type=int, default=2,
                   help="micro-batches per step over all ranks (divisible by --nproc)")
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--skip-logs", type=int, default=2, help="logged intervals treated as warm-up")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="bench-runs/ddp")
    args = p.parse_args()
    if args.global_accum % args.nproc:
        p.error(f"--global-accum {args.global_accum} is not divisible by --nproc {args.nproc}")
    out = Path(args.out)
    data = out / "data"
    if not (data / "manifest.json").exists():
        lmforge("prepare", "--data", str(DATA), "--tokenizer", "char", "--out", str(data), "--no-progress")
    results = []
    for nproc in (1, args.nproc):
        run_dir = out / f"run-{nproc}-{args.parallel}"
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        results.append(run(data, run_dir, nproc, args))
    one, many = results
    diff = max(abs(a - b) for a, b in zip(one["losses"], many["losses"]))
    print("\n| processes | grad accum | tokens/s | wall s |\n| ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['nproc']} | {r['grad_accum']} | {r['tok_per_s']:,.0f} | {r['wall_s']} |")
    print(f"\n{args.nproc} {args.parallel.upper()} ranks / 1 process: {many['tok_per_s'] / one['tok_per_s']:.2f}x "
          f"tokens/s on {os.cpu_count()} CPU cores ({args.device}); max loss difference over "
          f"{len(one['losses'])} logged intervals: {diff:.2e}")


if __name__ == "__main__":
    main()
