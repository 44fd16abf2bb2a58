"""What a program's literals can hold: symbol sequences for the copy detector, and a scrambled copy.

A ``transform`` that returns a shown output without computing it must carry that output's cells in
its source, so they are in its literals, possibly encoded. This module reads them statically (the
trainer parses the code with :mod:`ast`; it never executes, evals or unpickles anything a program
wrote) and turns them into candidate *symbol sequences* (int arrays) in which
:mod:`fp16rl.tasks.arc.copying` looks for the shown output grids:

* every int constant in source order (nested lists, tuples, dict keys and values, flat lists with
  shapes, ``if grid == [[...]]`` lookups), and the decimal digits of those ints run together;
* every str/bytes constant run together in source order (rows stored as separate strings stay
  contiguous), once with every character and once without common separators (``, ;|[](){}:'"``,
  whitespace);
* each str/bytes constant decoded as hex/base16, base64 (standard and URL-safe), base32, base85,
  ascii85, then decompressed as zlib, gzip, raw deflate, bz2 or lzma (output capped at
  ``MAX_DECODED`` bytes), recursively up to ``DECODE_DEPTH`` layers (base64 of zlib of JSON);
* each big int (>= ``BIG_INT``) written in the bases 2..16, 32, 64 and 256, both digit orders.

:func:`scrambled_sources` serves the dynamic check: the same program with its large literal payloads
(``>= min_symbols`` symbols) changed by a cyclic substitution of their own symbols (ints among the
payload's ints, characters among the string's characters, hex digits of big ints), so a decoder of
any plain encoding still runs but every cell it draws from the literals moves.
"""

from __future__ import annotations

import ast
import base64
import binascii
import bz2
import lzma
import zlib
from typing import Callable, Iterator

import numpy as np

MAX_SYMBOLS = 200_000  # longest sequence searched (a program padded past this is cut, not searched)
MAX_DECODED = 1 << 20  # bytes one decompression may produce (bombs stop here)
DECODE_DEPTH = 3  # layers of encoding peeled (base64 -> zlib -> base64 -> ...)
MIN_BLOB = 8  # shorter strings are not tried as encoded blobs
BIG_INT = 10**5  # ints from here on are read as packed digit strings
MAX_INT_BITS = 1 << 20  # bigger ints are skipped (digit conversion cost)
BASES = (*range(2, 17), 32, 64, 256)
SEPARATORS = frozenset(" \t\r\n,;|[](){}:'\"")


def parse(code: str) -> ast.Module | None:
    """The program's syntax tree, or None when it does not parse (the sandbox reports that)."""
    try:
        return ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _constants(tree: ast.AST) -> list[ast.Constant]:
    """Constants in source order (``ast.walk`` is breadth first, so sort by position)."""
    nodes = [n for n in ast.walk(tree) if isinstance(n, ast.Constant)]
    return sorted(nodes, key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0)))


