#!/usr/bin/env python
"""Bundle src/kernelkit into one self-contained kernel.py for Kaggle.

    python build_kernel.py            # write kernel.py
    python build_kernel.py --check    # exit 1 when kernel.py is not what the sources build
    python build_kernel.py --push-dir out/ --competition SLUG --dataset OWNER/SLUG --id OWNER/SLUG
                                      # write out/kernel.py + out/kernel-metadata.json for
                                      # `kaggle kernels push -p out/`

Each module's source is embedded verbatim as a string and served by an import hook, so the package
keeps its module structure: relative imports, `from __future__` lines and pickling by qualified
name (DataLoader workers under spawn/forkserver re-run kernel.py's top level, which re-installs
the hook, then import e.g. `kernelkit.data.ImageDataset` normally). The output is deterministic.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import MISSING, fields
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
# Uncomment and edit. Precedence: defaults < preset < this block < command-line flags.
CONFIG = dict(
{config_lines}
)
# ------------------------------------------------------------------------------------
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
        return _util.spec_from_loader(name, self, origin=self._filename(name), is_package=name == {package!r})

    @staticmethod
    def _filename(name):
        rel = name.replace(".", "/") + ("/__init__.py" if name == {package!r} else ".py")
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
    from {package}.cli import main
    _sys.exit(main(CONFIG, started_at=_STARTED_AT))
'''


def config_lines() -> str:
    sys.path.insert(0, str(ROOT / "src"))
    try:
        from kernelkit.config import Config
    finally:
        sys.path.pop(0)
    lines = []
    for f in fields(Config):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        entry = f"    # {f.name}={default!r},"
        help_text = f.metadata.get("help", "")
        lines.append(f"{entry:<44}# {help_text}".rstrip() if help_text else entry)
    return "\n".join(lines)


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def build() -> str:
    modules = sorted(p for p in SRC.rglob("*.py") if p.name != "__main__.py")
    chunks = []
    for path in modules:
        source = path.read_text(encoding="utf-8").replace("\r\n", "\n")
        if "'''" in source:
            raise SystemExit(f"{path}: contains ''' which the bundle uses as delimiter; use \"\"\" instead")
        if not source.endswith("\n"):
            source += "\n"
        chunks.append(f"{module_name(path)!r}: r'''{source}''',")
    text = (HEADER.format(package=PACKAGE, config_lines=config_lines())
            + "\n# Bundled sources of src/" + PACKAGE + ", one module each (generated; do not edit).\n"
            + "_SOURCES = {\n" + "\n".join(chunks) + "\n}\n"
            + BOOTSTRAP.format(package=PACKAGE))
    size = len(text.encode("utf-8"))
    if size > MAX_BYTES:
        raise SystemExit(f"kernel.py would be {size} bytes; Kaggle's limit is {MAX_BYTES}")
    compile(text, str(OUT), "exec")
    return text


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


def kernel_metadata(kernel_id: str, competition: str, datasets: Sequence[str] = (),
                    title: str | None = None, gpu: bool = True) -> dict[str, object]:
    """The kernel-metadata.json for `kaggle kernels push`; ValueError names the bad input."""
    slug = _check_kernel_id(kernel_id)
    _check_slug(competition, "--competition")
    for dataset in datasets:
        _check_ref(dataset, "--dataset")
    if len(set(datasets)) != len(datasets):
        raise ValueError(f"--dataset: the same dataset is given twice in {list(datasets)}")
    # Kaggle names a new kernel after its title, so the default title is the one that maps to the id.
    title = slug.replace("-", " ").capitalize() if title is None else title.strip()
    if len(title) < MIN_CHARS:
        raise ValueError(f"--title {title!r}: needs at least {MIN_CHARS} characters")
    return {
        "id": kernel_id,
        "title": title,
        "code_file": KERNEL_FILE,
        "language": "python",
        "kernel_type": "script",
        "is_private": True,
        "enable_gpu": gpu,
        # kernel.py reads weights from attached datasets only; Kaggle's default would be internet on.
        "enable_internet": False,
        "competition_sources": [competition],
        "dataset_sources": list(datasets),
        "kernel_sources": [],
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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if kernel.py is stale")
    ap.add_argument("--out", type=Path, default=None, help=f"where to write the kernel (default {OUT.name})")
    push = ap.add_argument_group("upload bundle", "write a folder for `kaggle kernels push -p DIR`")
    push.add_argument("--push-dir", type=Path, metavar="DIR",
                      help=f"write DIR/{KERNEL_FILE} and DIR/{METADATA_FILE} (kernel.py itself is left alone)")
    push.add_argument("--competition", metavar="SLUG", help="competition to attach, e.g. imet-2019-fgvc6")
    push.add_argument("--dataset", action="append", default=[], metavar="OWNER/SLUG",
                      help="dataset to attach (repeatable), e.g. the one holding pretrained weights")
    push.add_argument("--id", dest="kernel_id", metavar="OWNER/SLUG", help="the kernel, e.g. alice/imet-convnext")
    push.add_argument("--title", help="kernel title (default: from the id's slug)")
    push.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None, help="GPU on (default on)")
    args = ap.parse_args(argv)
    push_flags = [args.competition, args.kernel_id, args.title, args.gpu, *args.dataset]
    if args.push_dir is None and any(flag is not None for flag in push_flags):
        ap.error("--competition, --dataset, --id, --title and --gpu only go with --push-dir")
    if args.push_dir is not None and (args.check or args.out is not None):
        ap.error("--push-dir writes its own kernel.py; it does not combine with --check or --out")
    if args.push_dir is not None and (args.competition is None or args.kernel_id is None):
        ap.error("--push-dir needs --competition and --id")
    return args


def push(args: argparse.Namespace) -> int:
    try:
        metadata = kernel_metadata(args.kernel_id, args.competition, args.dataset, args.title, args.gpu is not False)
    except ValueError as e:
        print(f"build_kernel.py: error: {e}", file=sys.stderr)
        return 2
    if title_slug(str(metadata["title"])) != args.kernel_id.split("/")[1]:
        print(f"warning: title {metadata['title']!r} does not map to the id's slug; Kaggle may name a new kernel "
              "after the title", file=sys.stderr)
    text = build()
    write_push_dir(args.push_dir, text, metadata)
    print(f"wrote {args.push_dir / KERNEL_FILE} ({len(text.encode())} bytes) and {args.push_dir / METADATA_FILE}; "
          f"upload with: kaggle kernels push -p {args.push_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.push_dir is not None:
        return push(args)
    out = args.out or OUT
    text = build()
    if args.check:
        current = out.read_text(encoding="utf-8") if out.is_file() else ""
        if current != text:
            print(f"{out} is stale: run `python build_kernel.py` and commit it", file=sys.stderr)
            return 1
        print(f"{out} is up to date ({len(text.encode())} bytes)")
        return 0
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out} ({len(text.encode())} bytes, {text.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
