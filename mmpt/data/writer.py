"""Write WebDataset shards: a deterministic, crash-safe tar writer and ``mmpt data write``'s converter.

``ShardWriter`` appends samples (``key.ext`` members) to numbered tars and rolls to the next one at a
size or count limit. ``write_shards`` turns what users have (tables with a column per modality, folders
with sidecar captions, class folders, FASTA files: :mod:`mmpt.data.sources`) into such shards, any
registered modality, validating each sample with the loader's own decode and budget
(:mod:`mmpt.data.write_samples`) in worker processes; what fails is skipped and counted per reason with
its first keys; writing nothing at all is a DataError naming the input and the reasons. A re-run skips
the samples of the shards already finished, so an interrupted run resumes without duplicating a key.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mmpt.data.shards import DataError
from mmpt.data.sources import (
    TABLE_SUFFIXES,
    Row,
    Source,
    caption_modality,
    data_sides,
    file_source,
    folder_source,
    list_folder,
    suffix_owners,
    table_source,
)
from mmpt.data.write_samples import Plan, Result, build_row
from mmpt.registry import ConfigError

# Python's tarfile pads every archive to a multiple of its record size and ends it with two zero blocks.
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_END = 2 * _BLOCK

# Rows handed to a worker process at once, and the most samples a skip reason names.
_CHUNK = 64
_FIRST_KEYS = 3


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def member_header(name: str, size: int) -> bytes:
    """The tar header of a regular member (mode 0o444, mtime 0, uid/gid 0, no owner names), byte for byte what
    ``tarfile`` writes in PAX format: built directly for short ASCII names (tarfile's own header code was ~a
    third of writing small samples), by tarfile for the rest (a pax header carries a long or non-ASCII name)."""
    if len(name) > 100 or not name.isascii() or size >= 8**11:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid = size, 0, 0o444, 0, 0
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    head = bytearray(_HEADER)
    head[:len(name)] = name.encode("ascii")
    head[124:136] = b"%011o\0" % size
    head[148:155] = b"%06o\0" % sum(head)  # checksum over the header with its own field as spaces
    return bytes(head)


def _header_template() -> bytes:
    """A regular member's header with an empty name, size 0 and the checksum field as spaces."""
    info = tarfile.TarInfo("")
    info.size, info.mtime, info.mode, info.uid, info.gid = 0, 0, 0o444, 0, 0
    head = bytearray(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
    head[148:156] = b" " * 8
    return bytes(head)


_HEADER = _header_template()


class ShardWriter:
    """Write samples to ``pattern % index`` tars, each at most ``max_size`` bytes and ``max_count`` samples.

    Output is byte-deterministic (mtime 0, uid/gid 0, mode 0o444, empty owner names). Each shard is
    written to ``<name>.tmp`` and renamed when complete, so an interrupted run never leaves a partial
    shard under a final name; on an exception inside ``with`` the unfinished shard is deleted.
    """

    def __init__(self, pattern: str, max_size: int = 256 << 20, max_count: int = 10000, first_index: int = 0):
        self.check_pattern(pattern)
        self.first_index = first_index
        if max_count < 1 or max_size < 1:
            raise ValueError(f"max_count and max_size must be positive, got {max_count} and {max_size}")
        self.pattern = pattern
        self.max_size = max_size
        self.max_count = max_count
        self._shards: list[Path] = []
        self._file: io.BufferedWriter | None = None
        self._offset = 0  # bytes written to the current shard
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
        if self._file is not None and (self._count >= self.max_count or self._final_size(self._offset + size) > self.max_size):
            self._finish()
        if self._file is None:
            self._start()
        assert self._file is not None
        for ext, data in payload:
            header = member_header(f"{key}.{ext}", len(data))
            self._file.write(header)
            self._file.write(data)
            pad = -len(data) % _BLOCK
            if pad:
                self._file.write(b"\0" * pad)
            self._offset += len(header) + len(data) + pad
        self._count += 1
        self._last_key = key

    def close(self) -> None:
        """Finish the current shard (rename it to its final name)."""
        if self._file is not None:
            self._finish()

    def abort(self) -> None:
        """Drop the unfinished shard without renaming it; completed shards stay."""
        if self._file is not None:
            self._file.close()
            self._path.with_name(self._path.name + ".tmp").unlink(missing_ok=True)
            self._file = None

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
        self._path = Path(self.pattern % (self.first_index + len(self._shards)))
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._path.with_name(self._path.name + ".tmp"), "wb")
        self._offset = 0
        self._count = 0

    def _finish(self) -> None:
        # what tarfile.close() writes: two zero blocks, then zeros up to a whole record
        self._file.write(b"\0" * (self._final_size(self._offset) - self._offset))
        self._file.close()
        os.replace(self._path.with_name(self._path.name + ".tmp"), self._path)
        self._shards.append(self._path)
        self._file = None


