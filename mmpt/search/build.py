"""``mmpt index``: one FAISS index over one or more ``mmpt embed`` folders, streamed, resumable.

Layout of INDEX_DIR::

    index.faiss                    the index (ids 0..N-1 in the order below)
    metadata/part_<j>.parquet      one part per embedded shard: id, key, modality, shard, row, members
                                   (JSON {ext: [offset, size]} of the sample's tar members), caption/json if kept
    manifest.json                  model digest, embed settings, index kind and tuning, every part's id range,
                                   shard identity and embeddings file identity

Which index: exact (``IndexFlatIP``) below ``exact_below`` vectors when the full vectors fit the memory
budget; above it an inverted file (IVF, ~sqrt(N) lists, k-means trained on a sample) whose codes are the
richest the budget allows: fp16 or 8-bit scalar quantisation (recall close to exact), 4-bit, or OPQ+PQ
(a warning says recall drops). ``nprobe`` is then tuned on held-out queries against exact neighbours
computed while streaming, until recall@10 reaches ``recall_target`` (measured figure in the manifest). At query
time the shortlist is re-ranked by exact scores read from the embed files (``rerank``; see store.py).

Vectors are streamed from the memory-mapped ``.npy`` files in chunks; the quantiser trains on a sample.
A build checkpoints (partial index + progress) every ``checkpoint_seconds`` under ``INDEX_DIR/.build``;
rerunning the same command resumes there, a different plan (inputs, settings) is refused.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmpt.registry import ConfigError

INDEX_FORMAT = "mmpt-index/1"
TUNE_K = 10
TUNE_QUERIES = 256


@dataclass
class Part:
    """One embedded shard as an index part: rows ``start .. start+count`` of the index."""

    emb_dir: str
    modality: str
    prefix: str
    position: int  # the shard's index in its embed manifest
    shard: dict[str, Any]
    npy: str
    parquet: str
    start: int
    count: int
    npy_identity: dict[str, Any]


@dataclass
class Choice:
    """The index kind and its FAISS factory string, with the reason it was chosen."""

    kind: str  # "flat" or "ivf"
    factory: str
    nlist: int
    bytes_per_vector: float
    reason: str


@dataclass
class IndexSummary:
    """What ``mmpt index`` built."""

    out: str
    count: int
    kind: str
    factory: str
    nprobe: int | None
    recall: float | None
    seconds: float
    resumed_rows: int = 0

    def __str__(self) -> str:
        tuned = (f", nprobe {self.nprobe} (recall@{TUNE_K} {self.recall:.3f} vs exact on held-out queries)"
                 if self.nprobe is not None and self.recall is not None else "")
        resumed = f", resumed after {self.resumed_rows} vectors" if self.resumed_rows else ""
        return (f"indexed {self.count} vectors ({self.kind}: {self.factory}{tuned}) in {self.seconds:.1f} s"
                f"{resumed} -> {self.out}")


def parse_bytes(text: str | int) -> int:
    """``4G``, ``512M``, ``800k`` or a plain byte count -> bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(s[-1:], 1)
    try:
        value = float(s[:-1] if scale > 1 else s)
    except ValueError:
        raise ConfigError(f"--memory-budget {text}: expected a size like 4G, 512M or a byte count") from None
    if value <= 0:
        raise ConfigError(f"--memory-budget {text}: must be positive")
    return int(value * scale)


