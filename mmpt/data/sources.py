"""What ``mmpt data write`` reads: tables, folders (sidecar captions or class folders) and single files, as rows.

A :class:`Row` names, per modality, where its sample comes from (a file path, a table cell's own text, or a
sample a data side already made from a file), plus the caption and the extra ``json`` fields. Which modality
a file or column belongs to is never decided here by name: each registered data side states the source file
extensions it takes (``ModalityData.source_suffixes``) and whether a table cell may hold the value itself
(``inline_ext``). Reading bytes and turning them into members happens later, in :mod:`mmpt.data.write_samples`.
"""

from __future__ import annotations

import csv
import json
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmpt.contracts import ModalityData, SampleRejected, SourceSample
from mmpt.data.shards import DataError
from mmpt.registry import ConfigError, modalities

# Column names read as "the file of this row" and as "the caption" (today's image-table habit).
PATH_COLUMNS = ("file", "path", "filepath", "file_path", "url")
CAPTION_COLUMNS = ("caption", "text", "title")
# Per-modality column names: "<modality>", "<modality>_path", ...
_MODALITY_COLUMN_SUFFIXES = ("", "_path", "_file", "_filepath", "path", "file", "_url")
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq", ".jsonl", ".ndjson")


class Skip(Exception):
    """A row that cannot become a sample; the message is the reason it is counted under."""


@dataclass
class Row:
    """One input row: ``cells`` maps a modality to a file (:class:`FileRef`), a table cell (``str``: a path, or
    the value itself), a :class:`SourceSample` already made, or a :class:`Skip`; ``caption`` likewise (None:
    take the caption a source sample carries, else skip the row as ``caption_missing`` unless that is empty);
    ``extra`` is the json member's dict, a sidecar ``.json`` file (:class:`FileRef`, kept verbatim), or None."""

    index: int
    cells: dict[str, Any]
    caption: Any = None
    extra: dict | str | None = None
    caption_missing: str = "missing caption file"


@dataclass
class Source:
    """Rows of one input, how many there are (None: unknown), and where relative paths resolve."""

    rows: Callable[[], Iterator[Row]]
    total: int | None
    root: Path
    specs: dict[str, ModalityData] = field(default_factory=dict)


def data_sides() -> dict[str, ModalityData]:
    """Every registered data side, built with its defaults (the budgets and decode training uses by default)."""
    return {name: modalities.get(name)() for name in modalities.names()}


def caption_modality(specs: dict[str, ModalityData]) -> str | None:
    """The data side whose samples are words (``natural_language``): where captions go."""
    return next((name for name, spec in specs.items() if spec.natural_language), None)


def suffix_owners(specs: dict[str, ModalityData], caption: str | None) -> dict[str, str]:
    """File extension -> the modality taking it (the caption side excluded: its files are sidecars)."""
    owners: dict[str, str] = {}
    for name, spec in specs.items():
        if name != caption:
            for ext in spec.source_suffixes():
                owners.setdefault(ext, name)
    return owners


def _suffix(value: Any) -> str:
    text = str(value).strip()
    if "://" in text:
        text = text.split("?", 1)[0]
    return Path(text).suffix.lower().lstrip(".")


# --------------------------------------------------------------------------------------------- one file


def file_source(path: Path, specs: dict[str, ModalityData]) -> Source:
    """A single source file of many samples (a FASTA file): one row per sample its data side makes of it."""
    owners = suffix_owners(specs, caption_modality(specs))
    modality = owners[_suffix(path)]
    try:
        samples = specs[modality].source_samples(path.read_bytes(), _suffix(path))
    except SampleRejected as exc:
        raise DataError(f"{path}: {exc}") from None

    def rows() -> Iterator[Row]:
        for index, sample in enumerate(samples):
            yield Row(index, {modality: sample}, caption_missing="")

    return Source(rows, len(samples), path.parent, specs)


