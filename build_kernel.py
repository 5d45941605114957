#!/usr/bin/env python
"""Bundle src/kernelkit into one self-contained kernel.py for Kaggle.

    python build_kernel.py            # write kernel.py, keeping the CONFIG region it already has
    python build_kernel.py --set img_size=288 --set budget=2h [--preset NAME] [--reset-config]
                                      # ... with these settings in the CONFIG region (checked first)
    python build_kernel.py --check    # exit 1 when kernel.py outside its CONFIG region is not what
                                      # the sources build
    python build_kernel.py --push-dir out/ --competition SLUG --dataset OWNER/SLUG --id OWNER/SLUG
                                      # write out/kernel.py + out/kernel-metadata.json for
                                      # `kaggle kernels push -p out/`

The CONFIG region (between the CONFIG START and CONFIG END marker lines of kernel.py) belongs to the
user: a rebuild copies it from the existing kernel.py as it is, and --check does not compare it.

Each module's source is embedded verbatim as a string and served by an import hook, so the package
keeps its module structure: relative imports, `from __future__` lines and pickling by qualified
name (DataLoader workers under spawn/forkserver re-run kernel.py's top level, which re-installs
the hook, then import e.g. `kernelkit.data.loaders.ImageDataset` normally). The output is deterministic.
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import fields
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PACKAGE = "kernelkit"
SRC = ROOT / "src" / PACKAGE
OUT = ROOT / "kernel.py"
MAX_BYTES = 1_000_000  # Kaggle rejects kernel sources over 1 MB

# Upload bundle. `kaggle kernels push -p DIR` reads DIR/kernel-metadata.json by that exact name.
KERNEL_FILE = "kernel.py"
METADATA_FILE = "kernel-metadata.json"
SLUG = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")  # the form of Kaggle's URL slugs
OWNER = re.compile(r"[a-z0-9]+(?:[-_][a-z0-9]+)*")  # user or organisation; the kaggle client allows "_"
MIN_CHARS = 5  # the kaggle client refuses kernel slugs and titles shorter than this

HEADER = '''\
#!/usr/bin/env python
"""Kaggle image-classification kernel: trains a timm model inside the time budget, then writes
submission.csv with test-time augmentation.

