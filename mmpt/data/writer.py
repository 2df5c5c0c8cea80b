"""Write WebDataset shards: a deterministic, crash-safe tar writer and ``mmpt data write``'s converter.

``ShardWriter`` appends samples (``key.ext`` members) to numbered tars and rolls to the next one at a
size or count limit. ``write_shards`` turns a table of (image path, caption) rows, or a folder of
images with sidecar captions, into such shards, skipping and counting what it cannot read; writing
nothing at all is a DataError naming the input and the reasons.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmpt.data.shards import DataError
from mmpt.registry import ConfigError

# Python's tarfile pads every archive to a multiple of its record size and ends it with two zero blocks.
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_END = 2 * _BLOCK

PATH_COLUMNS = ("file", "path", "filepath", "file_path", "image", "image_path", "url")
CAPTION_COLUMNS = ("caption", "text", "title")

# Image formats stored as-is, keyed by their leading bytes; the member extension follows the bytes,
# not the file name, so a PNG saved as x.jpg is still decoded correctly.
_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"))
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_OTHER_IMAGE_SUFFIXES = (".gif", ".bmp", ".tif", ".tiff", ".avif", ".heic")


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


class ShardWriter:
    """Write samples to ``pattern % index`` tars, each at most ``max_size`` bytes and ``max_count`` samples.

    Output is byte-deterministic (mtime 0, uid/gid 0, mode 0o444, empty owner names). Each shard is
    written to ``<name>.tmp`` and renamed when complete, so an interrupted run never leaves a partial
    shard under a final name; on an exception inside ``with`` the unfinished shard is deleted.
    """

    def __init__(self, pattern: str, max_size: int = 256 << 20, max_count: int = 10000):
        self.check_pattern(pattern)
        if max_count < 1 or max_size < 1:
            raise ValueError(f"max_count and max_size must be positive, got {max_count} and {max_size}")
        self.pattern = pattern
        self.max_size = max_size
        self.max_count = max_count
        self._shards: list[Path] = []
        self._file: io.BufferedWriter | None = None
        self._tar: tarfile.TarFile | None = None
        self._path: Path | None = None
        self._count = 0
        self._last_key: str | None = None

    @staticmethod
    def check_pattern(pattern: str) -> None:
        """Raise ConfigError unless ``pattern % index`` names a different file for each shard index."""
        try:
            if pattern % 0 == pattern % 1:
                raise TypeError
        except TypeError:
            raise ConfigError(f"shard pattern {pattern!r} needs a %-format for the shard index, "
                              f"e.g. 'out/train-%06d.tar'") from None

    @property
    def shards(self) -> list[Path]:
        """Paths of the shards completed so far, in order."""
        return list(self._shards)

    def write(self, key: str, members: Mapping[str, bytes | str]) -> None:
        """Append one sample: a member ``key.ext`` per item of ``members`` (str values are UTF-8 encoded)."""
        payload = [(ext, data.encode("utf-8") if isinstance(data, str) else bytes(data)) for ext, data in members.items()]
        self._check(key, payload)
        # Exact for short ASCII names; a pax header for a long name adds a block or two, which a soft
        # size limit can ignore.
        size = sum(_BLOCK + _padded(len(data)) for _, data in payload)
        if self._tar is not None and (self._count >= self.max_count or self._final_size(self._tar.offset + size) > self.max_size):
            self._finish()
        if self._tar is None:
            self._start()
        assert self._tar is not None
        for ext, data in payload:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o444, 0, 0
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._last_key = key

    def close(self) -> None:
        """Finish the current shard (rename it to its final name)."""
        if self._tar is not None:
            self._finish()

    def abort(self) -> None:
        """Drop the unfinished shard without renaming it; completed shards stay."""
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            self._path.with_name(self._path.name + ".tmp").unlink(missing_ok=True)
            self._tar = self._file = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _check(self, key: str, payload: list[tuple[str, bytes]]) -> None:
        # webdataset cuts the key at the first dot of the basename: "a.b" + "jpg" would read back as
        # key "a", extension "b.jpg".
        if not key or "." in os.path.basename(key):
            raise ValueError(f"sample key {key!r} must be non-empty and contain no '.' (webdataset splits keys at the first dot)")
        if key == self._last_key:
            raise ValueError(f"sample key {key!r} written twice in a row: the reader would merge the two samples")
        if not payload:
            raise ValueError(f"sample {key!r} has no members")
        for ext, _ in payload:
            if not ext or "/" in ext:
                raise ValueError(f"sample {key!r}: bad member extension {ext!r}")

    @staticmethod
    def _final_size(offset: int) -> int:
        return -(-(offset + _END) // _RECORD) * _RECORD

    def _start(self) -> None:
        self._path = Path(self.pattern % len(self._shards))
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._path.with_name(self._path.name + ".tmp"), "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._count = 0

    def _finish(self) -> None:
        self._tar.close()
        self._file.close()
        os.replace(self._path.with_name(self._path.name + ".tmp"), self._path)
        self._shards.append(self._path)
        self._tar = self._file = None


@dataclass
class WriteSummary:
    """What ``write_shards`` did: samples written, rows skipped per reason, shard paths."""

    written: int
    skipped: dict[str, int] = field(default_factory=dict)
    shards: list[Path] = field(default_factory=list)

    @property
    def total_skipped(self) -> int:
        """Rows skipped for any reason."""
        return sum(self.skipped.values())

    def __str__(self) -> str:
        where = f" in {self.shards[0].parent}" if self.shards else ""
        text = f"wrote {self.written} samples to {len(self.shards)} shard(s){where}"
        if self.skipped:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in self.skipped.items())
            text += f"; skipped {self.total_skipped} ({reasons})"
        return text


class _Skip(Exception):
    """A row that cannot become a sample; the message is the reason it is counted under."""


@dataclass
class _Source:
    """Rows of (index, path, caption, extra columns), with where relative paths resolve."""

    rows: Callable[[], Iterator[tuple[int, Any, Any, dict]]]
    total: int | None
    root: Path


def write_shards(
    table: str | Path,
    out_pattern: str,
    *,
    path_column: str | None = None,
    caption_column: str | None = None,
    key_prefix: str | None = None,
    max_size: int = 256 << 20,
    max_count: int = 10000,
    progress: bool = True,
) -> WriteSummary:
    """Convert a table or an image folder to WebDataset shards with ``jpg|png|webp``, ``txt`` and ``json`` members.

    ``table``: a CSV/TSV/Parquet/JSONL table of (image path, caption) rows (columns found by name or
    set with ``path_column``/``caption_column``; relative paths resolve next to the table), or a
    folder of images with sidecar ``.txt`` captions. The ``json`` member holds every other column of
    the row (CSV values that read as numbers are stored as numbers: ``"8"`` -> 8, ``"0.5"`` -> 0.5;
    ``"007"`` stays a string) or, for a folder, the image's sidecar ``.json`` verbatim. Keys are
    ``<key_prefix><row number, 9 digits>``: the default prefix is the input's name plus a hash of its
    absolute path and content (``train-1a2b3c4d_000000012``), so tables written separately never
    collide, the same input rewritten gets the same keys, and a key leads back to its row; pass
    ``key_prefix=""`` for bare row numbers. Rows that cannot be read are
    skipped and counted; writing no sample at all raises DataError naming the input and the reasons.
    """
    from tqdm import tqdm

    ShardWriter.check_pattern(out_pattern)
    table = Path(table).expanduser().absolute()  # relative folders: rglob results already carry the root
    prefix = _key_prefix(table, key_prefix)
    if table.is_dir():
        if path_column or caption_column:
            raise ConfigError(f"{table} is an image folder: --path-column/--caption-column apply only to tables")
        source = _folder_source(table)
    else:
        source = _table_source(table, path_column, caption_column)
    skipped: Counter[str] = Counter()
    written = 0
    with ShardWriter(out_pattern, max_size=max_size, max_count=max_count) as writer, \
            tqdm(total=source.total, disable=not progress, unit="sample", desc="writing shards") as bar:
        for index, path, caption, extra in source.rows():
            try:
                members = _members(path, caption, extra, source.root)
            except _Skip as skip:
                skipped[str(skip)] += 1
            else:
                # Keys end in the row number, so a key leads back to its row and skipped rows leave gaps.
                writer.write(f"{prefix}{index:09d}", members)
                written += 1
            bar.update()
            if skipped and bar.n % 256 == 0:
                bar.set_postfix(skipped=sum(skipped.values()), refresh=False)
    summary = WriteSummary(written, dict(skipped.most_common()), writer.shards)
    if not written:
        raise DataError(f"{table}: {summary}: nothing to write"
                        + ("" if skipped else " (no rows or images found)"))
    return summary


def _key_prefix(table: Path, key_prefix: str | None) -> str:
    """The given prefix (checked), or ``<input name>-<8 hex digits>_`` hashing the input's absolute path and
    content: two inputs differ in one or the other (equal tables elsewhere may name other images)."""
    if key_prefix is not None:
        if "." in key_prefix or "/" in key_prefix:
            raise ConfigError(f"--key-prefix {key_prefix!r}: must not contain '.' or '/' (webdataset splits "
                              f"keys at the first dot of the file name)")
        return key_prefix
    if not table.exists():
        raise DataError(f"{table}: no such table or image folder")
    digest = hashlib.sha1(f"{table}\0".encode())
    if table.is_dir():  # names and sizes: the same folder written twice gets the same keys
        for p in sorted(table.rglob("*")):
            if p.is_file():
                digest.update(f"{p.relative_to(table)}\0{p.stat().st_size}\0".encode())
    else:
        with open(table, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", table.name.split(".")[0]) or "data"
    return f"{name}-{digest.hexdigest()[:8]}_"


def _members(path: Any, caption: Any, extra: dict | bytes, root: Path) -> dict[str, bytes]:
    if isinstance(caption, _Skip):  # the source already knows why this row cannot be used
        raise caption
    caption = "" if caption is None else str(caption).strip()
    if not caption:
        raise _Skip("empty caption")
    data = _read_image(path, root)
    members = {_image_ext(data): data, "txt": caption.encode("utf-8")}
    if isinstance(extra, bytes):  # a folder sample's sidecar .json, kept verbatim
        members["json"] = extra
    elif extra:
        members["json"] = json.dumps(extra, ensure_ascii=False, sort_keys=True, default=str).encode("utf-8")
    return members


def _read_image(path: Any, root: Path) -> bytes:
    text = "" if path is None else str(path).strip()
    if not text:
        raise _Skip("empty path")
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text:
        raise _Skip("remote url (download first)")
    file = root / Path(text).expanduser()
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise _Skip("missing file") from None
    except OSError:
        raise _Skip("unreadable file") from None
    if not data:
        raise _Skip("empty file")
    return data


def _image_ext(data: bytes) -> str:
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise _Skip("not a jpg/png/webp image")


def _table_source(table: Path, path_column: str | None, caption_column: str | None) -> _Source:
    suffix = table.suffix.lower()
    readers = {".csv": _read_csv, ".tsv": _read_csv, ".parquet": _read_parquet, ".pq": _read_parquet,
               ".jsonl": _read_jsonl, ".ndjson": _read_jsonl}
    if not table.is_file():
        raise DataError(f"{table}: no such table or image folder")
    if suffix not in readers:
        raise DataError(f"{table}: unsupported table type {suffix!r} "
                        f"(use .csv, .tsv, .parquet, .jsonl or an image folder)")
    columns, records, total = readers[suffix](table)
    path_col = _pick_column(table, columns, path_column, PATH_COLUMNS, "path", "--path-column")
    caption_col = _pick_column(table, columns, caption_column, CAPTION_COLUMNS, "caption", "--caption-column")
    typed = _number if suffix in (".csv", ".tsv") else (lambda v: v)  # Parquet and JSON keep their own types

    def rows() -> Iterator[tuple[int, Any, Any, dict]]:
        for index, record in enumerate(records()):
            extra = {k: typed(v) for k, v in record.items() if k not in (path_col, caption_col)}
            yield index, record.get(path_col), record.get(caption_col), extra

    return _Source(rows, total, table.parent)


def _pick_column(table: Path, columns: list[str], wanted: str | None, candidates: tuple[str, ...], role: str,
                 option: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{table}: no {role} column {wanted!r} ({option}); "
                            f"available columns: {', '.join(columns) or '(none)'}")
        return wanted
    by_lower = {c.lower(): c for c in columns}
    for name in candidates:
        if name in by_lower:
            return by_lower[name]
    raise DataError(f"{table}: no {role} column found (looked for {', '.join(candidates)}); "
                    f"available columns: {', '.join(columns) or '(none)'}; name it with {option}")


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
        if not columns:
            columns = list(record)
        total += 1
    return columns, records, total


def _read_parquet(table: Path) -> tuple[list[str], Callable[[], Iterator[dict]], int]:
    import pyarrow.parquet as pq

    def records() -> Iterator[dict]:
        with pq.ParquetFile(table) as file:
            for batch in file.iter_batches(batch_size=1024):
                yield from batch.to_pylist()

    return list(pq.read_schema(table).names), records, pq.read_metadata(table).num_rows


def _folder_source(folder: Path) -> _Source:
    suffixes = IMAGE_SUFFIXES + _OTHER_IMAGE_SUFFIXES
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes and p.is_file())

    def rows() -> Iterator[tuple[int, Any, Any, dict | bytes]]:
        for index, image in enumerate(images):
            if image.suffix.lower() not in IMAGE_SUFFIXES:
                yield index, image, _Skip(f"unsupported format {image.suffix.lower()}"), {}
                continue
            caption = _read_sidecar(image.with_suffix(".txt"))
            meta = image.with_suffix(".json")
            yield index, image, caption, meta.read_bytes() if meta.is_file() else {}

    return _Source(rows, len(images), folder)


def _read_sidecar(path: Path) -> str | _Skip:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return _Skip("missing caption file")
    except (OSError, UnicodeDecodeError):
        return _Skip("unreadable caption file")