# ----------------------------------------------------------------------------------------------- folders


class FileRef(str):
    """An absolute path of a file found in a folder (a plain string: a folder of a million files makes a
    million of these, and ``pathlib`` costs ~10x more)."""


def list_folder(folder: Path) -> list[tuple[str, int]]:
    """(path relative to ``folder``, size) of every file under it, in ``pathlib``'s order (by path parts)."""
    out = []
    for top, dirs, names in os.walk(folder):
        dirs.sort()
        rel = os.path.relpath(top, folder)
        for name in names:
            entry = os.path.join(top, name)
            try:
                st = os.stat(entry)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                out.append((name if rel == "." else f"{rel}/{name}", st.st_size))
    out.sort(key=lambda item: item[0].split("/"))
    return out


def folder_source(folder: Path, specs: dict[str, ModalityData], caption_template: str | None = None,
                  files: list[tuple[str, int]] | None = None) -> Source:
    """A folder of files grouped by name (``x.wav`` + ``x.txt`` caption + ``x.json`` metadata, any modality);
    with ``caption_template``, a class-folder layout ``folder/<class>/...`` whose caption is the template
    filled with the class name (underscores as spaces) and whose json holds ``{"label": <class>}``.
    ``files``: the folder's :func:`list_folder`, when the caller has it already."""
    caption = caption_modality(specs)
    owners = suffix_owners(specs, caption)
    caption_exts = set(specs[caption].source_suffixes()) if caption else set()
    groups: dict[str, dict[str, FileRef]] = {}
    root = str(folder)
    for rel, _ in list_folder(folder) if files is None else files:
        slash = rel.rfind("/")
        dot = rel.rfind(".")
        stem, ext = (rel[:dot], rel[dot + 1:].lower()) if dot > slash + 1 else (rel, "")
        groups.setdefault(stem, {})[ext] = FileRef(f"{root}/{rel}")
    samples = []
    for stem, found in sorted(groups.items(), key=lambda kv: kv[0].split("/")):
        primary = {ext: p for ext, p in found.items() if ext in owners}
        other = sorted(ext for ext in found if ext not in owners and ext not in caption_exts and ext != "json")
        sidecar = bool(set(found) & (caption_exts | {"json"}))
        if primary or (other and (sidecar or caption_template)):
            samples.append((stem, found, primary, other))

    def rows() -> Iterator[Row]:
        for index, (stem, found, primary, other) in enumerate(samples):
            if not primary:
                yield Row(index, {}, caption=Skip(f"unsupported format .{other[0]}"))
                continue
            cells: dict[str, Any] = {}
            for ext, path in primary.items():
                if owners[ext] in cells:
                    cells[owners[ext]] = Skip(f"several {owners[ext]} files for one sample")
                else:
                    cells[owners[ext]] = path
            if caption_template is not None:
                if "/" not in stem:
                    yield Row(index, cells, caption=Skip("file outside a class folder"))
                    continue
                label = stem.split("/", 1)[0]
                text = caption_template.replace("{}", label.replace("_", " "))
                yield Row(index, cells, caption=text, extra={"label": label})
                continue
            text_file = next((found[e] for e in caption_exts if e in found), None)
            yield Row(index, cells, caption=text_file, extra=found.get("json"))

    return Source(rows, len(samples), folder, specs)


# ------------------------------------------------------------------------------------------------ tables