Built by build_kernel.py from src/{package} -- edit the CONFIG block, not the code below it.
Run:  python kernel.py [--flag value ...]   (python kernel.py --help lists every option)
With no competition under /kaggle/input and no data_dir, it runs a small generated demo.
"""

import time as _time

_STARTED_AT = _time.time()  # the budget clock starts here, before the slow imports

# ----------------------------------------------------------------------------- CONFIG
# Your settings: uncomment and edit. Precedence: defaults < preset < CONFIG < command-line flags.
# build_kernel.py keeps everything between the two marker lines when it rebuilds kernel.py (and
# --check ignores it); it fills them for you with:
#   python build_kernel.py --set key=value [--set key=value ...] [--preset NAME] [--reset-config]
{start}
{region}{end}
'''

BOOTSTRAP = '''
import importlib.abc as _abc
import importlib.util as _util
import linecache as _linecache
import os as _os
import sys as _sys

_os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything can import timm


class _BundledPackage(_abc.MetaPathFinder, _abc.Loader):
    """Serves the embedded modules, ahead of anything installed under the same name."""

    def find_spec(self, name, path=None, target=None):
        if name not in _SOURCES:
            return None
        return _util.spec_from_loader(name, self, origin=self._filename(name), is_package=name in _PACKAGES)

    @staticmethod
    def _filename(name):
        rel = name.replace(".", "/") + ("/__init__.py" if name in _PACKAGES else ".py")
        return _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "kernel.py:" + rel)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        filename = self._filename(module.__name__)
        source = _SOURCES[module.__name__]
        # Registered so tracebacks show the bundled source lines.
        _linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        module.__file__ = filename
        exec(compile(source, filename, "exec"), module.__dict__)


if not any(isinstance(f, _BundledPackage) or type(f).__name__ == "_BundledPackage" for f in _sys.meta_path):
    _sys.meta_path.insert(0, _BundledPackage())



def _print_with_source(exc_type, exc, tb):
    """The interpreter's own hook reads source lines from disk, and the bundled modules have no
    files: the traceback module reads them from linecache, where the loader put them."""
    import traceback as _traceback
    _traceback.print_exception(exc_type, exc, tb)


_sys.excepthook = _print_with_source

if __name__ == "__main__":
    from {package}.app.cli import main
    _sys.exit(main(CONFIG, started_at=_STARTED_AT))
'''


# The user's CONFIG region lies between these two lines. Found by their words, so re-indenting,
# trailing spaces or a different number of arrows do not lose it.
REGION_START = "# " + ">" * 66 + " CONFIG START (yours)"
REGION_END = "# " + "<" * 66 + " CONFIG END (yours)"
_START_LINE = re.compile(r"\s*#[\s>]*CONFIG START\b.*")
_END_LINE = re.compile(r"\s*#[\s<]*CONFIG END\b.*")
_LEGACY_START, _LEGACY_END = "# Uncomment and edit. Precedence:", "# " + "-" * 84


class RegionError(ValueError):
    """The CONFIG region cannot be found or read; the message says where and what to do."""


class NotLiteral(RegionError):
    """A CONFIG value is an expression: the kernel may run it, but the build cannot check or rewrite it."""


def _config_module() -> types.SimpleNamespace:
    """kernelkit's config schema, checks and option parsing from the src tree (they import nothing
    heavy), so the build checks settings with the very code the kernel runs."""
    sys.path.insert(0, str(ROOT / "src"))
    try:
        from kernelkit.core import checks, config, options
    finally:
        sys.path.pop(0)
    return types.SimpleNamespace(Config=config.Config, PRESETS=config.PRESETS, ConfigError=config.ConfigError,
                                 checked_config=checks.checked_config, parse_value=options.parse_value)


def config_lines(values: dict[str, object] | None = None) -> str:
    """The body of CONFIG = dict(...): the given settings, then every other option commented out with
    the value it takes without a line here (the preset's, else the default) and its help."""
    config = _config_module()
    values = dict(values or {})
    base = {f.name: f.default for f in fields(config.Config)} | config.PRESETS.get(str(values.get("preset", "")), {})
    ordered = sorted(values.items(), key=lambda kv: kv[0] != "preset")  # the preset first: the rest override it
    lines = [f"    {key}={value!r}," for key, value in ordered]
    for f in fields(config.Config):
        if f.name in values:
            continue
        entry = f"    # {f.name}={base[f.name]!r},"
        help_text = f.metadata.get("help", "")
        lines.append(f"{entry:<44}# {help_text}".rstrip() if help_text else entry)
    return "\n".join(lines)


def region_text(values: dict[str, object] | None = None) -> str:
    return "CONFIG = dict(\n" + config_lines(values) + "\n)\n"


def find_region(text: str, where: str = "kernel.py") -> tuple[int, int]:
    """-> (start, end) character offsets of the CONFIG region's content in a built kernel."""
    head_end = text.find("\n_SOURCES = {")  # markers are looked for above the bundled sources only
    lines = text[: head_end if head_end >= 0 else len(text)].splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    starts = [i for i, line in enumerate(lines) if _START_LINE.fullmatch(line.rstrip("\n"))]
    ends = [i for i, line in enumerate(lines) if _END_LINE.fullmatch(line.rstrip("\n"))]
    if not starts and not ends:  # a kernel.py from before the markers: its block between the rules
        starts = [i for i, line in enumerate(lines) if line.startswith(_LEGACY_START)][:1]
        ends = [i for i, line in enumerate(lines) if line.rstrip() == _LEGACY_END and starts and i > starts[0]][:1]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise RegionError(
            f"{where}: cannot tell where the CONFIG region is: expected one '# >>> CONFIG START' line and, "
            f"below it, one '# <<< CONFIG END' line above the bundled sources; found {len(starts)} start and "
            f"{len(ends)} end line(s). Put the marker lines back (copy them from a fresh build), or rebuild "
            "with --reset-config to start from the defaults (that drops your settings)")
    return offsets[starts[0] + 1], offsets[ends[0]]


def extract_region(text: str, where: str = "kernel.py") -> tuple[str, int]:
    """-> (the CONFIG region's content, the kernel file's line number of its first line)."""
    start, end = find_region(text, where)
    return text[start:end], text[:start].count("\n") + 1


def _config_node(region: str, first_line: int, where: str) -> ast.expr:
    try:
        tree = ast.parse(region)
    except SyntaxError as e:
        line = first_line + (e.lineno or 1) - 1
        raise RegionError(f"{where}, line {line} (CONFIG region): {e.msg}; fix it or rebuild with "
                          "--reset-config") from None
    assigned = [node.value for node in tree.body if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "CONFIG" for t in node.targets)]
    if not assigned:
        raise RegionError(f"{where}: the CONFIG region must assign CONFIG = dict(...) (kernel.py passes CONFIG "
                          "to the run); fix it or rebuild with --reset-config")
    return assigned[-1]