@dataclass
class WriteSummary:
    """What ``write_shards`` did: samples written, samples skipped per reason (with their first keys), every
    shard of the output (finished earlier and now), and how many samples earlier runs had written."""

    written: int
    skipped: dict[str, int] = field(default_factory=dict)
    shards: list[Path] = field(default_factory=list)
    first_keys: dict[str, list[str]] = field(default_factory=dict)
    resumed: int = 0

    @property
    def total_skipped(self) -> int:
        """Samples skipped for any reason."""
        return sum(self.skipped.values())

    def headline(self) -> str:
        """The first line: samples written, shards, where, how many skipped."""
        where = f" in {self.shards[0].parent}" if self.shards else ""
        text = f"wrote {self.written} samples to {len(self.shards)} shard(s){where}"
        if self.resumed:
            text += f" ({self.resumed} of them by an earlier run: its finished shards were kept)"
        if self.skipped:
            text += f"; skipped {self.total_skipped}"
        return text

    def reason_lines(self) -> list[str]:
        """One line per skip reason, most frequent first: count and the first keys."""
        return [f"  skipped {reason}: {n} (first: {', '.join(self.first_keys.get(reason, []))})"
                for reason, n in self.skipped.items()]

    def one_line(self) -> str:
        """Everything on one line (for an error message)."""
        if not self.skipped:
            return self.headline()
        reasons = ", ".join(f"{reason}: {n} [first: {', '.join(self.first_keys.get(reason, []))}]"
                            for reason, n in self.skipped.items())
        return f"{self.headline()} ({reasons})"

    def __str__(self) -> str:
        return "\n".join([self.headline(), *self.reason_lines()])


