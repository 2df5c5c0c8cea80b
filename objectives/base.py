"""Contracts shared by every objective: typed output and the helpers to read a batch."""

from __future__ import annotations

from torch import Tensor, nn

from mmpt.data.batch import Batch
from mmpt.encoders.base import EncoderOutput, TensorRecord


class ObjectiveOutput(TensorRecord):
    """Loss of one objective plus detached metrics (accuracy, logit scale, ...); a dict subclass so
    ZeRO-3 hooks the backward of objectives that own parameters (see TensorRecord)."""

    loss: Tensor
    metrics: dict[str, Tensor]

    def __init__(self, loss: Tensor, metrics: dict[str, Tensor] | None = None):
        super().__init__(loss=loss, metrics=metrics or {})


class Objective(nn.Module):
    """Base class: ``forward(outputs, batch) -> ObjectiveOutput``.

    ``modalities`` lists the modalities the objective reads, so the pretrainer encodes only those (all of
    them when an objective leaves it None).
    An objective that must run a tower on inputs of its own (masked modelling encodes masked ids or
    the visible patches) sets ``uses_model = True`` and is called ``forward(outputs, batch, model)``
    with the :class:`~mmpt.model.MultimodalModel`: calling a tower's ``forward`` (a module call) keeps
    ZeRO-3's parameter fetch and release; reaching into a tower's own parameters outside a module call
    does not (see docs/design.md, "Objectives that run a tower").
    """

    # None: the objective does not say, so every modality is encoded; () reads no encoder output (an
    # objective that encodes inputs of its own, such as masked modelling, sets that).
    modalities: tuple[str, ...] | None = None
    # Modalities whose per-token projected embeddings (``EncoderOutput.token_embedding``) it reads.
    token_modalities: tuple[str, ...] = ()
    # True: forward also takes the MultimodalModel, to encode inputs of its own (masked modelling).
    uses_model: bool = False
    # Keyword sets that build this objective in milliseconds, for the ZeRO-3 init test (see Encoder).
    tiny_configs: tuple[dict, ...] = ()

    def forward(self, outputs: dict[str, EncoderOutput], batch: Batch) -> ObjectiveOutput:  # pragma: no cover
        raise NotImplementedError
