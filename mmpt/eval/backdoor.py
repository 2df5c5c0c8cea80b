"""Backdoor attack success rate (BadNets / CleanCLIP): zero-shot classification of triggered held-out samples.

The held-out data gets the same trigger ``mmpt data poison`` pastes (:func:`mmpt.data.poison.poison_shards`
with every sample triggered and captions kept, into a temporary folder); the samples whose true class is not
the target are classified by the zero-shot prompt classifier, and the attack success rate is the share
classified as the target. The same share on the clean data (``clean_target_rate``) is the floor it is read
against.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmpt.contracts import ModalityData
from mmpt.data.poison import Trigger, poison_shards
from mmpt.eval.common import (
    Embedded,
    accuracy_metrics,
    embed_data,
    is_class_folder,
    label_indices,
    sample_labels,
)
from mmpt.eval.zero_shot import ZeroShot, index_labels, ranked_classes, zero_shot_classifier
from mmpt.model import MultimodalModel
from mmpt.registry import ConfigError, closest, tasks


@tasks.register("backdoor")
@dataclass(kw_only=True)
class Backdoor(ZeroShot):
    """Attack success rate of a patch backdoor: triggered samples of another class classified as ``target``.

    target: the attacked class name (one of the classnames). patch_size: trigger side in pixels, as
    ``mmpt data poison --patch-size``. trigger: 'noise' or 'checkerboard' (``--trigger``). location: 'fixed'
    or 'random' (``--location``). trigger_seed: the poisoning ``--seed`` (it draws the noise pattern). The zero-shot keys (label_key, classnames, templates,
    label_type, modality, text_modality) are ``zero_shot``'s. Metrics: ``asr`` (share of triggered non-target
    samples classified as the target), ``clean_target_rate`` (the same share without the trigger),
    ``triggered_top1`` / ``clean_top1`` (accuracy over every labelled sample), ``n`` (non-target samples).
    """

    target: str
    patch_size: int = 8
    trigger: str = "noise"
    location: str = "fixed"
    trigger_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if is_class_folder(self.data):
            raise ConfigError("data: the backdoor task reads shards (the trigger is pasted on a copy of them)")
        if isinstance(self.patch_size, bool) or not isinstance(self.patch_size, int) or self.patch_size < 1:
            raise ConfigError(f"patch_size: expected a positive integer, got {self.patch_size!r}")
        if self._classes is not None and self.target not in self._classes:
            raise ConfigError(f"target: '{self.target}' is not a class{closest(self.target, self._classes)}")

    def default_id(self) -> str:
        return f"backdoor/{self.target}"

    def run(self, model: MultimodalModel, specs: dict[str, ModalityData], device: torch.device | str,
            progress: bool = True) -> dict[str, Any]:
        """Embed the clean and the triggered data, classify both, count hits on the target."""
        with tempfile.TemporaryDirectory(prefix="mmpt-backdoor-") as tmp:
            poison_shards(self.data, str(Path(tmp) / "triggered-%06d.tar"), fraction=1.0, target=None,
                          trigger=Trigger(self.patch_size, self.trigger, self.location, self.trigger_seed),
                          modality=self.modality)
            triggered = self._embed(model, specs, device, progress, f"{tmp}/triggered-*.tar")
        clean = self._embed(model, specs, device, progress, self.data)
        ids, classes = self._labels(clean)
        if ids is None or self.target not in classes:
            raise ConfigError(f"target: '{self.target}' is not among the classes ({', '.join(classes[:5])}, ...)")
        t_ids, _ = self._labels(triggered, classes)
        if clean.keys != triggered.keys or not torch.equal(ids, t_ids):
            raise ConfigError(f"data: the triggered copy of {self.data!r} lost samples (some did not decode)")
        classifier = zero_shot_classifier(model, specs, classes, self._templates, self.batch_size, device,
                                          modality=self.text_modality)
        return backdoor_metrics(clean.embeddings, triggered.embeddings, ids, classifier, classes.index(self.target),
                                classes) | {"skipped": clean.skipped}

    def _embed(self, model: MultimodalModel, specs: dict[str, ModalityData], device: torch.device | str,
               progress: bool, pattern: str) -> Embedded:
        return embed_data(model, specs, pattern, self.batch_size, keep=("json",), device=device, progress=progress,
                          workers=self.workers, modality=self.modality, desc=self.default_id())

    def _labels(self, emb: Embedded, classes: list[str] | None = None) -> tuple[torch.Tensor | None, list[str]]:
        """Class index per sample (-1: not a class) and the class list, as ``zero_shot`` reads them."""
        labels = sample_labels(emb, self.label_key)
        if self._indexed(emb):
            labels = index_labels(labels, self._classes)
        classes = classes or self._classes or self._classes_from_labels(labels)
        ids, _ = label_indices(labels, classes)
        return (ids if (ids >= 0).any() else None), classes


def backdoor_metrics(clean: torch.Tensor, triggered: torch.Tensor, ids: torch.Tensor, classifier: torch.Tensor,
                     target: int, classes: list[str]) -> dict[str, Any]:
    """ASR and its clean floor from (N, E) embeddings of the same samples without and with the trigger,
    their class ids (-1: unlabelled, not scored), the (C, E) classifier and the target's index."""
    scored = ids >= 0
    ids = ids[scored]
    k = min(5, len(classes))
    top_clean = ranked_classes(clean[scored.to(clean.device)], classifier, k)
    top_trig = ranked_classes(triggered[scored.to(triggered.device)], classifier, k)
    others = (ids != target).to(top_trig.device)
    if not others.any():
        raise ConfigError("target: every labelled sample is of the target class; nothing to attack")
    asr = (top_trig[others, 0] == target).double().mean().item()
    floor = (top_clean[others, 0] == target).double().mean().item()
    return {"asr": asr, "asr_chance": 1.0 / len(classes), "clean_target_rate": floor,
            "triggered_top1": accuracy_metrics(top_trig, ids, classes)["top1"],
            "clean_top1": accuracy_metrics(top_clean, ids, classes)["top1"], "n": int(others.sum())}
