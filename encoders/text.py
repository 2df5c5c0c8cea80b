"""Text modality: a from-scratch transformer (``text/transformer``) and the data side (decode ``txt``,
tokenize the whole batch in collate; the demo's captions, written in a small grammar). The tokenizers
live in :mod:`mmpt.nn.tokenizers`.
"""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mmpt.contracts import Encoder, EncoderOutput, MiB, ModalityData, SourceSample
from mmpt.data.concepts import concept_words
from mmpt.data.views import Views, check_views, collate_views
from mmpt.nn.layers import KVCache, Transformer, last_token, masked_mean
from mmpt.nn.padding import by_length
from mmpt.nn.tokenizers import build_tokenizer
from mmpt.registry import ConfigError, encoders, modalities

# The demo's caption grammar, (form, weight). Descriptive forms name the colour, the shape and the
# background; partial forms use generic words ("shape", "a background") so zero-shot prompts are
# captions the model has seen.
DESCRIPTIVE_FORMS = (
    ("a {size} {color} {shape} {where} of a {background} background", 0.20),
    ("a {color} {shape} {where} of a {background} background", 0.12),
    ("a {size} {color} {shape} on a {background} background", 0.12),
    ("a {color} {shape} on a {background} background", 0.12),
    ("a {background} background with a {size} {color} {shape} {where}", 0.07),
    ("a {background} background with a {color} {shape}", 0.07),
)
PARTIAL_FORMS = (
    ("a {color} shape on a {background} background", 0.05),
    ("a {shape} on a {background} background", 0.05),
    ("a {color} shape", 0.04),
    ("a {color} shape on a background", 0.04),
    ("a {shape}", 0.04),
    ("a {shape} on a background", 0.04),
    ("a {color} {shape}", 0.02),
    ("a {size} {color} {shape} {where}", 0.02),
)
FORMS = tuple(form for form, _ in DESCRIPTIVE_FORMS + PARTIAL_FORMS)
# Zero-shot prompts: each is one of the partial forms with the class name in the slot.
TEMPLATES = {
    "color": ("a {} shape", "a {} shape on a background"),
    "shape": ("a {}", "a {} on a background"),
}
CAPTION_VARIANTS = 3  # captions per sample in its json, for multi-caption retrieval


@encoders.register("text/transformer")
class TextTransformer(Encoder):
    """Text transformer from scratch (CLIP's text tower when causal with EOT pooling).

    Args: context_length: tokens per text (longer texts are cut, keeping EOT). width: token width.
    depth: transformer blocks. heads: attention heads. mlp_ratio: MLP hidden size over width.
    causal: causal attention (CLIP) or bidirectional (BERT-style, for MLM). pool: 'eot' (last real
    token), 'cls' (first) or 'mean'. tokenizer: 'openclip-bpe' or 'hf:<folder>'. vocab_size: defaults
    to the tokenizer's.
    """

    modality = "text"
    tiny_configs = ({"context_length": 16, "width": 32, "depth": 2, "heads": 2},)
    # Real tokens never see trailing padding (causal, or padded keys masked; pooling by the mask), so
    # training cuts each batch after its longest caption and the trunk runs rows grouped by length
    # (mmpt.nn.padding).
    trims_padding = True

    def __init__(self, context_length: int = 77, width: int = 512, depth: int = 12, heads: int = 8,
                 mlp_ratio: float = 4.0, causal: bool = True, pool: str = "eot",
                 tokenizer: str = "openclip-bpe", vocab_size: int | None = None):
        super().__init__()
        if pool not in ("eot", "cls", "mean"):
            raise ValueError(f"pool must be eot|cls|mean, got {pool!r}")
        tok = build_tokenizer(tokenizer, context_length)
        self.width, self.pool, self.context_length = width, pool, context_length
        self.token_embed = nn.Embedding(vocab_size or tok.vocab_size, width)
        self.pos_embed = nn.Parameter(torch.randn(1, context_length, width) * 0.01)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        self.trunk = Transformer(width, depth, heads, mlp_ratio, causal=causal)
        self.norm = nn.LayerNorm(width)

    def forward(self, inputs: dict[str, Tensor], cache: KVCache | None = None) -> EncoderOutput:
        """``cache``: incremental decoding (causal only): ``ids`` are the positions after ``cache.length``."""
        ids, mask = inputs["ids"], inputs["mask"]
        start = 0 if cache is None else cache.length
        if start + ids.shape[1] > self.context_length:
            raise ValueError(f"text/transformer: {start + ids.shape[1]} positions > context_length {self.context_length}")
        x = self.token_embed(ids) + self.pos_embed[:, start: start + ids.shape[1]]
        tokens = self.norm(self.trunk(x, mask, cache) if cache is not None else by_length(self.trunk, x, mask))
        if self.pool == "eot":
            pooled = last_token(tokens, mask)
        elif self.pool == "cls":
            pooled = tokens[:, 0]
        else:
            pooled = masked_mean(tokens, mask)
        return EncoderOutput(tokens=tokens, mask=mask, pooled=pooled)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "token_embed.weight"}


