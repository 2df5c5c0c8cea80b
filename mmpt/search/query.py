"""Queries through the model's own data sides, and a small micro-batching queue in front of the model.

A typed query becomes the member a table cell would (``ModalityData.inline_members``: a caption, a
sequence); an uploaded file becomes the members ``mmpt data write`` would make of it
(``source_samples``: a PLY becomes an ``npy``, an image is named by its bytes). Either is then decoded by
``decode_within_budget`` and transformed for eval, exactly as a shard member in training. Nothing here
knows what a modality is.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np


class QueryError(ValueError):
    """A query the server refuses: ``status`` is the HTTP status, the message says why in one line."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def describe_sides(transforms: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per modality: whether it takes typed text (its side has an ``inline_ext``) and the upload suffixes."""
    return {m: {"text": side.inline_ext is not None, "upload": list(side.source_suffixes()),
                "max_bytes": int(side.max_sample_bytes)} for m, side in transforms.items()}


def query_value(side: Any, *, text: str | None = None, data: bytes | None = None, suffix: str | None = None) -> Any:
    """The eval-transformed value of one query for data side ``side``: typed ``text`` or uploaded ``data``
    whose file suffix is ``suffix`` (None: sniffed by the side as its first extension)."""
    from mmpt.contracts import SampleRejected, SampleTooLarge
    from mmpt.data.budget import decode_within_budget
    from mmpt.registry import ConfigError

    m = side.modality
    if text is not None:
        if side.inline_ext is None:
            raise QueryError(f"modality {m}: takes an uploaded file ({', '.join(side.source_suffixes())}), "
                             "not typed text")
        if not text.strip():
            raise QueryError(f"modality {m}: empty query text")
        try:
            members = side.inline_members(text)
        except SampleRejected as exc:
            raise QueryError(f"modality {m}: {exc}") from None
    else:
        if not data:
            raise QueryError(f"modality {m}: empty upload")
        ext = (suffix or side.extensions[0]).lower().lstrip(".")
        if ext not in side.source_suffixes():
            raise QueryError(f"modality {m}: .{ext} files are not taken; expected one of "
                             f"{', '.join(side.source_suffixes())}", 415)
        try:
            samples = side.source_samples(data, ext)
        except SampleRejected as exc:
            raise QueryError(f"modality {m}: the uploaded .{ext} file: {exc}", 415) from None
        if not samples:
            raise QueryError(f"modality {m}: the uploaded .{ext} file holds no sample")
        members = samples[0].members
    ext = next((e for e in side.extensions if e in members), None)
    if ext is None:
        raise QueryError(f"modality {m}: the query gave no member this side decodes ({', '.join(side.extensions)})")
    try:
        return side.transform(decode_within_budget(side, members[ext], ext), False)
    except SampleTooLarge as exc:
        raise QueryError(f"modality {m}: {exc}", 413) from None
    except (SampleRejected, ConfigError, ValueError, RuntimeError, OSError, TypeError) as exc:
        # decoders raise what their libraries raise (PIL, soundfile, numpy): the query is what is wrong
        raise QueryError(f"modality {m}: cannot decode the query as .{ext}: {exc}") from None


@dataclass
class Job:
    """One query waiting for the model: its modality and value (or a ready vector), top-k and filter."""

    modality: str | None
    value: Any
    k: int
    target: str | None
    vector: np.ndarray | None = None


class Busy(RuntimeError):
    """The queue is full: the server answers 503."""


class MicroBatcher:
    """Collects jobs for up to ``max_wait`` seconds (or ``max_batch`` jobs) and runs them as one call of
    ``run(jobs) -> results`` on its own thread: the model is loaded once and sees batches under load."""

    def __init__(self, run: Callable[[list[Job]], list[Any]], max_batch: int = 32, max_wait: float = 0.004,
                 max_pending: int = 512):
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait
        self.jobs: queue.Queue[tuple[Job, Future] | None] = queue.Queue(max_pending)
        self.batches = self.done = 0
        self.thread = threading.Thread(target=self._loop, name="mmpt-search-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Future:
        """Queue a job; its future gets the result or the exception ``run`` raised."""
        fut: Future = Future()
        try:
            self.jobs.put_nowait((job, fut))
        except queue.Full:
            raise Busy("the server is busy (query queue full); retry") from None
        return fut

    def close(self) -> None:
        """Stop the thread after the queued jobs."""
        self.jobs.put(None)
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            batch, stop = [first], False
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    item = self.jobs.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self.batches += 1
            try:
                results = self.run([j for j, _ in batch])
                for (_, fut), res in zip(batch, results, strict=True):
                    fut.set_result(res)
                self.done += len(batch)
            except Exception as exc:  # every waiting request hears it
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
            if stop:
                return


class Searcher:
    """The model (loaded once) and the index: embeds batches of jobs grouped by modality, searches them."""

    def __init__(self, model: Any, transforms: dict[str, Any], store: Any, *, normalize: bool = True,
                 precision: str = "fp32", max_batch: int = 32):
        import torch

        self.model, self.transforms, self.store = model, transforms, store
        self.normalize, self.precision = normalize, precision
        self.device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
        self.batcher = MicroBatcher(self.run, max_batch=max_batch)

    def run(self, jobs: list[Job]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Embed the jobs (one forward per modality present), then one search per (k, filter) group."""
        import torch

        from mmpt.commands.embed import _embed_batch

        vectors: list[np.ndarray | None] = [j.vector for j in jobs]
        by_modality: dict[str, list[int]] = {}
        for i, j in enumerate(jobs):
            if j.vector is None:
                by_modality.setdefault(str(j.modality), []).append(i)
        for m, rows in by_modality.items():
            fields = self.transforms[m].collate([jobs[i].value for i in rows])
            present = torch.ones(len(rows), dtype=torch.bool)
            vec = _embed_batch(self.model, m, fields, present, self.device, self.normalize, self.precision)
            out = vec.float().cpu().numpy()
            for r, i in enumerate(rows):
                vectors[i] = out[r]
        results: list[Any] = [None] * len(jobs)
        groups: dict[str | None, list[int]] = {}
        for i, j in enumerate(jobs):
            groups.setdefault(j.target, []).append(i)
        for target, rows in groups.items():
            k = max(jobs[i].k for i in rows)
            scores, ids = self.store.search(np.stack([vectors[i] for i in rows]), k, target)
            for r, i in enumerate(rows):
                results[i] = (scores[r, :jobs[i].k], ids[r, :jobs[i].k])
        return results

    def close(self) -> None:
        """Stop the batching thread."""
        self.batcher.close()