def write_shards(
    table: str | Path,
    out_pattern: str,
    *,
    path_column: str | None = None,
    caption_column: str | None = None,
    columns: Mapping[str, str] | None = None,
    caption_template: str | None = None,
    key_prefix: str | None = None,
    max_size: int = 256 << 20,
    max_count: int = 10000,
    workers: int | None = None,
    progress: bool = True,
) -> WriteSummary:
    """Convert a table, a folder or a many-sample file (FASTA) into WebDataset shards, any registered modality.

    ``table``: a CSV/TSV/Parquet/JSONL table with one column per modality holding a file path (relative paths
    resolve next to the table) or, where the data side takes one (text, protein), the value itself; columns
    are set with ``columns`` (``{"image": "img_path", "audio": "wav", "text": "caption"}``) or
    ``path_column``/``caption_column``, or found by name and by the extensions of their values. Or a folder
    whose files are grouped by name (``x.wav`` + ``x.txt`` caption + ``x.json`` metadata, verbatim); with
    ``caption_template`` (``"a photo of a {}"``) a class-folder layout ``folder/<class>/file``, whose json
    holds ``{"label": <class>}``. Or a FASTA file: one sample per record, the header's description as the
    caption, ``{"id", "description"}`` as json. Each file becomes members as its data side says
    (``ModalityData.source_samples``: PLY becomes ``npy``, an image is named by its bytes) and is decoded as
    the loader will, under the same byte budget. The ``json`` member of a table row holds every other
    column (CSV numbers as numbers: ``"8"`` -> 8, ``"0.5"`` -> 0.5; ``"007"`` stays a string).

    Keys are ``<key_prefix><row number, 9 digits>`` (``_<record, 6 digits>`` appended for each record of a
    many-sample file in a folder); the default prefix is the input's name plus a hash of its absolute path
    and content (``train-1a2b3c4d_000000012``), so inputs written separately never collide, the same input
    rewritten gets the same keys, and a key leads back to its row; ``key_prefix=""`` gives bare row numbers.
    Shards already finished under ``out_pattern`` (by an interrupted run) are kept and their keys not written
    again. ``workers`` processes validate samples (default: one fewer than the CPUs, at most 8; 0 or 1: none). Rows that cannot be
    used are skipped and counted; writing no sample at all raises DataError naming the input and the reasons.
    """
    from tqdm import tqdm

    ShardWriter.check_pattern(out_pattern)
    table = Path(table).expanduser().absolute()  # relative folders: rglob results already carry the root
    files = list_folder(table) if table.is_dir() else None
    prefix = _key_prefix(table, key_prefix, files)
    source = _source(table, path_column, caption_column, columns, caption_template, files)
    plan = Plan(source.specs, caption_modality(source.specs), source.root, prefix)
    finished, done = _finished_shards(out_pattern, prefix)
    skipped: Counter[str] = Counter()
    first_keys: dict[str, list[str]] = {}
    written = resumed = 0
    with ShardWriter(out_pattern, max_size=max_size, max_count=max_count, first_index=len(finished)) as writer, \
            tqdm(total=source.total, disable=not progress, unit="sample", desc="writing shards") as bar:
        for results in _results(source, plan, done, workers):
            for key, members, reason in results:
                if key in done:
                    resumed += 1
                elif members is None:
                    skipped[reason] += 1
                    keys = first_keys.setdefault(reason, [])
                    if len(keys) < _FIRST_KEYS:
                        keys.append(key)
                else:
                    writer.write(key, members)
                    written += 1
            bar.update()
            if skipped and bar.n % 256 == 0:
                bar.set_postfix(skipped=sum(skipped.values()), refresh=False)
    summary = WriteSummary(written + resumed, dict(skipped.most_common()), finished + writer.shards, first_keys,
                           resumed)
    if not written + resumed:
        raise DataError(f"{table}: {summary.one_line()}: nothing to write"
                        + ("" if skipped else " (no rows or files found)") + _hint(skipped, table, caption_template))
    return summary


def _hint(skipped: Counter[str], table: Path, caption_template: str | None) -> str:
    """A class-folder layout written without a template lacks every caption file: say what to pass."""
    if table.is_dir() and caption_template is None and skipped.get("missing caption file") == sum(skipped.values()):
        return "; for class folders (<folder>/<class>/<file>) pass --caption-template 'a photo of a {}'"
    return ""


def _source(table: Path, path_column: str | None, caption_column: str | None, columns: Mapping[str, str] | None,
            caption_template: str | None, files: list[tuple[str, int]] | None) -> Source:
    specs = data_sides()
    if table.is_dir():
        if path_column or caption_column or columns:
            raise ConfigError(f"{table} is a folder: --path-column/--caption-column/--column apply only to tables")
        return folder_source(table, specs, caption_template, files)
    if caption_template is not None:
        raise ConfigError(f"{table}: --caption-template applies to class folders (<folder>/<class>/<file>)")
    suffix = table.suffix.lower()
    if suffix not in TABLE_SUFFIXES and suffix.lstrip(".") in suffix_owners(specs, caption_modality(specs)):
        if path_column or caption_column or columns:
            raise ConfigError(f"{table} is a {suffix} file: --path-column/--caption-column/--column apply only to "
                              f"tables")
        return file_source(table, specs)
    return table_source(table, specs, dict(columns or {}), path_column, caption_column)


