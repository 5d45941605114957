"""The command line: --help built from the Config schema (groups, metavars, defaults), typed flags
(`--amp` / `--no-amp`, `--img-size auto`), `--set key=value` values at build time (`parse_value`),
and the merge defaults < preset < CONFIG block < flags (`make_config`), checked by `checks`."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import fields
from typing import Any

from .checks import MODEL_FROM_WEIGHTS, checked_config, refuse_unknown_keys
from .config import AUTO_ZERO, DURATIONS, PRESETS, TYPE_WORDS, Config, ConfigError, field_types
from .weights import resolve_weights, weights_given


def _coerce(value: str, typ: str) -> Any:
    if typ == "bool":
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {value!r}")
    return {"int": int, "float": float, "str": str}[typ](value)


class _Typed:
    """argparse `type=`: a module-level callable (no lambda) whose name shows in error messages."""

    def __init__(self, typ: str, auto_zero: bool = False):
        self.typ, self.__name__ = typ, {"int": "integer", "float": "number", "bool": "boolean"}.get(typ, typ)
        self.auto_zero = auto_zero

    def __call__(self, value: str) -> Any:
        return 0 if self.auto_zero and value.strip().lower() == "auto" else _coerce(value, self.typ)


def parse_value(key: str, text: str, where: str = "option") -> Any:
    """One option's value from text (`--set key=value` at build time), typed as its Config field."""
    refuse_unknown_keys({key: text}, where)
    try:
        return _Typed(field_types()[key], key in AUTO_ZERO)(text)
    except ValueError:
        raise ConfigError(f"{key}={text!r}: expected {TYPE_WORDS[field_types()[key]]}") from None


class _BoolFlag(argparse.Action):
    """--amp / --no-amp, and --amp VALUE (true/false/yes/no/1/0), which scripts already use."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if option_string and option_string.startswith("--no-"):
            if values is not None:
                raise argparse.ArgumentError(self, f"takes no value (got {values!r})")
            values = False
        setattr(namespace, self.dest, True if values is None else values)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, _BoolFlag):
            return ", ".join(action.option_strings)
        return super()._format_action_invocation(action)


# --help groups: the first field of each commented group of Config; later fields follow it until the
# next group starts, so a field added inside a group lands in that group (tests check the comments).
GROUP_STARTS = {"mode": "what to run", "model": "model", "img_size": "images", "budget": "training",
                "tta": "inference", "demo_images": "demo"}


_DESCRIPTION = """\
Kaggle image-classification kernel (kernelkit): trains a timm model inside the time budget, then
writes submission.csv with test-time augmentation. Settings come from, lowest first: defaults <
--preset < the CONFIG block at the top of kernel.py < these flags.
presets: {presets}"""


_EPILOG = """\
examples:
  python kernel.py                       # the competition under /kaggle/input (else a generated demo)
  python kernel.py --preset imet2019 --pretrained-path /kaggle/input/w/model.safetensors --budget 8h
  python kernel.py --data-dir ~/data/scene15 --model resnet50 --img-size 288 --no-amp --budget 30m
  python kernel.py --mode infer --checkpoints '/kaggle/input/earlier-run/*.pt'
  python kernel.py --dry-run --preset imet2019 --budget 8h30m   # does the plan fit?

