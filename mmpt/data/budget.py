"""What one sample may cost: the byte budget every data side declares and the core enforces.

A worker must never spend gigabytes or tens of seconds on one sample, whatever its modality. Each
``ModalityData`` declares ``max_sample_bytes`` (its default; ``data.max_sample_bytes.<modality>``
overrides it) and two measures of a sample:

* ``decoded_size(data, ext)``: what decoding *will* allocate, read from the member's header without
  decoding it (image width x height, audio frames x channels, an ``.npz`` member's uncompressed size);
  ``None`` when the format has no header worth reading (the member's own size then bounds it);
* ``sample_size(value)``: what the decoded value holds.

:func:`decode_within_budget` checks the member's size and the header's claim *before* decoding and the
result after, so a lying header costs nothing and an honest but huge sample is refused cheaply. A
data side that refuses a sample for a reason of its own (an absurd sample rate) raises
:class:`SampleRejected` with that reason; the loader counts ``<reason>_<modality>``.
"""

from __future__ import annotations

from typing import Any

MiB = 1 << 20


class SampleRejected(ValueError):
    """A sample a data side refuses for a named reason; counted as ``<reason>_<modality>``."""

    reason: str = "rejected"

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class SampleTooLarge(SampleRejected):
    """A sample over its modality's byte budget (before or after decoding)."""

    reason = "too_large"


def skip_reason(exc: BaseException, modality: str) -> str:
    """The reason a failed decode is counted under: ``<reason>_<modality>`` for a refusal that names its
    reason, ``decode_error_<modality>`` for anything else a decoder raised."""
    return f"{exc.reason if isinstance(exc, SampleRejected) else 'decode_error'}_{modality}"


def value_size(value: Any) -> int:
    """Bytes held by a decoded value: tensors and arrays by their buffers, text by its length, containers
    and dataclasses by their parts (anything else counts 0)."""
    if value is None:
        return 0
    if isinstance(value, (str, bytes, bytearray)):
        return len(value)
    nbytes = getattr(value, "nbytes", None)  # numpy arrays, torch tensors (torch >= 2.1)
    if isinstance(nbytes, int):
        return nbytes
    if isinstance(value, dict):
        return sum(value_size(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(value_size(v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return sum(value_size(getattr(value, f)) for f in value.__dataclass_fields__)
    return 0


def decode_within_budget(spec: Any, data: bytes, ext: str, budget: int | None = None) -> Any:
    """``spec.decode(data, ext)`` under ``budget`` bytes (default: the data side's ``max_sample_bytes``):
    raises :class:`SampleTooLarge` naming the measure that exceeded it, from the member's size or its
    header before decoding, or from the decoded value after."""
    limit = spec.max_sample_bytes if budget is None else budget
    name = f"{spec.modality} {ext} member"
    if len(data) > limit:
        raise SampleTooLarge(f"{name} of {_size(len(data))} exceeds max_sample_bytes={_size(limit)}")
    claimed = spec.decoded_size(data, ext)
    if claimed is not None and claimed > limit:
        raise SampleTooLarge(f"{name} would decode to {_size(claimed)} (from its header), over "
                             f"max_sample_bytes={_size(limit)}")
    value = spec.decode(data, ext)
    held = spec.sample_size(value)
    if held > limit:
        raise SampleTooLarge(f"{name} decoded to {_size(held)}, over max_sample_bytes={_size(limit)}")
    return value


def _size(n: int) -> str:
    return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n} bytes"
