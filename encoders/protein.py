"""Protein modality: the ESM-2 tokenizer (ESM's alphabet and id order, so ESM checkpoints map later), an
ESM-2-style transformer from scratch with rotary positions (``protein/transformer``), the data side (decode
``seq`` and ``fasta``/``fa``, crop, tokenize the batch in collate) and the demo renderer.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmpt.contracts import (
    DemoConcepts,
    Encoder,
    EncoderOutput,
    MiB,
    ModalityData,
    SampleRejected,
    SourceSample,
)
from mmpt.nn.layers import Attention, Transformer, masked_mean
from mmpt.registry import ConfigError, encoders, modalities

# ESM-2's alphabet in ESM's id order (esm.data.Alphabet.from_architecture("ESM-1b")).
ESM_TOKENS: tuple[str, ...] = ("<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWC", *"XBUZO", ".", "-",
                               "<null_1>", "<mask>")
# Letters a sequence may contain: every one-character token (residues, ambiguity codes, alignment gaps).
SEQUENCE_LETTERS = "".join(t for t in ESM_TOKENS if len(t) == 1)


class ProteinTokenizer:
    """ESM-2's tokenizer behind the mmpt tokenizer contract: one token per residue, ``<cls>`` and ``<eos>``
    around each sequence, ``<pad>`` after it. Encoding is one table lookup over the bytes of the whole batch.

    Special-token text inside a sequence (``"<mask>"``) is not parsed: every character is one token, and
    characters outside the alphabet (lower case included) become ``<unk>``.
    """

    def __init__(self, context_length: int = 1024):
        if context_length < 3:
            raise ConfigError(f"protein context_length={context_length}: need at least 3 (cls, a residue, eos)")
        self.context_length = context_length
        self.tokens = ESM_TOKENS
        ids = {t: i for i, t in enumerate(ESM_TOKENS)}
        self.bos_id, self.pad_id, self.eos_id = ids["<cls>"], ids["<pad>"], ids["<eos>"]
        self.unk_id, self.mask_id = ids["<unk>"], ids["<mask>"]
        self.vocab_size = len(ESM_TOKENS)
        self.special_ids = {self.bos_id, self.pad_id, self.eos_id}
        self._lut = np.full(256, self.unk_id, np.int64)
        for letter in SEQUENCE_LETTERS:
            self._lut[ord(letter)] = ids[letter]

    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Sequences -> ids (B, L) and mask (B, L); longer sequences are cut to L - 2 residues, keeping eos."""
        n, body = self.context_length, self.context_length - 2
        raw = [s.encode("ascii", "replace")[:body] for s in texts]  # non-ASCII -> '?' -> <unk>, one per char
        lengths = np.fromiter((len(r) for r in raw), np.int64, len(raw))
        ids = np.full((len(raw), n), self.pad_id, np.int64)
        ids[:, 0] = self.bos_id
        flat = np.frombuffer(b"".join(raw), np.uint8)
        rows = np.repeat(np.arange(len(raw)), lengths)
        starts = np.cumsum(lengths) - lengths
        cols = 1 + np.arange(len(flat)) - np.repeat(starts, lengths)
        ids[rows, cols] = self._lut[flat]
        ids[np.arange(len(raw)), lengths + 1] = self.eos_id
        mask = np.arange(n)[None, :] < (lengths + 2)[:, None]
        return torch.from_numpy(ids), torch.from_numpy(mask)

    def word_ids(self, ids: Tensor) -> Tensor:
        """(B, L) index of the residue each token is (0, 1, ...), -1 on cls/eos/pad: whole-word masking of
        a protein masks residues, never the special tokens."""
        residue = residue_mask(ids, self)
        return torch.where(residue, residue.long().cumsum(1) - 1, torch.full_like(ids, -1))

    def decode(self, ids: list[int]) -> str:
        """Ids -> sequence up to the first eos; cls and pad dropped, other specials written as tokens."""
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return "".join(self.tokens[i] for i in ids if i not in self.special_ids)


def residue_mask(ids: Tensor, tok: ProteinTokenizer) -> Tensor:
    """True on tokens that stand for a residue (everything but cls, eos and pad)."""
    return (ids != tok.bos_id) & (ids != tok.eos_id) & (ids != tok.pad_id)


