"""OpenCLIP's API over an mmpt model, so code written for OpenCLIP runs unchanged:

    model, preprocess_train, preprocess_val = mmpt.create_model_and_transforms(PATH)
    tokenizer = mmpt.get_tokenizer(PATH)
    image_features = model.encode_image(preprocess_val(pil_image).unsqueeze(0))
    text_features = model.encode_text(tokenizer(["a dog", "a cat"]))

This is OpenCLIP's image-text contract, so it names the ``image`` and ``text`` towers. Images arrive as
OpenCLIP's tensors (normalised with the tower's mean and std); ``encode_image`` inverts that normalisation
with the tower's own constants and hands [0, 1] pixels to the tower, which normalises on the batch as in
training. Texts arrive as OpenCLIP-style padded ids (no mask); the mask is recovered from the tokenizer's
EOT id (the first one ends the text, as OpenCLIP's argmax pooling assumes), so any text tower pools where
it was trained to. Both encoders keep gradients: the wrapper fine-tunes like an OpenCLIP model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmpt.registry import ConfigError

IMAGE, TEXT = "image", "text"


class Preprocess:
    """A torchvision-style transform: one PIL image (or path) -> a (3, S, S) float tensor normalised with the
    tower's mean and std; the crop is the mmpt data side's own (random-resized for training, centre for eval)."""

    def __init__(self, data: Any, train: bool, mean: Tensor, std: Tensor):
        self.data, self.train = data, train
        self.mean, self.std = mean.view(-1, 1, 1), std.view(-1, 1, 1)

    def __call__(self, image: Any) -> Tensor:
        pixels = self.data.transform(self.data.coerce(image), self.train)
        return (pixels.float() / 255.0 - self.mean) / self.std

    def __repr__(self) -> str:
        kind = "train" if self.train else "val"
        return (f"Preprocess({kind}, size={self.data.size}, mean={self.mean.flatten().tolist()}, "
                f"std={self.std.flatten().tolist()})")


class Tokenizer:
    """OpenCLIP's tokenizer call: ``tokenizer(texts) -> LongTensor (B, context_length)`` of padded ids."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.context_length = tokenizer.context_length

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> Tensor:
        if context_length is not None and context_length != self.context_length:
            raise ConfigError(f"tokenizer: context_length {context_length}; this model's text tower takes "
                              f"{self.context_length}")
        ids, _ = self.tokenizer.encode([texts] if isinstance(texts, str) else list(texts))
        return ids

    def mask(self, ids: Tensor) -> Tensor:
        """(B, L) bool: real tokens up to and including the first EOT (rows without one: the non-padding ids)."""
        eos, pad = self.tokenizer.eos_id, self.tokenizer.pad_id
        positions = torch.arange(ids.shape[1], device=ids.device)
        if eos is None:
            return ids != pad
        is_eos = ids == eos
        end = torch.where(is_eos.any(1), is_eos.int().argmax(1), ids.shape[1])
        return torch.where(is_eos.any(1, keepdim=True), positions <= end[:, None], ids != pad)


def _pixel_norm(tower: nn.Module) -> tuple[Tensor, Tensor]:
    """(mean, std) of the image tower's on-batch normalisation (``norm_in``: x * scale - shift on 0-255)."""
    norm = getattr(tower, "norm_in", None)
    if norm is None or not hasattr(norm, "scale"):
        raise ConfigError(f"image tower {type(tower).__name__} has no pixel normalisation (norm_in); the OpenCLIP API "
                          "needs one to accept normalised tensors")
    std = 1.0 / (255.0 * norm.scale.flatten())
    return norm.shift.flatten() * std, std


