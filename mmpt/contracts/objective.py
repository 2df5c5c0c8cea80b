"""What every objective is: ``forward(outputs, batch[, model]) -> ObjectiveOutput`` plus class-level facts."""

from __future__ import annotations

from torch import nn

from mmpt.contracts.batch import Batch
from mmpt.contracts.records import EncoderOutput, ObjectiveOutput


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
    # Keyword arguments naming mmpt export files of frozen models the objective borrows (a distillation
    # teacher): the pretrainer builder loads each file (a path or a list of paths) and passes the frozen
    # Pretrainer(s) instead. Their tensors live under ``objectives.<name>.<key>.`` and are not part of the
    # model: state dicts, checkpoints' consolidation and exports leave them out.
    frozen_models: tuple[str, ...] = ()
    # Modalities whose tower and head the objective keeps a copy of (an EMA teacher), set in ``__init__``: the
    # pretrainer builder builds each again from the model's config and calls ``adopt_copies(towers, heads,
    # micro_batches)`` before the objective is partitioned, so ZeRO-3 shards every copy as its student.
    copied_modalities: tuple[str, ...] = ()
    # Submodule names under the objective that checkpoints keep (a resumed run needs them) and exports leave out.
    export_excludes: tuple[str, ...] = ()
    # Keys that read weights or other files at construction, with their off values: reset when a model
    # is rebuilt from a file (data reads no other file), as ``Encoder.weight_sources``.
    weight_sources: dict = {}

    def forward(self, outputs: dict[str, EncoderOutput], batch: Batch) -> ObjectiveOutput:  # pragma: no cover
        raise NotImplementedError