@modalities.register("text")
class TextData(ModalityData):
    """``txt`` members: one caption per line; training picks one line at random, eval keeps the first
    (retrieval reads every line from the sample's raw text). Tokenized per batch in ``collate``.

    train_views: views per training sample (1: one; more: view 0 as above plus ``train_views - 1`` copies
    augmented as EDA does for CleanCLIP: each word dropped with probability ``view_word_drop``, then two
    words swapped; see :mod:`mmpt.data.views`)."""

    modality = "text"
    extensions = ("txt", "text", "caption")
    source_extensions = ("txt",)  # a caption file, stored as the sample's txt member
    inline_ext = "txt"  # a table's caption cell

    def source_samples(self, data: bytes, ext: str) -> list[SourceSample]:
        """A caption file as the ``txt`` member."""
        return [SourceSample({"txt": data})]
    max_sample_bytes = 16 * MiB  # a caption file; tokenising sees only a prefix bounded by the context anyway
    natural_language = True

    def __init__(self, tokenizer: str | None = None, context_length: int = 77, folder: str | None = None,
                 train_views: int = 1, view_word_drop: float = 0.1):
        self.views, self.word_drop = check_views(train_views), float(view_word_drop)
        if tokenizer is None and folder:  # text/hf: the model folder holds the tokenizer
            from mmpt.encoders.hf import resolve_folder

            tokenizer = "hf:" + resolve_folder(folder, "text/hf folder")
        self.tokenizer = build_tokenizer(tokenizer or "openclip-bpe", context_length)

    def decode(self, data: bytes, ext: str) -> str:
        text = data.decode("utf-8").strip()
        if not text:
            raise ValueError("empty caption")
        return text

    # The demo's zero-shot prompts and the info.json entries describing its captions (mmpt.data.demo_shards).
    demo_templates = TEMPLATES
    demo_info = {"caption_forms": list(FORMS)}

    def demo_split(self, rng: np.random.Generator) -> DemoCaptions:
        """One demo split's captions (drawn from the split's stream: see :mod:`mmpt.data.demo_shards`)."""
        return DemoCaptions()

    def transform(self, text: str, train: bool) -> str:
        lines = [line for line in text.splitlines() if line.strip()] or [text]
        line = random.choice(lines) if train and len(lines) > 1 else lines[0]
        if train and self.views > 1:
            return Views([line, *(self._augmented(line) for _ in range(self.views - 1))])
        return line

    def _augmented(self, line: str) -> str:
        """EDA's random deletion and random swap (Wei and Zou 2019), as CleanCLIP augments captions."""
        words = line.split()
        kept = [w for w in words if random.random() >= self.word_drop] or [random.choice(words)] if words else []
        if len(kept) > 1:
            i, j = random.sample(range(len(kept)), 2)
            kept[i], kept[j] = kept[j], kept[i]
        return " ".join(kept) or line

    def coerce(self, value: Any) -> str:
        if not isinstance(value, str):
            raise TypeError(f"text input must be str, got {type(value).__name__}")
        return value

    def collate(self, values: list[Any]) -> dict[str, Tensor]:
        def tokenized(texts: list[Any]) -> dict[str, Tensor]:
            ids, mask = self.tokenizer.encode(["" if v is None else v for v in texts])
            return {"ids": ids, "mask": mask}

        return collate_views(values, tokenized)

    def fields_from_tensor(self, x: Tensor) -> dict[str, Tensor]:
        """Refused: padded ids alone do not say where the text ends (OpenCLIP's padding id 0 is a real
        token), and a guessed mask would pool on padding."""
        raise ConfigError(f"encode('text', ids): bare id tensor {tuple(x.shape)} has no padding mask; "
                          "pass {'ids', 'mask'} or a list of strings (ids, mask = tokenizer.encode(texts))")


class DemoCaptions:
    """One demo split's captions: a training caption (``txt``) in a weighted form and
    ``CAPTION_VARIANTS`` distinct descriptive ones (the json's ``captions``) per sample."""

    def plan(self, concepts: Any, rng: np.random.Generator) -> None:
        """Draw every sample's caption forms; ``concepts`` carries shape, color, background, size and position."""
        n = len(concepts)
        weights = np.asarray([w for _, w in DESCRIPTIVE_FORMS + PARTIAL_FORMS])
        self.concepts = concepts
        self.form = rng.choice(len(weights), size=n, p=weights / weights.sum())
        # argsort of uniform keys = a random permutation per row; its first columns are distinct draws.
        self.variants = rng.random((n, len(DESCRIPTIVE_FORMS))).argsort(axis=1)[:, :CAPTION_VARIANTS]

    def render(self, rows: slice) -> list[dict[str, bytes]]:
        """``{"txt", "json"}`` members for the planned samples ``rows``."""
        members = []
        for i in range(rows.start, rows.stop):
            words = concept_words(self.concepts, i)
            captions = [DESCRIPTIVE_FORMS[k][0].format(**words) for k in self.variants[i]]
            members.append({"txt": FORMS[self.form[i]].format(**words).encode("utf-8"),
                            "json": json.dumps({"captions": captions}).encode("utf-8")})
        return members
