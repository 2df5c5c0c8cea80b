"""Embedding extraction at scale: clip-retrieval's layout, one output pair per input shard.

For a modality with file prefix ``p`` (``img`` for images, else the modality name):
``OUT/p_emb/p_emb_<i>.npy`` (float16/float32 rows) and ``OUT/metadata/p_metadata_<i>.parquet`` (key,
shard, row, optional caption/json) for shard ``i`` of ``OUT/p_manifest.json``. The manifest records
the model (a digest of its weights), the settings (normalisation, dtype, metadata columns) and every
shard's identity (path, size, mtime); ``i`` is the shard's position there, not in this command's list.
A run into an existing folder therefore resumes (skips shards whose ``.npy`` exists), extends it with
new shards, and refuses a different model or settings or a shard that changed since it was embedded.
Image and text runs share a folder without sharing a file. Each rank takes every ``world``-th shard of
its list; a shard's pair is written atomically when the shard is finished, so every key lands once.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmpt.registry import ConfigError

MANIFEST_FORMAT = "mmpt-embed/1"
# --metadata field -> the shard extension it comes from
METADATA_FIELDS = {"caption": "txt", "json": "json"}
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class EmbedSummary:
    """What an embedding run did on this rank."""

    out: str
    shards_done: int
    shards_skipped: int
    rows: int
    skips: dict[str, int] = field(default_factory=dict)
    absent: int = 0  # samples of these shards that do not carry the modality (no row, not an error)
    modality: str = ""
    seconds: float = 0.0  # the embedding loop: data, forward passes and writes (not model loading)

    def __str__(self) -> str:
        from mmpt.data.loader import format_skips

        lacking = f"; {self.absent} samples without {self.modality}" if self.absent else ""
        return (f"embedded {self.rows} samples from {self.shards_done} shards ({self.shards_skipped} already done; "
                f"{format_skips(self.skips)}{lacking}) -> {self.out}"
                + (f" in {self.seconds:.1f} s ({self.rows / self.seconds:.0f} samples/s)" if self.seconds > 0 else ""))


def output_paths(out: Path, prefix: str, index: int) -> tuple[Path, Path]:
    """(embeddings .npy, metadata .parquet) of manifest shard ``index`` for file prefix ``prefix``."""
    return out / f"{prefix}_emb" / f"{prefix}_emb_{index}.npy", out / "metadata" / f"{prefix}_metadata_{index}.parquet"


def shard_identity(url: str) -> dict[str, Any]:
    """What makes a shard the same shard: its absolute path, size and mtime (commands/URLs: the string)."""
    if url.startswith("pipe:") or "://" in url:
        return {"url": url}
    st = os.stat(url)
    return {"url": os.path.abspath(url), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every tensor's name, dtype, shape and bytes: the same weights give the same digest
    wherever the file lives (an export or the run directory it came from)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # reshape: 0-dim cannot view; no bytes copy
    return h.hexdigest()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def shard_indices(out: Path, prefix: str, header: dict[str, Any], urls: list[str]) -> list[int]:
    """Manifest index of each url, extending ``OUT/<prefix>_manifest.json`` with new shards; a folder
    written by another model or settings, or holding a changed shard, is refused (ConfigError)."""
    path = out / f"{prefix}_manifest.json"
    ids = [shard_identity(u) for u in urls]
    if path.exists():
        manifest = json.loads(path.read_text())
        for key, value in header.items():
            if manifest.get(key) != value:
                raise ConfigError(f"--out {out}: written for another {key} ({manifest.get(key)} there, {value} now); "
                                  "use a new --out folder (or delete this one)")
    elif (out / f"{prefix}_emb").exists():
        raise ConfigError(f"--out {out}: holds {prefix}_emb/ but no {path.name} (written by an older mmpt?): "
                          "cannot tell which shards its files belong to; use a new --out folder")
    else:
        manifest = {**header, "shards": []}
    known = {s["url"]: i for i, s in enumerate(manifest["shards"])}
    indices, changed = [], False
    for ident in ids:
        i = known.get(ident["url"])
        if i is None:
            manifest["shards"].append(ident)
            i = known[ident["url"]] = len(manifest["shards"]) - 1
            changed = True
        elif manifest["shards"][i] != ident:
            raise ConfigError(f"--out {out}: shard {ident['url']} changed since it was embedded there "
                              f"({manifest['shards'][i]} then, {ident} now); use a new --out folder")
        indices.append(i)
    if changed:  # every rank computes the same manifest from the same inputs: the last write wins, equal
        out.mkdir(parents=True, exist_ok=True)
        _write_json(path, manifest)
    return indices


def _write_shard(out: Path, prefix: str, index: int, url: str, columns: dict[str, list[Any]], emb: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    npy, meta = output_paths(out, prefix, index)
    npy.parent.mkdir(parents=True, exist_ok=True)
    meta.parent.mkdir(parents=True, exist_ok=True)
    n = len(columns["key"])
    table = pa.table({"key": columns["key"], "shard": [url] * n, "row": list(range(n)),
                      **{k: v for k, v in columns.items() if k != "key"}})
    pq.write_table(table, str(meta) + ".tmp")
    with open(str(npy) + ".tmp", "wb") as f:
        np.save(f, emb)
    # metadata first, embeddings last: a shard counts as done only when its .npy exists
    os.replace(str(meta) + ".tmp", meta)
    os.replace(str(npy) + ".tmp", npy)


def _metadata_fields(fields: tuple[str, ...] | list[str] | str) -> tuple[str, ...]:
    names = tuple(f.strip() for f in (fields.split(",") if isinstance(fields, str) else fields) if f.strip())
    unknown = [f for f in names if f not in METADATA_FIELDS]
    if unknown:
        raise ConfigError(f"--metadata {unknown[0]}: unknown field; expected a comma list of "
                          f"{', '.join(METADATA_FIELDS)}")
    return tuple(sorted(set(names)))


def _cell(value: Any, name: str) -> str | None:
    if value is None:
        return None
    return json.dumps(value, ensure_ascii=False) if name == "json" else str(value)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where ``device`` computes bfloat16 natively (CUDA with bf16, CPUs with AVX512-BF16
    or AMX: ~1.6x faster matmuls), else ``fp32``; ``fp32`` and ``bf16`` are kept as they are."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    from mmpt.nn.precision import native_bf16

    return "bf16" if native_bf16(device) else "fp32"


def _embed_batch(model: Any, modality: str, fields: dict[str, torch.Tensor], present: torch.Tensor,
                 dev: torch.device, normalize: bool, precision: str, dim: int | None = None,
                 layer: int | None = None) -> torch.Tensor:
    """Embeddings (P, D) float32 of the P present rows of one batch, left on ``dev`` (no host sync here);
    ``layer``: the tower stopped after its first ``layer`` blocks; ``dim``: the first ``dim`` dims (normalised again)."""
    from mmpt.nn.layers import layer_exit
    from mmpt.nn.matryoshka import prefix

    inputs = {k: v.to(dev, non_blocking=True) for k, v in fields.items()}
    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"), \
            layer_exit(model.model.encoders[modality], layer, "--layer"):
        if normalize:
            vec = prefix(model.model.encode_fields(modality, inputs).embedding, dim)
        else:
            vec = prefix(model.model.heads[modality](model.model.encoders[modality](inputs).pooled).float(), dim,
                         normalize=False)
    if not bool(present.all()):  # present is a CPU tensor: no device sync
        vec = vec.index_select(0, present.nonzero().flatten().to(dev))
    return vec


class _ShardWriter:
    """Writes finished shards on one background thread, so the next batches compute while parquet and npy
    files are written; errors surface at the next ``submit`` or at ``close``."""

    def __init__(self, out: Path, prefix: str):
        from concurrent.futures import ThreadPoolExecutor

        self.out, self.prefix, self.submitted = out, prefix, 0
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="mmpt-embed-write")
        self.futures: list[Any] = []

    def submit(self, index: int, url: str, columns: dict[str, list[Any]], emb: np.ndarray) -> None:
        """Queue shard ``index``'s files (at most two shards wait, so memory stays bounded)."""
        self.futures.append(self.pool.submit(_write_shard, self.out, self.prefix, index, url, columns, emb))
        self.submitted += 1
        while len(self.futures) > 2 or (self.futures and self.futures[0].done()):
            self.futures.pop(0).result()

    def close(self) -> None:
        """Wait for every queued shard; re-raise the first write error."""
        try:
            for f in self.futures:
                f.result()
        finally:
            self.futures = []
            self.pool.shutdown(wait=True)


