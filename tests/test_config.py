import json

import pytest

from kernelkit.config import Config, budget_seconds, make_config, parse_duration


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
    with pytest.raises(ValueError, match="unknown config keys"):
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
    assert Config.from_dict(json.loads((tmp_path / "c.json").read_text())) == cfg