def read_region_values(region: str, first_line: int = 1, where: str = "kernel.py") -> dict[str, object]:
    """The settings in a CONFIG region, which must be CONFIG = dict(key=literal, ...) or a {...} literal."""
    node = _config_node(region, first_line, where)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args \
            and all(k.arg for k in node.keywords):
        items = [(k.arg, k.value) for k in node.keywords]
    elif isinstance(node, ast.Dict) and all(isinstance(k, ast.Constant) and isinstance(k.value, str)
                                            for k in node.keys):
        items = [(k.value, v) for k, v in zip(node.keys, node.values)]  # type: ignore[union-attr]
    else:
        raise NotLiteral(f"{where}, line {first_line + node.lineno - 1}: CONFIG is not a dict(...) of settings")
    values = {}
    for key, value in items:
        try:
            values[key] = ast.literal_eval(value)
        except ValueError:
            raise NotLiteral(f"{where}, line {first_line + value.lineno - 1}: CONFIG {key}= is an expression, "
                             "not a plain value") from None
    return values


_LISTED = re.compile(r"    # (\w+)=(.*?),(?:\s+#.*)?")
_SETTING = re.compile(r"    (\w+)=.*,")


def generated_values(region: str) -> dict[str, object] | None:
    """The settings of a region that is exactly what region_text() writes (settings, then the listing of
    the other options at their current defaults), else None. Such a region can be written afresh,
    so a new option or help text reaches it; anything else there is the user's and is kept as it is."""
    lines = region.rstrip("\n").split("\n")
    if len(lines) < 2 or lines[0] != "CONFIG = dict(" or lines[-1] != ")":
        return None
    try:
        values = read_region_values(region)
    except RegionError:
        return None
    config = _config_module()
    base = {f.name: f.default for f in fields(config.Config)} | config.PRESETS.get(str(values.get("preset", "")), {})
    for line in lines[1:-1]:
        listed, setting = _LISTED.fullmatch(line), _SETTING.fullmatch(line)
        if listed and listed[1] in base and listed[1] not in values and listed[2] == repr(base[listed[1]]):
            continue
        if not listed and setting and setting[1] in values:
            continue
        return None
    return values


def check_values(values: dict[str, object]) -> None:
    """The kernel's own start-up checks (types, choices, ranges, durations), less the files, which
    exist only where the kernel runs; raises kernelkit's ConfigError naming each problem."""
    config = _config_module()
    preset = values.get("preset", "")
    merged = {**config.PRESETS.get(preset if isinstance(preset, str) else "", {}), **values}
    config.checked_config(merged, where="CONFIG", check_paths=False)


