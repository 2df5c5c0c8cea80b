"""What every modality encoder is (``nn.Module`` + class-level facts) and the tokenizer contract of token modalities."""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

from torch import Tensor, nn

from mmpt.contracts.records import EncoderOutput


class Encoder(nn.Module):
    """Base class of every modality encoder."""

    modality: ClassVar[str] = ""
    width: int
    # Keyword sets that build this encoder in milliseconds: the every-encoder contract test and the
    # ZeRO-3 init test run each, so a new encoder is tested by adding its file alone.
    tiny_configs: ClassVar[tuple[dict[str, Any], ...]] = ()
    # Keyword arguments that load weights while constructing (hub weights, a local file) and the value
    # that turns each off. Loading an export resets them: its tensors already hold the weights, and a
    # model file must not fetch or read anything else.
    weight_sources: ClassVar[dict[str, Any]] = {}

    def forward(self, inputs: dict[str, Tensor]) -> EncoderOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory in the trunk."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this module) excluded from weight decay besides norms and biases."""
        return set()

    def layer_trunk(self) -> nn.Module | None:
        """The block stack layer exits truncate (Starbucks, ``mmpt embed --layer``): ``self.trunk`` when it is
        the shared ``mmpt.nn.layers.Transformer`` (it has ``exit_at``); None: this tower has no layer exits."""
        trunk = getattr(self, "trunk", None)
        return trunk if hasattr(trunk, "exit_at") else None


class Tokenizer(Protocol):
    """Contract of every token modality's tokenizer."""

    vocab_size: int
    pad_id: int
    mask_id: int
    bos_id: int | None
    eos_id: int | None
    context_length: int

    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Return ids (B, L) long and mask (B, L) bool (True on real tokens)."""
        ...