def embed(model_path: str, data: str, modality: str, out: str, *, batch_size: int = 256, workers: int = 1,
          normalize: bool = True, dtype: str = "float16", device: str | None = None, progress: bool = True,
          metadata: tuple[str, ...] | list[str] | str = (), allow_nonfinite: bool = False,
          stop_after_shards: int | None = None, precision: str = "auto", dim: int | None = None,
          layer: int | None = None) -> EmbedSummary:
    """Embed every sample of ``data`` for ``modality`` with the model at ``model_path`` into ``out``.

    ``metadata``: extra parquet columns, any of ``caption`` (the sample's txt) and ``json`` (its json,
    as a string), so hits can be shown without reopening the shards. ``precision``: the forward passes'
    compute type: ``fp32``, ``bf16`` (autocast; unit embeddings within 1e-2 per component and cosine 0.999
    of fp32, 1.7e-3 and 0.99999 measured: tests/test_embed_precision.py) or ``auto`` (bf16 where the
    device has native bfloat16, see :func:`resolve_precision`); a folder keeps the precision it started with.
    ``dim``: keep the first ``dim`` dims of each embedding, normalised again (a Matryoshka size); ``layer``: stop the
    tower after its first ``layer`` transformer blocks (a Starbucks sub-model); both are recorded in the manifest.
    """
    from mmpt.commands.export import load
    from mmpt.data.loader import eval_loader, format_skips
    from mmpt.data.shards import DataError, expand_urls

    if dtype not in ("float16", "float32"):
        raise ConfigError(f"--dtype {dtype}: expected float16 or float32")
    fields = _metadata_fields(metadata)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dev = torch.device(device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"))
    compute = resolve_precision(precision, dev)
    model, transforms, _ = load(model_path, dev, allow_nonfinite=allow_nonfinite)
    if modality not in transforms:
        raise ConfigError(f"--modality {modality}: the model has no such tower; valid: {', '.join(transforms)}")
    spec = transforms[modality]
    prefix = spec.file_prefix
    width = model.model.embed_dim if dim is None else dim
    for key, value, most in (("--dim", dim, model.model.embed_dim), ("--layer", layer, None)):
        if value is not None and (value < 1 or (most is not None and value > most)):
            raise ConfigError(f"{key} {value}: expected 1 <= {key[2:]}" + (f" <= {most} (the embedding size)" if most else ""))
    urls = expand_urls(data)
    out_dir = Path(out)
    header = {"format": MANIFEST_FORMAT, "modality": modality, "model": weights_digest(model),
              "settings": {"normalize": normalize, "dtype": dtype, "metadata": list(fields),
                           # fp32 folders keep the header older versions wrote, so they still resume
                           **({"precision": compute} if compute != "fp32" else {}),
                           **({"dim": dim} if dim is not None else {}), **({"layer": layer} if layer is not None else {})}}
    manifest, out_existed = out_dir / f"{prefix}_manifest.json", out_dir.exists()
    manifest_existed = manifest.exists()
    indices = shard_indices(out_dir, prefix, header, urls)
    mine = [(i, u) for pos, (i, u) in enumerate(zip(indices, urls, strict=True)) if pos % world == rank]
    todo = [(i, u) for i, u in mine if not output_paths(out_dir, prefix, i)[0].exists()]
    index = {u: i for i, u in todo}
    keep = tuple(METADATA_FIELDS[f] for f in fields)
    loader = eval_loader([u for _, u in todo], {modality: spec}, batch_size, keep=keep, workers=workers,
                         by_shard=True)
    writer = _ShardWriter(out_dir, prefix)
    pending: dict[str, dict[str, list[Any]]] = {}
    rows, absent = 0, 0
    from tqdm import tqdm

    bar = tqdm(total=len(todo), disable=not (progress and rank == 0), desc=f"embed {modality}", unit="shard")
    start = time.perf_counter()
    try:
        for batch in loader:
            if len(batch):
                present = batch.present[modality]
                cols = pending.setdefault(batch.meta["url"][0], {"key": [], "_vecs": [], **{f: [] for f in fields}})
                cols["_vecs"].append(_embed_batch(model, modality, batch.fields[modality], present, dev, normalize,
                                                  compute, dim, layer))
                ok = present.tolist()
                cols["key"].extend(k for k, keep in zip(batch.keys, ok, strict=True) if keep)
                for f in fields:
                    values = batch.meta.get(METADATA_FIELDS[f], [None] * len(batch))
                    cols[f].extend(_cell(v, f) for v, keep in zip(values, ok, strict=True) if keep)
                rows += sum(ok)
                absent += len(ok) - sum(ok)
            for url in batch.meta["_loader"]["shards_done"]:
                bar.update(1)
                cols = pending.pop(url, None)
                if cols is None or not cols["key"]:  # written below, only if the run embeds something
                    continue
                # one device-to-host copy per shard, not per batch
                writer.submit(index[url], url, cols, torch.cat(cols.pop("_vecs")).cpu().numpy().astype(dtype))
                if stop_after_shards is not None and writer.submitted >= stop_after_shards:
                    writer.close()
                    bar.close()
                    raise SystemExit(f"embed: stopped after {writer.submitted} shards (stop_after_shards)")
        writer.close()
        if todo and not rows:  # writing nothing is an error (as in `mmpt data write`), and leaves no files
            if not manifest_existed:
                manifest.unlink(missing_ok=True)
                if not out_existed and out_dir.is_dir() and not any(out_dir.iterdir()):
                    out_dir.rmdir()
            raise DataError(f"{data}: nothing to embed: " + (
                f"none of {absent} samples has a '{modality}' member ({' '.join(spec.extensions)})" if absent
                else f"no readable sample ({format_skips(loader.state.counts())})"))
        # shards that yielded no row still get (empty) outputs, so resume is complete; the summary's
        # counts (skips, samples without the modality) say why they are empty
        for i, u in todo:
            if not output_paths(out_dir, prefix, i)[0].exists():
                _write_shard(out_dir, prefix, i, u, {"key": [], **{f: [] for f in fields}},
                             np.zeros((0, width), dtype=dtype))
                writer.submitted += 1
    finally:
        writer.close()
        bar.close()
    return EmbedSummary(str(out_dir), writer.submitted, len(mine) - len(todo), rows, loader.state.counts(), absent,
                        modality, time.perf_counter() - start)