def _finished_shards(pattern: str, prefix: str) -> tuple[list[Path], set[str]]:
    """The shards an earlier run finished under ``pattern`` (indices 0, 1, ... while they exist) and their keys;
    refuses shards holding keys of another input."""
    shards: list[Path] = []
    keys: set[str] = set()
    while (path := Path(pattern % len(shards))).is_file():
        try:
            with tarfile.open(path) as tar:
                names = tar.getnames()
        except (tarfile.TarError, OSError) as exc:
            raise DataError(f"{path}: an existing shard that does not read ({exc}); remove it to rewrite it") from None
        found = {os.path.basename(n).split(".", 1)[0] for n in names}
        other = sorted(k for k in found if not k.startswith(prefix))
        if other:
            raise DataError(f"{path}: holds key {other[0]!r}, not from this input (its keys start {prefix!r}); "
                            f"write to another --out or remove those shards")
        keys |= found
        shards.append(path)
    return shards, keys


_PLAN: Plan | None = None  # the plan a forked worker inherits


def _build_chunk(rows: list[Row]) -> list[list[Result]]:
    assert _PLAN is not None
    return [build_row(row, _PLAN) for row in rows]


def _results(source: Source, plan: Plan, done: set[str], workers: int | None) -> Iterator[list[Result]]:
    """Each row's results in row order; rows whose key an earlier run wrote are not read again (their result
    is that key alone, with no members). Rows are built in ``workers`` forked processes, in chunks."""
    rows: Iterable[Row] = source.rows()
    # the main process reads rows and writes tars on a core of its own; with 2 CPUs, in-process was faster
    # (bench/write_throughput.py: 2502 vs 2200 samples/s)
    workers = min((os.cpu_count() or 1) - 1, 8) if workers is None else workers
    if workers <= 1 or (source.total is not None and source.total < 4 * _CHUNK):
        for row in rows:
            yield _done(row, plan, done) or build_row(row, plan)
        return
    import concurrent.futures as cf
    import multiprocessing as mp

    global _PLAN
    _PLAN = plan
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
        pending: deque = deque()
        for chunk in _chunks(rows, plan, done):
            pending.append(pool.submit(_build_chunk, chunk) if isinstance(chunk, list) else chunk)
            while len(pending) > 4 * workers or (pending and not isinstance(pending[0], cf.Future)):
                head = pending.popleft()
                yield from head.result() if isinstance(head, cf.Future) else [head]
        while pending:
            head = pending.popleft()
            yield from head.result() if isinstance(head, cf.Future) else [head]


def _done(row: Row, plan: Plan, done: set[str]) -> list[Result] | None:
    key = plan.key(row)
    return [(key, None, None)] if key in done else None


def _chunks(rows: Iterable[Row], plan: Plan, done: set[str]) -> Iterator[list[Row] | list[Result]]:
    """Rows to build, in chunks; a row an earlier run wrote comes alone as its finished result, in order."""
    chunk: list[Row] = []
    for row in rows:
        finished = _done(row, plan, done)
        if finished is None:
            chunk.append(row)
            if len(chunk) == _CHUNK:
                yield chunk
                chunk = []
            continue
        if chunk:
            yield chunk
            chunk = []
        yield finished
    if chunk:
        yield chunk


def _key_prefix(table: Path, key_prefix: str | None, files: list[tuple[str, int]] | None = None) -> str:
    """The given prefix (checked), or ``<input name>-<8 hex digits>_`` hashing the input's absolute path and
    content: two inputs differ in one or the other (equal tables elsewhere may name other files)."""
    if key_prefix is not None:
        if "." in key_prefix or "/" in key_prefix:
            raise ConfigError(f"--key-prefix {key_prefix!r}: must not contain '.' or '/' (webdataset splits "
                              f"keys at the first dot of the file name)")
        return key_prefix
    if not table.exists():
        raise DataError(f"{table}: no such table, folder or file")
    digest = hashlib.sha1(f"{table}\0".encode())
    if table.is_dir():  # names and sizes: the same folder written twice gets the same keys
        for rel, size in list_folder(table) if files is None else files:
            digest.update(f"{rel}\0{size}\0".encode())
    else:
        with open(table, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", table.name.split(".")[0]) or "data"
    return f"{name}-{digest.hexdigest()[:8]}_"
