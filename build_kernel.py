#!/usr/bin/env python
"""Bundle src/kernelkit into one self-contained kernel.py for Kaggle.

    python build_kernel.py            # write kernel.py
    python build_kernel.py --check    # exit 1 when kernel.py is not what the sources build

Each module's source is embedded verbatim as a string and served by an import hook, so the package
keeps its module structure: relative imports, `from __future__` lines and pickling by qualified
name (DataLoader workers under spawn/forkserver re-run kernel.py's top level, which re-installs
the hook, then import e.g. `kernelkit.data.ImageDataset` normally). The output is deterministic.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PACKAGE = "kernelkit"
SRC = ROOT / "src" / PACKAGE
OUT = ROOT / "kernel.py"
MAX_BYTES = 1_000_000  # Kaggle rejects kernel sources over 1 MB

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

if __name__ == "__main__":
    from {package}.run import main
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if kernel.py is stale")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    text = build()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else ""
        if current != text:
            print(f"{args.out} is stale: run `python build_kernel.py` and commit it", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date ({len(text.encode())} bytes)")
        return 0
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({len(text.encode())} bytes, {text.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
