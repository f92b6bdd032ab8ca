"""`lmforge prune` as a user runs it: what it prints, what it writes, one-line errors."""

import json
import re

import pytest

from tests.cli.test_cli import TINY, assert_one_line_error, lmforge
from tests.conftest import SAMPLE_TEXT


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune_cli")
    (root / "corpus.txt").write_text(SAMPLE_TEXT * 3)
    lmforge("prepare", "--data", root / "corpus.txt", "--tokenizer", "char", "--out", root / "data", "--no-progress")
    lmforge("train", "--data", root / "data", "--out", root / "run", "--no-progress",
            "--set", *TINY, "model.n_head=4", "train.max_iters=30", "train.eval_interval=30")
    return root


def test_heads_with_recovery_prints_sizes_and_losses_and_the_result_generates(trained):
    out = lmforge("prune", trained / "run", "--method", "heads", "--amount", "0.5", "--out", trained / "heads",
                  "--recover-data", trained / "data", "--recover-iters", "4", "--no-progress",
                  "--set", "train.batch_size=4", "train.eval_iters=2", "train.precision=fp32", "train.device=cpu")
    text = out.stdout
    assert "attention heads 4 -> 2 per layer, head size 8" in text
    assert "importance: gradient scores" in text
    params = re.search(r"parameters: ([\d,]+) -> ([\d,]+)", text)
    assert int(params[2].replace(",", "")) < int(params[1].replace(",", ""))
    assert re.search(r"file size: [\d.]+ kB -> [\d.]+ kB", text)
    assert re.search(r"val loss: [\d.]+ before, [\d.]+ pruned, [\d.]+ after 4 recovery steps", text), text
    assert (trained / "heads" / "best").is_dir() and (trained / "heads" / "metrics.jsonl").is_file()
    meta = json.loads((trained / "heads" / "best" / "config.json").read_text())
    assert meta["model"]["n_head"] == 2 and meta["model"]["head_size"] == 8 and meta["prune"]["method"] == "heads"

    gen = lmforge("generate", trained / "heads", "--prompt", "The", "--max-new-tokens", "6", "--greedy", "--json")
    assert len(json.loads(gen.stdout)[0]["token_ids"]) == 6


def test_magnitude_without_data_writes_a_smaller_file(trained):
    out = lmforge("prune", trained / "run", "--method", "magnitude", "--amount", "0.6", "--out", trained / "mag",
                  "--device", "cpu")
    sizes = re.search(r"file size: ([\d.]+) kB -> ([\d.]+) kB", out.stdout)
    assert float(sizes[2]) < 0.7 * float(sizes[1]), out.stdout
    assert "nonzero" in out.stdout and "val loss" not in out.stdout
    meta = json.loads((trained / "mag" / "config.json").read_text())
    assert meta["sparsity"]["format"] == "bitmask" and meta["prune"]["scope"] == "layer"
    (trained / "eval.txt").write_text(SAMPLE_TEXT[:300])
    ev = json.loads(lmforge("eval", trained / "mag", "--text", trained / "eval.txt", "--json").stdout)
    assert ev["perplexity"] > 1  # the sparse file loads wherever a checkpoint does


def test_user_errors_are_one_line(trained):
    assert_one_line_error(
        lmforge("prune", trained / "run", "--method", "ffn", "--amount", "1.5", "--out", trained / "x", check=False),
        "amount must be in [0, 1)",
    )
    assert_one_line_error(
        lmforge("prune", trained / "run", "--method", "ffn", "--amount", "0.3", "--out", trained / "x",
                "--recover-iters", "5", check=False),
        "--recover-iters needs --recover-data",
    )
    assert_one_line_error(
        lmforge("prune", trained / "run", "--method", "ffn", "--amount", "0.3", "--out", trained / "run",
                check=False),
        "exists and is not empty",
    )
