"""The data side of a modality: extensions, decode under a byte budget, transform, collate, demo rendering.

A data side that refuses a sample for a named reason raises :class:`SampleRejected` (the loader counts
``<reason>_<modality>``); one over its byte budget, :class:`SampleTooLarge`
(:func:`mmpt.data.budget.decode_within_budget` enforces the budget around ``decode``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor

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


@dataclass(frozen=True)
class DemoConcepts:
    """Attributes of N demo samples, shared by every modality that renders them (``mmpt data demo``).

    Each field is an (N,) int array indexing the vocabularies of :mod:`mmpt.data.concepts`: ``shape`` into
    ``SHAPES`` (8), ``color`` into ``COLORS`` (10), ``size`` into ``SIZES`` (3), ``position`` into
    ``POSITIONS`` (5). Zero-shot prompts name shape and colour, so every modality renders at least
    those two learnably (an image draws them; a sound might map shape to rhythm and colour to pitch).
    """

    shape: Any
    color: Any
    size: Any
    position: Any

    def __len__(self) -> int:
        return len(self.shape)


@dataclass
class SourceSample:
    """One sample a source file becomes (``mmpt data write``): its shard ``members`` (``{ext: bytes}``), and
    what the file itself says about it: a ``caption`` (a FASTA header's description) and ``meta`` for the
    sample's ``json`` member. Most files are one sample; a FASTA file is one per record."""

    members: dict[str, bytes]
    caption: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class ModalityData:
    """Data side of a modality: extensions, decode, transform and collate.

    ``decode`` and ``transform`` run per sample in DataLoader workers; ``collate`` runs once per
    batch and should do the heavy lifting as batch tensor ops. ``collate`` receives ``None`` for
    samples lacking the modality and must produce rows for them anyway (the batch's presence mask
    says which rows are real).

    Writing shards (``mmpt data write``) asks the data side two things: ``source_extensions``, the file
    extensions it takes from users' folders and tables (default: its shard ``extensions``), and
    ``source_samples(data, ext)``, what one such file becomes: shard members the loader's ``decode`` reads
    (default: the bytes as they are, under their extension). ``inline_ext`` names the member a table cell's
    own text becomes when it is no file name (text captions, protein sequences; default: none, a cell is
    always a path). The writer then validates each sample with the loader's decode under the same budget.

    ``max_sample_bytes`` is what one decoded sample may cost (``data.max_sample_bytes.<modality>``
    overrides it per run); ``decoded_size`` reads what a member *will* decode to from its header and
    ``sample_size`` what a decoded value holds. The core checks both around ``decode``
    (:func:`mmpt.data.budget.decode_within_budget`) and skips a sample over it as ``too_large_<modality>``,
    so a new modality is guarded by declaring its limit and, where its format has a header, reading it.
    """

    modality: ClassVar[str] = ""
    extensions: ClassVar[tuple[str, ...]] = ()
    max_sample_bytes: int = 256 * MiB
    # True for the side whose samples are words (prompts, captions): ``mmpt.load`` returns its tokenizer as
    # OpenCLIP's ``create_model_and_transforms`` + ``get_tokenizer`` users expect.
    natural_language: ClassVar[bool] = False

    @classmethod
    def from_encoder_config(cls, **cfg: Any) -> ModalityData:
        """Build from an encoder's keyword arguments, taking only the keys this class needs."""
        import inspect

        accepted = inspect.signature(cls.__init__).parameters
        return cls(**{k: v for k, v in cfg.items() if k in accepted})

    # ``mmpt data write``: which source files this side takes and what each becomes (see the class docstring).
    source_extensions: ClassVar[tuple[str, ...]] = ()
    inline_ext: ClassVar[str | None] = None

    def source_suffixes(self) -> tuple[str, ...]:
        """Lower-case source file extensions (no dot) this side takes: ``source_extensions`` or, when a side
        declares none, its shard ``extensions``."""
        return tuple(e.lower() for e in (self.source_extensions or self.extensions))

    def source_samples(self, data: bytes, ext: str) -> list[SourceSample]:
        """The sample(s) one source file with extension ``ext`` becomes; default: one sample holding the bytes
        unchanged as member ``ext``. Raise :class:`SampleRejected` (with a reason) for a file that cannot be one."""
        if ext not in self.extensions:
            raise SampleRejected(f"{self.modality}: no shard member for .{ext} files", reason="unsupported_format")
        return [SourceSample({ext: data})]

    def inline_members(self, value: str) -> dict[str, bytes]:
        """Members for a table cell holding the value itself (a caption, a sequence): ``{inline_ext: utf-8}``."""
        if self.inline_ext is None:
            raise SampleRejected(f"{self.modality}: a table cell must name a file", reason="not_a_file")
        return {self.inline_ext: value.encode("utf-8")}

    def decode(self, data: bytes, ext: str) -> Any:
        raise NotImplementedError

    def decoded_size(self, data: bytes, ext: str) -> int | None:
        """Bytes ``decode`` will allocate for this member, read from its header without decoding; None
        when the member's own size bounds it (default)."""
        return None

    def sample_size(self, value: Any) -> int:
        """Bytes a decoded value holds (default: its tensors, arrays and text)."""
        return value_size(value)

    def transform(self, value: Any, train: bool) -> Any:
        return value

    def collate(self, values: list[Any]) -> dict[str, Tensor]:
        raise NotImplementedError

    def prepare(self, raw: list[Any], train: bool = False) -> dict[str, Tensor]:
        """Turn raw user inputs (PIL images, strings, arrays, tensors) into collated fields."""
        return self.collate([self.transform(self.coerce(x), train) for x in raw])

    def coerce(self, value: Any) -> Any:
        """Convert one raw user input into what ``transform`` takes (default: unchanged)."""
        return value

    def render_demo(self, concepts: DemoConcepts, rng: Any) -> list[dict[str, bytes]]:
        """Shard members (``{ext: bytes}``, decodable by :meth:`decode`) rendering each demo concept;
        ``rng`` is a ``numpy.random.Generator``. Vectorise over the N concepts where it pays."""
        raise NotImplementedError(f"modality {self.modality!r} has no demo renderer")

    @property
    def file_prefix(self) -> str:
        """Prefix of this modality's output files (``<prefix>_emb/``); default: the modality name."""
        return self.modality

    def fields_from_tensor(self, x: Tensor) -> dict[str, Tensor]:
        """Collated fields from one bare batch tensor a user passed to ``encode``, checked; a modality
        whose fields cannot be told from one tensor refuses it (default)."""
        from mmpt.registry import ConfigError

        raise ConfigError(f"encode('{self.modality}', tensor): a bare tensor is ambiguous for this modality; "
                          f"pass a dict of collated fields or a list of raw inputs")
