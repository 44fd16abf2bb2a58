"""Where a prompt data file is broken, said as a user can find it: the line of a text file, the row and
column of a table.

``datasets`` stays the reader (memory-mapped, cached), but its errors do not locate the problem:
pyarrow names a byte position inside a block of a JSON Lines file, an empty file ends in
``StopIteration`` or "corresponds to no data", and strings that are not UTF-8 pass the JSON reader
and fail only when a row is first read. So these checks run on the error path (a file ``datasets``
rejected, or a table that fails Arrow's UTF-8 validation) and read the file once more, line by line,
to name the first line a reader stumbles on.
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import IO, Any, Iterator

import pyarrow as pa


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of a text file, gzip-compressed when its name ends in .gz."""
    opener: Any = gzip.open if path.suffix.lower() == ".gz" else open
    handle: IO[bytes]
    with opener(path, "rb") as handle:
        yield from enumerate(handle, start=1)


def text_file_problem(path: Path, kind: str | None) -> str | None:
    """The first problem of a ``kind`` (json | csv) file, naming its line; None when none is found (then
    the reader's own message is the best there is) and for other kinds (parquet: not text). One pass,
    line by line; only a JSON document (a list, first character ``[``) is held whole, as its reader does."""
    if kind not in ("json", "csv"):
        return None
    document: list[str] | None = None
    seen_text = False
    try:
        for number, raw in _lines(path):
            try:
                line = raw.decode("utf-8").removeprefix("\ufeff" if number == 1 else "")
            except UnicodeDecodeError as err:
                return f"line {number} is not UTF-8 text (byte {err.start + 1} of the line is 0x{raw[err.start]:02x})"
            if kind == "json" and not seen_text and line.strip():
                document = [] if line.lstrip().startswith("[") else None
            seen_text = seen_text or bool(line.strip())
            if document is not None:
                document.append(line)
            elif kind == "json" and line.strip() and (problem := _json_line_problem(number, line)):
                return problem
    except (OSError, EOFError, zlib.error) as err:  # unreadable, or a truncated or corrupt gzip stream
        return f"cannot be read ({type(err).__name__}: {err})"
    if not seen_text:
        return "holds no rows (the file is empty or blank)"
    return _json_document_problem("".join(document)) if document is not None else None


def _json_document_problem(text: str) -> str | None:
    """A .json file holding one list of records."""
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        return f"line {err.lineno}, column {err.colno}: not valid JSON ({err.msg})"
    if not records:
        return "holds no rows (an empty list)"
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            return f"record {index} is a JSON {type(record).__name__}, not an object of columns"
    return None


def _json_line_problem(number: int, line: str) -> str | None:
    """Line ``number`` of a JSON Lines file: one object (the reader skips blank lines)."""
    try:
        record = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as err:
        return f"line {number}, column {err.colno}: not valid JSON ({err.msg}); JSON Lines holds one object a line"
    if not isinstance(record, dict):
        return f"line {number} holds a JSON {type(record).__name__}, not an object of columns"
    return None


def invalid_table_problem(table: pa.Table) -> str | None:
    """The first string that is not UTF-8, by row and column (Arrow's JSON reader does not check what
    strings decode to), or None when the table is valid. Arrow's full validation is one C++ pass; the
    row is searched only when it fails."""
    try:
        table.validate(full=True)
        return None
    except pa.ArrowInvalid as err:
        problem = f"not valid Arrow data ({err})"
    for name in table.column_names:
        start = 0
        for chunk in table.column(name).chunks:
            for index in range(len(chunk)):
                try:
                    chunk.slice(index, 1).validate(full=True)
                except pa.ArrowInvalid:
                    return f"row {start + index}, column {name!r}: not UTF-8 text"
            start += len(chunk)
    return problem
