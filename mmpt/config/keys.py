"""Describe the keys of a config class from its own fields and docstring (for ``--help`` and ``mmpt info``).

Config classes document their keys in the docstring as ``key: what it is.`` (several keys may share
one text: ``a/b: ...`` or ``a / b: ...``). Reading them from there keeps a single source: a key added
to a class without a description shows up as undocumented (and a test fails).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Any

UNDOCUMENTED = "(undocumented)"


def _type_text(tp: Any) -> str:
    text = getattr(tp, "__name__", None) if not typing.get_args(tp) else None
    return text or str(tp).replace("typing.", "")


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "required"


def docstring_keys(cls: type, names: list[str]) -> dict[str, str]:
    """``{key: description}`` for the ``names`` that the docstrings of ``cls`` and its bases describe
    (a subclass's text wins; a description ends at the next key or at the end of its paragraph)."""
    alternatives = "|".join(sorted((re.escape(n) for n in names), key=len, reverse=True))
    if not alternatives:
        return {}
    label = re.compile(rf"(?<![\w.`])((?:{alternatives})(?:\s*/\s*(?:{alternatives}))*):\s")
    out: dict[str, str] = {}
    for klass in cls.__mro__:
        doc = inspect.getdoc(klass) if klass.__doc__ else None
        for paragraph in (doc or "").split("\n\n"):
            text = " ".join(paragraph.split())
            hits = list(label.finditer(text))
            for i, hit in enumerate(hits):
                end = hits[i + 1].start() if i + 1 < len(hits) else len(text)
                for key in re.split(r"\s*/\s*", hit.group(1)):
                    out.setdefault(key, text[hit.end():end].strip())
    return out


def describe(cls: type) -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) for every field of dataclass ``cls``, or every keyword
    argument of a registered part's constructor (encoders and objectives are configured that way)."""
    if dataclasses.is_dataclass(cls):
        fields = [f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]
        hints = typing.get_type_hints(cls)
        rows = [(f.name, _type_text(hints.get(f.name, f.type)), _default_text(f)) for f in fields]
    else:
        target = cls.__init__ if inspect.isclass(cls) else cls
        try:
            hints = typing.get_type_hints(target)
        except Exception:  # annotations naming optional heavy imports
            hints = {}
        params = [p for p in inspect.signature(target).parameters.values()
                  if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        rows = [(p.name, _type_text(hints.get(p.name, p.annotation)),
                 "required" if p.default is p.empty else repr(p.default)) for p in params]
    docs = docstring_keys(cls, [name for name, _, _ in rows])
    return [(name, tp, default, docs.get(name, UNDOCUMENTED)) for name, tp, default in rows]


def format_keys(title: str, cls: type, indent: str = "  ") -> str:
    """A help block: the title line, then one line per key with its type, default and description."""
    lines = [title]
    for key, tp, default, text in describe(cls):
        lines.append(f"{indent}{key} ({tp}, default {default}): {text}")
    return "\n".join(lines)
