"""Decide on rank 0, tell every rank: a failure there must stop all ranks, not leave them in a collective;
and the reverse, a problem any rank found, heard by all (:func:`first_from_any_rank`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from mmpt.registry import ConfigError

T = TypeVar("T")


def on_rank0(fn: Callable[[], T], share: bool = False) -> T | None:
    """Run ``fn`` on rank 0 only; its exception is raised on every rank (as ConfigError elsewhere when it was
    one there); with ``share`` every rank returns rank 0's (picklable) result, else the others get None."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    result: Any = None
    failure: BaseException | None = None
    if rank == 0:
        try:
            result = fn()
        except Exception as exc:  # every kind: the other ranks must hear of it
            failure = exc
    if world > 1:
        box = [None if failure is None else (isinstance(failure, ConfigError), str(failure)),
               result if share and failure is None else None]
        dist.broadcast_object_list(box, src=0)
        if rank != 0:
            if box[0] is not None:
                is_config, text = box[0]
                raise ConfigError(text) if is_config else RuntimeError(f"rank 0 failed: {text}")
            return box[1]
    if failure is not None:
        raise failure
    return result


def first_from_any_rank(message: str | None) -> str | None:
    """The first non-empty ``message`` over ranks (rank order), the same on every rank; every rank must call
    it, so a problem one rank found stops all of them instead of leaving the others in a collective."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return message
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    return next((m for m in messages if m), None)
