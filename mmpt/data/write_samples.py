"""One input row -> validated shard samples (``mmpt data write``'s per-row work, run in worker processes).

Each file is read, its data side turns it into members (``ModalityData.source_samples``), and the member
the loader will pick is decoded exactly as training decodes it, under the same byte budget
(:func:`mmpt.data.budget.decode_within_budget`): what fails here would have been skipped in training, and is
counted under the same reason (``decode_error_image``, ``too_large_audio``, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmpt.contracts import ModalityData, SourceSample
from mmpt.data.budget import decode_within_budget, skip_reason
from mmpt.data.sources import FileRef, Row, Skip

# (key, members or None, skip reason or None)
Result = tuple[str, "dict[str, bytes] | None", "str | None"]


@dataclass
class Plan:
    """What turning a row into samples needs: the data sides, the caption side, where paths resolve, the
    key prefix."""

    specs: dict[str, ModalityData]
    caption: str | None
    root: Path
    prefix: str

    def key(self, row: Row) -> str:
        """The key of a row's (first) sample: prefix + row number, 9 digits."""
        return f"{self.prefix}{row.index:09d}"


def build_row(row: Row, plan: Plan) -> list[Result]:
    """The samples of ``row`` (one, or one per record of a many-sample file, keyed ``<key>_<record>``), each
    with its members or the reason it is skipped."""
    key = plan.key(row)
    try:
        if isinstance(row.caption, Skip):
            raise row.caption
        parts = {m: _source_samples(m, plan.specs[m], value, plan.root) for m, value in row.cells.items()}
        caption = None if row.caption is None else _caption_text(row.caption, plan)
        samples = _combine(key, parts)
    except Skip as skip:
        return [(key, None, str(skip))]
    out: list[Result] = []
    for sample_key, sample in samples:
        try:
            out.append((sample_key, _members(sample, caption, row, plan), None))
        except Skip as skip:
            out.append((sample_key, None, str(skip)))
    return out


def _combine(key: str, parts: dict[str, list[SourceSample]]) -> list[tuple[str, dict[str, SourceSample]]]:
    several = [m for m, samples in parts.items() if len(samples) != 1]
    if not several:
        return [(key, {m: samples[0] for m, samples in parts.items()})]
    if len(parts) > 1:
        raise Skip("a file of several samples beside other files")
    (modality, samples), = parts.items()
    if not samples:
        raise Skip(f"no_samples_{modality}")
    return [(f"{key}_{j:06d}", {modality: s}) for j, s in enumerate(samples)]


def _source_samples(modality: str, spec: ModalityData, value: Any, root: Path) -> list[SourceSample]:
    if isinstance(value, Skip):
        raise value
    if isinstance(value, SourceSample):
        return [value]
    suffixes = spec.source_suffixes()
    if isinstance(value, str) and not isinstance(value, FileRef) and spec.inline_ext is not None and not _names_file(value, suffixes):
        return [SourceSample(spec.inline_members(value))]
    data, ext = read_file(value, root)
    if ext and ext not in suffixes:
        raise Skip(f"unsupported format .{ext}")
    try:
        return spec.source_samples(data, ext)
    except Exception as exc:  # a file its data side refuses: counted the way the loader counts it
        raise Skip(skip_reason(exc, modality)) from None


def _names_file(value: str, suffixes: tuple[str, ...]) -> bool:
    return value.startswith("file://") or Path(value).suffix.lower().lstrip(".") in suffixes


def read_file(value: Any, root: Path) -> tuple[bytes, str]:
    """The bytes of the file a path or ``file://`` URL names (relative to ``root``) and its extension."""
    if isinstance(value, FileRef):  # found in a folder: no parsing
        try:
            with open(value, "rb") as f:
                data = f.read()
        except OSError:
            raise Skip("unreadable file") from None
        if not data:
            raise Skip("empty file")
        dot = value.rfind(".")
        return data, value[dot + 1:].lower() if dot > value.rfind("/") else ""
    text = "" if value is None else str(value).strip()
    if not text:
        raise Skip("empty path")
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text:
        raise Skip("remote url (download first)")
    file = root / Path(text).expanduser()
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise Skip("missing file") from None
    except OSError:
        raise Skip("unreadable file") from None
    if not data:
        raise Skip("empty file")
    return data, file.suffix.lower().lstrip(".")


def _caption_text(value: Any, plan: Plan) -> str:
    spec = plan.specs[plan.caption] if plan.caption else None
    if isinstance(value, str) and not isinstance(value, FileRef) and (spec is None or not _names_file(value, spec.source_suffixes())):
        return value
    try:
        path = value if isinstance(value, FileRef) else plan.root / Path(str(value).removeprefix("file://"))
        with open(path, "rb") as f:
            return f.read().decode("utf-8")
    except FileNotFoundError:
        raise Skip("missing caption file") from None
    except (OSError, UnicodeDecodeError):
        raise Skip("unreadable caption file") from None


def _members(sample: dict[str, SourceSample], caption: str | None, row: Row, plan: Plan) -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    meta: dict[str, Any] = {}
    for modality, part in sample.items():
        spec = plan.specs[modality]
        ext = next((e for e in spec.extensions if e in part.members), None)
        if ext is None:
            raise Skip(f"no_member_{modality}")
        _validate(spec, modality, part.members[ext], ext)
        for name, data in part.members.items():
            if name in members:
                raise Skip(f"two .{name} members")
            members[name] = data
        meta.update(part.meta)
    if caption is None:
        caption = next((part.caption for part in sample.values() if part.caption), None)
    if caption is not None:
        caption = caption.strip()
        if not caption:
            raise Skip("empty caption")
        if plan.caption:
            spec = plan.specs[plan.caption]
            text = spec.inline_members(caption)
            for ext, data in text.items():
                _validate(spec, plan.caption, data, ext)
            members.update(text)
        else:
            members["txt"] = caption.encode("utf-8")
    elif row.caption_missing:
        raise Skip(row.caption_missing)
    if isinstance(row.extra, str):  # a folder sample's sidecar .json, kept verbatim
        try:
            with open(row.extra, "rb") as f:
                members["json"] = f.read()
        except OSError:
            raise Skip("unreadable json file") from None
    elif meta or row.extra:
        members["json"] = json.dumps({**meta, **(row.extra or {})}, ensure_ascii=False, sort_keys=True,
                                     default=str).encode("utf-8")
    if not members:
        raise Skip("nothing to write")
    return members


def _validate(spec: ModalityData, modality: str, data: bytes, ext: str) -> None:
    """Decode as the loader will, under the data side's budget; a failure is a skip under the loader's reason."""
    try:
        decode_within_budget(spec, data, ext)
    except Exception as exc:
        raise Skip(skip_reason(exc, modality)) from None
