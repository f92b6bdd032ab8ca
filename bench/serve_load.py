"""Serving under load: the OpenAI-compatible server with continuous batching against the same
server decoding one sequence at a time.

Two servers run side by side in this process, each in its own uvicorn thread on a free
127.0.0.1 port, over the same model: "batched" (`max_batch_size=--max-batch-size`, default 64)
and "unbatched" (`max_batch_size=1`: each request waits until the one before it has finished);
everything else is the same (the queue holds every client's request, no request timeout). For
each number of concurrent clients c, `--requests` streaming `POST /v1/completions` requests
(default max(8, 2c)) are sent by c clients, each starting its next request when its last one
ended. Request i has a prompt from a fixed list, `max_tokens` `--max-tokens`, temperature 0.8,
seed i, and asks for the usage in the last chunk; the engine makes its tokens independent of
what it is batched with, so both servers generate the same tokens for the same request.

Per request: TTFT (time to first token: from sending the request to the first chunk that
carries text), inter-token latencies (ITL: the gaps between successive chunks that carry text,
as vLLM's benchmark counts them; a token that ends inside a UTF-8 character sends no chunk, so
the next gap spans two tokens), and the tokens generated (`usage.completion_tokens`, an
end-of-text token included: a request can end before `max_tokens`, and the tokens actually
generated are what is counted). Per run: requests/s and output tokens/s (completed requests and
their tokens over the run's wall time), TTFT and ITL p50/p99 over all its requests. The ratio is
batched over unbatched output tokens/s; the target (issue 5) is >= 4x at 16 clients.

Without `--ckpt` the model is the `gpt-mini` preset (nanoGPT's 6-layer, 6-head, 384-wide
"baby GPT", context 256), randomly initialised (throughput does not depend on the weights; an
untrained model's end-of-text is about as likely as any of its 4096 tokens, so almost every
request runs to `max_tokens`), with a byte-level BPE tokenizer trained here on the Python
documentation's topics that ship with Python (`pydoc_data.topics`): nothing is downloaded.

The clients are asyncio tasks (httpx) in the main thread of the same process, so they share the
interpreter (and the CPU cores) with both servers; both settings pay that cost alike. With
`--rounds` > 1 each c runs batched and unbatched alternately, in alternating order, and the
median round's tok/s and req/s are reported (latency percentiles pool every round's requests).

    python bench/serve_load.py                       # ~3 minutes on 2 EPYC cores
    python bench/serve_load.py --clients 1 4 --requests 8 --max-tokens 16      # a quick check
    python bench/serve_load.py --ckpt runs/shakespeare --rounds 3 --json serve_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import httpx  # noqa: E402
import torch  # noqa: E402

from lmforge.checkpoint import Checkpoint, load_checkpoint  # noqa: E402
from lmforge.models.gpt import GPT, GPT_PRESETS, GPTConfig  # noqa: E402
from lmforge.serve.app import create_app, serve_in_thread  # noqa: E402
from lmforge.tokenizer import train_tokenizer  # noqa: E402

MODEL = "bench"
SETTINGS = ("batched", "unbatched")
# plain letters and punctuation: a character-level tokenizer (tiny Shakespeare's) knows them all
PROMPTS = [
    "The",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "In the beginning",
    "Once upon a time, there was",
    "ROMEO:\n",
    "The quick brown fox jumps over the lazy dog.",
    "To be, or not to be, that is the question:",
    "It was the best of times, it was the worst of times,",
]


# --- the model and the servers ------------------------------------------------------------------


def build_checkpoint(args) -> Checkpoint:
    if args.ckpt:
        return load_checkpoint(args.ckpt, device=args.device)
    from pydoc_data.topics import topics  # the Python docs' topics, shipped with Python

    tokenizer = train_tokenizer("bpe", list(topics.values()), args.vocab_size)
    torch.manual_seed(0)
    config = GPTConfig(**GPT_PRESETS["gpt-mini"], vocab_size=tokenizer.vocab_size, dropout=0.0)
    return Checkpoint(model=GPT(config).to(args.device).eval(), tokenizer=tokenizer)


# --- the clients ---------------------------------------------------------------------------------


async def one_request(client: httpx.AsyncClient, i: int, args) -> dict:
    """Stream request i; its timings (perf_counter seconds) and tokens, or its error."""
    body = dict(
        model=MODEL,
        prompt=PROMPTS[i % len(PROMPTS)],
        max_tokens=args.max_tokens,
        temperature=0.8,
        seed=i,
        stream=True,
        stream_options={"include_usage": True},
    )
    t0 = time.perf_counter()
    chunk_times: list[float] = []
    usage, error = None, None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"i": i, "error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                error = chunk["error"].get("message", str(chunk["error"]))
            if chunk.get("usage"):
                usage = chunk["usage"]
            if any(c.get("text") for c in chunk.get("choices", [])):
                chunk_times.append(time.perf_counter())
    end = time.perf_counter()
    if error or usage is None:
        return {"i": i, "error": error or "the stream ended without usage"}
    tokens = usage["completion_tokens"]
    return {
        "i": i,
        "tokens": tokens,
        "chunks": len(chunk_times),
        "latency_s": end - t0,
        "ttft_s": chunk_times[0] - t0 if chunk_times else None,
        "itl_s": [b - a for a, b in zip(chunk_times, chunk_times[1:])],
        # mean time per output token after the first (vLLM's TPOT)
        "tpot_s": (end - chunk_times[0]) / (tokens - 1) if chunk_times and tokens > 1 else None,
    }


async def load(url: str, clients: int, requests: int, args) -> dict:
    """`requests` requests by `clients` concurrent clients; the run's wall time and requests."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    timeout = httpx.Timeout(args.timeout)
    results: list[dict] = []
    todo = iter(range(requests))  # shared by the clients: one event loop, no lock needed

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

        async def one_client() -> None:
            for i in todo:
                try:
                    results.append(
                        await asyncio.wait_for(one_request(client, i, args), args.timeout)
                    )
                except (TimeoutError, httpx.HTTPError) as e:
                    results.append({"i": i, "error": f"{type(e).__name__}: {e}"})

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "requests": sorted(results, key=lambda r: r["i"])}


