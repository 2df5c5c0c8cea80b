"""Zero-shot classification: class prompts through the text tower as the classifier (CLIP, OpenCLIP).

Data is shards (label = ``json[label_key]``) or an ImageFolder-style directory (label = class folder),
so OpenCLIP's ImageNet class names and templates work with ``openclip:imagenet``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpt.contracts import ModalityData
from mmpt.eval.common import (
    Task,
    accuracy_metrics,
    embed_data,
    embed_texts,
    is_class_folder,
    label_indices,
    no_label_error,
    sample_labels,
)
from mmpt.model import MultimodalModel
from mmpt.registry import ConfigError, closest, tasks

log = logging.getLogger(__name__)

# ``openclip:<name>`` -> attribute of open_clip.zero_shot_metadata, per key.
OPENCLIP_LISTS = {
    "classnames": {"imagenet": "IMAGENET_CLASSNAMES"},
    "templates": {"imagenet": "OPENAI_IMAGENET_TEMPLATES", "imagenet-simple": "SIMPLE_IMAGENET_TEMPLATES"},
}


def read_list(value: str | list[str] | None, key: str) -> list[str] | None:
    """An inline list, a UTF-8 file with one entry a line, or ``openclip:<name>``; None stays None."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        items = [str(v).strip() for v in value]
    elif value.startswith("openclip:"):
        name, known = value.split(":", 1)[1], OPENCLIP_LISTS[key]
        if name not in known:
            raise ConfigError(f"{key}: unknown OpenCLIP list '{name}'{closest(name, list(known))}; "
                              f"known: {', '.join(known)}")
        from open_clip import zero_shot_metadata

        # OpenCLIP's templates are lambdas; calling one on "{}" gives the same template as a string.
        items = [t("{}") if callable(t) else str(t) for t in getattr(zero_shot_metadata, known[name])]
    else:
        path = Path(value)
        if not path.is_file():
            raise ConfigError(f"{key}: no file {value!r} (give a file with one entry a line, an inline list, "
                              f"or openclip:{next(iter(OPENCLIP_LISTS[key]))})")
        items = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    items = [item for item in items if item]
    if not items:
        raise ConfigError(f"{key}: {value!r} holds no entries")
    return items


@torch.no_grad()
def zero_shot_classifier(model: MultimodalModel, specs: dict[str, ModalityData], classes: list[str],
                         templates: list[str], batch_size: int, device: torch.device | str,
                         modality: str = "text") -> Tensor:
    """(C, E) class weights: the re-normalised mean of each class's normalised prompt embeddings."""
    prompts = [t.replace("{}", c) for c in classes for t in templates]
    emb = embed_texts(model, specs, prompts, batch_size, device, modality=modality)
    return F.normalize(emb.view(len(classes), len(templates), -1).mean(1), dim=-1)


def ranked_classes(x: Tensor, classifier: Tensor, k: int, chunk: int = 8192) -> Tensor:
    """(N, k) indices of the ``k`` highest-scoring classes per row, one matmul per chunk of rows."""
    return torch.cat([(x[i:i + chunk] @ classifier.T).topk(k, dim=1).indices for i in range(0, len(x), chunk)])


def match_folders(labels: list[str | None], classes: list[str]) -> list[str | None]:
    """Folder names as class names: themselves when they are class names, else by sorted position.

    The second case is torchvision's ImageFolder convention (class i = i-th folder in sorted order),
    which is how OpenCLIP's ImageNet class names line up with WordNet-id folders (n01440764, ...).
    """
    folders = sorted({label for label in labels if label is not None})
    if set(folders) <= set(classes):
        return labels
    if len(folders) != len(classes):
        raise ConfigError(f"classnames: the data has {len(folders)} class folders ({', '.join(folders[:3])}, ...) "
                          f"that are not class names, and {len(classes)} classes to pair them with in order")
    by_position = dict(zip(folders, classes))
    log.info("zero_shot: mapping %d class folders to class names by sorted order", len(folders))
    return [None if label is None else by_position[label] for label in labels]