def parse_settings(pairs: Sequence[str]) -> dict[str, object]:
    """--set key=value, each value typed as its Config field: 'img_size=288' -> {'img_size': 288}."""
    config = _config_module()
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise config.ConfigError(f"--set {pair!r}: expected key=value, like --set img_size=288")
        out[key.strip()] = config.parse_value(key.strip(), value, where="--set")
    return out


def build(region: str | None = None) -> str:
    """The kernel source; `region` is the CONFIG region's content (default: every option commented)."""
    modules = sorted(p for p in SRC.rglob("*.py") if p.name != "__main__.py")
    chunks = []
    for path in modules:
        source = path.read_text(encoding="utf-8").replace("\r\n", "\n")
        if "\'\'\'" in source:
            raise SystemExit(f"{path}: contains \'\'\' which the bundle uses as delimiter; use \"\"\" instead")
        if not source.endswith("\n"):
            source += "\n"
        chunks.append(f"{module_name(path)!r}: r\'\'\'{source}\'\'\',")
    # A package is a folder with an __init__.py: the import hook must mark it so, or its submodules
    # cannot be found (`kernelkit.core.config` needs `kernelkit.core.__path__`).
    packages = tuple(sorted(module_name(p) for p in modules if p.name == "__init__.py"))
    region = region_text() if region is None else region
    if region and not region.endswith("\n"):
        region += "\n"
    text = (HEADER.format(package=PACKAGE, start=REGION_START, region=region, end=REGION_END)
            + "\n# Bundled sources of src/" + PACKAGE + ", one module each (generated; do not edit).\n"
            + "_SOURCES = {\n" + "\n".join(chunks) + "\n}\n"
            + f"_PACKAGES = {packages!r}  # the names whose source is an __init__.py\n"
            + BOOTSTRAP.format(package=PACKAGE))
    size = len(text.encode("utf-8"))
    if size > MAX_BYTES:
        raise SystemExit(f"kernel.py would be {size} bytes; Kaggle's limit is {MAX_BYTES}")
    compile(text, str(OUT), "exec")
    return text


def without_region(text: str, where: str = "kernel.py") -> str:
    """The kernel with its CONFIG region emptied: what --check compares."""
    start, end = find_region(text, where)
    return text[:start] + text[end:]


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _check_slug(value: str, flag: str) -> None:
    if not SLUG.fullmatch(value):
        raise ValueError(f"{flag} {value!r}: a slug is lowercase letters, digits and single dashes, "
                         "like 'imet-2019-fgvc6'")


def _check_ref(value: str, flag: str) -> str:
    """Checks an owner/slug reference and returns the slug."""
    owner, _, slug = value.partition("/")
    if not OWNER.fullmatch(owner) or not SLUG.fullmatch(slug):
        raise ValueError(f"{flag} {value!r}: expected owner/slug in lowercase letters, digits and dashes, "
                         "like 'alice/timm-convnext-tiny'")
    return slug


def _check_kernel_id(kernel_id: str) -> str:
    slug = _check_ref(kernel_id, "--id")
    if len(slug) < MIN_CHARS:
        raise ValueError(f"--id {kernel_id!r}: the kernel slug needs at least {MIN_CHARS} characters")
    return slug


def title_slug(title: str) -> str:
    """About the slug Kaggle derives from a title (python-slugify without its transliteration)."""
    return "-".join(re.findall(r"[a-z0-9]+", title.lower()))


