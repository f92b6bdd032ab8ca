"""The CLI as a user runs it: a subprocess per command, error messages as one line."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import SAMPLE_TEXT


def lmforge(*args, check=True, timeout=300):
    result = subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if check and result.returncode != 0:
        raise AssertionError(f"lmforge {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    # progress bars may come before it; the error itself is one line, the last
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("lmforge: error:"), result.stderr
    assert sum("error" in line for line in lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "corpus.txt").write_text(SAMPLE_TEXT * 3)
    lmforge("prepare", "--data", root / "corpus.txt", "--tokenizer", "char", "--out", root / "data", "--no-progress")
    return root


TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "train.batch_size=4",
        "train.eval_iters=2", "train.precision=fp32", "train.warmup_iters=2", "train.log_interval=1"]


@pytest.fixture(scope="module")
def trained(workdir):
    """A run trained through the CLI, and what `lmforge train` printed."""
    run = workdir / "run"
    out = lmforge("train", "--data", workdir / "data", "--out", run, "--no-progress",
                  "--set", *TINY, "train.max_iters=30", "train.eval_interval=10")
    return run, out.stdout


def test_prepare_train_generate_eval_convert(workdir, trained):
    run, stdout = trained
    assert "parameters" in stdout and "MFLOPs per token" in stdout
    assert "stopped (max_iters) at iter 30" in stdout
    assert (run / "best" / "model.safetensors").exists() and (run / "loss.png").exists()

    gen = lmforge("generate", run, "--prompt", "The quick", "--prompt", "Pack", "--max-new-tokens", "12",
                  "--seed", "1", "--temperature", "0.9", "--top-k", "10", "--json")
    results = json.loads(gen.stdout)
    assert [r["prompt"] for r in results] == ["The quick", "Pack"]
    assert all(len(r["token_ids"]) == 12 and r["finish_reason"] == "length" for r in results)
    again = json.loads(lmforge("generate", run, "--prompt", "The quick", "--prompt", "Pack",
                               "--max-new-tokens", "12", "--seed", "1", "--temperature", "0.9", "--top-k", "10",
                               "--json").stdout)
    assert again == results  # seeded sampling is reproducible
    streamed = lmforge("generate", run, "--prompt", "The", "--max-new-tokens", "8", "--greedy")
    assert streamed.stdout.startswith("The") and len(streamed.stdout.rstrip("\n")) == 3 + 8

    (workdir / "eval.txt").write_text(SAMPLE_TEXT[:500])
    ev = json.loads(lmforge("eval", run, "--text", workdir / "eval.txt", "--context", "16", "--json").stdout)
    assert ev["tokens"] == 500 and ev["context"] == 16 and ev["perplexity"] > 1

    conv = lmforge("convert", run, workdir / "hf")
    assert (workdir / "hf" / "model.safetensors").exists(), conv.stdout
    back = json.loads(lmforge("eval", workdir / "hf", "--text", workdir / "eval.txt", "--context", "16",
                              "--json").stdout)
    assert back["loss"] == pytest.approx(ev["loss"], abs=1e-5)


def test_ctrl_c_saves_and_resume_continues(workdir):
    run = workdir / "interrupted"
    cmd = [sys.executable, "-m", "lmforge", "train", "--data", str(workdir / "data"), "--out", str(run),
           "--no-progress", "--set", *TINY, "train.max_iters=100000", "train.eval_interval=1000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.2)
    while time.time() < deadline and len((run / "metrics.jsonl").read_text().splitlines()) < 5:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "stopped (interrupted)" in output
    state_iter = json.loads((run / "last" / "config.json").read_text())["iter"]
    assert state_iter > 0
    out = lmforge("train", "--out", run, "--resume", "--no-progress", "--set", f"train.max_iters={state_iter + 5}")
    assert f"stopped (max_iters) at iter {state_iter + 5}" in out.stdout


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--set", "model.n_layers=2"], ["unknown config key 'model.n_layers'", "valid keys are"]),
        (["--set", "train.lr=-1"], ["train.lr must be > 0"]),
        (["--set", "model.activation=tanh"], ["activation='tanh' is not valid", "'swiglu'"]),
        (["--set", "model.block_size=100000"], ["fewer than", "block_size"]),
        (["--preset", "gpt-huge"], ["unknown preset 'gpt-huge'", "gpt-tiny"]),
    ],
)
def test_train_errors_are_one_line(workdir, tmp_path, args, fragments):
    result = lmforge("train", "--data", workdir / "data", "--out", tmp_path / "run", "--no-progress", *args,
                     check=False)
    assert_one_line_error(result, *fragments)


def test_data_errors_are_one_line(workdir, tmp_path):
    assert_one_line_error(lmforge("train", "--data", tmp_path / "nope", "--out", tmp_path / "r", check=False),
                          "nope")
    (tmp_path / "empty.txt").write_text("")
    assert_one_line_error(lmforge("prepare", "--data", tmp_path / "empty.txt", "--out", tmp_path / "d",
                                  check=False), "empty.txt")
    assert_one_line_error(lmforge("prepare", "--data", tmp_path / "missing.txt", "--out", tmp_path / "d",
                                  check=False), "missing.txt")
    assert_one_line_error(lmforge("prepare", "--data", "builtin:pydocs", "--tokenizer", "sentencepiece",
                                  "--out", tmp_path / "d", check=False), "sentencepiece", "bpe")


def test_checkpoint_errors_are_one_line(trained, tmp_path):
    run, _ = trained
    import shutil

    shutil.copytree(run / "best", tmp_path / "future")
    meta = json.loads((tmp_path / "future" / "config.json").read_text())
    (tmp_path / "future" / "config.json").write_text(json.dumps({**meta, "format_version": 7}))
    assert_one_line_error(lmforge("generate", tmp_path / "future", "--prompt", "a", check=False),
                          "format version 7", "upgrade lmforge")
    assert_one_line_error(lmforge("generate", run, "--prompt", "a", "--top-p", "1.5", check=False), "top_p")
    assert_one_line_error(lmforge("generate", run, "--prompt", "a", "--max-new-tokens", "500", check=False),
                          "context")
    assert_one_line_error(lmforge("generate", tmp_path / "missing", "--prompt", "a", check=False), "does not exist")
    assert_one_line_error(lmforge("eval", run, "--text", tmp_path / "missing.txt", check=False), "does not exist")


def test_config_file_and_overrides(workdir, tmp_path):
    (tmp_path / "run.toml").write_text(
        'preset = "gpt-tiny-modern"\n[model]\nn_layer = 1\nblock_size = 32\n'
        "[train]\nmax_iters = 4\neval_interval = 2\nbatch_size = 2\neval_iters = 1\nprecision = \"fp32\"\n"
    )
    out = lmforge("train", "--data", workdir / "data", "--out", tmp_path / "run", "--config", tmp_path / "run.toml",
                  "--set", "max_iters=6", "--no-progress")  # a bare key: only [train] has max_iters
    assert "stopped (max_iters) at iter 6" in out.stdout
    meta = json.loads((tmp_path / "run" / "last" / "config.json").read_text())
    assert meta["model"]["n_layer"] == 1 and meta["model"]["position"] == "rotary"  # file over preset
    assert meta["train"]["max_iters"] == 6  # --set over file
    (tmp_path / "bad.toml").write_text("[optimizer]\nlr = 1\n")
    assert_one_line_error(lmforge("train", "--data", workdir / "data", "--out", tmp_path / "r2", "--config",
                                  tmp_path / "bad.toml", check=False), "unknown section [optimizer]")
