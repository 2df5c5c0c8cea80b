"""Caption identity shared by retrieval relevance and matching negatives: two samples whose captions
normalise to the same text describe the same thing."""

from __future__ import annotations


def normalise_caption(text: str) -> str:
    """Caption identity for relevance: lowercase, stripped, inner whitespace collapsed."""
    return " ".join(text.lower().split())
