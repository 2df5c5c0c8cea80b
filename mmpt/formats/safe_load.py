"""Checkpoints are data: every ``torch.load`` of a run directory unpickles with ``weights_only=True``.

DeepSpeed 0.19 loads its own files with the weights-only guard off (engine resume through its checkpoint
engine, ``zero_to_fp32`` consolidation), so a crafted ``*_model_states.pt`` would run code. While
:func:`restricted_unpickling` is active, ``torch.load`` is forced to the weights-only unpickler with
exactly the DeepSpeed classes its checkpoints legitimately hold allow-listed (checked with
``torch.serialization.get_unsafe_globals_in_checkpoint`` on real ZeRO 0-3 checkpoints, plus the fp16
scaler of the same module); anything else fails with one line naming the file and the global.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mmpt.formats.messages import one_line
from mmpt.registry import ConfigError

_lock = threading.RLock()
_original_load = torch.load


class UnsafeCheckpointError(ConfigError):
    """A checkpoint file references something outside the allow-list: it is refused, nothing runs."""

    def __init__(self, path: Any, what: str):
        super().__init__(f"{path}: refusing to unpickle {what}; expected a torch.save file holding only tensors and "
                         "DeepSpeed's known state classes (this file is damaged or crafted)")


def allowed_globals() -> list[Any]:
    """The non-tensor classes DeepSpeed 0.19 pickles into its checkpoints (ZeRO 0-3, fp32/bf16/fp16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: str | Path, *args: Any, **kwargs: Any) -> Any:
    """``torch.load`` restricted to tensors, plain containers and DeepSpeed's allow-listed classes."""
    kwargs.pop("weights_only", None)
    with torch.serialization.safe_globals(allowed_globals()):
        try:
            return _original_load(path, *args, weights_only=True, **kwargs)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(path, _refused(path, str(exc))) from None


def _refused(path: Any, message: str) -> str:
    """What the weights-only unpickler refused, from torch's multi-line message: the global it names, else its
    reason (``Unsupported operand 149``) and whether the file is a bare pickle rather than torch.save's zip."""
    found = re.search(r"GLOBAL (\S+)", message)
    if found:
        return found.group(1)
    after = message.split("WeightsUnpickler error:", 1)[-1]
    reason = one_line(next((x for x in after.splitlines() if x.strip()), "unreadable"), 80)
    if isinstance(path, (str, Path)) and Path(path).is_file():
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                return f"a raw pickle (not a torch.save archive: {reason})"
    return f"a pickle the weights-only loader rejects ({reason})"


@contextlib.contextmanager
def restricted_unpickling() -> Iterator[None]:
    """Route every ``torch.load`` (DeepSpeed's included) through :func:`safe_torch_load` meanwhile."""
    with _lock:
        previous, torch.load = torch.load, safe_torch_load
        try:
            yield
        finally:
            torch.load = previous


def check_pickles(ckpt: Path) -> None:
    """Refuse a checkpoint folder if any ``*.pt`` references a global outside the allow-list (a scan of the
    pickle opcodes that runs nothing), so every rank hears of it before any rank starts loading."""
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in allowed_globals()}
    for path in sorted(Path(ckpt).glob("*.pt")):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except (RuntimeError, ValueError):
            continue  # not a zip checkpoint: the restricted loader itself refuses what it must
        bad = sorted(set(unsafe) - allowed)
        if bad:
            raise UnsafeCheckpointError(path, bad[0])
