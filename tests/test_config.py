from dataclasses import dataclass
from typing import Literal

import pytest

from lmforge.config import from_dict, load_config_file, parse_overrides
from lmforge.errors import LmforgeError
from lmforge.models import GPTConfig
from lmforge.train import TrainConfig


@dataclass
class Example:
    n: int = 1
    lr: float = 0.1
    flag: bool = False
    name: str = "x"
    mode: Literal["a", "b"] = "a"
    limit: int | None = None
    tags: list[str] | None = None


def test_from_dict_coerces_strings():
    e = from_dict(Example, dict(n="4", lr="3e-4", flag="true", mode="b", limit="none", tags="x,y"))
    assert (e.n, e.lr, e.flag, e.mode, e.limit, e.tags) == (4, 3e-4, True, "b", None, ["x", "y"])


@pytest.mark.parametrize(
    "data, message",
    [
        (dict(m=1), "unknown config key 'm'; valid keys are: flag, limit, lr, mode, n"),
        (dict(n="four"), "n must be an integer, got 'four'"),
        (dict(lr="fast"), "lr must be a number"),
        (dict(flag="maybe"), "flag must be true or false"),
        (dict(mode="c"), "mode='c' is not valid; choose one of 'a', 'b'"),
    ],
)
def test_from_dict_errors(data, message):
    with pytest.raises(LmforgeError, match=message.split(";")[0].replace("(", r"\(")):
        from_dict(Example, data)


def test_overrides_qualified_bare_and_ambiguous():
    sections = {"model": GPTConfig, "train": TrainConfig}
    out = parse_overrides(["model.n_layer=6", "lr=3e-4"], sections)
    assert out == {"model": {"n_layer": "6"}, "train": {"lr": "3e-4"}}
    with pytest.raises(LmforgeError, match="ambiguous"):
        parse_overrides(["dropout=0.1", "seed=1"], {"model": GPTConfig, "train": GPTConfig})
    with pytest.raises(LmforgeError, match="unknown config key 'nlayers'"):
        parse_overrides(["nlayers=2"], sections)
    with pytest.raises(LmforgeError, match="key=value"):
        parse_overrides(["n_layer"], sections)
    with pytest.raises(LmforgeError, match="unknown section 'optim'"):
        parse_overrides(["optim.lr=1"], sections)


def test_load_toml_yaml_json(tmp_path):
    (tmp_path / "a.toml").write_text('[model]\nn_layer = 3\n[train]\nlr = 0.01\n')
    (tmp_path / "a.yaml").write_text("model:\n  n_layer: 3\ntrain:\n  lr: 0.01\n")
    (tmp_path / "a.json").write_text('{"model": {"n_layer": 3}, "train": {"lr": 0.01}}')
    for name in ("a.toml", "a.yaml", "a.json"):
        assert load_config_file(tmp_path / name) == {"model": {"n_layer": 3}, "train": {"lr": 0.01}}
    (tmp_path / "bad.toml").write_text("[model\n")
    with pytest.raises(LmforgeError, match="could not be parsed"):
        load_config_file(tmp_path / "bad.toml")
    with pytest.raises(LmforgeError, match="does not exist"):
        load_config_file(tmp_path / "missing.toml")


def test_train_config_validation():
    assert TrainConfig(lr=1e-3).min_lr == pytest.approx(1e-4)
    assert TrainConfig(max_iters=50).lr_decay_iters == 50
    with pytest.raises(LmforgeError, match="train.batch_size must be >= 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(LmforgeError, match="train.precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(LmforgeError, match="train.device"):
        TrainConfig(device="tpu")