def _int_value(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def sequences(tree: ast.AST) -> list[np.ndarray]:
    """Every candidate symbol sequence of a parsed program (see the module docstring)."""
    constants = _constants(tree)
    ints = [v for c in constants if (v := _int_value(c.value)) is not None and v.bit_length() <= MAX_INT_BITS]
    texts = [c.value if isinstance(c.value, str) else c.value.decode("latin-1")
             for c in constants if isinstance(c.value, (str, bytes))]
    found = [np.asarray(ints, dtype=object)] if ints else []
    digits = [d for v in ints if abs(v) < 10**4000 for d in str(abs(v))]
    found.append(np.frombuffer("".join(digits).encode(), dtype=np.uint8).astype(np.int64) - 48)
    joined = "".join(texts)
    found += [_codes(joined), _codes("".join(ch for ch in joined if ch not in SEPARATORS))]
    for text in texts:
        for blob in _decodings(text, DECODE_DEPTH):
            found.append(np.frombuffer(blob, dtype=np.uint8).astype(np.int64))
            found.append(_codes("".join(ch for ch in blob.decode("latin-1") if ch not in SEPARATORS)))
    for value in ints:
        if abs(value) >= BIG_INT:
            for base in BASES:
                packed = digits_of(abs(value), base)
                found += [packed, packed[::-1]]
    return [_as_int_array(seq[:MAX_SYMBOLS]) for seq in found if len(seq)]


def _codes(text: str) -> np.ndarray:
    return np.fromiter((ord(ch) for ch in text[:MAX_SYMBOLS]), dtype=np.int64, count=min(len(text), MAX_SYMBOLS))


def _as_int_array(seq: np.ndarray) -> np.ndarray:
    """Symbols as int64; ints beyond int64 (they cannot be cells) become one shared marker."""
    if seq.dtype != object:
        return seq.astype(np.int64)
    return np.array([v if -(2**62) < v < 2**62 else 2**62 for v in seq], dtype=np.int64)


def digits_of(value: int, base: int) -> np.ndarray:
    """Digits of ``value >= 0`` in ``base``, most significant first (divide and conquer: linear
    repeated division would be quadratic in the digits)."""
    if value < base:
        return np.array([value], dtype=np.int64)
    width = 1
    while base ** (2 * width) <= value:
        width *= 2
    high, low = divmod(value, base**width)
    low_digits = digits_of(low, base)
    pad = np.zeros(width - len(low_digits), dtype=np.int64)
    return np.concatenate([digits_of(high, base), pad, low_digits])


def _decodings(text: str, depth: int) -> Iterator[bytes]:
    """Every byte string ``text`` decodes to through up to ``depth`` layers of encoding."""
    if depth == 0 or len(text) < MIN_BLOB:
        return
    raw = text.encode("latin-1", errors="ignore")
    compact = "".join(text.split())
    layer = [_decoded(fn, compact) for fn in _TEXT_DECODERS] + [_decompressed(fn, raw) for fn in _DECOMPRESSORS]
    for blob in dict.fromkeys(b for b in layer if b):  # distinct, in order
        yield blob
        yield from _decodings(blob.decode("latin-1"), depth - 1)


def _decoded(fn: Callable[[str], bytes], text: str) -> bytes | None:
    try:
        return fn(text)
    except (binascii.Error, ValueError, TypeError, OverflowError):
        return None


def _decompressed(make: Callable[[], object], raw: bytes) -> bytes | None:
    """Bounded decompression: at most ``MAX_DECODED`` bytes come out, whatever the input claims."""
    try:
        return make().decompress(raw, MAX_DECODED)  # type: ignore[attr-defined]
    except (zlib.error, OSError, EOFError, lzma.LZMAError, ValueError, MemoryError):
        return None


def _unhex(text: str) -> bytes:
    return bytes.fromhex(text)


def _b64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b32(text: str) -> bytes:
    return base64.b32decode(text + "=" * (-len(text) % 8), casefold=True)


_TEXT_DECODERS: tuple[Callable[[str], bytes], ...] = (_unhex, _b64, _b64url, _b32, base64.b85decode, base64.a85decode)
_DECOMPRESSORS: tuple[Callable[[], object], ...] = (
    zlib.decompressobj,
    lambda: zlib.decompressobj(wbits=31),  # gzip
    lambda: zlib.decompressobj(wbits=-15),  # raw deflate
    bz2.BZ2Decompressor,
    lzma.LZMADecompressor,
)


# ---- the dynamic check's scramble -------------------------------------------------------------------

def _is_data(node: ast.AST) -> bool:
    """A literal made only of constants: a constant, or a list/tuple/set/dict display of them."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (int, str, bytes)) and not isinstance(node.value, bool)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return _is_data(node.operand)
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return all(_is_data(e) for e in node.elts)
    if isinstance(node, ast.Dict):
        return all(k is not None and _is_data(k) for k in node.keys) and all(_is_data(v) for v in node.values)
    return False


def payload_size(node: ast.AST) -> int:
    """Symbols a data literal carries: one per small int, one per character or byte, the hex
    digits of a big int."""
    total = 0
    for leaf in ast.walk(node):
        if isinstance(leaf, ast.Constant):
            value = leaf.value
            if isinstance(value, (str, bytes)):
                total += len(value)
            elif (v := _int_value(value)) is not None:
                total += (abs(v).bit_length() + 3) // 4 if abs(v) >= BIG_INT else 1
    return total


def _cycle(symbols: set) -> dict:
    """Each symbol to the next one in sorted order (every symbol moves when there are >= 2)."""
    ordered = sorted(symbols)
    return dict(zip(ordered, ordered[1:] + ordered[:1]))


def _payloads(tree: ast.AST, min_symbols: int) -> list[ast.AST]:
    """The outermost data literals of ``>= min_symbols`` symbols, in a fixed (walk) order."""
    found: list[ast.AST] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_data(node) and payload_size(node) >= min_symbols:
            found.append(node)
        else:
            stack.extend(reversed(list(ast.iter_child_nodes(node))))
    return found


def _scramble_value(value: object, mapping: dict) -> object:
    """One constant moved by a cyclic substitution that keeps its alphabet (a decoder still runs)."""
    if isinstance(value, str):
        table = _cycle(set(value))
        return "".join(table[ch] for ch in value)
    if isinstance(value, bytes):
        table = _cycle(set(value))
        return bytes(table[b] for b in value)
    if (v := _int_value(value)) is not None:
        if abs(v) < BIG_INT:
            return mapping.get(v, v)
        hex_digits = format(abs(v), "x")  # power-of-two bases have no str() digit limit
        table = _cycle(set(hex_digits))
        return int("".join(table[d] for d in hex_digits), 16) * (1 if v > 0 else -1)
    return value


def _scramble(node: ast.AST) -> None:
    """Small ints cycle among the payload's own small ints; strings, bytes and big ints per constant."""
    constants = [leaf for leaf in ast.walk(node) if isinstance(leaf, ast.Constant)]
    mapping = _cycle({v for c in constants if (v := _int_value(c.value)) is not None and abs(v) < BIG_INT})
    for leaf in constants:
        leaf.value = _scramble_value(leaf.value, mapping)


def scrambled_sources(code: str, min_symbols: int, max_single: int) -> list[str]:
    """Sources of the program with its data literals of ``>= min_symbols`` symbols scrambled: all
    of them at once, then (when there are several) each of the ``max_single`` largest alone, since
    one scrambled checksummed blob can make every input raise and hide what another literal does."""
    tree = parse(code)
    if tree is None:
        return []
    sizes = [payload_size(node) for node in _payloads(tree, min_symbols)]
    count = len(sizes)
    largest = sorted(range(count), key=lambda k: -sizes[k])[:max_single] if count > 1 else []
    sources = []
    for chosen in ([*range(count)], *([k] for k in largest)) if count else ():
        fresh = parse(code)
        if fresh is None:
            return []
        payloads = _payloads(fresh, min_symbols)
        for k in chosen:
            _scramble(payloads[k])
        try:
            sources.append(ast.unparse(fresh))
        except (RecursionError, ValueError, MemoryError):
            return []
    return sources
