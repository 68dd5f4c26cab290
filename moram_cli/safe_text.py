"""Text from files a user (or anyone with write access) controls, made safe to embed in a one-line message."""

from __future__ import annotations


def one_line(text: str, limit: int = 60) -> str:
    """`text` made safe to embed in a message: whitespace runs collapsed, at most `limit` chars, control characters escaped.

    Escaping keeps a hostile file from writing terminal escape sequences, NULs
    or lone surrogates (which cannot even be printed) into the error line.
    """
    flat = " ".join(text.split())
    flat = flat if len(flat) <= limit else flat[: limit - 3] + "..."
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in flat)
