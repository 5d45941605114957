"""Read the small CSVs a competition ships (train.csv, labels.csv, sample_submission.csv).

Files saved by Excel or by hand come as latin-1, UTF-16 or UTF-8 with a byte-order mark, and with
`;` or tab between the fields. Each of those, read as plain UTF-8 commas, fails late or silently (one
merged column, garbled classes); here it is read correctly, or refused at once with the file's name.
"""
from __future__ import annotations

import codecs
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

log = logging.getLogger("kernelkit")

# UTF-32 before UTF-16: the UTF-32 little-endian mark begins with the UTF-16 one.
BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF8, "utf-8"),
        (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
DELIMITERS = (",", ";", "\t", "|")  # on a tie the earlier one wins: a comma file is the common case
# Cell texts that mean "no value": pandas and spreadsheets write these for a missing label.
MISSING = frozenset({"", "nan", "none", "null"})


@dataclass
class CsvTable:
    name: str  # the file's path (or a name for in-memory text), for messages
    frame: pd.DataFrame  # every cell a str, "" where empty
    sep: str
    encoding: str

    @property
    def columns(self) -> list[str]:
        return list(self.frame.columns)

    def column(self, name: str) -> list[str]:
        return [str(v) for v in self.frame[name]]


def is_missing(cell: str) -> bool:
    return cell.strip().lower() in MISSING


def _guess_utf16(head: bytes) -> str:
    """UTF-16 without a byte-order mark: ASCII text has a NUL in every other byte."""
    even, odd = head[0::2], head[1::2]
    if not even or not odd:
        return ""
    if odd.count(0) > 0.4 * len(odd) and even.count(0) < 0.05 * len(even):
        return "utf-16-le"
    if even.count(0) > 0.4 * len(even) and odd.count(0) < 0.05 * len(odd):
        return "utf-16-be"
    return ""


def decode_bytes(data: bytes, name: str) -> tuple[str, str]:
    """(text, encoding): a byte-order mark decides, else UTF-8, else latin-1 with a warning."""
    for bom, enc in BOMS:
        if data.startswith(bom):
            try:
                return data[len(bom):].decode(enc), enc
            except UnicodeDecodeError as e:
                raise ValueError(f"{name}: starts with a {enc} byte-order mark but is not valid {enc} "
                                 f"({e.reason} at byte {e.start}); re-save it as UTF-8") from None
    if b"\x00" in data[:4096]:
        enc = _guess_utf16(data[:4096])
        try:
            if enc:
                return data.decode(enc), enc
        except UnicodeDecodeError:
            pass
        raise ValueError(f"{name}: contains NUL bytes, so it is not a text CSV (a spreadsheet or an "
                         "archive saved under a .csv name?); export it as a UTF-8 CSV")
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError as e:
        # latin-1 maps every byte to one character, so it never fails and never loses a byte.
        log.warning("%s is not UTF-8 (byte %d: %r); reading it as latin-1: check that non-ASCII labels "
                    "and ids look right", name, e.start, data[e.start:e.start + 1])
        return data.decode("latin-1"), "latin-1"


def _count_outside_quotes(line: str, sep: str) -> int:
    n, quoted = 0, False
    for ch in line:
        if ch == '"':
            quoted = not quoted
        elif ch == sep and not quoted:
            n += 1
    return n


def sniff_delimiter(text: str) -> str:
    """The delimiter from the header line alone: label cells ("1 5 9", "a;b") must not vote."""
    header = next((ln for ln in text.splitlines() if ln.strip()), "")
    counts = {d: _count_outside_quotes(header, d) for d in DELIMITERS}
    best = max(DELIMITERS, key=lambda d: counts[d])
    return best if counts[best] else ","


def parse_csv_text(text: str, name: str, encoding: str = "utf-8") -> CsvTable:
    """Every cell as text (ids keep leading zeros, "NA" stays "NA"); column names stripped."""
    if not text.strip():
        raise ValueError(f"{name} is empty: no header and no rows")
    sep = sniff_delimiter(text)
    try:
        df = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
        msg = " ".join(str(e).split())
        raise ValueError(f"{name}: not a readable CSV with delimiter {sep!r}: {msg}") from None
    df.columns = [str(c).strip() for c in df.columns]
    return CsvTable(name, df.fillna(""), sep, encoding)


def read_csv_file(path: Path) -> CsvTable:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror})") from None
    if not data.strip():
        raise ValueError(f"{path} is empty ({len(data)} bytes): no header and no rows")
    text, enc = decode_bytes(data, str(path))
    return parse_csv_text(text, str(path), enc)


def require_rows(table: CsvTable) -> CsvTable:
    if len(table.frame) == 0:
        raise ValueError(f"{table.name} has no rows (only the header {table.columns})")
    return table
