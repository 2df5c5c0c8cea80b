"""Contracts shared by every objective: typed output and the helpers to read a batch."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from mmpt.data.batch import Batch
from mmpt.encoders.base import EncoderOutput


@dataclass
class ObjectiveOutput:
    """Loss of one objective plus detached metrics (accuracy, logit scale, ...)."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


class Objective(nn.Module):
    """Base class: ``forward(outputs, batch) -> ObjectiveOutput``.

    ``modalities`` lists the modalities the objective reads, so the pretrainer encodes only those.
    """

    modalities: tuple[str, ...] = ()

    def forward(self, outputs: dict[str, EncoderOutput], batch: Batch) -> ObjectiveOutput:  # pragma: no cover
        raise NotImplementedError
