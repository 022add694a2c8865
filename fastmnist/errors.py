"""Failures as the user reads them: one line each."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """'TypeName: first line of its message', cut to limit characters: a library's error quoted inside ours."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:limit]}" if text else type(exc).__name__