@tasks.register("zero_shot")
@dataclass(kw_only=True)
class ZeroShot(Task):
    """Zero-shot top-1/top-5 of ``modality`` embeddings against prompts of each class name.

    label_key: json field holding the class (shards; unused for image folders). classnames/templates:
    file, inline list or ``openclip:imagenet`` (templates contain ``{}``; default: the bare class
    name; classnames default: the labels found in the data, with a warning: they become the prompts).
    label_type: 'auto' (JSON integers index ``classnames``, as ImageNet's 0-999; strings are class
    names), 'index' (digit strings index too) or 'name' (every label is a class name). Samples whose
    label is not a class are counted (``n_unknown_label``), not scored.

    modality: the tower embedding the data. text_modality: the tower embedding the prompts.
    """

    label_key: str | None = None
    classnames: str | list[str] | None = None
    templates: str | list[str] | None = None
    label_type: str = "auto"
    modality: str = "image"
    text_modality: str = "text"

    def __post_init__(self) -> None:
        super().__post_init__()
        kinds = ["auto", "index", "name"]
        if self.label_type not in kinds:
            raise ConfigError(f"label_type: expected {'|'.join(kinds)}{closest(self.label_type, kinds)}, "
                              f"got {self.label_type!r}")
        if self.label_type == "index" and self.classnames is None:
            raise ConfigError("label_type: 'index' needs classnames (the list the integer labels index into)")
        self._classes = read_list(self.classnames, "classnames")
        self._templates = read_list(self.templates, "templates") or ["{}"]
        bad = [t for t in self._templates if "{}" not in t]
        if bad:
            raise ConfigError(f"templates: every template needs '{{}}' where the class name goes; {bad[0]!r} has none")
        if self._classes is not None and len(set(self._classes)) != len(self._classes):
            dup = next(c for c in self._classes if self._classes.count(c) > 1)
            raise ConfigError(f"classnames: '{dup}' is listed twice")
        if self.label_key is None and not is_class_folder(self.data):
            raise ConfigError("label_key: required for shard data (the json field holding each sample's class)")

    def default_id(self) -> str:
        folder = is_class_folder(self.data)
        return f"zero_shot/{Path(self.data.rstrip('/')).name if folder else self.label_key}"

    def run(self, model: MultimodalModel, specs: dict[str, ModalityData], device: torch.device | str,
            progress: bool = True) -> dict[str, Any]:
        """Embed the data, build the prompt classifier, score every labelled sample."""
        emb = embed_data(model, specs, self.data, self.batch_size, keep=("json",), device=device,
                           progress=progress, workers=self.workers, modality=self.modality, desc=self.default_id())
        labels = sample_labels(emb, self.label_key)
        if self._indexed(emb):
            labels = index_labels(labels, self._classes)
        classes = self._classes or self._classes_from_labels(labels)
        if "label" in emb.meta:
            labels = match_folders(labels, classes)
        ids, unknown = label_indices(labels, classes)
        if unknown:
            examples = sorted({str(u) for u in unknown})[:5]
            log.warning("%s: %d samples have no label among the %d classes (e.g. %s); not scored",
                        self.default_id(), len(unknown), len(classes), ", ".join(examples))
        scored = ids >= 0
        if not scored.any():
            if self.label_type != "index" and all(_is_index(u) for u in unknown):
                seen = ", ".join(sorted({str(u) for u in unknown})[:5])
                raise ConfigError(f"label_type: the labels are integers ({seen}, ...), not class names: set "
                                  "label_type: index to read them as positions in classnames")
            raise no_label_error(emb, self.label_key, unknown, classes)
        classifier = zero_shot_classifier(model, specs, classes, self._templates, self.batch_size, device,
                                          modality=self.text_modality)
        top = ranked_classes(emb.embeddings[scored.to(emb.embeddings.device)], classifier, min(5, len(classes)))
        metrics = accuracy_metrics(top, ids[scored], classes)
        metrics.update(n_unknown_label=len(unknown), skipped=emb.skipped)
        return metrics

    def _indexed(self, emb: Any) -> bool:
        """Whether labels are positions in classnames: asked for, or (auto) every label is a JSON integer."""
        if self.label_type != "auto":
            return self.label_type == "index"
        if self._classes is None or "label" in emb.meta:
            return False
        raw = [m.get(self.label_key) for m in emb.meta.get("json", []) if isinstance(m, dict)]
        raw = [v for v in raw if v is not None]
        return bool(raw) and all(isinstance(v, int) and not isinstance(v, bool) for v in raw)

    def _classes_from_labels(self, labels: list[str | None]) -> list[str]:
        classes = sorted({label for label in labels if label is not None})
        hint = ("they look like class indices: give classnames and label_type: index"
                if classes and all(_is_index(c) for c in classes) else "give classnames for meaningful prompts")
        log.warning("%s: no classnames: the %d labels found in the data (%s%s) are used as class names and "
                    "prompts unchanged; %s", self.default_id(), len(classes), ", ".join(classes[:5]),
                    ", ..." if len(classes) > 5 else "", hint)
        return classes


def _is_index(label: object) -> bool:
    return isinstance(label, str) and label.strip().lstrip("-").isdigit()


def index_labels(labels: list[str | None], classes: list[str]) -> list[str | None]:
    """Integer labels (``json`` ints or digit strings) -> class names by position; anything else stays
    as it is (then not a class: counted as unknown, not scored)."""
    out: list[str | None] = []
    for label in labels:
        i = int(label) if label is not None and _is_index(label) else -1
        out.append(classes[i] if 0 <= i < len(classes) else label)
    return out
