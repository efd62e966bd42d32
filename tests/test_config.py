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


def test_a_section_the_file_lacks_or_fields_beside_sections_are_refused(tmp_path):
    from csmn.config import ConfigError

    sections = tmp_path / "pipeline.yaml"
    sections.write_text("train:\n  epochs: 5\nextract:\n  layer: res5c\n")
    with pytest.raises(ConfigError, match="no section 'extarct'"):
        load_config(ExampleConfig, sections, section="extarct")
    beside = tmp_path / "beside.yaml"
    beside.write_text("epochs: 7\ntrain:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="epochs beside the section 'train'"):
        load_config(ExampleConfig, beside, section="train")
    # An empty section is a section, not a field beside them.
    empty = tmp_path / "empty.yaml"
    empty.write_text("train:\n  epochs: 4\nsynth:\n")
    assert load_config(ExampleConfig, empty, section="train").epochs == 4
    # auto_section: the job's own section where the file has one, else the whole file.
    assert load_config(ExampleConfig, sections, auto_section="train").epochs == 5
    flat = tmp_path / "flat.yaml"
    flat.write_text("epochs: 7\n")
    assert load_config(ExampleConfig, flat, auto_section="train").epochs == 7


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--config", "/no/such/config.yaml"], "no config file /no/such/config.yaml"),
    (["generate", "--config", "{bad}"], "no config file"),
    (["evaluate", "--config", "BAD_YAML"], "is not YAML"),
    (["train", "--epochs", "0"], "epochs must be >= 1"),
    (["train", "--lr-decay-factor", "0"], "lr_decay_factor must be > 0"),
    (["train", "--model", "{vocab_size: 100}"], "may not set vocab_size"),
    (["train", "--model", "{a: [}"], "expected the node content"),
    (["evaluate", "--beam-width", "0"], "beam_width must be >= 1"),
    (["generate", "--precision", "fp8"], "precision must be auto, fp32, bf16 or fp16"),
    (["generate", "--io-threads", "0"], "io_threads must be at least 1"),
    (["extract-features", "--precision", "fp8", "--overwrite"], "precision must be"),
    (["ablation", "--batch-size", "0"], "batch_size must be >= 1"),
    (["demo", "--tasks", "foo"], "task must be one of"),
    (["synth", "--config", "/no/such/config.yaml"], "no config file"),
    (["preprocess", "--archive", "a", "--out", "b", "--max-test-share", "5"],
     "max_test_share must be between 0 and 1"),
])
def test_a_configuration_that_cannot_run_is_one_line_and_exit_code_2(
        argv, message, tmp_path, capsys):
    """Before Ray starts or anything is read, deleted or logged: a scheduler can tell a
    refusal (2) from a crash (1), and a person reads one line, not a traceback."""
    from csmn import cli

    argv = [a.replace("BAD_YAML", str(tmp_path / "bad.yaml")) for a in argv]
    (tmp_path / "bad.yaml").write_text("epochs: [1,\n")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err


def test_train_config_takes_max_length_from_model_only_where_the_flags_agree():
    from csmn.pipeline.train import TrainConfig

    config = TrainConfig(model="{max_length: 12, context_size: 20, embed_dim: 16}")
    assert (config.max_length, config.context_size, config.model) == (12, 20, {"embed_dim": 16})
    with pytest.raises(ValueError, match="--max-length 10: give one"):
        TrainConfig(max_length=10, model={"max_length": 12})
    with pytest.raises(ValueError, match="each with its own vocabulary"):
        TrainConfig(train_split="train_by_posts")  # val_split left at val
    assert TrainConfig(train_split="train_by_posts", val_split="val_by_posts").val_split == \
        "val_by_posts"
    for bad in (dict(learning_rate=float("nan")), dict(adam_beta2=1.0), dict(val_split="tset"),
                dict(cpus_per_worker=0), dict(shuffle_buffer=0), dict(adam_epsilon=0),
                dict(model={"image_layer": "res5c"})):
        with pytest.raises(ValueError):
            TrainConfig(**bad)


def test_an_empty_model_in_the_nightly_config_turns_it_off(tmp_path):
    from csmn.pipeline.generate import GenerateConfig

    path = tmp_path / "nightly.yaml"
    path.write_text("post_model:\nhashtag_model: models:/csmn-hashtag@champion\n")
    config = load_config(GenerateConfig, path)
    assert list(config.model_uris()) == ["hashtag"]
    assert list(GenerateConfig(post_model="none").model_uris()) == ["hashtag"]
    assert list(GenerateConfig().model_uris()) == ["hashtag", "post"]