class CLIPModel(nn.Module):
    """An mmpt model behind OpenCLIP's ``CLIP`` interface: ``encode_image``, ``encode_text``, ``logit_scale``,
    ``forward(image, text) -> (image_features, text_features, logit_scale.exp()[, logit_bias])``."""

    def __init__(self, pretrainer: nn.Module, tokenizer: Tokenizer | None):
        super().__init__()
        self.pretrainer = pretrainer
        self.tokenizer = tokenizer
        towers = pretrainer.model.encoders
        if IMAGE not in towers and TEXT not in towers:
            raise ConfigError(f"the OpenCLIP API needs an image or a text tower; this model has {list(towers)}")
        if IMAGE in towers:
            mean, std = _pixel_norm(towers[IMAGE])
            self.register_buffer("image_mean", mean.view(1, -1, 1, 1), persistent=False)
            self.register_buffer("image_std", std.view(1, -1, 1, 1), persistent=False)

    def _features(self, modality: str, fields: dict[str, Tensor], normalize: bool) -> Tensor:
        model = self.pretrainer.model
        if modality not in model.encoders:
            raise ConfigError(f"encode_{modality}: this model has no {modality} tower (towers: {list(model.encoders)})")
        features = model.heads[modality](model.encoders[modality](fields).pooled)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_image(self, image: Tensor, normalize: bool = False) -> Tensor:
        """Features (B, embed_dim) of OpenCLIP-normalised images (B, 3, S, S); uint8 (0-255) is taken as is."""
        if image.dtype != torch.uint8:
            image = image * self.image_std + self.image_mean
        fields = self.pretrainer.model.data[IMAGE].fields_from_tensor(image)
        return self._features(IMAGE, fields, normalize)

    def encode_text(self, text: Tensor, normalize: bool = False) -> Tensor:
        """Features (B, embed_dim) of padded ids from :meth:`Tokenizer.__call__`."""
        if self.tokenizer is None:
            raise ConfigError("encode_text: this model has no text tower")
        return self._features(TEXT, {"ids": text, "mask": self.tokenizer.mask(text)}, normalize)

    def _scalar(self, name: str) -> Tensor | None:
        """The objective's entry of ``name`` (logit_scale, logit_bias) for the image-text pair, if it has one."""
        for objective in self.pretrainer.objectives.values():
            pairs = [set(p) for p in getattr(objective, "pairs", None) or ()]
            value = getattr(objective, name, None)
            if value is None or not ({IMAGE, TEXT} in pairs or getattr(objective, "anchor", None) in (IMAGE, TEXT)):
                continue
            return value if value.numel() == 1 else value[pairs.index({IMAGE, TEXT})]
        return None

    @property
    def logit_scale(self) -> Tensor:
        """The log of the image-text logit scale (OpenCLIP's parameter: ``logit_scale.exp()`` scales logits)."""
        scale = self._scalar("logit_scale")
        if scale is None:
            raise AttributeError("logit_scale: this model has no image-text contrastive objective holding one")
        return scale

    @property
    def logit_bias(self) -> Tensor | None:
        """The image-text logit bias of a SigLIP objective; None otherwise (as OpenCLIP's CLIP models)."""
        return self._scalar("logit_bias")

    def forward(self, image: Tensor | None = None, text: Tensor | None = None) -> tuple[Any, ...]:
        """OpenCLIP's ``CLIP.forward``: normalised features of whichever inputs are given, the scale, and the
        bias when the model has one."""
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        if self.logit_bias is not None:
            return image_features, text_features, self.logit_scale.exp(), self.logit_bias
        return image_features, text_features, self.logit_scale.exp()


def create_model_and_transforms(path: str | Path, device: str | torch.device = "cpu", *,
                                allow_nonfinite: bool = False) -> tuple[CLIPModel, Preprocess | None, Preprocess | None]:
    """``model, preprocess_train, preprocess_val`` of an mmpt export or run directory, OpenCLIP-style (the
    model is in eval mode; call ``.train()`` to fine-tune)."""
    from mmpt.commands.export import load

    pretrainer, transforms, tokenizer = load(path, device, allow_nonfinite=allow_nonfinite)
    model = CLIPModel(pretrainer, Tokenizer(tokenizer) if tokenizer is not None else None).to(device).eval()
    if IMAGE not in transforms:
        return model, None, None
    mean, std = model.image_mean.flatten().cpu(), model.image_std.flatten().cpu()
    return model, Preprocess(transforms[IMAGE], True, mean, std), Preprocess(transforms[IMAGE], False, mean, std)


def get_tokenizer(path: str | Path) -> Tokenizer:
    """OpenCLIP-style callable tokenizer of an mmpt export (read from its header) or run directory."""
    from mmpt.commands.export import export_config, load
    from mmpt.formats.export_file import read_header
    from mmpt.pretrainer import build_data_specs

    if Path(path).is_dir():
        tokenizer = load(path)[2]
    else:
        spec = build_data_specs(export_config(path, read_header(path)[0])).get(TEXT)
        tokenizer = getattr(spec, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError(f"{path}: the model has no text tower, so no tokenizer")
    return Tokenizer(tokenizer)