exit status: 0 submission written (also when training failed: see the log), 2 refused before
training (bad option or data), 4 --dry-run plan does not fit, other: no submission could be made"""


def _help_text(f: dataclasses.Field) -> str:
    text = f.metadata.get("help", "")
    if f.name == "preset":
        text = f"{text.split(' (')[0]}: {' | '.join(PRESETS)}"
    default = ("on" if f.default else "off") if isinstance(f.default, bool) else repr(f.default)
    # argparse %-formats help strings: a literal % (as in "2% + 2s") must be doubled.
    return f"{text} (default {default})".replace("%", "%%")


_METAVARS = {"int": "N", "float": "X", "str": "TEXT", "preset": "NAME", "model": "NAME", "model2": "NAME",
             **dict.fromkeys(("data_dir", "out_dir", "checkpoints", "pretrained_path", "pretrained_path2",
                              "cache_dir", "resume_from"), "PATH")}


def _add_option(group: argparse._ArgumentGroup, f: dataclasses.Field, typ: str) -> None:
    flag = f"--{f.name.replace('_', '-')}"
    if typ == "bool":
        group.add_argument(flag, f"--no-{flag[2:]}", dest=f.name, default=None, nargs="?", action=_BoolFlag,
                           type=_Typed("bool"), help=_help_text(f))
        return
    choices = f.metadata.get("choices")
    metavar = None if choices else _METAVARS.get(f.name) or ("TIME" if f.name in DURATIONS else _METAVARS[typ])
    group.add_argument(flag, dest=f.name, default=None, help=_help_text(f), type=_Typed(typ, f.name in AUTO_ZERO),
                       choices=choices, metavar=metavar)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=_DESCRIPTION.format(presets=" | ".join(PRESETS)), epilog=_EPILOG,
                                formatter_class=_HelpFormatter,
                                usage="%(prog)s [--preset NAME] [--option VALUE ...]  (--help lists them)")
    types = field_types()
    group = p.add_argument_group("options")
    for f in fields(Config):
        if f.name in GROUP_STARTS:
            group = p.add_argument_group(GROUP_STARTS[f.name])
        _add_option(group, f, types[f.name])
        if f.name == "checkpoints":
            group.add_argument("--dry-run", action="store_true",
                               help="short local run that measures speed and says whether the plan fits the "
                                    "budget (exit 4 when not)")
    return p


def make_config(block: dict[str, Any] | None = None, argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """Merge defaults, the named preset, the CONFIG block and command-line flags, in that order.

    Raises ConfigError (argparse errors exit with status 2 themselves) before anything is imported
    or read that takes time.
    """
    args = build_parser().parse_args(argv)
    cli = {k: v for k, v in vars(args).items() if v is not None and k in Config.__dataclass_fields__}
    block = dict(block or {})
    refuse_unknown_keys(block, "CONFIG block")
    preset = cli.get("preset", block.get("preset", ""))
    merged: dict[str, Any] = {}
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose from {' | '.join(sorted(PRESETS))}")
        merged.update(PRESETS[preset])
    merged.update(block)
    merged.update(cli)
    return checked_config(with_weights_defaults(merged, {**block, **cli})), args


# Fine-tuning from weights (pretrained_path set or found), for the options neither the user nor the
# preset set. A pretrained net converges in a few epochs, so autopick wants 4, not 10, and its sizes
# run from a quarter of the weights' input size (at least autopick.FINETUNE_FLOOR, or the device's floor
# for thumbnails; at most their own size) up to it (autopick.ladder); progressive resizing is
# off (issue #20: its half-size stages put a pretrained net at 32 px; --img-size 128 --resize-start 0
# by hand took F2 from 0.627 to 0.728); cosine as fine-tuning recipes use; single-label adds label
# smoothing 0.1 (components.label_smoothing). Compared on CPU with EfficientNet-Lite0 in
# bench/bench_finetune.py.
FINETUNE: dict[str, Any] = dict(auto_min_epochs=4, resize_start=0.0, schedule="cosine")


def with_weights_defaults(merged: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    """`merged` plus the fine-tuning recipe where weights are given. `user`: what the CONFIG block and
    the command line set (those always win). A weights folder the user gave while a preset names
    another model: the folder's architecture wins unless the user named a model too."""
    path = str(merged.get("pretrained_path", ""))
    if not weights_given(path):
        return merged
    out = dict(merged)
    if "pretrained_path" in user and "model" not in user and merged.get("model", "auto") not in MODEL_FROM_WEIGHTS:
        try:
            if resolve_weights(path).architecture:
                out["model"] = "auto"
        except ValueError:
            pass  # the checks name the problem
    for key, value in FINETUNE.items():
        out.setdefault(key, value)
    return out
