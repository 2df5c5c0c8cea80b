"""Tokenizers behind the one contract every token modality shares (:class:`mmpt.contracts.Tokenizer`):
OpenCLIP's BPE (with a mask id added above its vocabulary and an explicit padding mask) and Hugging Face
tokenizers from a local folder (``hf:/path``). Text towers, captioning objectives and exports build them by
name with :func:`build_tokenizer`; tokenising cost follows the context length (:func:`bounded_prefix`).
"""

from __future__ import annotations

import functools
import itertools
import os
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpt.registry import ConfigError

# A token covers at most ~20 characters in BPE and WordPiece vocabularies: the first `context_length`
# tokens of a text lie within its first context_length x 32 characters, with room for the cut word.
CHARS_PER_TOKEN = 32


def bounded_prefix(text: str, tokens: int) -> str:
    """The start of ``text`` that holds its first ``tokens`` tokens for word-based tokenizers: at most
    ``tokens x CHARS_PER_TOKEN`` characters and ``2 x tokens`` whitespace-separated words (every word gives at
    least one token; the slack covers words cleaning removes). Tokenising cost then follows the context
    length, not the text: a 10 MB caption cost ~8 s uncut. Whitespace inside the prefix is kept as it is."""
    text = text[: tokens * CHARS_PER_TOKEN]
    ends = [m.end() for m in itertools.islice(re.finditer(r"\S+", text), 2 * tokens + 1)]
    return text[: ends[2 * tokens - 1]] if len(ends) > 2 * tokens else text