def _file_identity(path: Path) -> dict[str, Any]:
    st = os.stat(path)
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def plan_parts(emb_dirs: list[str]) -> tuple[dict[str, Any], list[Part], int]:
    """(header shared by every embed manifest: model + settings, the parts in id order, dimension) of the
    given embed folders; folders of other models or settings, or unfinished shards, are refused."""
    from mmpt.commands.embed import MANIFEST_FORMAT, output_paths

    header: dict[str, Any] | None = None
    parts: list[Part] = []
    dim, start = 0, 0
    for emb_dir in emb_dirs:
        root = Path(emb_dir)
        if not root.is_dir():
            raise ConfigError(f"{emb_dir}: no such folder (expected an `mmpt embed --out` folder)")
        manifests = sorted(root.glob("*_manifest.json"))
        if not manifests:
            raise ConfigError(f"{emb_dir}: no *_manifest.json (expected an `mmpt embed --out` folder)")
        for path in manifests:
            try:
                m = json.loads(path.read_text())
            except ValueError as exc:
                raise ConfigError(f"{path}: not JSON ({exc})") from None
            if m.get("format") != MANIFEST_FORMAT:
                raise ConfigError(f"{path}: format {m.get('format')!r}, expected {MANIFEST_FORMAT!r}")
            mine = {"model": m.get("model"), "settings": m.get("settings")}
            if header is None:
                header = mine
            for key in ("model", "settings"):
                if mine[key] != header[key]:
                    raise ConfigError(f"{path}: embedded with another {key} ({mine[key]}) than the first folder "
                                      f"({header[key]}); one index holds one model's embeddings")
            prefix = path.name.removesuffix("_manifest.json")
            for position, shard in enumerate(m.get("shards", [])):
                npy, parquet = output_paths(root, prefix, position)
                if not npy.exists():
                    raise ConfigError(f"{npy}: missing: shard {shard.get('url')} of {path} has no embeddings yet "
                                      "(finish `mmpt embed` into that folder first)")
                if not parquet.exists():
                    raise ConfigError(f"{parquet}: missing (the metadata of {npy})")
                arr = np.load(npy, mmap_mode="r", allow_pickle=False)
                if arr.ndim != 2 or arr.dtype not in (np.float16, np.float32):
                    raise ConfigError(f"{npy}: array {arr.dtype} {arr.shape}, expected (rows, dim) float16/float32")
                if arr.shape[0] and dim and arr.shape[1] != dim:
                    raise ConfigError(f"{npy}: dimension {arr.shape[1]}, other files {dim}")
                dim = dim or (arr.shape[1] if arr.shape[0] else 0)
                parts.append(Part(str(root.resolve()), m["modality"], prefix, position, shard, str(npy),
                                  str(parquet), start, int(arr.shape[0]), _file_identity(npy)))
                start += int(arr.shape[0])
    if header is None or not start:
        raise ConfigError(f"{', '.join(emb_dirs)}: no embeddings to index (every shard is empty)")
    return header, parts, dim


