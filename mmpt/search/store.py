"""An opened INDEX_DIR (see :mod:`mmpt.search.build`): search with an optional modality filter, metadata
rows by id, and a hit's tar members read back by their recorded offsets.

An approximate index built with re-ranking shortlists max(4k, k+16) candidates from its codes and orders
them by their exact scores, read from the memory-mapped embed files (paged from disk, outside the
memory budget); if those files are gone or changed, it warns and ranks by the codes alone."""

from __future__ import annotations

import bisect
import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from mmpt.registry import ConfigError
from mmpt.search.members import MemberGone, read_member

MEDIA_LIMIT = 64 << 20  # the largest member the server sends back


class IndexStore:
    """The index, its manifest and its metadata parts (an LRU of parsed parts: a 100M-row index never
    holds all its metadata in memory)."""

    def __init__(self, index_dir: str, cached_parts: int = 64):
        import faiss

        from mmpt.search.build import INDEX_FORMAT

        self.root = Path(index_dir)
        path = self.root / "manifest.json"
        if not path.exists():
            unfinished = (self.root / ".build").exists()
            raise ConfigError(f"{index_dir}: no manifest.json ("
                              + ("an unfinished build: rerun `mmpt index` to resume it)" if unfinished
                                 else "expected an `mmpt index --out` folder)"))
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != INDEX_FORMAT:
            raise ConfigError(f"{path}: format {self.manifest.get('format')!r}, expected {INDEX_FORMAT!r}")
        self.index = faiss.read_index(str(self.root / "index.faiss"))
        if self.index.ntotal != self.manifest["count"]:
            raise ConfigError(f"{self.root / 'index.faiss'}: {self.index.ntotal} vectors, manifest says "
                              f"{self.manifest['count']}")
        self.parts = self.manifest["parts"]
        self.starts = [p["start"] for p in self.parts]
        self.nprobe = self.manifest["index"].get("nprobe")
        self.rerank = bool(self.manifest["index"].get("rerank")) and self._embeddings_unchanged()
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache: OrderedDict[int, dict[str, list[Any]]] = OrderedDict()
        self._cached_parts = cached_parts
        self._lock = threading.Lock()
        self._selectors: dict[str, Any] = {}
        for m in self.manifest["modalities"]:
            self._selectors[m] = self._selector([(p["start"], p["start"] + p["count"]) for p in self.parts
                                                 if p["modality"] == m])

    def _embeddings_unchanged(self) -> bool:
        """Whether every embeddings file the index was built from is still there as it was (re-ranking
        reads them); a warning names the first that is not."""
        import os
        import warnings

        for p in self.manifest["plan"]["parts"]:
            ident = p["npy_identity"]
            try:
                st = os.stat(ident["path"])
            except OSError:
                st = None
            if st is None or (st.st_size, st.st_mtime_ns) != (ident["size"], ident["mtime_ns"]):
                warnings.warn(f"{self.root}: {ident['path']} is gone or changed since indexing: hits come from the "
                              "compressed codes alone (no exact re-ranking)", stacklevel=3)
                return False
        return True

    def _vectors(self, ids: np.ndarray) -> np.ndarray:
        """float32 embeddings of index ids, read from the memory-mapped embed files (an LRU of 128 maps)."""
        where = np.searchsorted(self.starts, ids, side="right") - 1
        out = np.empty((len(ids), self.dim), np.float32)
        for j in np.unique(where):
            with self._lock:
                arr = self._maps.get(int(j))
                if arr is None:
                    arr = np.load(self.manifest["plan"]["parts"][j]["npy"], mmap_mode="r", allow_pickle=False)
                    self._maps[int(j)] = arr
                    while len(self._maps) > 128:
                        self._maps.popitem(last=False)
                else:
                    self._maps.move_to_end(int(j))
            sel = where == j
            out[sel] = arr[ids[sel] - self.parts[j]["start"]]
        return out

    @property
    def modalities(self) -> dict[str, int]:
        """Vectors per modality in the index."""
        return dict(self.manifest["modalities"])

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return int(self.manifest["dim"])

    @staticmethod
    def _selector(ranges: list[tuple[int, int]]) -> Any:
        import faiss

        merged: list[list[int]] = []
        for lo, hi in sorted(ranges):
            if merged and merged[-1][1] == lo:
                merged[-1][1] = hi
            else:
                merged.append([lo, hi])
        sel = faiss.IDSelectorRange(*merged[0])
        keep = [sel]  # the SWIG objects must outlive the combined selector
        for lo, hi in merged[1:]:
            other = faiss.IDSelectorRange(lo, hi)
            sel = faiss.IDSelectorOr(sel, other)
            keep += [other, sel]
        sel.keep_alive = keep
        return sel

    def search(self, vectors: np.ndarray, k: int, modality: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the top ``k`` for each row of ``vectors``, only among ``modality`` when given
        (ids -1 where fewer exist)."""
        import faiss

        if modality is not None and modality not in self._selectors:
            raise KeyError(modality)
        sel = self._selectors.get(modality) if modality is not None else None
        if self.nprobe is not None:
            params = faiss.SearchParametersIVF(nprobe=int(self.nprobe))
            if sel is not None:
                params.sel = sel
        else:
            params = faiss.SearchParameters(sel=sel) if sel is not None else None
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        wide = min(max(4 * k, k + 16), self.index.ntotal) if self.rerank else k
        scores, ids = self.index.search(x, wide, params=params) if params is not None else self.index.search(x, wide)
        if not self.rerank:
            return scores, ids
        # exact scores of the candidates from the embeddings themselves: the codes only shortlist
        out_s = np.full((len(x), k), -np.inf, np.float32)
        out_i = np.full((len(x), k), -1, np.int64)
        for r in range(len(x)):
            cand = ids[r][ids[r] >= 0]
            exact = self._vectors(cand) @ x[r]
            top = np.argsort(-exact, kind="stable")[:k]
            out_s[r, :len(top)], out_i[r, :len(top)] = exact[top], cand[top]
        return out_s, out_i

    def _part(self, j: int) -> dict[str, list[Any]]:
        with self._lock:
            if j in self._cache:
                self._cache.move_to_end(j)
                return self._cache[j]
        import pyarrow.parquet as pq

        table = pq.read_table(self.root / self.parts[j]["file"]).to_pydict()
        with self._lock:
            self._cache[j] = table
            while len(self._cache) > self._cached_parts:
                self._cache.popitem(last=False)
        return table

    def row(self, id_: int) -> dict[str, Any]:
        """The metadata of index id ``id_`` (KeyError when out of range)."""
        if not 0 <= id_ < self.manifest["count"]:
            raise KeyError(id_)
        j = bisect.bisect_right(self.starts, id_) - 1
        table = self._part(j)
        i = id_ - self.parts[j]["start"]
        out = {name: values[i] for name, values in table.items()}
        out["members"] = json.loads(out["members"]) if out.get("members") else {}
        return out

    def member(self, id_: int, ext: str) -> bytes:
        """The bytes of member ``ext`` of the sample behind id ``id_``, read by offset from its shard
        (KeyError: no such id or member; :class:`MemberGone`: the shard cannot be read back)."""
        row = self.row(id_)
        if ext not in row["members"]:
            raise KeyError(ext)
        offset, size = row["members"][ext]
        j = bisect.bisect_right(self.starts, id_) - 1
        return read_member(self.parts[j]["shard"], int(offset), int(size), MEDIA_LIMIT)


__all__ = ["IndexStore", "MemberGone", "MEDIA_LIMIT"]