def _open_clip_tokenizer_module() -> Any:
    """``open_clip/tokenizer.py`` without running ``open_clip/__init__``, which imports every OpenCLIP model,
    torchvision and training helpers (~2 s of a 4 s ``mmpt.load``); the module imports only ftfy, regex,
    numpy and torch at the top."""
    import importlib.util
    import sys

    if "open_clip" in sys.modules:
        import open_clip.tokenizer

        return open_clip.tokenizer
    name = "mmpt._open_clip_tokenizer"
    if name not in sys.modules:
        package = importlib.util.find_spec("open_clip")  # locates the package without executing it
        spec = importlib.util.spec_from_file_location(name, os.path.join(package.submodule_search_locations[0],
                                                                         "tokenizer.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


class OpenCLIPTokenizer:
    """OpenCLIP's BPE behind the mmpt tokenizer contract.

    OpenCLIP pads with id 0 (also the real token '!') and finds EOT by argmax. Here the padding mask
    is explicit, a mask token is appended above the BPE vocabulary (id 49408) and pooling uses the
    last real position, so argmax-free EOT pooling survives masked tokens.
    """

    def __init__(self, context_length: int = 77):
        self._bpe = _open_clip_tokenizer_module().SimpleTokenizer(context_length=context_length)
        self.context_length = context_length
        self.bos_id, self.eos_id = self._bpe.all_special_ids[:2]
        self.pad_id = 0
        self.mask_id = len(self._bpe.encoder)
        self.vocab_size = self.mask_id + 1
        self.special_ids = {self.bos_id, self.eos_id, self.mask_id}

    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Texts -> ids (B, L) and mask (B, L); over-long texts are cut, keeping EOT last."""
        n = self.context_length
        ids = torch.full((len(texts), n), self.pad_id, dtype=torch.long)
        lengths = torch.empty(len(texts), dtype=torch.long)
        for i, text in enumerate(texts):
            toks = [self.bos_id, *self._bpe.encode(bounded_prefix(text, n))][: n - 1] + [self.eos_id]
            ids[i, : len(toks)] = torch.tensor(toks)
            lengths[i] = len(toks)
        mask = torch.arange(n).unsqueeze(0) < lengths.unsqueeze(1)
        return ids, mask

    def word_ids(self, ids: Tensor) -> Tensor:
        """(B, L) index of the word each token belongs to (BPE ends a word's last piece with ``</w>``), -1 on
        specials and on everything after EOT (padding is id 0, a real token): for whole-word masking."""
        if not hasattr(self, "_word_ends"):
            self._word_ends = torch.ones(self.vocab_size, dtype=torch.bool)  # specials and the mask id: one each
            for i, piece in self._bpe.decoder.items():
                self._word_ends[i] = piece.endswith("</w>")
        specials = torch.tensor(sorted(self.special_ids), device=ids.device)
        text = (ids.eq(self.eos_id).long().cumsum(1) == 0) & ~torch.isin(ids, specials)
        ends = self._word_ends.to(ids.device)[ids]
        return words_from_starts(F.pad(ends[:, :-1], (1, 0), value=True), text)

    def decode(self, ids: list[int]) -> str:
        """Ids -> text up to the first EOT (padding after it is id 0, a real BPE token), specials dropped."""
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self._bpe.decode([i for i in ids if i not in self.special_ids]).strip()


class HFTokenizer:
    """A Hugging Face tokenizer from a local folder (``hf:/path``) behind the same contract."""

    def __init__(self, path: str, context_length: int = 77):
        from transformers import AutoTokenizer

        if not os.path.isdir(path):  # a hub name would be downloaded: a config never reaches the network
            raise ConfigError(f"tokenizer hf:{path}: not a local folder (download it once, then give its path)")
        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.context_length = context_length
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else 0
        self.mask_id = self._tok.mask_token_id if self._tok.mask_token_id is not None else len(self._tok)
        self.bos_id = self._tok.cls_token_id if self._tok.cls_token_id is not None else self._tok.bos_token_id
        self.eos_id = self._tok.sep_token_id if self._tok.sep_token_id is not None else self._tok.eos_token_id
        self.vocab_size = max(len(self._tok), self.mask_id + 1)
        self.special_ids = set(self._tok.all_special_ids)

    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        texts = [bounded_prefix(t, self.context_length) for t in texts]
        out = self._tok(texts, padding="max_length", truncation=True, max_length=self.context_length,
                        return_tensors="pt")
        return out["input_ids"].long(), out["attention_mask"].bool()

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def word_ids(self, ids: Tensor) -> Tensor:
        """(B, L) index of the word each token belongs to, -1 on specials and padding: WordPiece continues a word
        with ``##`` pieces; byte-level BPE and SentencePiece start one with ``Ġ`` / ``▁``."""
        if not hasattr(self, "_word_starts"):
            pieces = [str(p) for p in self._tok.convert_ids_to_tokens(list(range(self.vocab_size)))]
            if any(p.startswith("##") for p in pieces):
                starts = [not p.startswith("##") for p in pieces]
            else:
                starts = [p.startswith(("Ġ", "▁")) for p in pieces]
            self._word_starts = torch.tensor(starts, dtype=torch.bool)
        specials = torch.tensor(sorted(self.special_ids | {self.pad_id}), device=ids.device)
        return words_from_starts(self._word_starts.to(ids.device)[ids], ~torch.isin(ids, specials))


def words_from_starts(starts: Tensor, valid: Tensor) -> Tensor:
    """(B, L) word index from per-token "starts a word" flags, -1 where not ``valid``; a valid token after an
    invalid one starts a word whatever its flag."""
    begins = valid & (starts | ~F.pad(valid[:, :-1], (1, 0), value=False))
    return torch.where(valid, begins.long().cumsum(1) - 1, torch.full_like(starts, -1, dtype=torch.long))


@functools.lru_cache(maxsize=8)
def build_tokenizer(name: str = "openclip-bpe", context_length: int = 77) -> OpenCLIPTokenizer | HFTokenizer:
    """'openclip-bpe' or 'hf:<local folder>'; cached per process (loading BPE merges takes time)."""
    if name == "openclip-bpe":
        return OpenCLIPTokenizer(context_length)
    if name.startswith("hf:"):
        return HFTokenizer(name[3:], context_length)
    raise ConfigError(f"unknown tokenizer {name!r}: expected 'openclip-bpe' or 'hf:<folder>'")
