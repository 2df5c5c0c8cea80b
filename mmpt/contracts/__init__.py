"""The core's shared types: what an encoder, a modality's data side and an objective are, and what they
exchange. Plugins (``encoders/``, ``objectives/``, entry points) implement these; the core builds on them.
This package imports nothing else of mmpt but the registry's error type.
"""

from mmpt.contracts.batch import Batch
from mmpt.contracts.encoder import Encoder, Tokenizer
from mmpt.contracts.modality import (
           DemoConcepts,
           MiB,
           ModalityData,
           SampleRejected,
           SampleTooLarge,
           SourceSample,
           value_size,
)
from mmpt.contracts.objective import Objective
from mmpt.contracts.records import EncoderOutput, ObjectiveOutput, StemOutput, TensorRecord

__all__ = ["Batch", "DemoConcepts", "Encoder", "EncoderOutput", "MiB", "ModalityData", "Objective", "ObjectiveOutput",
           "SampleRejected", "SampleTooLarge", "SourceSample", "StemOutput", "TensorRecord", "Tokenizer", "value_size"]
