"""Third-party error text for mmpt's one-line messages: whitespace collapsed, cut at a word boundary."""

from __future__ import annotations


def one_line(text: object, limit: int = 160) -> str:
    """``text`` (or an exception's message) on one line of at most ``limit`` characters, cut between words."""
    flat = " ".join(str(text).split()) or type(text).__name__
    if len(flat) <= limit:
        return flat
    cut = flat[:limit].rsplit(" ", 1)[0] if " " in flat[:limit] else flat[:limit]
    return cut.rstrip(" ,;:") + " ..."
