"""Several augmented views of one sample (CleanCLIP's in-modality self-supervision, SimCLR-style objectives).

A data side with a ``train_views`` option returns a :class:`Views` from its training ``transform`` (view 0 is
its ordinary training transform, the others its stronger augmentation) and collates it with
:func:`collate_views`: view 0 keeps the ordinary field names, so every tower and objective reads it as
usual, and view ``k`` adds the same fields named ``<field>@view<k>``. An objective takes view ``k`` back
with :func:`view_fields`. Nothing here names a modality.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

SEPARATOR = "@view"


class Views(tuple):
    """The augmented views of one sample (a tuple, marked so collate tells it from a value that is a tuple)."""


def check_views(n: Any, key: str = "train_views") -> int:
    """``n`` as a count of views (>= 1), or a ValueError naming ``key``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{key}: expected an integer >= 1 (1: no extra views), got {n!r}")
    return n


def collate_views(values: list[Any], collate: Callable[[list[Any]], dict[str, Tensor]]) -> dict[str, Tensor]:
    """Collate samples that may be :class:`Views`: view 0 under the fields' own names, view ``k`` under
    ``<field>@view<k>``; ``None`` (an absent sample) stays None in every view. Plain values collate as usual."""
    n = max((len(v) for v in values if isinstance(v, Views)), default=0)
    if not n:
        return collate(values)
    fields: dict[str, Tensor] = {}
    for k in range(n):
        part = collate([v[k] if isinstance(v, Views) else v for v in values])
        fields.update(part if k == 0 else {f"{name}{SEPARATOR}{k}": t for name, t in part.items()})
    return fields


def view_count(fields: dict[str, Tensor]) -> int:
    """How many views a modality's collated fields carry (1 when it has no extra view)."""
    ks = [int(name.rsplit(SEPARATOR, 1)[1]) for name in fields if SEPARATOR in name]
    return 1 + max(ks, default=0)


def view_fields(fields: dict[str, Tensor], k: int) -> dict[str, Tensor]:
    """The fields of view ``k`` under their ordinary names (view 0: the fields without any extra view)."""
    if k == 0:
        return {name: t for name, t in fields.items() if SEPARATOR not in name}
    suffix = f"{SEPARATOR}{k}"
    return {name[: -len(suffix)]: t for name, t in fields.items() if name.endswith(suffix)}