# --- statistics ----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between order statistics (numpy's default); None without values."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def run_stats(run: dict) -> dict:
    ok = [r for r in run["requests"] if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "wall_s": run["wall_s"],
        "completed": len(ok),
        "errors": len(run["requests"]) - len(ok),
        "output_tokens": tokens,
        "req_s": len(ok) / run["wall_s"],
        "tok_s": tokens / run["wall_s"],
    }


def summarize(runs: list[dict]) -> dict:
    """The median round's throughput; latency percentiles over every round's requests."""
    stats = [run_stats(r) for r in runs]
    ok = [r for run in runs for r in run["requests"] if "error" not in r]
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    itl = [g for r in ok for g in r["itl_s"]]
    tpot = [r["tpot_s"] for r in ok if r["tpot_s"] is not None]
    out = {
        "tok_s": statistics.median(s["tok_s"] for s in stats),
        "req_s": statistics.median(s["req_s"] for s in stats),
        "errors": sum(s["errors"] for s in stats),
        "mean_output_tokens": statistics.mean(r["tokens"] for r in ok) if ok else None,
        "rounds": stats,
    }
    for name, values in (("ttft", ttft), ("itl", itl), ("tpot", tpot)):
        for q in (50, 99):
            out[f"{name}_p{q}_s"] = percentile(values, q)
    return out


def ms(seconds: float | None) -> str:
    return (
        "-"
        if seconds is None
        else f"{seconds * 1e3:,.0f}"
        if seconds >= 0.1
        else f"{seconds * 1e3:.1f}"
    )


