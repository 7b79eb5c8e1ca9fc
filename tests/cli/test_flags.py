"""Every flag of every subcommand: help text, defaults equal to its config field, numbers checked
where the flags are parsed, and no default that makes a short run fail."""

from __future__ import annotations

import argparse
import dataclasses
import importlib

import pytest

from megatron_minitron.cli import build_parser, main
from megatron_minitron.flags import Bounded, config_fields


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _options():
    for command, sub in _subparsers().items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                yield command, action


def test_every_option_has_help():
    missing = [f"{command} {action.option_strings[0]}" for command, action in _options() if not (action.help or "").strip()]
    assert not missing, f"flags without help: {missing}"


def test_every_numeric_option_is_bounded():
    raw = [f"{command} {action.option_strings[0]}" for command, action in _options() if action.type in (int, float)]
    assert not raw, f"numeric flags parsed without a bound: {raw}"


def test_field_flags_take_default_and_help_from_their_field():
    checked = 0
    for command, action in _options():
        if not hasattr(action, "field"):
            continue
        module, cls, name = action.field
        real = {f.name: f for f in dataclasses.fields(getattr(importlib.import_module(module), cls))}[name]
        assert action.default == real.default, f"{command} {action.option_strings[0]}: {action.default!r} != {real.default!r}"
        doc = config_fields(module, cls)[name].doc
        assert action.help.replace("%%", "%").startswith(doc), f"{command} {action.option_strings[0]}"
        checked += 1
    # the training flags of pretrain/distill/search, the losses of distill/search, demo, importance, evaluate
    assert checked > 80


@pytest.mark.parametrize("module,cls", [("megatron_minitron.training.loop", "TrainConfig"),
                                        ("megatron_minitron.distill.loop", "DistillConfig"),
                                        ("megatron_minitron.demo.config", "DemoConfig"),
                                        ("megatron_minitron.importance.run", "ImportanceConfig"),
                                        ("megatron_minitron.importance.calibration", "CalibrationData")])
def test_fields_read_from_source_equal_the_dataclass(module, cls):
    real = {f.name: f.default for f in dataclasses.fields(getattr(importlib.import_module(module), cls))
            if f.default is not dataclasses.MISSING}
    read = {name: info.default for name, info in config_fields(module, cls).items()}
    assert read == {name: real[name] for name in read}
    assert len(read) >= len(real) - 1  # every documented field with a literal default (started_at has none)


@pytest.mark.parametrize("argv,flag", [
    (["pretrain", "--save", "{tmp}/run", "--exit-interval=-1"], "--exit-interval"),
    (["pretrain", "--save", "{tmp}/run", "--lr", "0"], "--lr"),
    (["pretrain", "--save", "{tmp}/run", "--micro-batch-size", "0"], "--micro-batch-size"),
    (["distill", "--teacher", "t", "--student", "s", "--save", "{tmp}/run", "--kd-temperature", "-1"],
     "--kd-temperature"),
    (["prune", "--load", "x", "--save", "{tmp}/run", "--chunk-mb=-1"], "--chunk-mb"),
    (["prune", "--load", "x", "--save", "{tmp}/run", "--workers", "0"], "--workers"),
    (["importance", "--load", "x", "--out", "{tmp}/run", "--num-samples", "-5"], "--num-samples"),
    (["search", "--load", "x", "--scores", "s", "--out", "{tmp}/run", "--budget", "-5M"], "--budget"),
    (["demo", "--out", "{tmp}/run", "--teacher-iters", "nan"], "--teacher-iters"),
    (["evaluate", "--load", "x", "--eval-iters", "0"], "--eval-iters"),
])
def test_nonsense_numbers_are_refused_naming_the_flag(tmp_path, capsys, argv, flag):
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(tmp=tmp_path) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}" in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_bounded_type_message():
    with pytest.raises(argparse.ArgumentTypeError, match="must be >= 1, got -1"):
        Bounded(int, 1)("-1")
    with pytest.raises(argparse.ArgumentTypeError, match="finite"):
        Bounded(float, 0)("inf")
    assert Bounded(float, 0, strict=True)("0.5") == 0.5


def test_short_run_takes_a_shorter_default_warmup(tmp_path, capsys):
    from megatron_minitron.cli._common import train_config
    from megatron_minitron.config import ConfigError

    parser = _subparsers()["pretrain"]
    cfg = train_config(parser.parse_args(["--save", str(tmp_path / "r"), "--train-iters", "20"]))
    assert cfg.lr_warmup_iters == 2 and cfg.train_iters == 20
    assert "--lr-warmup-iters 20 is not below --train-iters 20" in capsys.readouterr().err
    # a warm-up the user asked for is taken as given, and refused when it cannot work
    cfg = train_config(parser.parse_args(["--save", str(tmp_path / "r"), "--train-iters", "40",
                                          "--lr-warmup-iters", "20"]))
    assert cfg.lr_warmup_iters == 20
    with pytest.raises(ConfigError, match="lr_warmup_iters=20"):
        train_config(parser.parse_args(["--save", str(tmp_path / "r"), "--train-iters", "20",
                                        "--lr-warmup-iters", "20"]))


def test_demo_short_run_takes_shorter_default_warmups(tmp_path):
    from megatron_minitron.cli.demo import config_from_args

    cfg = config_from_args(_subparsers()["demo"].parse_args(["--out", str(tmp_path / "d"), "--teacher-iters", "5",
                                                             "--retrain-iters", "2", "--tp", "1"]))
    assert (cfg.warmup_iters, cfg.retrain_warmup_iters, cfg.tensor_parallel) == (0, 0, 1)
