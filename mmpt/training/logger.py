"""Run logs: JSONL of every logged step and TensorBoard events (rank 0 only; loss.png is plot.py).

Each step appears once: a (re)started run first cuts every log back to its start step (records of steps
it will run again came from a run that crashed after its last checkpoint), and logs are flushed and
fsynced at every checkpoint, so what a checkpoint covers survives a ``kill -9``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class RunLogger:
    """Writes ``metrics.jsonl`` and TensorBoard events under the run directory."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True, start: int = 0):
        self.dir = Path(run_dir)
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open_from(self.dir / "metrics.jsonl", start)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step hides events of steps > start that an earlier, crashed run wrote
                self._tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=start + 1)

    def log(self, step: int, values: dict[str, Any], kind: str = "train") -> None:
        """Append one record; numbers also go to TensorBoard as ``kind/name``."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)
            self._tb.flush()

    def sync(self) -> None:
        """Make every record so far durable (called at each checkpoint)."""
        if self._jsonl:
            fsync(self._jsonl)
        if self._tb:
            self._tb.flush()

    def close(self) -> None:
        """Close the JSONL file and the TensorBoard writer."""
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()


class StepRecords:
    """``keys_rank<r>.jsonl``: one record per micro-step (keys, loss) of this rank; false when disabled."""

    def __init__(self, path: Path, enabled: bool, start: int = 0):
        # its "step" is the 0-based index of the step, so a run starting after `start` steps keeps < start
        self._f = open_from(path, start, offset=1) if enabled else None

    def __bool__(self) -> bool:
        return self._f is not None

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (buffered; durable at the next :meth:`sync`)."""
        self._f.write(json.dumps(record) + "\n")

    def sync(self) -> None:
        """Make every record so far durable (called at each checkpoint)."""
        if self._f:
            fsync(self._f)

    def close(self) -> None:
        """Close the file."""
        if self._f:
            self._f.close()


def fsync(f: Any) -> None:
    """Flush ``f`` to the OS and the OS to the disk."""
    f.flush()
    os.fsync(f.fileno())


def open_from(path: Path, start: int, offset: int = 0) -> Any:
    """Open a JSONL log for appending after dropping records of steps after ``start`` (``step + offset >
    start``) and any torn last line, so records of re-run steps appear once."""
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)
        keep = [x for x in lines if _before(x, start, offset)]
        if len(keep) != len(lines):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(keep))
            os.replace(tmp, path)
    return open(path, "a")


def _before(line: str, start: int, offset: int) -> bool:
    if not line.endswith("\n"):
        return False  # torn by a crash mid-write
    try:
        rec = json.loads(line)
    except ValueError:
        return False
    step = rec.get("step") if isinstance(rec, dict) else None
    return not isinstance(step, int) or step + offset <= start


def read_jsonl(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl, optionally of one kind."""
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                if kind is None or rec.get("kind") == kind:
                    out.append(rec)
    return out
