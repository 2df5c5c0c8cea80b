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


@dataclass
class ShardEvent:
    """A problem found while reading a shard (yielded instead of a sample, then counted)."""

    reason: str
    url: str


def iter_samples(url: str) -> Iterator[dict | ShardEvent]:
    """Yield samples ``{"__key__", "__url__", ext: bytes}`` of one shard, grouping members by key.

    Yields a ShardEvent ('unreadable_shard', 'truncated_shard') instead of raising; the sample being
    assembled when a tar breaks off is dropped (it may be missing members).
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
                f = tar.extractfile(member)
                data = f.read() if f is not None else b""
                if len(data) != member.size:
                    raise EOFError("member cut short")
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    current = {"__key__": key, "__url__": url}
                current[ext] = data
            # tarfile treats a header cut short as a clean end; a real end has a zero block after it
            while stream.read(1 << 16):
                pass
            if stream.count < tar.offset + tarfile.BLOCKSIZE:
                raise EOFError("archive ends without an end-of-archive block")
        if current is not None:
            yield current
    except (tarfile.TarError, EOFError, OSError, ValueError):
        yield ShardEvent("truncated_shard" if seen_any else "unreadable_shard", url)
    finally:
        close = getattr(stream, "close", None)
        if close:
            try:
                close()
            except Exception:  # a pipe: whose process failed; already counted
                pass


class _CountingReader:
    """File-like wrapper counting the bytes read (to tell a truncated tar from a complete one)."""

    def __init__(self, raw: Any):
        self.raw = raw
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.count += len(data)
        return data

    def close(self) -> None:
        self.raw.close()


def count_samples(urls: list[str]) -> int:
    """Count samples (distinct consecutive keys) of local shards by reading tar headers only."""
    total = 0
    for url in urls:
        if url.startswith("pipe:") or "://" in url:
            raise DataError(f"cannot count samples of {url!r}: set data.samples_per_epoch")
        last = None
        try:
            with tarfile.open(url, mode="r:") as tar:
                for member in tar:
                    key, ext = split_key(member.name)
                    if member.isfile() and ext and key != last:
                        total += 1
                        last = key
        except (tarfile.TarError, OSError):
            continue  # counted as skipped when read; here it only shortens the epoch estimate
    return total


def assign(urls: list[str], worker: int, workers: int) -> tuple[list[str], int, int]:
    """Shards of global worker ``worker`` of ``workers``: (urls, stride, offset).

    With at least as many shards as workers each worker takes every ``workers``-th shard; with fewer,
    every worker reads every shard and keeps every ``workers``-th sample, so no worker is ever idle
    and no sample is read twice in one pass.
    """
    if len(urls) >= workers:
        return urls[worker::workers], 1, 0
    return list(urls), workers, worker