def choose_index(n: int, dim: int, budget: int, exact_below: int) -> Choice:
    """Exact below ``exact_below`` vectors when the float32 vectors fit ``budget`` bytes, else IVF with the
    richest codes the budget allows (see the module docstring)."""
    flat = 4 * dim
    if n < exact_below and n * flat <= budget:
        return Choice("flat", "Flat", 0, flat, f"{n} vectors < {exact_below} (--exact-below): exact search")
    nlist = int(2 ** round(math.log2(max(math.sqrt(n), 16))))
    nlist = max(16, min(nlist, 65536, n // 39 or 16))
    per = (budget - nlist * dim * 4) / n - 8  # inverted lists store an 8-byte id per vector
    why = f"{n} vectors, budget {budget / 2**20:.0f} MiB = {per:.0f} bytes a vector for codes"
    for code, size in (("SQfp16", 2 * dim), ("SQ8", dim), ("SQ4", dim / 2)):
        if per >= size:
            return Choice("ivf", f"IVF{nlist},{code}", nlist, size + 8, why)
    m = max((m for m in range(4, dim // 2 + 1) if dim % m == 0 and m <= per), default=0)
    if not m:
        raise ConfigError(f"--memory-budget {budget / 2**20:.0f} MiB: too small for {n} vectors of {dim} "
                          f"dimensions ({per:.1f} bytes a vector left; PQ needs at least 4)")
    # plain PQ: OPQ's rotation gains a few points of recall but its training took minutes on 6,000 vectors
    return Choice("ivf", f"IVF{nlist},PQ{m}", nlist, m + 8, why + " (product quantisation: recall drops)")


class _Truth:
    """Exact top-(k+1) inner-product neighbours of a few query vectors, merged chunk by chunk."""

    def __init__(self, queries: np.ndarray, k: int):
        self.q = queries.astype(np.float32)
        self.scores = np.full((len(queries), k), -np.inf, np.float32)
        self.ids = np.full((len(queries), k), -1, np.int64)

    def update(self, x: np.ndarray, start: int) -> None:
        s = self.q @ x.T  # (Q, chunk)
        k = self.scores.shape[1]
        scores = np.concatenate([self.scores, s], 1)
        ids = np.concatenate([self.ids, np.broadcast_to(np.arange(start, start + x.shape[0]), s.shape)], 1)
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if scores.shape[1] > k else np.argsort(-scores, 1)
        self.scores = np.take_along_axis(scores, top, 1)
        self.ids = np.take_along_axis(ids, top, 1)


def _rows(parts: list[Part], ids: np.ndarray) -> np.ndarray:
    """float32 rows ``ids`` (sorted global ids) read from the memory-mapped parts."""
    starts = np.array([p.start for p in parts])
    out = []
    where = np.searchsorted(starts, ids, side="right") - 1
    for j in np.unique(where):
        p = parts[j]
        local = ids[where == j] - p.start
        out.append(np.asarray(np.load(p.npy, mmap_mode="r")[local], dtype=np.float32))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _metadata_part(part: Part, ids_start: int) -> Any:
    """The metadata table of one part: the embed parquet's columns plus id, modality, shard and members."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmpt.search.members import is_local, member_offsets

    table = pq.read_table(part.parquet)
    if table.num_rows != part.count:
        raise ConfigError(f"{part.parquet}: {table.num_rows} rows, but {part.npy} has {part.count}")
    url = part.shard.get("url", "")
    offsets = member_offsets(url) if is_local(url) and os.path.exists(url) else {}
    keys = table.column("key").to_pylist()
    members = [json.dumps({e: list(v) for e, v in offsets[k].items()}) if k in offsets else None for k in keys]
    columns = {"id": pa.array(np.arange(ids_start, ids_start + part.count), pa.int64()), "key": keys,
               "modality": [part.modality] * part.count, "shard": [url] * part.count,
               "row": table.column("row"), "members": pa.array(members, pa.string())}
    for name in table.column_names:
        if name not in columns:
            columns[name] = table.column(name)
    return pa.table(columns)


def _save_npz(path: str, **arrays: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to a name
        np.savez(f, **arrays)


def _write_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(str(tmp))
    os.replace(tmp, path)


def build_index(emb_dirs: list[str] | str, out: str, *, memory_budget: str | int = "4G",
                exact_below: int = 500_000, factory: str | None = None, recall_target: float = 0.95, rerank: bool = True,
                chunk_rows: int = 65536, checkpoint_seconds: float = 300.0, progress: bool = True,
                seed: int = 0, stop_after_parts: int | None = None) -> IndexSummary:
    """Build INDEX_DIR ``out`` from the embed folders ``emb_dirs`` (see the module docstring).

    ``factory``: a FAISS factory string that replaces the automatic choice. ``stop_after_parts``: checkpoint
    and stop (SystemExit) after that many parts, as an interrupted build would (tests). ``rerank``: an approximate
    index orders its shortlist by exact scores from the embed files at query time (see mmpt.search.store)."""
    import faiss
    import pyarrow.parquet as pq
    from tqdm import tqdm

    dirs = [emb_dirs] if isinstance(emb_dirs, str) else list(emb_dirs)
    start_time = time.perf_counter()
    header, parts, dim = plan_parts(dirs)
    n = parts[-1].start + parts[-1].count
    budget = parse_bytes(memory_budget)
    if factory:
        probe = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)  # a bad string fails here
        try:
            choice = Choice("ivf", factory, faiss.extract_index_ivf(probe).nlist, 0.0, "--factory")
        except RuntimeError:
            choice = Choice("flat" if factory.strip() == "Flat" else "other", factory, 0, 0.0, "--factory")
    else:
        choice = choose_index(n, dim, budget, exact_below)
    out_dir = Path(out)
    manifest_path = out_dir / "manifest.json"
    plan = {"format": INDEX_FORMAT, **header, "dim": dim, "count": n, "choice": asdict(choice),
            "recall_target": recall_target, "seed": seed, "parts": [asdict(p) for p in parts]}
    if manifest_path.exists():
        done = json.loads(manifest_path.read_text())
        if done.get("plan") == plan:
            ix = done["index"]
            return IndexSummary(str(out_dir), n, ix["kind"], ix["factory"], ix.get("nprobe"), ix.get("recall"), 0.0)
        raise ConfigError(f"--out {out}: holds an index built from other embeddings or settings; "
                          "use a new --out folder (or delete this one)")
    build = out_dir / ".build"
    state_path = build / "state.json"
    rng = np.random.default_rng(seed)
    tune_ids = np.sort(rng.choice(n, size=min(TUNE_QUERIES, n), replace=False)) if choice.kind == "ivf" else None
    resumed = 0
    if state_path.exists():
        state = json.loads(state_path.read_text())
        if state.get("plan") != plan:
            raise ConfigError(f"--out {out}: an unfinished build of other embeddings or settings is there; "
                              "use a new --out folder (or delete this one)")
        index = faiss.read_index(str(build / "partial.faiss"))
        parts_done, resumed = state["parts_done"], state["rows_done"]
        if index.ntotal != resumed:
            raise ConfigError(f"{build}: partial index holds {index.ntotal} vectors, its state says {resumed}; "
                              "delete the folder and rebuild")
        truth = None
        if tune_ids is not None:
            with np.load(build / "truth.npz", allow_pickle=False) as z:
                truth = _Truth(_rows(parts, tune_ids), TUNE_K + 1)
                truth.scores, truth.ids = z["scores"], z["ids"]
    else:
        (out_dir / "metadata").mkdir(parents=True, exist_ok=True)
        build.mkdir(parents=True, exist_ok=True)
        index = faiss.index_factory(dim, choice.factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            nlist = max(choice.nlist, 1)
            size = min(n, max(64 * nlist, 20_000), 262_144)
            sample = _rows(parts, np.sort(rng.choice(n, size=size, replace=False)))
            index.train(sample)
            del sample
        parts_done = 0
        truth = _Truth(_rows(parts, tune_ids), TUNE_K + 1) if tune_ids is not None else None

    def checkpoint(k: int) -> None:
        _write_atomic(build / "partial.faiss", lambda p: faiss.write_index(index, p))
        if truth is not None:
            _write_atomic(build / "truth.npz", lambda p: _save_npz(p, scores=truth.scores, ids=truth.ids))
        _write_atomic(state_path, lambda p: Path(p).write_text(json.dumps(
            {"plan": plan, "parts_done": k, "rows_done": int(index.ntotal)})))

    bar = tqdm(total=n, initial=resumed, disable=not progress, desc="index", unit="vec", unit_scale=True)
    last = time.monotonic()
    try:
        for j in range(parts_done, len(parts)):
            p = parts[j]
            if _file_identity(Path(p.npy)) != p.npy_identity:
                raise ConfigError(f"{p.npy}: changed while indexing; rerun `mmpt index`")
            table = _metadata_part(p, p.start)
            _write_atomic(out_dir / "metadata" / f"part_{j:06d}.parquet", lambda f, t=table: pq.write_table(t, f))
            arr = np.load(p.npy, mmap_mode="r", allow_pickle=False)
            for lo in range(0, p.count, chunk_rows):
                x = np.ascontiguousarray(arr[lo:lo + chunk_rows], dtype=np.float32)
                index.add(x)
                if truth is not None:
                    truth.update(x, p.start + lo)
                bar.update(len(x))
            if time.monotonic() - last > checkpoint_seconds or (stop_after_parts and j + 1 - parts_done >= stop_after_parts):
                checkpoint(j + 1)
                last = time.monotonic()
                if stop_after_parts and j + 1 - parts_done >= stop_after_parts and j + 1 < len(parts):
                    raise SystemExit(f"index: stopped after {stop_after_parts} parts (stop_after_parts)")
    finally:
        bar.close()
    nprobe, recall = (None, None) if truth is None else _tune(index, truth, tune_ids, recall_target, choice)
    _write_atomic(out_dir / "index.faiss", lambda p: faiss.write_index(index, p))
    modalities: dict[str, int] = {}
    for p in parts:
        modalities[p.modality] = modalities.get(p.modality, 0) + p.count
    manifest = {"format": INDEX_FORMAT, "model": header["model"], "settings": header["settings"], "dim": dim,
                "count": n, "modalities": modalities,
                "index": {"kind": choice.kind, "factory": choice.factory, "nlist": choice.nlist, "nprobe": nprobe,
                          "recall": recall, "reason": choice.reason, "memory_budget": budget,
                          "rerank": rerank and choice.kind != "flat"},
                "parts": [{"file": f"metadata/part_{j:06d}.parquet", "start": p.start, "count": p.count,
                           "modality": p.modality, "shard": p.shard} for j, p in enumerate(parts)],
                "plan": plan}
    _write_atomic(manifest_path, lambda f: Path(f).write_text(json.dumps(manifest, indent=1) + "\n"))
    shutil.rmtree(build, ignore_errors=True)
    return IndexSummary(str(out_dir), n, choice.kind, choice.factory, nprobe, recall,
                        time.perf_counter() - start_time, resumed)


def recall_at(found: np.ndarray, truth: np.ndarray, self_ids: np.ndarray | None, k: int) -> float:
    """Mean share of each query's exact top-``k`` (its own id dropped when ``self_ids`` are given) among
    the ids found."""
    hits = 0
    for i in range(len(truth)):
        t = [x for x in truth[i] if self_ids is None or x != self_ids[i]][:k]
        f = set(int(x) for x in found[i] if self_ids is None or x != self_ids[i])
        hits += sum(int(x) in f for x in t)
    return hits / (k * len(truth))


def _tune(index: Any, truth: _Truth, tune_ids: np.ndarray, target: float, choice: Choice) -> tuple[int, float]:
    """The smallest power-of-two nprobe whose recall@10 (query's own id excluded) reaches ``target``; when the
    codes cannot reach it even probing every list, the smallest within 0.005 of that ceiling (warned)."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    order = np.argsort(-truth.scores, 1)
    exact = np.take_along_axis(truth.ids, order, 1)

    def recall(nprobe: int) -> float:
        ivf.nprobe = nprobe
        return recall_at(index.search(truth.q, TUNE_K + 1)[1], exact, tune_ids, TUNE_K)

    ceiling = recall(ivf.nlist)
    goal = min(target, ceiling - 0.005)
    nprobe, found = 1, recall(1)
    while found < goal and nprobe < ivf.nlist:
        nprobe = min(nprobe * 2, ivf.nlist)
        found = ceiling if nprobe == ivf.nlist else recall(nprobe)
    if ceiling < target:
        import warnings

        warnings.warn(f"index: recall@{TUNE_K} {ceiling:.3f} < {target} even probing every list ({choice.factory}); "
                      f"using nprobe {nprobe} (recall {found:.3f}); a larger --memory-budget gives richer codes",
                      stacklevel=2)
    return nprobe, found