# Machine for `kaggle kernels push`: `machine_shape` picks the accelerator (kagglesdk's SaveKernel
# request lists NvidiaTeslaT4, NvidiaTeslaP100, Tpu1VmV38; Kaggle's NvidiaTeslaT4 is the two-GPU
# "GPU T4 x2"). `enable_gpu` alone gets whatever Kaggle's default GPU is, so both are written.
ACCELERATORS: dict[str, str | None] = {"t4x2": "NvidiaTeslaT4", "p100": "NvidiaTeslaP100", "none": None}
DEFAULT_ACCELERATOR = "t4x2"  # the DDP path uses both GPUs; recent PyTorch builds may not run on a P100
# Kaggle Models instance version: owner/model/framework/variation/version; the kaggle client
# requires all five parts and an integer version. Frameworks are camelCase (pyTorch, tensorFlow2,
# transformers); variations may hold "_" and "." (gemma2_2b_en, fb-in22k).
MODEL_SOURCE = re.compile(r"(?P<owner>[a-z0-9]+(?:[-_][a-z0-9]+)*)/(?P<model>[a-z0-9]+(?:[-_.][a-z0-9]+)*)/"
                          r"(?P<framework>[A-Za-z][A-Za-z0-9]*)/(?P<variation>[A-Za-z0-9]+(?:[-_.][A-Za-z0-9]+)*)/"
                          r"(?P<version>[1-9][0-9]*)")


def _check_model_source(handle: str) -> None:
    if not MODEL_SOURCE.fullmatch(handle):
        raise ValueError(f"--model-source {handle!r}: expected owner/model/framework/variation/version as on the "
                         "model's Kaggle page, like 'timm/convnext-tiny/pytorch/fb-in22k/1' (the version is a "
                         "number; the kaggle client refuses a handle without it)")


def _check_kernel_source(ref: str) -> None:
    slug = _check_ref(ref, "--kernel-source")
    if len(slug) < MIN_CHARS:
        raise ValueError(f"--kernel-source {ref!r}: a kernel slug has at least {MIN_CHARS} characters")


def _check_sources(flag: str, refs: Sequence[str], check: Callable[[str], object]) -> None:
    for ref in refs:
        check(ref)
    if len(set(refs)) != len(refs):
        raise ValueError(f"{flag}: the same source is given twice in {list(refs)}")


def kernel_metadata(kernel_id: str, competition: str, datasets: Sequence[str] = (), title: str | None = None,
                    accelerator: str = DEFAULT_ACCELERATOR, models: Sequence[str] = (),
                    kernels: Sequence[str] = ()) -> dict[str, object]:
    """The kernel-metadata.json for `kaggle kernels push`; ValueError names the bad input."""
    slug = _check_kernel_id(kernel_id)
    _check_slug(competition, "--competition")
    _check_sources("--dataset", datasets, partial(_check_ref, flag="--dataset"))
    _check_sources("--model-source", models, _check_model_source)
    _check_sources("--kernel-source", kernels, _check_kernel_source)
    if accelerator not in ACCELERATORS:
        raise ValueError(f"--accelerator {accelerator!r}: one of {' | '.join(ACCELERATORS)}")
    # Kaggle names a new kernel after its title, so the default title is the one that maps to the id.
    title = slug.replace("-", " ").capitalize() if title is None else title.strip()
    if len(title) < MIN_CHARS:
        raise ValueError(f"--title {title!r}: needs at least {MIN_CHARS} characters")
    machine = {"machine_shape": ACCELERATORS[accelerator]} if ACCELERATORS[accelerator] else {}
    return {
        "id": kernel_id,
        "title": title,
        "code_file": KERNEL_FILE,
        "language": "python",
        "kernel_type": "script",
        "is_private": True,
        "enable_gpu": ACCELERATORS[accelerator] is not None,
        **machine,
        # kernel.py reads weights from attached sources only; Kaggle's default would be internet on.
        "enable_internet": False,
        "competition_sources": [competition],
        "dataset_sources": list(datasets),
        "model_sources": list(models),
        "kernel_sources": list(kernels),
    }


