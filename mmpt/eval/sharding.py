"""Eval shared by the ranks of a job: each rank embeds its part of the set, one all-gather assembles it.

Inside :func:`split_over_ranks` the embedding helpers of :mod:`mmpt.eval.common` give each rank a share of
the inputs (whole shards when there are at least as many shards as ranks, else every ``world``-th batch;
every ``world``-th file of a class folder; every ``world``-th batch of a text list) and gather the rows back
in a canonical order, so every rank ends with the same whole set and computes the same metrics.

Every rank must run the same collectives: a ZeRO-3 forward gathers each layer's parameters from all
ranks, so the ranks take their forwards in lockstep (:func:`in_lockstep`) and a rank whose batches have
run out runs one-sample forwards of an input it has (or is sent one) and drops their rows. Outside the context (``mmpt eval``, one process) nothing is split or gathered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import torch.distributed as dist

from mmpt.registry import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class EvalRanks:
    """This process's place among the ranks that share an eval."""

    rank: int = 0
    world: int = 1

    def owns(self, index: int) -> bool:
        """Whether this rank embeds batch (or file) number ``index`` of a round-robin split."""
        return index % self.world == self.rank


_ONE = EvalRanks()
_CURRENT: ContextVar[EvalRanks | None] = ContextVar("mmpt_eval_ranks", default=None)


def current_ranks() -> EvalRanks:
    """The ranks sharing the eval now running (one rank outside :func:`split_over_ranks`)."""
    return _CURRENT.get() or _ONE


@contextmanager
def split_over_ranks(rank: int, world: int) -> Iterator[None]:
    """Within the block, every embedding of :mod:`mmpt.eval.common` is split over ``world`` ranks; every
    rank of the process group must run the same eval inside it (the gathers are collectives)."""
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(f"eval split over {world} ranks needs an initialised process group")
    token = _CURRENT.set(EvalRanks(rank, world))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def all_gather(obj: Any, ranks: EvalRanks) -> list[Any]:
    """``obj`` of every rank, in rank order (no communication for one rank). Objects travel pickled
    between this job's own ranks; nothing read from data is unpickled."""
    if ranks.world == 1:
        return [obj]
    parts: list[Any] = [None] * ranks.world
    dist.all_gather_object(parts, obj)
    return parts


def in_lockstep(items: Iterable[tuple[T, bool]], sample: Callable[[T], Any], pad: Callable[[Any], Any],
                ranks: EvalRanks) -> Iterator[T]:
    """The items flagged True of ``items`` (this rank's inputs, each flagged whether this rank embeds
    it), yielded in steps that every rank takes together: one small all-gather a step says who still has
    one. A rank whose items have run out calls ``pad(template)`` in each step where another still has
    one, so every rank runs as many forwards as the busiest; the template is ``sample(item)`` of the
    first item it read, or one sent by a rank that has one."""
    template = None
    for item, mine in items:
        if template is None:
            template = sample(item)
        if mine:
            if ranks.world > 1:
                _, template = _step(True, template, ranks)
            yield item
    while ranks.world > 1:
        busy, template = _step(False, template, ranks)
        if not busy:
            return
        pad(template)


def _step(has_item: bool, template: Any, ranks: EvalRanks) -> tuple[bool, Any]:
    """Whether any rank has an item this step; a template for a rank that must pad without one."""
    states = all_gather((has_item, template is not None), ranks)
    busy = any(has for has, _ in states)
    if busy and any(not has and not held for has, held in states):
        source = next(r for r, (_, held) in enumerate(states) if held)  # a rank with an item has a template
        box = [template if ranks.rank == source else None]
        dist.broadcast_object_list(box, src=source)
        template = box[0] if template is None else template
    return busy, template


def canonical_order(order: list[tuple[int, ...]]) -> list[int]:
    """The permutation sorting rows by their place in the whole set (stable)."""
    return sorted(range(len(order)), key=order.__getitem__)
