"""Shard lists: expand patterns, split across ranks and DataLoader workers, read tar members.

Reading is done here (not by webdataset's pipeline stages) so every failure is attributed to a
reason and counted: a truncated tar ends its shard, a bad member skips its sample, nothing crashes.
``webdataset.gopen`` opens the stream, so local paths, ``pipe:`` and the URL schemes webdataset
knows all work.
"""

from __future__ import annotations

import glob
import os
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mmpt.registry import ConfigError


class DataError(ConfigError):
    """A data source cannot be used (empty pattern, unreadable file); the message names it."""


def expand_urls(pattern: str) -> list[str]:
    """Expand brace lists (``a-{000..009}.tar``), ``::``-separated lists and local globs."""
    import braceexpand

    urls: list[str] = []
    for part in pattern.split("::"):
        for item in braceexpand.braceexpand(part.strip()):
            if item.startswith("pipe:") or "://" in item:
                urls.append(item)
            elif any(c in item for c in "*?["):
                urls.extend(sorted(glob.glob(item)))
            elif os.path.isdir(item):
                urls.extend(sorted(glob.glob(os.path.join(item, "*.tar"))))
            else:
                urls.append(item)
    if not urls:
        raise DataError(f"no shards match {pattern!r} (expected a path, glob, brace list or pipe: URL)")
    missing = [u for u in urls if not (u.startswith("pipe:") or "://" in u) and not os.path.exists(u)]
    if missing:
        raise DataError(f"shard {missing[0]!r} from pattern {pattern!r} does not exist ({len(missing)} missing)")
    return urls


def split_key(name: str) -> tuple[str, str]:
    """webdataset's convention: key = path up to the first dot of the basename; ext = the rest."""
    dirname, base = os.path.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return os.path.join(dirname, stem), ext.lower()


SHARD_REASONS = ("unreadable_shard", "truncated_shard")
"""Reasons of :class:`ShardEvent`: problems of a whole shard, counted per shard, never as samples."""

CUT_REASON = "cut_by_truncation"
"""Skip reason of the sample a truncation cuts through (see :func:`iter_samples`)."""


@dataclass
class ShardEvent:
    """A problem found while reading a shard (yielded instead of a sample, then counted)."""

    reason: str
    url: str


def iter_samples(url: str) -> Iterator[dict | ShardEvent]:
    """Yield samples ``{"__key__", "__url__", ext: bytes}`` of one shard, grouping members by key.

    Yields a ShardEvent ('unreadable_shard', 'truncated_shard') instead of raising. A sample is complete
    once a member of another key begins (webdataset keeps a key's members together) or the archive ends
    cleanly, so a truncated tar still yields every sample completed before the cut. The sample the cut
    falls in (some members may be lost, even if those read are whole) is yielded as
    ``{"__key__", "__url__", "__cut__": True}`` so the loader counts it as skipped (``cut_by_truncation``)
    when it consumes it, then the ShardEvent follows.
    """
    import webdataset as wds

    try:
        stream = _CountingReader(wds.gopen(url))
    except Exception:
        yield ShardEvent("unreadable_shard", url)
        return
    current: dict | None = None
    seen_any = False
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                seen_any = True
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                if not ext or key.startswith("__"):
                    continue
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current  # complete before this member is read: a cut inside it cannot lose it
                    current = {"__key__": key, "__url__": url}
                f = tar.extractfile(member)
                data = f.read() if f is not None else b""
                if len(data) != member.size:
                    raise EOFError("member cut short")
                current[ext] = data
            # tarfile treats a header cut short as a clean end; a real end has a zero block after it
            while tar.fileobj.read(1 << 16):
                pass
            if tar.fileobj.pos < tar.offset + tarfile.BLOCKSIZE:
                partial = stream.tail[len(stream.tail) - (tar.fileobj.pos - tar.offset):]
                if current is not None and stream.count == tar.fileobj.pos and _ends_sample(partial, current):
                    yield current
                    current = None
                raise EOFError("archive ends without an end-of-archive block")
        if current is not None:
            yield current
    except (tarfile.TarError, EOFError, OSError, ValueError):
        if current is not None:
            yield {"__key__": current["__key__"], "__url__": url, "__cut__": True}
        yield ShardEvent("truncated_shard" if seen_any else "unreadable_shard", url)
    finally:
        close = getattr(stream, "close", None)
        if close:
            try:
                close()
            except Exception:  # a pipe: whose process failed; already counted
                pass


def _ends_sample(partial: bytes, current: dict) -> bool:
    """Whether the partial header block a tar breaks off in proves ``current`` complete: a cut inside
    the zero end-of-archive blocks, or inside the header of a member of another key. An empty or
    unnamed block, or a pax/GNU extension header (whose member is unknown), proves nothing."""
    if partial and not partial.strip(b"\0"):
        return True
    name, nul, _ = partial[:100].partition(b"\0")
    if not (nul or len(partial) >= 100) or not name or name.startswith(b"././@"):
        return False
    return split_key(name.decode("utf-8", "replace"))[0] != current["__key__"]


class _CountingReader:
    """File-like wrapper counting the bytes read and keeping the last few (to tell a truncated tar
    from a complete one, and where it broke off)."""

    def __init__(self, raw: Any):
        self.raw = raw
        self.count = 0
        self.tail = b""

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.count += len(data)
        self.tail = data[-1024:] if len(data) >= 1024 else (self.tail + data)[-1024:]
        return data

    def close(self) -> None:
        self.raw.close()


def count_samples(urls: list[str]) -> int:
    """Count samples (distinct consecutive keys) of local shards by reading tar headers only.

    A truncated shard counts the samples before the cut. A shard with no readable member (not a tar,
    empty) counts 0 and is named in a warning; if no shard is readable it is a DataError naming them.
    """
    total, unreadable = 0, []
    for url in urls:
        if url.startswith("pipe:") or "://" in url:
            raise DataError(f"cannot count samples of {url!r}: set data.samples_per_epoch")
        n, readable = _count_members(url)
        total += n
        if not readable:
            unreadable.append(url)
    if unreadable:
        names = ", ".join(unreadable[:3]) + (f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else "")
        message = f"{len(unreadable)} of {len(urls)} shard(s) are unreadable (not a tar archive, or empty): {names}"
        if len(unreadable) == len(urls):
            raise DataError(f"data.sources: {message}")
        warnings.warn(f"mmpt: {message}; training skips them", stacklevel=2)
    return total


def _count_members(url: str) -> tuple[int, bool]:
    """(samples, whether any member could be read) of one local tar."""
    total, last, readable = 0, None, False
    try:
        with tarfile.open(url, mode="r:") as tar:
            for member in tar:
                readable = True
                key, ext = split_key(member.name)
                if member.isfile() and ext and key != last:
                    total += 1
                    last = key
    except (tarfile.TarError, OSError):
        pass  # truncated: what was read counts; the loader reports the truncation when it reads it
    return total, readable


def assign(urls: list[str], worker: int, workers: int) -> tuple[list[str], int, int]:
    """Shards of global worker ``worker`` of ``workers``: (urls, stride, offset).

    With at least as many shards as workers each worker takes every ``workers``-th shard; with fewer,
    every worker reads every shard and keeps every ``workers``-th sample, so no worker is ever idle
    and no sample is read twice in one pass.
    """
    if len(urls) >= workers:
        return urls[worker::workers], 1, 0
    return list(urls), workers, worker