def check_hf_alphabet(folder: str | None, config: Any, tok: ProteinTokenizer) -> None:
    """protein/hf: the folder's tokenizer (or, without one, its vocabulary size) must be ESM-2's alphabet in
    ESM's order, since sequences are tokenized with :class:`ProteinTokenizer`."""
    from pathlib import Path

    vocab_file = Path(folder or "") / "vocab.txt"
    if folder and vocab_file.is_file():
        theirs = tuple(line.strip() for line in vocab_file.read_text().splitlines() if line.strip())
        if theirs != tok.tokens:
            raise ConfigError(f"protein/hf folder={folder}: vocab.txt ({len(theirs)} tokens, starting {theirs[:4]}) "
                              f"is not ESM-2's alphabet in ESM's order ({len(tok.tokens)} tokens)")
    elif getattr(config, "vocab_size", None) != tok.vocab_size:
        raise ConfigError(f"protein/hf folder={folder}: no vocab.txt and vocab_size={getattr(config, 'vocab_size', None)}; "
                          f"expected ESM-2's {tok.vocab_size}-token alphabet")


def rope_angles(positions: Tensor, dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos, sin (T, dim) of rotary embeddings at ``positions`` (T,), in ESM-2's (GPT-NeoX) half-split layout."""
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (..., T, dim) query or key vectors by their position's angles; dot products of rotated q and k
    then depend on positions only through their difference."""
    x1, x2 = x.float().chunk(2, -1)
    rotated = torch.cat([-x2, x1], -1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


class RotaryAttention(nn.Module):
    """Bidirectional SDPA self-attention with rotary q/k, built on an :class:`mmpt.nn.layers.Attention`'s own
    projections (same parameter names and init as the shared trunk, so LoRA and checkpoints see no change)."""

    def __init__(self, attn: Attention, base: float = 10000.0):
        super().__init__()
        self.heads, self.qkv, self.proj, self.base = attn.heads, attn.qkv, attn.proj, base

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # tokens start at position 0 (cls) and padding only follows them, so positions are 0..T-1
        cos, sin = rope_angles(torch.arange(t, device=x.device), d // self.heads, self.base)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attn_mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


@encoders.register("protein/transformer")
class ProteinTransformer(Encoder):
    """ESM-2-style protein encoder from scratch: token embedding -> pre-norm bidirectional transformer with
    rotary position embeddings (no learned positions) -> final LayerNorm -> CLS or mean pooling.

    ``tokens`` are aligned with the input ids (B, L, D); ``mask`` is True on residues only (not cls, eos or
    padding), so per-residue heads and probes read residue i at token i + 1. ESM-2 8M is width 320, depth 6,
    heads 20.

    Args: context_length: tokens per sequence including cls and eos (longer sequences are cropped).
    width: token width. depth: transformer blocks. heads: attention heads. mlp_ratio: MLP hidden size over
    width. pool: 'cls' (the cls token) or 'mean' (mean over residues). rope_base: rotary frequency base.
    """

    modality = "protein"
    tiny_configs = ({"context_length": 16, "width": 32, "depth": 2, "heads": 2, "pool": "mean"},)

    def __init__(self, context_length: int = 1024, width: int = 320, depth: int = 6, heads: int = 20,
                 mlp_ratio: float = 4.0, pool: str = "cls", rope_base: float = 10000.0):
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ConfigError(f"protein/transformer pool={pool!r}: expected 'cls' or 'mean'")
        if width % heads or (width // heads) % 2:
            raise ConfigError(f"protein/transformer width={width}, heads={heads}: the head size must be even "
                              "(rotary embeddings rotate pairs of dimensions)")
        self.tokenizer = ProteinTokenizer(context_length)
        self.width, self.pool, self.context_length = width, pool, context_length
        self.token_embed = nn.Embedding(self.tokenizer.vocab_size, width)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        self.trunk = Transformer(width, depth, heads, mlp_ratio)
        for block in self.trunk.blocks:
            block.attn = RotaryAttention(block.attn, rope_base)
        self.norm = nn.LayerNorm(width)

    def forward(self, inputs: dict[str, Tensor]) -> EncoderOutput:
        ids, mask = inputs["ids"], inputs["mask"]
        tokens = self.norm(self.trunk(self.token_embed(ids), mask))
        residues = mask & residue_mask(ids, self.tokenizer)
        pooled = tokens[:, 0] if self.pool == "cls" else masked_mean(tokens, residues)
        return EncoderOutput(tokens=tokens, mask=residues, pooled=pooled)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"token_embed.weight"}


class InvalidSequence(ValueError):
    """A protein member that is empty or has letters outside the ESM alphabet."""


@modalities.register("protein")
class ProteinData(ModalityData):
    """``seq`` members (one sequence; line breaks ignored) and ``fasta``/``fa`` (the first record), upper-cased
    and checked against the ESM alphabet; a trailing ``*`` (stop) is dropped. Sequences longer than
    ``context_length - 2`` residues are cropped: a random window in training, the first window in eval.
    Tokenized per batch in ``collate``."""

    modality = "protein"
    extensions = ("seq", "fasta", "fa")
    max_sample_bytes = 16 * MiB  # titin, the longest protein, is ~35,000 residues; a member is one record
    source_extensions = ("fasta", "fa", "faa", "seq")
    inline_ext = "seq"  # a table cell holding the sequence itself

    def source_samples(self, data: bytes, ext: str) -> list[SourceSample]:
        """A FASTA file is one sample per record: the sequence as ``seq``, the header's description as the
        caption and ``{"id", "description"}`` as json; a ``seq`` file is one sequence, stored as it is."""
        if ext == "seq":
            return [SourceSample({"seq": data})]
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise SampleRejected(f".{ext} file has non-ASCII bytes", reason="not_fasta") from None
        try:
            records = list(fasta_records(text))
        except InvalidSequence as exc:
            raise SampleRejected(f".{ext} file: {exc}", reason="not_fasta") from None
        return [SourceSample({"seq": seq.encode("ascii")}, caption=description or None,
                             meta={"id": name, "description": description})
                for name, description, seq in records]

    def __init__(self, context_length: int = 1024):
        self.tokenizer = ProteinTokenizer(context_length)
        self.max_residues = context_length - 2
        self._valid = np.zeros(256, bool)
        self._valid[[ord(c) for c in SEQUENCE_LETTERS]] = True

    def decode(self, data: bytes, ext: str) -> str:
        text = data.decode("ascii")  # a non-ASCII byte is no residue: UnicodeDecodeError skips the sample
        if ext in ("fasta", "fa"):
            text = first_fasta_record(text)
        return self.clean("".join(text.split()))

    def clean(self, seq: str) -> str:
        """Upper-case, drop a trailing stop ``*``, and raise :class:`InvalidSequence` on an empty sequence or
        letters outside the alphabet."""
        seq = seq.upper().removesuffix("*")
        if not seq:
            raise InvalidSequence("empty protein sequence")
        codes = np.frombuffer(seq.encode("ascii", "replace"), np.uint8)
        bad = ~self._valid[codes]
        if bad.any():
            letters = "".join(sorted({seq[i] for i in np.flatnonzero(bad)[:50]}))
            raise InvalidSequence(f"protein sequence has letters outside the ESM alphabet: {letters!r}")
        return seq

    def transform(self, seq: str, train: bool) -> str:
        extra = len(seq) - self.max_residues
        if extra <= 0:
            return seq
        start = random.randint(0, extra) if train else 0  # the loader seeds `random` per sample
        return seq[start: start + self.max_residues]

    def coerce(self, value: Any) -> str:
        if not isinstance(value, str):
            raise TypeError(f"protein input must be a str of residues, got {type(value).__name__}")
        try:
            return self.clean("".join(value.split()))
        except InvalidSequence as exc:
            raise ConfigError(f"encode('protein', ...): {exc}") from None

    def collate(self, values: list[Any]) -> dict[str, Tensor]:
        ids, mask = self.tokenizer.encode(["" if v is None else v for v in values])
        return {"ids": ids, "mask": mask}

    def fields_from_tensor(self, x: Tensor) -> dict[str, Tensor]:
        """(B, L) ESM ids -> ``{"ids", "mask"}``: ``<pad>`` (id 1) is never a residue, so the mask is ids != pad."""
        tok = self.tokenizer
        if x.ndim != 2 or x.dtype not in (torch.int32, torch.int64) or x.shape[1] > tok.context_length:
            raise ConfigError(f"encode('protein', ids): tensor {tuple(x.shape)} {x.dtype}; expected (B, L) integer "
                              f"ESM ids with L <= {tok.context_length}, or a list of sequences")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= tok.vocab_size):
            raise ConfigError(f"encode('protein', ids): ids outside 0..{tok.vocab_size - 1}")
        return {"ids": x.long(), "mask": x != tok.pad_id}

    def render_demo(self, concepts: DemoConcepts, rng: Any) -> list[dict[str, bytes]]:
        """Protein-like members: ``seq`` plus ``json`` with per-residue labels (see :func:`render_sequences`)."""
        seqs, labels = render_sequences(concepts, rng, self.max_residues)
        return [{"seq": s.encode(), "json": json.dumps({"residue_labels": lab}).encode()}
                for s, lab in zip(seqs, labels)]


def fasta_records(text: str) -> Iterator[tuple[str, str, str]]:
    """(id, description, sequence) of every record of a FASTA text: the header line ``>id description``, then
    sequence lines joined without white space; ``;`` comment lines and blank lines are skipped."""
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith(";")]
    if not lines or not lines[0].startswith(">"):
        raise InvalidSequence("FASTA text does not start with a '>' header line")
    header, body = lines[0], []
    for line in lines[1:] + [">"]:
        if line.startswith(">"):
            name, _, description = header[1:].strip().partition(" ")
            yield name, description.strip(), "".join("".join(body).split())
            header, body = line, []
        else:
            body.append(line)


def first_fasta_record(text: str) -> str:
    """The sequence lines of the first record of a FASTA text (``>`` header lines; ``;`` comments skipped)."""
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith(";")]
    if not lines or not lines[0].startswith(">"):
        raise InvalidSequence("FASTA member does not start with a '>' header line")
    body = []
    for line in lines[1:]:
        if line.startswith(">"):
            break
        body.append(line)
    return "".join(body)


# Demo families. Filler residues are drawn from common residues with a colour-specific enrichment; the shape
# is a motif over three rare residues of its own (any two shapes share at most one), a fixed table the same in
# every split, mutated a little per sample; size sets the length and position where the motif sits.
_FILLER = np.array([ESM_TOKENS.index(c) for c in "LAGVSERTIDKQ"])
_MOTIF_LETTERS = np.array([ESM_TOKENS.index(c) for c in "WCHMYFPN"])
_MOTIF_LENGTH = 10
_MOTIFS = np.stack([np.random.default_rng(k).choice(_MOTIF_LETTERS[[k, (k + 1) % 8, (k + 3) % 8]], _MOTIF_LENGTH)
                    for k in range(8)])  # one per demo shape
_LENGTHS = np.array([32, 48, 64])  # small, medium, large: short, so a demo step stays cheap
_ANCHORS = np.array([0.5, 0.1, 0.9, 0.3, 0.7])  # centre, left, right, top, bottom: where the motif sits
_ENRICHED = 0.5  # share of filler drawn from the colour's three residues
_MUTATION = 0.1  # share of motif residues replaced by filler


def _filler_cdf(n_colors: int) -> np.ndarray:
    """(colors, filler) cumulative residue distributions: uniform plus three enriched residues per colour."""
    k = len(_FILLER)
    probs = np.full((n_colors, k), (1 - _ENRICHED) / k)
    for c in range(n_colors):
        probs[c, [c % k, (c + 1) % k, (c + 4) % k]] += _ENRICHED / 3
    return probs.cumsum(1)


def render_sequences(concepts: DemoConcepts, rng: np.random.Generator,
                     max_residues: int = 1022) -> tuple[list[str], list[list[int]]]:
    """One sequence per concept and its per-residue labels (0: filler, 1 + shape: a residue of that shape's
    motif), vectorised over the N concepts; lengths are capped at ``max_residues``."""
    shape, color = np.asarray(concepts.shape), np.asarray(concepts.color)
    n = len(shape)
    lengths = np.minimum(_LENGTHS[np.asarray(concepts.size)] + rng.integers(-6, 7, n), max_residues)
    width = int(lengths.max()) if n else 0
    cdf = _filler_cdf(int(color.max()) + 1 if n else 1)[color]  # (N, filler)
    residues = _FILLER[(rng.random((n, width, 1)) > cdf[:, None, :]).sum(-1).clip(max=len(_FILLER) - 1)]
    motif = _MOTIFS[shape].copy()
    mutate = rng.random(motif.shape) < _MUTATION
    motif[mutate] = rng.choice(_FILLER, int(mutate.sum()))
    room = np.maximum(lengths - _MOTIF_LENGTH, 0)
    anchor = np.clip(_ANCHORS[np.asarray(concepts.position)] + rng.uniform(-0.05, 0.05, n), 0, 1)
    start = np.round(anchor * room).astype(np.int64)
    cols = start[:, None] + np.arange(_MOTIF_LENGTH)
    inside = cols < lengths[:, None]
    rows = np.broadcast_to(np.arange(n)[:, None], cols.shape)
    residues[rows[inside], cols[inside]] = motif[inside]
    labels = np.zeros((n, width), np.int64)
    labels[rows[inside], cols[inside]] = np.broadcast_to(1 + shape[:, None], cols.shape)[inside]
    letters = np.frombuffer("".join(t if len(t) == 1 else "?" for t in ESM_TOKENS).encode(), np.uint8)
    chars = letters[residues]
    return ([chars[i, : lengths[i]].tobytes().decode() for i in range(n)],
            [labels[i, : lengths[i]].tolist() for i in range(n)])
