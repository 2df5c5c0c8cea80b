"""Where each sample's members lie inside its shard, so a server reads one member by offset and never
opens a path a request names.

Offsets are read from tar headers only (``tarfile`` seeks over member data). A shard is read back only
while its size and mtime are those recorded at indexing time: a changed shard could hold anything at
that offset.
"""

from __future__ import annotations

import os
import tarfile
from typing import Any

from mmpt.data.shards import split_key


class MemberGone(LookupError):
    """A recorded member cannot be read back (shard missing, changed since indexing, or not a local file)."""


def is_local(url: str) -> bool:
    """Whether a shard url is a plain local file (no ``pipe:`` command, no URL scheme)."""
    return not (url.startswith("pipe:") or "://" in url)


def member_offsets(path: str) -> dict[str, dict[str, tuple[int, int]]]:
    """``{key: {ext: (offset, size)}}`` of a local tar's file members, from its headers; a truncated or
    unreadable tar gives what was read before the break (those members are whole)."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                if ext and not key.startswith("__"):
                    out.setdefault(key, {})[ext] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError, EOFError):
        pass
    return out


def read_member(shard: dict[str, Any], offset: int, size: int, limit: int) -> bytes:
    """The ``size`` bytes at ``offset`` of the shard ``shard`` (an identity: url, size, mtime_ns) when it is
    still the file that was indexed and ``size <= limit``; else :class:`MemberGone`."""
    url = shard.get("url", "")
    if not is_local(url) or "size" not in shard:
        raise MemberGone(f"shard {url} is not a local file: its members cannot be served")
    if size > limit:
        raise MemberGone(f"member of {size} bytes in {url} is over the serving limit of {limit} bytes")
    try:
        st = os.stat(url)
    except OSError:
        raise MemberGone(f"shard {url} is gone") from None
    if (st.st_size, st.st_mtime_ns) != (shard["size"], shard["mtime_ns"]):
        raise MemberGone(f"shard {url} changed since it was indexed")
    if offset < 0 or offset + size > st.st_size:
        raise MemberGone(f"member at {offset}+{size} lies outside shard {url}")
    with open(url, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise MemberGone(f"shard {url} ends inside the member at {offset}")
    return data