def check_push_dir(folder: Path) -> None:
    """Checks what `kaggle kernels push -p folder` reads locally: the metadata and its code file."""
    meta_path = folder / METADATA_FILE
    if not meta_path.is_file():
        raise ValueError(f"{meta_path} is missing")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: expected a JSON object")
    _check_kernel_id(str(meta.get("id", "")))
    code_file = str(meta.get("code_file") or "")
    if not code_file or not (folder / code_file).is_file():
        raise ValueError(f"{meta_path}: code_file {code_file!r} is not a file in {folder}")


def write_push_dir(folder: Path, text: str, metadata: dict[str, object]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / KERNEL_FILE).write_text(text, encoding="utf-8")
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    check_push_dir(folder)


PUSH_ONLY = ("competition", "kernel_id", "title", "gpu", "accelerator", "dataset", "model_source", "kernel_source")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if kernel.py (outside its CONFIG region) is stale")
    ap.add_argument("--out", type=Path, default=None, help=f"where to write the kernel (default {OUT.name})")
    cfg = ap.add_argument_group("CONFIG region", "your settings in kernel.py; a plain build keeps what is there")
    cfg.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                     help="put this setting in the CONFIG region (repeatable), typed and checked like "
                          "`python kernel.py --help` describes, e.g. --set img_size=288 --set amp=false")
    cfg.add_argument("--preset", metavar="NAME", help="--set preset=NAME")
    cfg.add_argument("--reset-config", action="store_true",
                     help="start the region from the defaults instead of what kernel.py holds")
    push = ap.add_argument_group("upload bundle", "write a folder for `kaggle kernels push -p DIR`")
    push.add_argument("--push-dir", type=Path, metavar="DIR",
                      help=f"write DIR/{KERNEL_FILE} (with kernel.py's CONFIG region and any --set) and "
                           f"DIR/{METADATA_FILE}; kernel.py itself is left alone")
    push.add_argument("--competition", metavar="SLUG", help="competition to attach, e.g. imet-2019-fgvc6")
    push.add_argument("--dataset", action="append", default=[], metavar="OWNER/SLUG",
                      help="dataset to attach (repeatable), e.g. the one holding pretrained weights")
    push.add_argument("--model-source", action="append", default=[], metavar="OWNER/MODEL/FRAMEWORK/VARIATION/VERSION",
                      help="Kaggle Models weights to attach (repeatable), e.g. timm/convnext-tiny/pytorch/fb-in22k/1")
    push.add_argument("--kernel-source", action="append", default=[], metavar="OWNER/SLUG",
                      help="an earlier kernel's output to attach (repeatable): checkpoints for resume_from or "
                           "--mode infer")
    push.add_argument("--id", dest="kernel_id", metavar="OWNER/SLUG", help="the kernel, e.g. alice/imet-convnext")
    push.add_argument("--title", help="kernel title (default: from the id's slug)")
    push.add_argument("--accelerator", choices=list(ACCELERATORS), default=None,
                      help=f"t4x2: Kaggle's 'GPU T4 x2' (two GPUs, trained with DDP), p100: 'GPU P100', none: "
                           f"CPU only (default {DEFAULT_ACCELERATOR})")
    push.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                      help=f"--no-gpu = --accelerator none; --gpu = the default ({DEFAULT_ACCELERATOR})")
    args = ap.parse_args(argv)
    _check_combinations(ap, args)
    if args.gpu is False:
        args.accelerator = "none"
    args.accelerator = args.accelerator or DEFAULT_ACCELERATOR
    return args


