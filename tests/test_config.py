"""Config dataclasses: paper defaults <- YAML <- command line, with clear errors."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from csmn.config import add_config_arguments, config_from_args, load_config


@dataclass
class ExampleConfig:
    learning_rate: float = 0.001
    epochs: int = 20
    widths: tuple[int, ...] = (3, 4, 5)
    use_cnn: bool = True
    name: str | None = None


def test_defaults_yaml_then_cli(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 5\n  widths: [3, 4]\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ExampleConfig)
    args = parser.parse_args(["--learning-rate", "0.01", "--use-cnn", "false"])
    config = config_from_args(ExampleConfig, args, str(path), section="train")
    assert config == ExampleConfig(0.01, 5, (3, 4), False, None)
    # a boolean flag alone means true (here over a YAML false)
    off = tmp_path / "off.yaml"
    off.write_text("use_cnn: false\n")
    assert load_config(ExampleConfig, str(off)).use_cnn is False
    switched = config_from_args(ExampleConfig, parser.parse_args(["--use-cnn"]), str(off))
    assert switched.use_cnn is True


def test_list_flags_and_unknown_keys(tmp_path):
    assert load_config(ExampleConfig, overrides={"widths": "3,5"}).widths == (3, 5)
    with pytest.raises(ValueError, match="unknown ExampleConfig field"):
        load_config(ExampleConfig, overrides={"epoch": 3})
    with pytest.raises(ValueError, match="epochs"):
        load_config(ExampleConfig, overrides={"epochs": "many"})


def test_help_shows_each_default():
    from csmn.config import config_parser

    text = config_parser(ExampleConfig, "prog", "an example").format_help()
    for shown in ("(default: 0.001)", "(default: 20)", "(default: 3,4,5)", "(default: True)"):
        assert shown in text


@dataclass
class NamesConfig:
    out: str = ""
    variants: str = "P5,NoUC-P5"
    seeds: int = 1
    note: str | None = "kept"


def test_empty_yaml_values_keep_defaults_and_names_take_lists(tmp_path):
    path = tmp_path / "c.yaml"
    # "out:" and "~" are YAML nulls: the default stays (str(None) made a folder "None")
    path.write_text("out:\nvariants: [P5, NoCNN-P5]\nseeds: 3.0\nnote: ~\n")
    config = load_config(NamesConfig, str(path))
    assert config == NamesConfig(out="", variants="P5,NoCNN-P5", seeds=3, note=None)
    assert load_config(NamesConfig, overrides={"variants": "[P5, W20-P5]"}).variants == \
        "P5,W20-P5"
    with pytest.raises(ValueError, match="expected int, got 2.7"):
        load_config(NamesConfig, overrides={"seeds": 2.7})


def test_model_overrides_are_typed_as_the_model_config():
    from csmn.pipeline.train import TrainConfig

    config = TrainConfig(data="d", model='{use_user_context: "false", embed_dim: "16"}')
    assert config.model == {"use_user_context": False, "embed_dim": 16}
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        TrainConfig(data="d", model={"embed_size": 16})