# --- the machine ---------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--ckpt",
        type=str,
        default=None,
        help="a GPT checkpoint folder (default: gpt-mini, random weights, built here)",
    )
    ap.add_argument("--device", type=str, default="cpu")
    ap.add_argument("--vocab-size", type=int, default=4096, help="the built model's BPE vocabulary")
    ap.add_argument(
        "--clients",
        type=int,
        nargs="+",
        default=[1, 4, 16, 64],
        help="numbers of concurrent clients",
    )
    ap.add_argument(
        "--requests", type=int, default=None, help="requests per run (default: max(8, 2 * clients))"
    )
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request")
    ap.add_argument("--max-batch-size", type=int, default=64, help="the batched server's batch")
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="alternating rounds per number of clients; the median is reported",
    )
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per request at most")
    ap.add_argument("--json", type=str, default=None, help="write every number to this file")
    args = ap.parse_args()
    if min(args.clients) < 1 or args.rounds < 1 or args.max_tokens < 1:
        ap.error("--clients, --rounds and --max-tokens must be >= 1")
    if args.requests is not None and args.requests < 1:
        ap.error("--requests must be >= 1")

    t_start = time.perf_counter()
    ckpt = build_checkpoint(args)
    model, tokenizer = ckpt.model, ckpt.tokenizer
    context = model.config.block_size
    longest = max(len(tokenizer.encode(p)) for p in PROMPTS)
    if longest + args.max_tokens > context:
        sys.exit(
            f"the longest prompt ({longest} tokens) + --max-tokens ({args.max_tokens}) exceeds "
            f"the model's context ({context}); lower --max-tokens"
        )
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())
    machine = {
        "cpu": cpu_name(),
        "cpus_available": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": args.device,
        "python": platform.python_version(),
    }
    model_info = {
        "source": args.ckpt or "gpt-mini preset, random init",
        "params": n_params,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_embd": c.n_embd,
        "block_size": context,
        "vocab_size": c.vocab_size,
    }
    print(
        f"machine: {machine['cpu']}, {machine['cpus_available']} CPUs available, torch "
        f"{machine['torch']} with {machine['torch_threads']} threads, device {args.device}"
    )
    print(
        f"model: {model_info['source']}: {n_params / 1e6:.2f}M parameters, {c.n_layer}L/{c.n_head}H/"
        f"{c.n_embd}, context {context}, vocabulary {c.vocab_size}; prompts of up to {longest} tokens, "
        f"max_tokens {args.max_tokens}",
        flush=True,
    )

    max_queue = max(args.clients) + 8  # every client's request waits rather than being refused
    batch_sizes = {"batched": args.max_batch_size, "unbatched": 1}
    results: dict = {}
    with ExitStack() as stack:
        urls = {
            s: stack.enter_context(
                serve_in_thread(create_app(ckpt, model_name=MODEL, max_batch_size=b, max_queue=max_queue))
            )
            for s, b in batch_sizes.items()
        }
        # warm-up, not timed: the first requests pay for lazy initialisation
        for url in urls.values():
            warm = argparse.Namespace(**{**vars(args), "max_tokens": min(8, args.max_tokens)})
            asyncio.run(load(url, 2, 4, warm))

        for clients in args.clients:
            n = args.requests or max(8, 2 * clients)
            runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
            for r in range(args.rounds):
                for s in SETTINGS if r % 2 == 0 else SETTINGS[::-1]:
                    run = asyncio.run(load(urls[s], clients, n, args))
                    runs[s].append(run)
                    st = run_stats(run)
                    print(
                        f"{clients} clients, {s}, round {r + 1}: {n} requests in {st['wall_s']:.1f} s, "
                        f"{st['tok_s']:,.0f} tok/s, {st['req_s']:.2f} req/s"
                        + (f", {st['errors']} errors" if st["errors"] else ""),
                        flush=True,
                    )
            summary = {s: summarize(runs[s]) for s in SETTINGS}
            results[clients] = {
                "requests": n,
                **summary,
                "ratio": summary["batched"]["tok_s"] / summary["unbatched"]["tok_s"]
                if summary["unbatched"]["tok_s"]
                else float("nan"),
                "raw": runs,
            }

    b, u = "batched", "unbatched"
    print(
        f"\nbatched: max_batch_size {args.max_batch_size}; unbatched: max_batch_size 1; "
        f"latencies in ms (b / u)\n"
    )
    print(
        "| clients | batched tok/s | unbatched tok/s | ratio | req/s | TTFT p50 | TTFT p99 "
        "| ITL p50 | ITL p99 |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for clients, r in results.items():

        def both(key: str, r=r) -> str:
            return f"{ms(r[b][key])} / {ms(r[u][key])}"

        errors = r[b]["errors"] + r[u]["errors"]
        print(
            f"| {clients} | {r[b]['tok_s']:,.0f} | {r[u]['tok_s']:,.0f} | {r['ratio']:.2f}x | "
            f"{r[b]['req_s']:.2f} / {r[u]['req_s']:.2f} | {both('ttft_p50_s')} | {both('ttft_p99_s')} | "
            f"{both('itl_p50_s')} | {both('itl_p99_s')} |" + (f" {errors} errors" if errors else "")
        )
    tokens = {
        c: (r[b]["mean_output_tokens"], r[u]["mean_output_tokens"]) for c, r in results.items()
    }
    print(
        "\nmean output tokens per request (b / u): "
        + ", ".join(
            f"{c} clients {t[0]:.1f} / {t[1]:.1f}" if None not in t else f"{c} clients -"
            for c, t in tokens.items()
        )
    )
    if 16 in results:
        ratio = results[16]["ratio"]
        print(
            f"target >= 4x output tok/s at 16 clients: {ratio:.2f}x, {'met' if ratio >= 4 else 'NOT met'}"
        )
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": machine,
                    "model": model_info,
                    "args": vars(args),
                    "results": {str(c): r for c, r in results.items()},
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