def _check_combinations(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    push_flags = [getattr(args, name) for name in PUSH_ONLY]
    if args.push_dir is None and any(flag not in (None, []) for flag in push_flags):
        ap.error("--competition, --dataset, --model-source, --kernel-source, --id, --title, --accelerator and "
                 "--gpu only go with --push-dir")
    if args.push_dir is not None and (args.check or args.out is not None):
        ap.error("--push-dir writes its own kernel.py; it does not combine with --check or --out")
    if args.push_dir is not None and (args.competition is None or args.kernel_id is None):
        ap.error("--push-dir needs --competition and --id")
    if args.check and (args.settings or args.preset is not None or args.reset_config):
        ap.error("--check compares the code and ignores the CONFIG region: no --set, --preset or --reset-config")
    if args.gpu is False and args.accelerator not in (None, "none"):
        ap.error(f"--no-gpu contradicts --accelerator {args.accelerator}")


def _error(message: str) -> int:
    print(f"build_kernel.py: error: {message}", file=sys.stderr)
    return 2


def resolve_region(source: Path, settings: Sequence[str] = (), preset: str | None = None,
                   reset: bool = False) -> str:
    """The CONFIG region to build with: the one in `source` as it is, or, with settings, a preset or a
    reset, one written from its values (reset: from none) and those. RegionError / ConfigError when it
    cannot be read or a setting is refused (the kernel's own checks, paths aside)."""
    changes = parse_settings(settings) | ({"preset": preset} if preset is not None else {})
    text = source.read_text(encoding="utf-8") if source.is_file() and not reset else None
    if text is None:
        values: dict[str, object] = {}
    else:
        region, line = extract_region(text, source.name)
        if not changes:
            _warn_about(region, line, source.name)
            generated = generated_values(region)
            return region if generated is None else region_text(generated)
        try:
            values = read_region_values(region, line, source.name)
        except NotLiteral as e:
            raise NotLiteral(f"{e}: --set rewrites the region from its values, so each must be a plain value "
                             "(a number, string, True/False); edit it by hand instead, or --reset-config") from None
    if not changes and not values:
        return region_text()
    values |= changes
    check_values(values)
    return region_text(values)


def _warn_about(region: str, line: int, where: str) -> None:
    """A kept region is the user's: settings the kernel would refuse are pointed out, not fixed."""
    try:
        check_values(read_region_values(region, line, where))
    except NotLiteral as e:
        print(f"note: {e}; the CONFIG region is kept as it is, unchecked", file=sys.stderr)
    except RegionError:
        raise  # not Python, or no CONFIG: the kernel could not even start
    except ValueError as e:  # ConfigError
        print(f"warning: {where}'s CONFIG region (kept as it is) would be refused by the kernel: {e}",
              file=sys.stderr)


def push(args: argparse.Namespace, region: str) -> int:
    try:
        metadata = kernel_metadata(args.kernel_id, args.competition, args.dataset, args.title, args.accelerator,
                                   args.model_source, args.kernel_source)
    except ValueError as e:
        return _error(str(e))
    if title_slug(str(metadata["title"])) != args.kernel_id.split("/")[1]:
        print(f"warning: title {metadata['title']!r} does not map to the id's slug; Kaggle may name a new kernel "
              "after the title", file=sys.stderr)
    text = build(region)
    write_push_dir(args.push_dir, text, metadata)
    print(f"wrote {args.push_dir / KERNEL_FILE} ({len(text.encode())} bytes) and {args.push_dir / METADATA_FILE}; "
          f"upload with: kaggle kernels push -p {args.push_dir}")
    return 0


def check(out: Path) -> int:
    text = build()
    current = out.read_text(encoding="utf-8") if out.is_file() else ""
    try:
        stale = without_region(current, out.name) != without_region(text)
    except RegionError as e:
        print(f"{out} is stale ({e})", file=sys.stderr)
        return 1
    if stale:
        print(f"{out} is stale: run `python build_kernel.py` and commit it", file=sys.stderr)
        return 1
    print(f"{out} is up to date outside its CONFIG region ({len(text.encode())} bytes)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or OUT
    if args.check:
        return check(out)
    try:
        # --push-dir takes the region of the kernel.py beside this script (left unchanged).
        region = resolve_region(OUT if args.push_dir is not None else out, args.settings, args.preset,
                                args.reset_config)
    except ValueError as e:  # RegionError, kernelkit's ConfigError
        return _error(str(e))
    if args.push_dir is not None:
        return push(args, region)
    text = build(region)
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out} ({len(text.encode())} bytes, {text.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