def table_source(table: Path, specs: dict[str, ModalityData], columns: dict[str, str] | None = None,
                 path_column: str | None = None, caption_column: str | None = None) -> Source:
    """A CSV/TSV/Parquet/JSONL table with one column per modality (a path, or the value itself where the data
    side takes inline values); every other column goes into the sample's json."""
    suffix = table.suffix.lower()
    readers = {".csv": _read_csv, ".tsv": _read_csv, ".parquet": _read_parquet, ".pq": _read_parquet,
               ".jsonl": _read_jsonl, ".ndjson": _read_jsonl}
    if not table.is_file():
        raise DataError(f"{table}: no such table or folder")
    if suffix not in readers:
        owners = suffix_owners(specs, caption_modality(specs))
        raise DataError(f"{table}: unsupported input type {suffix!r} (use a .csv, .tsv, .parquet or .jsonl table, "
                        f"a folder, or a file of {', '.join(sorted(owners))})")
    names, records, total = readers[suffix](table)
    chosen = pick_columns(table, names, records, specs, columns or {}, path_column, caption_column)
    caption = caption_modality(specs)
    used = set(chosen.values())
    typed = _number if suffix in (".csv", ".tsv") else (lambda v: v)  # Parquet and JSON keep their own types

    def rows() -> Iterator[Row]:
        for index, record in enumerate(records()):
            extra = {k: typed(v) for k, v in record.items() if k not in used}
            cells = {m: _cell(record.get(c)) for m, c in chosen.items() if m != caption}
            text = _caption_cell(record.get(chosen[caption])) if caption in chosen else None
            yield Row(index, cells, caption=text, extra=extra, caption_missing="")

    return Source(rows, total, table.parent, specs)


def _cell(value: Any) -> Any:
    text = "" if value is None else str(value).strip()
    return text if text else Skip("empty path")


def _caption_cell(value: Any) -> Any:
    text = "" if value is None else str(value).strip()
    return text if text else Skip("empty caption")


def pick_columns(table: Path, names: list[str], records: Callable[[], Iterator[dict]],
                 specs: dict[str, ModalityData], columns: dict[str, str], path_column: str | None,
                 caption_column: str | None) -> dict[str, str]:
    """modality -> column: ``columns`` (``--column m=c``), ``--path-column``/``--caption-column``, then found by
    name (``caption``/``text``/``title``; ``<modality>``, ``<modality>_path``, ...; ``file``/``path``/``url``
    by their values' extensions) and by the extensions of a column's values."""
    caption = caption_modality(specs)
    owners = suffix_owners(specs, caption)
    chosen: dict[str, str] = {}
    for modality, column in columns.items():
        if modality not in specs:
            raise ConfigError(f"--column {modality}={column}: unknown modality {modality!r}; registered: "
                              f"{', '.join(specs)}")
        chosen[modality] = _check_column(table, names, column, modality, f"--column {modality}=...")
    if caption_column is not None and caption:
        chosen[caption] = _check_column(table, names, caption_column, "caption", "--caption-column")
    samples = _first_values(records, names)
    if path_column is not None:
        column = _check_column(table, names, path_column, "path", "--path-column")
        chosen[_owner_of(table, column, samples.get(column, []), owners)] = column
    if columns:
        return chosen
    by_lower = {c.lower(): c for c in names}
    taken = lambda c: c in chosen.values()  # noqa: E731
    for modality in specs:
        if modality in chosen:
            continue
        for suffix in _MODALITY_COLUMN_SUFFIXES:
            column = by_lower.get(f"{modality}{suffix}")
            if column is not None and not taken(column):
                chosen[modality] = column
                break
    if caption and caption not in chosen:
        column = next((by_lower[n] for n in CAPTION_COLUMNS if n in by_lower and not taken(by_lower[n])), None)
        if column is not None:
            chosen[caption] = column
    for name in PATH_COLUMNS:
        column = by_lower.get(name)
        if column is not None and not taken(column):
            owner = _owner_of(table, column, samples.get(column, []), owners, strict=False)
            if owner and owner not in chosen:
                chosen[owner] = column
    for column in names:  # any other column whose values are files some data side takes
        if not taken(column):
            owner = _owner_of(table, column, samples.get(column, []), owners, strict=False)
            if owner and owner not in chosen:
                chosen[owner] = column
    if not any(m != caption for m in chosen):
        raise DataError(f"{table}: no path column found (looked for {', '.join(PATH_COLUMNS)}, a modality's name "
                        f"and values ending in {', '.join(sorted(owners))}); available columns: "
                        f"{', '.join(names) or '(none)'}; name it with --path-column or --column MODALITY=COLUMN")
    if caption and caption not in chosen:
        raise DataError(f"{table}: no caption column found (looked for {', '.join(CAPTION_COLUMNS)}); available "
                        f"columns: {', '.join(names) or '(none)'}; name it with --caption-column")
    return chosen


