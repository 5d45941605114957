import json

import pytest

from kernelkit.core.checks import checked_config
from kernelkit.core.config import CHOICES, PRESETS, Config, ConfigError, parse_duration
from kernelkit.core.options import make_config
from kernelkit.engine.budget import budget_seconds


@pytest.mark.parametrize("text,seconds", [("9h", 32400), ("8h30m", 30600), ("90s", 90), ("1.5h", 5400),
                                          ("600", 600), ("2m 30s", 150)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "abc", "5x", "h", "1h-2m"])
def test_parse_duration_rejects_garbage(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_precedence_defaults_preset_block_cli():
    cfg, _ = make_config({"preset": "demo", "img_size": 80, "lr": 0.5}, ["--lr", "0.01", "--amp", "false"])
    assert cfg.model == "resnet18"  # from the preset
    assert cfg.img_size == 80  # block beats preset
    assert cfg.lr == 0.01  # command line beats block
    assert cfg.amp is False
    assert cfg.batch_size == Config().batch_size  # untouched default


def test_unknown_keys_and_presets_are_errors():
    with pytest.raises(ConfigError, match="unknown CONFIG block key 'modle' .did you mean 'mode' or 'model'"):
        make_config({"modle": "resnet18"}, [])
    with pytest.raises(ValueError, match="unknown preset"):
        make_config({}, ["--preset", "nope"])
    with pytest.raises(ValueError, match="duration"):
        make_config({"budget": "nine hours"}, [])
    with pytest.raises(ValueError, match="larger than margin"):
        make_config({"budget": "5m", "margin": "10m"}, [])


def test_auto_margin_is_two_percent_plus_two_seconds_at_most_ten_minutes():
    assert budget_seconds(make_config({"budget": "100s"}, [])[0]) == (100, 4)
    assert budget_seconds(make_config({"budget": "9h"}, [])[0]) == (32400, 600)


def test_config_round_trips_through_json(tmp_path):
    cfg, _ = make_config({"model": "test_vit", "epochs": 3}, [])
    cfg.save(tmp_path / "c.json")
    assert checked_config(json.loads((tmp_path / "c.json").read_text())) == cfg


def test_every_choice_lives_in_one_place_and_matches_the_code():
    from kernelkit.core import accel
    from kernelkit.data import transforms
    from kernelkit.decide import thresholds
    from kernelkit.inputs import competition
    from kernelkit.model import factory as models
    from kernelkit.model import losses
    assert set(CHOICES["loss"]) == {"auto", *losses.LOSSES}
    assert CHOICES["aug"] == ("auto", *transforms.AUG_LEVELS) and CHOICES["gpu_aug"] == ("auto", *transforms.BATCH_AUG_LEVELS)
    assert CHOICES["amp_dtype"] == accel.AMP_DTYPES
    assert CHOICES["head"] == models.HEADS and CHOICES["threshold_rule"] == thresholds.KINDS
    assert CHOICES["format"] == ("auto", *competition.FORMATS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_configs(name):
    cfg, _ = make_config({"preset": name}, [])
    assert cfg.preset == name


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_a_choice_typo_is_refused_by_the_command_line_with_the_allowed_values(key, capsys):
    with pytest.raises(SystemExit) as exit_info:
        make_config({}, [f"--{key.replace('_', '-')}", "zzz-typo"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--{key.replace('_', '-')}" in err and "invalid choice" in err
    assert all(repr(v) in err for v in CHOICES[key] if v), err


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_a_choice_typo_in_the_config_block_is_refused_with_the_allowed_values(key):
    with pytest.raises(ConfigError, match=f"{key}='zzz-typo' is not one of") as e:
        make_config({key: "zzz-typo"}, [])
    assert all(repr(v) in str(e.value) for v in CHOICES[key])


@pytest.mark.parametrize("block,match", [
    ({"tta": 0}, "tta=0"), ({"img_size": 4}, "img_size=4: must be 0 \\(auto\\) or between 8"), ({"img_size": -5}, "img_size=-5"),
    ({"batch_size": 0}, "batch_size=0"), ({"epochs": -1}, "epochs=-1"), ({"fold": 5}, "fold=5"),
    ({"val_fraction": 1.5}, "val_fraction=1.5"), ({"val_fraction": -0.1}, "val_fraction=-0.1"),
    ({"threshold": 1.5}, "threshold=1.5"), ({"warmup": 2.0}, "warmup=2.0"), ({"lr": 0.0}, "lr=0.0"),
    ({"min_labels": 3, "max_labels": 1}, "min_labels=3 > max_labels=1"), ({"pad_fill": 300}, "pad_fill=300"),
    ({"budget": "5s"}, "leaves under 20 s"), ({"budget": "abc"}, "cannot parse duration"),
    ({"grace": "0s"}, "grace"), ({"mode": "infer"}, "needs checkpoints"),
    ({"batch_size": "16"}, "batch_size='16': expected an integer, got str"),
    ({"img_size": 3.5}, "img_size=3.5: expected an integer"), ({"amp": "yes"}, "amp='yes': expected True or False"),
    ({"lr": True}, "lr=True: expected a number"), ({"data_dir": "/no/such/dir"}, "data_dir='/no/such/dir' does not exist"),
    ({"resume_from": "/no/such.pt"}, "resume_from='/no/such.pt' does not exist"),
    ({"mixup": 0.2, "loss": "complement"}, "soft targets"),
    ({"swa": 1.0}, "swa=1.0: 0 .off. or the share"), ({"swa": -0.1}, "swa=-0.1"),
    ({"sessions": 0}, "sessions=0: must be between 1 and 100"), ({"sessions": 1.5}, "sessions=1.5: expected an integer"),
    ({"sessions": 3, "epochs": 2}, "epochs=2 cannot be split over sessions=3"),
    ({"mode": "blend"}, "mode='blend' needs checkpoints"), ({"mode": "blnd"}, "did you mean 'blend'"),
])
def test_values_out_of_range_or_of_the_wrong_type_are_refused_naming_the_option(block, match):
    with pytest.raises(ConfigError, match=match):
        make_config(block, [])


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as e:
        make_config({"tta": 0, "batch_size": 0}, ["--fold", "9"])
    assert all(k in str(e.value) for k in ("tta=0", "batch_size=0", "fold=9"))


def test_numbers_are_accepted_where_they_are_meant():
    cfg, _ = make_config({"budget": 3600, "lr": 1, "ema": 0}, [])
    assert cfg.budget == "3600s" and budget_seconds(cfg)[0] == 3600 and cfg.lr == 1.0


def test_a_checkpoint_config_from_another_version_still_loads():
    stored = {**Config().to_dict(), "removed_option": 1}
    del stored["grace"]
    cfg = Config.from_stored(stored)
    assert cfg.grace == Config().grace and not hasattr(cfg, "removed_option")


def test_help_has_no_python_reprs(capsys):
    from kernelkit.core.options import build_parser
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "2% + 2s" in out and "{'" not in out, "no raw % formatting, no dict reprs"
    assert "--threshold-rule {global,group,class}" in out and "exit status: 0 submission written" in out


# --help: grouped like the Config dataclass, every option explained, examples that parse.

def _help(capsys) -> str:
    from kernelkit.core.options import build_parser
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def test_help_groups_follow_the_comments_of_the_config_dataclass():
    """GROUP_STARTS must name the field under each `# group` comment of Config, in order."""
    import re
    from pathlib import Path

    import kernelkit.core.config as config
    from kernelkit.core.options import GROUP_STARTS
    source = Path(config.__file__).read_text()
    body = source[source.index("class Config:"):source.index("    def to_dict(")]
    found = re.findall(r"\n    # ([a-z ]+)\n    (\w+):", body)
    assert [(g, f) for f, g in GROUP_STARTS.items()] == found


def test_help_lists_every_option_with_a_help_line_under_its_group(capsys):
    from kernelkit.core.options import GROUP_STARTS, build_parser
    parser = build_parser()
    by_dest = {a.dest: a for a in parser._actions}
    for name in Config.__dataclass_fields__:
        text = by_dest[name].help.split(" (default")[0]
        assert len(text) > 5, f"--{name} has no help line"
    titles = [g.title for g in parser._action_groups]
    assert [t for t in titles if t in GROUP_STARTS.values()] == list(GROUP_STARTS.values())
    out = _help(capsys)
    for title in GROUP_STARTS.values():
        assert f"\n{title}:\n" in out
    # options sit under their own group: budget in training, tta in inference
    assert out.index("\ntraining:\n") < out.index("--budget TIME") < out.index("\ninference:\n") < out.index("--tta N")


def test_help_shows_presets_choices_booleans_and_examples(capsys):
    out = _help(capsys)
    assert "presets: " + " | ".join(PRESETS) in out
    assert "--aug {auto,none,flip,light,medium,strong}" in out
    assert "--amp, --no-amp" in out and "(default on)" in out and "(default True)" not in out
    assert "examples:\n  python kernel.py" in out


def test_the_help_examples_parse(capsys):
    import shlex

    from kernelkit.core.options import build_parser
    lines = [line.split("#")[0] for line in _help(capsys).splitlines() if line.strip().startswith("python kernel.py")]
    assert len(lines) >= 3
    for line in lines:
        build_parser().parse_args(shlex.split(line)[2:])  # argparse exits on anything it does not know


@pytest.mark.parametrize("argv, amp", [(["--amp"], True), (["--no-amp"], False), (["--amp", "false"], False),
                                       (["--amp", "yes"], True), ([], True)])
def test_boolean_options_take_a_flag_a_no_flag_or_a_value(argv, amp):
    cfg, _ = make_config({"amp": True}, argv)
    assert cfg.amp is amp


@pytest.mark.parametrize("argv", [["--amp", "maybe"], ["--no-amp", "false"]])
def test_boolean_options_refuse_anything_else(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        make_config({}, argv)
    assert exited.value.code == 2 and "--amp" in capsys.readouterr().err
