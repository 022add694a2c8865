"""Text a person reads: names and values from a user's input shown so they cannot forge or break a line.

A Linux file name is any bytes but "/" and NUL: a newline (which would print a second, fake result
line), a terminal escape sequence, a right-to-left override, or bytes that are not UTF-8 (Python
carries them as lone surrogates, which a UTF-8 stdout refuses to print). Every human output line
that names a user's file goes through display_name; every value quoted from a user's file in an
error goes through shorten; --json output takes json_name's fields, which lose nothing.
"""
import base64
import os

QUOTE_LIMIT = 80  # characters of a user's value quoted in an error; the rest is counted, not shown
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, as os.fsdecode's surrogateescape carries it
        return f"\\x{code - 0xDC00:02x}"
    if ch in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[ch]
    if ch.isprintable():  # letters of every script, marks, symbols and the space
        return ch
    # Control and format characters (C0, C1, zero-width, bidirectional overrides), line and paragraph
    # separators, unassigned code points and other lone surrogates: as Python's repr writes them.
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def display_text(text: str) -> str:
    """text on one printable line: control characters, non-printable ones and undecodable bytes as escapes.

    For messages that embed a name among our own words; a backslash is kept as it is.
    """
    return "".join(_escape_char(ch) for ch in str(text))


def display_name(name) -> str:
    """A file name (str, bytes or path) as one printable line that no other name can produce.

    Like `ls -b` and Python's repr: a newline shows as \\n, a byte that is not UTF-8 as \\xff, other
    non-printable characters as \\xNN, \\uNNNN or \\UNNNNNNNN, and a backslash as \\\\ (so a name
    holding a real backslash and n never reads as one holding a newline). Printable characters of any
    script are shown as they are. The result always encodes as UTF-8.
    """
    text = os.fsdecode(name) if isinstance(name, (bytes, os.PathLike)) else str(name)
    return "".join("\\\\" if ch == "\\" else _escape_char(ch) for ch in text)


def json_name(name, key: str = "file") -> dict:
    """The fields that carry a file name in JSON without loss.

    {key: the name} when it is valid Unicode (JSON escapes its control characters itself); for a name
    whose bytes are not UTF-8, {key: display_name(name), key + "_base64": its exact bytes in base64},
    since JSON text cannot hold such bytes (a lone surrogate escape is refused by strict parsers).
    """
    text = os.fsdecode(name) if isinstance(name, (bytes, os.PathLike)) else str(name)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raw = os.fsencode(text)
        return {key: display_name(text), f"{key}_base64": base64.b64encode(raw).decode("ascii")}
    return {key: text}


def shorten(value, limit: int = QUOTE_LIMIT) -> str:
    """A value read from a user's file, for an error message: short, one line, never computed on.

    Strings and bytes are quoted (escaped, cut to limit characters, their length given); small
    numbers shown; anything else (a tensor, a list, a huge integer) is named by its type (and a
    tensor by its shape and dtype), never printed: printing a crafted object can cost gigabytes.
    """
    if isinstance(value, (str, bytes)):
        text = repr(value[:limit])
        unit = "characters" if isinstance(value, str) else "bytes"
        return text if len(value) <= limit else f"{text}... ({len(value):,} {unit})"
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= 64 else f"an integer of {value.bit_length():,} bits"
    if isinstance(value, float):
        return repr(value)
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):
        dims = tuple(shape)
        return f"a {type(value).__name__} of shape {shorten_sequence(dims)} ({value.dtype})"
    return f"a {type(value).__name__}"


def shorten_sequence(items, limit: int = 8) -> str:
    """At most limit items of a sequence, as (a, b, ...), with the count of the rest."""
    items = list(items[: limit + 1])
    shown = ", ".join(str(i) for i in items[:limit])
    return f"({shown}{', ...' if len(items) > limit else ''})"
