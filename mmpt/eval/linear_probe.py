"""Linear probe: multinomial logistic regression on frozen embeddings (CLIP's linear-probe protocol).

The fit is full-batch L-BFGS from zero weights on standardised features, so it has no randomness:
the same embeddings always give the same classifier.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpt.contracts import ModalityData
from mmpt.eval.common import (
    Task,
    accuracy_metrics,
    check_source,
    embed_data,
    is_class_folder,
    label_indices,
    no_label_error,
    sample_labels,
)
from mmpt.model import MultimodalModel
from mmpt.registry import ConfigError, tasks

log = logging.getLogger(__name__)


@dataclass
class LinearClassifier:
    """Standardisation + linear layer fitted by :func:`fit_logistic_regression`."""

    mean: Tensor
    std: Tensor
    weight: Tensor  # (E, C)
    bias: Tensor  # (C,)

    def __call__(self, x: Tensor) -> Tensor:
        """Logits (N, C)."""
        return ((x - self.mean) / self.std) @ self.weight + self.bias


def fit_logistic_regression(x: Tensor, y: Tensor, num_classes: int, weight_decay: float = 1e-4,
                            max_iter: int = 300) -> LinearClassifier:
    """Fit softmax regression of labels ``y`` (N,) on features ``x`` (N, E): cross-entropy + L2 on weights."""
    x = x.float()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mean) / std
    weight = torch.zeros(x.shape[1], num_classes, device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xs @ weight + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():  # eval runs under no_grad; the probe itself is trained
        opt.step(closure)
    return LinearClassifier(mean, std, weight.detach(), bias.detach())


def probe_metrics(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, classes: list[str],
                  weight_decay: float, max_iter: int) -> dict[str, Any]:
    """Fit a probe on (x_train, y_train), score it on the test rows: accuracy metrics, ``train_top1`` and
    ``majority`` (always answering the most frequent training class: the bar on skewed labels)."""
    probe = fit_logistic_regression(x_train, y_train, len(classes), weight_decay, max_iter)
    metrics = accuracy_metrics(probe(x_test).topk(min(5, len(classes)), dim=1).indices, y_test, classes)
    metrics["train_top1"] = (probe(x_train).argmax(1) == y_train).double().mean().item()
    majority = torch.bincount(y_train, minlength=len(classes)).argmax()
    metrics["majority"] = (y_test == majority).double().mean().item()
    return metrics


def check_fit_args(weight_decay: float, max_iter: int) -> None:
    """The probe fit's own keys, shared by every probe task."""
    if weight_decay < 0 or max_iter < 1:
        raise ConfigError(f"weight_decay must be >= 0 and max_iter >= 1, got {weight_decay}, {max_iter}")


@tasks.register("linear_probe")
@dataclass(kw_only=True)
class LinearProbe(Task):
    """Top-1 of a logistic-regression probe fitted on ``train_data`` embeddings, tested on ``data``.

    label_key: json field holding the class (shards; class folders use folder names). Classes are the
    labels of the training data; test samples with another label are counted (``n_unknown_label``).
    weight_decay: L2 strength on the standardised features. max_iter: L-BFGS iterations.
    train_data: shards or class folder the probe is fitted on. modality: the tower whose embeddings
    are probed.
    """

    train_data: str
    label_key: str | None = None
    weight_decay: float = 1e-4
    max_iter: int = 300
    modality: str = "image"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_source(self.train_data, "train_data")
        if self.label_key is None and not (is_class_folder(self.data) and is_class_folder(self.train_data)):
            raise ConfigError("label_key: required for shard data (the json field holding each sample's class)")
        check_fit_args(self.weight_decay, self.max_iter)

    def default_id(self) -> str:
        return f"linear_probe/{self.label_key or 'label'}"

    def run(self, model: MultimodalModel, specs: dict[str, ModalityData], device: torch.device | str,
            progress: bool = True) -> dict[str, Any]:
        """Embed both splits, fit on train, score test."""
        embedded = {
            split: embed_data(model, specs, pattern, self.batch_size, keep=("json",), device=device,
                                progress=progress, workers=self.workers, modality=self.modality,
                                desc=f"{self.default_id()} {split}")
            for split, pattern in (("train", self.train_data), ("test", self.data))
        }
        train_labels = sample_labels(embedded["train"], self.label_key)
        classes = sorted({label for label in train_labels if label is not None})
        if len(classes) < 2:
            raise ConfigError(f"train_data: linear_probe needs at least 2 classes of '{self.label_key}', "
                              f"found {len(classes)}")
        (train_y, _), (test_y, unknown) = (label_indices(sample_labels(embedded[s], self.label_key), classes)
                                           for s in ("train", "test"))
        if not (test_y >= 0).any():
            raise no_label_error(embedded["test"], self.label_key, unknown, classes)
        if unknown:
            log.warning("%s: %d test samples have no label among the %d training classes; not scored",
                        self.default_id(), len(unknown), len(classes))

        def labelled(split: str, y: Tensor) -> tuple[Tensor, Tensor]:
            x = embedded[split].embeddings
            keep = (y >= 0).to(x.device)
            return x[keep], y.to(x.device)[keep]

        x_train, y_train = labelled("train", train_y)
        metrics = probe_metrics(x_train, y_train, *labelled("test", test_y), classes, self.weight_decay,
                                self.max_iter)
        metrics.update(n_train=len(y_train), n_unknown_label=len(unknown),
                       skipped=embedded["train"].skipped + embedded["test"].skipped)
        return metrics
