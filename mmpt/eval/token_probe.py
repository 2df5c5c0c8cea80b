"""Per-token probe (TAPE secondary-structure style): a linear classifier on frozen per-token features.

Each sample's json lists one label per token of its content (``json[label_key]``, e.g. a residue's
helix/strand/coil class); the labels line up with the tower's real tokens after ``token_offset``
leading ones (a CLS or BOS token). Accuracy is per token, over every labelled token of the test split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mmpt.contracts import ModalityData
from mmpt.eval.common import Task, TokenFeatures, check_source, embed_tokens
from mmpt.eval.linear_probe import check_fit_args, probe_metrics
from mmpt.model import MultimodalModel
from mmpt.registry import ConfigError, tasks

log = logging.getLogger(__name__)


@dataclass
class TokenLabels:
    """Labelled tokens of one split: features (N, D), labels as strings, and how many labels had no token."""

    features: Tensor
    labels: list[str]
    cropped: int
    sequences: int


def token_labels(emb: TokenFeatures, label_key: str, token_offset: int) -> TokenLabels:
    """Pair each labelled token with its feature row; labels beyond the tower's tokens (a cropped input)
    are counted, null labels are skipped."""
    rows: list[Tensor] = []
    labels: list[str] = []
    cropped = sequences = 0
    for feats, meta in zip(emb.features, emb.meta.get("json", [None] * len(emb))):
        values = meta.get(label_key) if isinstance(meta, dict) else None
        if values is None:
            continue
        if not isinstance(values, list):
            raise ConfigError(f"label_key: json['{label_key}'] must list one label per token, got "
                              f"{type(values).__name__}")
        usable = feats[token_offset:token_offset + len(values)]
        cropped += len(values) - len(usable)
        keep = [i for i, v in enumerate(values[:len(usable)]) if v is not None]
        rows.append(usable[keep])
        labels += [str(values[i]) for i in keep]
        sequences += 1
    width = emb.features[0].shape[-1] if emb.features else 0
    features = torch.cat(rows) if rows else torch.zeros(0, width)
    return TokenLabels(features, labels, cropped, sequences)


@tasks.register("token_probe")
@dataclass(kw_only=True)
class TokenProbe(Task):
    """Per-token top-1 of a logistic-regression probe on frozen ``EncoderOutput.tokens``.

    train_data: shards the probe is fitted on (``data`` is the test split). label_key: json field
    listing one label per token (null: not scored), e.g. secondary structure per residue.
    modality: the tower whose per-token features are probed. token_offset: leading real tokens that
    carry no label (1 for a CLS/BOS token). weight_decay: L2 strength on the standardised features.
    max_iter: L-BFGS iterations.
    """

    train_data: str
    label_key: str
    modality: str = "text"
    token_offset: int = 0
    weight_decay: float = 1e-4
    max_iter: int = 300

    def __post_init__(self) -> None:
        super().__post_init__()
        check_source(self.train_data, "train_data")
        if self.token_offset < 0:
            raise ConfigError(f"token_offset: must be >= 0, got {self.token_offset}")
        check_fit_args(self.weight_decay, self.max_iter)

    def default_id(self) -> str:
        return f"token_probe/{self.label_key}"

    def run(self, model: MultimodalModel, specs: dict[str, ModalityData], device: torch.device | str,
            progress: bool = True) -> dict[str, Any]:
        """Per-token features of both splits, fit on train tokens, score test tokens."""
        split: dict[str, TokenLabels] = {}
        skipped = 0
        for name, pattern in (("train", self.train_data), ("test", self.data)):
            emb = embed_tokens(model, specs, pattern, self.batch_size, keep=("json",), device=device,
                               progress=progress, workers=self.workers, modality=self.modality,
                               desc=f"{self.default_id()} {name}")
            split[name] = token_labels(emb, self.label_key, self.token_offset)
            skipped += emb.skipped
            if not split[name].labels:
                raise ConfigError(f"label_key: no sample of {pattern!r} has a per-token list in json['{self.label_key}']")
        classes = sorted(set(split["train"].labels))
        if len(classes) < 2:
            raise ConfigError(f"train_data: token_probe needs at least 2 token classes of '{self.label_key}', "
                              f"found {len(classes)}")
        index = {c: i for i, c in enumerate(classes)}
        y_train = torch.tensor([index[c] for c in split["train"].labels])
        y_all = torch.tensor([index.get(c, -1) for c in split["test"].labels])
        unknown = int((y_all < 0).sum())
        if unknown:
            log.warning("%s: %d test tokens have a label no training token has; not scored", self.default_id(), unknown)
        x_train = split["train"].features
        x_test = split["test"].features[(y_all >= 0).to(x_train.device)]
        metrics = probe_metrics(x_train, y_train.to(x_train.device), x_test, y_all[y_all >= 0].to(x_train.device),
                                classes, self.weight_decay, self.max_iter)
        cropped = split["train"].cropped + split["test"].cropped
        if cropped:
            log.warning("%s: %d labels lie beyond their sample's tokens (cropped input); not used", self.default_id(),
                        cropped)
        metrics.update(n_train_tokens=len(y_train), n_sequences=split["test"].sequences, n_unknown_label=unknown,
                       n_labels_without_token=cropped, skipped=skipped)
        return metrics
