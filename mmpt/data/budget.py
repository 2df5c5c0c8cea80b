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

from mmpt.contracts import MiB, SampleRejected, SampleTooLarge


def skip_reason(exc: BaseException, modality: str) -> str:
    """The reason a failed decode is counted under: ``<reason>_<modality>`` for a refusal that names its
    reason, ``decode_error_<modality>`` for anything else a decoder raised."""
    return f"{exc.reason if isinstance(exc, SampleRejected) else 'decode_error'}_{modality}"


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