def _check_column(table: Path, names: list[str], column: str, role: str, option: str) -> str:
    if column not in names:
        raise DataError(f"{table}: no {role} column {column!r} ({option}); "
                        f"available columns: {', '.join(names) or '(none)'}")
    return column


def _first_values(records: Callable[[], Iterator[dict]], names: list[str], rows: int = 50) -> dict[str, list[str]]:
    """Up to 5 non-empty string values of each column among the first ``rows`` rows."""
    out: dict[str, list[str]] = {n: [] for n in names}
    for i, record in enumerate(records()):
        if i >= rows:
            break
        for name, value in record.items():
            if isinstance(value, str) and value.strip() and len(out.setdefault(name, [])) < 5:
                out[name].append(value)
    return out


def _owner_of(table: Path, column: str, values: list[str], owners: dict[str, str], strict: bool = True) -> str | None:
    """The modality whose files a column's values name (by extension)."""
    for value in values:
        owner = owners.get(_suffix(value))
        if owner:
            return owner
    if not strict:
        return None
    shown = ", ".join(repr(v) for v in values[:2]) or "no values"
    raise DataError(f"{table}: column {column!r} ({shown}) names no file a data side takes "
                    f"({', '.join(sorted(owners))}); name its modality with --column MODALITY={column}")


_INT = re.compile(r"-?(0|[1-9][0-9]*)")
_FLOAT = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?|-?\.[0-9]+([eE][-+]?[0-9]+)?")


def _number(value: Any) -> Any:
    """A CSV cell as int or float when it is written as one; anything else (``007``, ``nan``, ``""``) as is."""
    if not isinstance(value, str):
        return value
    if _INT.fullmatch(value):
        return int(value)
    return float(value) if _FLOAT.fullmatch(value) else value


def _read_csv(table: Path) -> tuple[list[str], Callable[[], Iterator[dict]], int]:
    delimiter = "\t" if table.suffix.lower() == ".tsv" else ","

    def records() -> Iterator[dict]:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark that would rename column 1.
        with open(table, newline="", encoding="utf-8-sig") as f:
            yield from csv.DictReader(f, delimiter=delimiter)

    with open(table, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, [])
        total = sum(1 for _ in reader)
    return header, records, total


def _read_jsonl(table: Path) -> tuple[list[str], Callable[[], Iterator[dict]], int]:
    def records() -> Iterator[dict]:
        with open(table, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        record = None
                    # A broken line still yields a row, so it is counted as skipped and keys stay row numbers.
                    yield record if isinstance(record, dict) else {}

    columns: list[str] = []
    total = 0
    for record in records():
        for name in record:
            if name not in columns:
                columns.append(name)
        total += 1
    return columns, records, total


def _read_parquet(table: Path) -> tuple[list[str], Callable[[], Iterator[dict]], int]:
    import pyarrow.parquet as pq

    def records() -> Iterator[dict]:
        with pq.ParquetFile(table) as file:
            for batch in file.iter_batches(batch_size=1024):
                yield from batch.to_pylist()

    return list(pq.read_schema(table).names), records, pq.read_metadata(table).num_rows


__all__ = ["CAPTION_COLUMNS", "PATH_COLUMNS", "TABLE_SUFFIXES", "FileRef", "Row", "Skip", "Source", "SourceSample",
           "caption_modality", "data_sides", "file_source", "folder_source", "list_folder", "pick_columns", "suffix_owners",
           "table_source"]
