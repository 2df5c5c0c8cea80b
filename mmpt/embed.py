"""Embedding extraction at scale: clip-retrieval's layout, one output pair per input shard.

``OUT/img_emb/img_emb_<i>.npy`` (float16/float32 rows) and ``OUT/metadata/metadata_<i>.parquet``
(key, shard, row) for input shard ``i`` of the sorted shard list. Each rank takes shards
``i % world == rank``; a shard's pair is written atomically when the shard is finished, so a killed
run resumes by skipping finished shards: every key lands exactly once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

PREFIX = {"image": "img", "text": "text"}


@dataclass
class EmbedSummary:
    """What an embedding run did on this rank."""

    out: str
    shards_done: int
    shards_skipped: int
    rows: int
    skips: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        bad = sum(self.skips.values())
        return (f"embedded {self.rows} samples from {self.shards_done} shards ({self.shards_skipped} already done, "
                f"{bad} bad samples skipped) -> {self.out}")


def output_paths(out: Path, modality: str, index: int) -> tuple[Path, Path]:
    """(embeddings .npy, metadata .parquet) for input shard ``index``."""
    p = PREFIX.get(modality, modality)
    return out / f"{p}_emb" / f"{p}_emb_{index}.npy", out / "metadata" / f"metadata_{index}.parquet"


def _write_shard(out: Path, modality: str, index: int, url: str, keys: list[str], emb: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    npy, meta = output_paths(out, modality, index)
    npy.parent.mkdir(parents=True, exist_ok=True)
    meta.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"key": keys, "shard": [url] * len(keys), "row": list(range(len(keys)))})
    pq.write_table(table, str(meta) + ".tmp")
    with open(str(npy) + ".tmp", "wb") as f:
        np.save(f, emb)
    # metadata first, embeddings last: a shard counts as done only when its .npy exists
    os.replace(str(meta) + ".tmp", meta)
    os.replace(str(npy) + ".tmp", npy)


def embed(model_path: str, data: str, modality: str, out: str, *, batch_size: int = 256, workers: int = 1,
          normalize: bool = True, dtype: str = "float16", device: str | None = None, progress: bool = True,
          stop_after_shards: int | None = None) -> EmbedSummary:
    """Embed every sample of ``data`` for ``modality`` with the model at ``model_path``."""
    import mmpt
    from mmpt.data.loader import eval_loader
    from mmpt.data.shards import expand_urls

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dev = torch.device(device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"))
    model, transforms, _ = mmpt.load(model_path, dev)
    if modality not in transforms:
        raise ValueError(f"--modality {modality}: the model has no {modality!r} encoder (has {', '.join(transforms)})")
    urls = expand_urls(data)
    out_dir = Path(out)
    mine = [(i, u) for i, u in enumerate(urls) if i % world == rank]
    todo = [(i, u) for i, u in mine if not output_paths(out_dir, modality, i)[0].exists()]
    index = {u: i for i, u in todo}
    loader = eval_loader([u for _, u in todo], {modality: transforms[modality]}, batch_size, workers=workers,
                         by_shard=True)
    pending: dict[str, tuple[list[str], list[np.ndarray]]] = {}
    rows, finished = 0, 0
    from tqdm import tqdm

    bar = tqdm(total=len(todo), disable=not (progress and rank == 0), desc=f"embed {modality}", unit="shard")
    for batch in loader:
        if len(batch):
            url = batch.meta["url"][0]
            fields = {k: v.to(dev) for k, v in batch.fields[modality].items()}
            with torch.no_grad():
                e = model.model.encode_fields(modality, fields)
                vec = e.embedding if normalize else model.model.heads[modality](e.pooled).float()
            keys, vecs = pending.setdefault(url, ([], []))
            keep = batch.present[modality].tolist()
            keys.extend(k for k, ok in zip(batch.keys, keep, strict=True) if ok)
            vecs.append(vec[batch.present[modality].to(dev)].cpu().numpy().astype(dtype))
            rows += int(sum(keep))
        for url in batch.meta["_loader"]["shards_done"]:
            keys, vecs = pending.pop(url, ([], []))
            emb = np.concatenate(vecs) if vecs else np.zeros((0, model.model.embed_dim), dtype=dtype)
            _write_shard(out_dir, modality, index[url], url, keys, emb)
            finished += 1
            bar.update(1)
            if stop_after_shards is not None and finished >= stop_after_shards:
                bar.close()
                raise SystemExit(f"embed: stopped after {finished} shards (stop_after_shards)")
    # shards that yielded no readable sample at all still get (empty) outputs, so resume is complete
    for i, u in todo:
        if not output_paths(out_dir, modality, i)[0].exists():
            _write_shard(out_dir, modality, i, u, [], np.zeros((0, model.model.embed_dim), dtype=dtype))
            finished += 1
    bar.close()
    return EmbedSummary(str(out_dir), finished, len(mine) - len(todo), rows, loader.state.total_skips())
