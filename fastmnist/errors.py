"""Failures as the user reads them: one line each."""
from fastmnist.display import display_text


def first_line(exc: BaseException, limit: int = 200) -> str:
    """'TypeName: message' as one short printable line: a library's error quoted inside ours.

    Whitespace runs (newlines included) become one space, control characters and undecodable bytes are
    escaped, and the text is cut to limit characters: a decoder's or torch's message may quote a file's bytes.
    """
    text = " ".join(str(exc).split())
    if not text:
        return type(exc).__name__
    return f"{type(exc).__name__}: {display_text(text[:limit])}{'...' if len(text) > limit else ''}"
