"""Compositional and lexical sensitivity (SugarCrepe, Hsieh et al. 2023; SugarCrepe++, Dumpala et al. 2024).

Each sample carries caption triplets: two lexically different positives (the same meaning in other words)
and one hard negative (a small change of meaning: an attribute swapped, an object replaced, a relation
changed). A model passes a triplet X-to-text when both positives are closer to the sample than the negative
(SugarCrepe++'s ITT; ``x2t_p1``: the first positive alone, SugarCrepe's), and text-to-text when the two
positives are closer to each other than either is to the negative (SugarCrepe++'s TOT).

Triplets come from the sample's json (``triplets_key``: a list of ``{"positives": [p1, p2], "negative": n,
"type": t}``) or, with ``rules: demo``, from the demo's concept fields, in the captions' own grammar (see
:func:`demo_triplets`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mmpt.contracts import ModalityData
from mmpt.data.concepts import COLORS, POSITION_PHRASES, SHAPES
from mmpt.data.shards import DataError
from mmpt.eval.common import Task, embed_data, embed_texts
from mmpt.model import MultimodalModel
from mmpt.registry import ConfigError, closest, tasks

RULES = ("json", "demo", "auto")
# The demo captions' grammar (encoders/text.py's descriptive forms): two forms that say the same with other
# words and word order, and the relation each position word stands in to the picture.
DEMO_FORMS = ("a {size} {color} {shape} {where} of a {background} background",
              "a {background} background with a {size} {color} {shape} {where}")
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def demo_triplets(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """SugarCrepe's three alterations of one demo sample (its json: shape, color, background, size,
    position): ``attribute`` swaps the shape's colour with the background's, ``object`` replaces the shape by
    the next one of the vocabulary, ``relation`` moves it to the opposite side (none for a centred shape).
    Positives are the two forms of :data:`DEMO_FORMS`; the negative is the first form with the change."""
    if not all(isinstance(meta.get(k), str) for k in ("shape", "color", "background", "size", "position")):
        return []
    words = {k: meta[k] for k in ("shape", "color", "background", "size", "position")}
    if words["position"] not in POSITION_PHRASES or words["shape"] not in SHAPES or words["color"] not in COLORS:
        return []

    def caption(form: str, **change: str) -> str:
        w = {**words, **change}
        return form.format(**w, where=POSITION_PHRASES[w["position"]])

    positives = [caption(form) for form in DEMO_FORMS]
    out = [{"type": "attribute", "positives": positives,
            "negative": caption(DEMO_FORMS[0], color=words["background"], background=words["color"])},
           {"type": "object", "positives": positives,
            "negative": caption(DEMO_FORMS[0], shape=SHAPES[(SHAPES.index(words["shape"]) + 1) % len(SHAPES)])}]
    if words["position"] in OPPOSITE:
        out.append({"type": "relation", "positives": positives,
                    "negative": caption(DEMO_FORMS[0], position=OPPOSITE[words["position"]])})
    return out


def json_triplets(meta: Any, key: str) -> list[dict[str, Any]] | None:
    """The sample's own triplets (``json[key]``), checked; None when it has none."""
    items = meta.get(key) if isinstance(meta, dict) else None
    if items is None:
        return None
    if not isinstance(items, list):
        raise DataError(f"{key}: expected a list of triplets in the sample json, got {type(items).__name__}")
    out = []
    for t in items:
        ok = isinstance(t, dict) and isinstance(t.get("negative"), str) and isinstance(t.get("positives"), list) \
            and len(t["positives"]) == 2 and all(isinstance(p, str) for p in t["positives"])
        if not ok:
            raise DataError(f"{key}: each triplet is {{\"positives\": [p1, p2], \"negative\": n, \"type\": t}}, "
                            f"got {str(t)[:80]}")
        out.append({"type": str(t.get("type", "default")), "positives": list(t["positives"]), "negative": t["negative"]})
    return out


def triplet_scores(x: Tensor, p1: Tensor, p2: Tensor, neg: Tensor) -> dict[str, Tensor]:
    """Per-triplet passes (bool) from L2-normalised (N, E) embeddings of the samples and their texts."""
    s1, s2, sn = (x * p1).sum(1), (x * p2).sum(1), (x * neg).sum(1)
    pp, p1n, p2n = (p1 * p2).sum(1), (p1 * neg).sum(1), (p2 * neg).sum(1)
    return {"x2t": (s1 > sn) & (s2 > sn), "x2t_p1": s1 > sn, "t2t": (pp > p1n) & (pp > p2n)}


@tasks.register("compositional")
@dataclass(kw_only=True)
class Compositional(Task):
    """SugarCrepe(++)-style accuracy per alteration type: X-to-text and text-to-text on caption triplets.

    rules: where triplets come from: 'json' (the sample json's ``triplets_key``), 'demo' (generated from
    the demo's concept fields: attribute swap, object replace, relation swap) or 'auto' (json where a sample
    has it, else demo). triplets_key: json field of a sample's triplets. modality: the tower embedding the
    samples. text_modality: the tower embedding the captions. Metrics per type ``<type>/x2t`` (both
    positives beat the negative), ``<type>/x2t_p1`` (the first does), ``<type>/t2t`` (the positives are
    closer to each other than to the negative), their ``mean_*`` over types and ``<type>/n``.
    """

    rules: str = "auto"
    triplets_key: str = "triplets"
    modality: str = "image"
    text_modality: str = "text"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rules not in RULES:
            raise ConfigError(f"rules: expected {'|'.join(RULES)}{closest(str(self.rules), RULES)}, got {self.rules!r}")

    def default_id(self) -> str:
        return "compositional"

    def triplets(self, meta: Any) -> list[dict[str, Any]]:
        """One sample's triplets as ``rules`` says."""
        own = json_triplets(meta, self.triplets_key) if self.rules != "demo" else None
        if own is not None or self.rules == "json":
            return own or []
        return demo_triplets(meta) if isinstance(meta, dict) else []

    def run(self, model: MultimodalModel, specs: dict[str, ModalityData], device: torch.device | str,
            progress: bool = True) -> dict[str, Any]:
        """Embed the samples and every distinct caption once, then score each triplet."""
        emb = embed_data(model, specs, self.data, self.batch_size, keep=("json",), device=device, progress=progress,
                         workers=self.workers, modality=self.modality, desc=self.default_id())
        rows, types, texts = [], [], {}
        for i, meta in enumerate(emb.meta.get("json", [None] * len(emb))):
            for t in self.triplets(meta):
                rows.append((i, *(texts.setdefault(s, len(texts)) for s in (*t["positives"], t["negative"]))))
                types.append(t["type"])
        if not rows:
            raise DataError(f"compositional: no sample of {self.data!r} has triplets (rules: {self.rules}; "
                            f"json['{self.triplets_key}'] or the demo's concept fields)")
        text_emb = embed_texts(model, specs, list(texts), self.batch_size, device, modality=self.text_modality)
        idx = torch.tensor(rows, dtype=torch.long, device=text_emb.device)
        x = emb.embeddings.to(text_emb.device)[idx[:, 0]]
        passes = triplet_scores(x, text_emb[idx[:, 1]], text_emb[idx[:, 2]], text_emb[idx[:, 3]])
        return compositional_metrics(passes, types) | {"skipped": emb.skipped}


def compositional_metrics(passes: dict[str, Tensor], types: list[str]) -> dict[str, Any]:
    """Accuracy per type and metric, their mean over types, and chance levels (x2t 1/3, x2t_p1 1/2, t2t 1/3
    for a model that ranks at random)."""
    out: dict[str, Any] = {}
    kinds = sorted(set(types))
    chance = {"x2t": 1 / 3, "x2t_p1": 0.5, "t2t": 1 / 3}
    for kind in kinds:
        rows = torch.tensor([t == kind for t in types], device=next(iter(passes.values())).device)
        for metric, hits in passes.items():
            out[f"{kind}/{metric}"] = hits[rows].double().mean().item()
            out[f"{kind}/{metric}_chance"] = chance[metric]
        out[f"{kind}/n"] = int(rows.sum())
    for metric in passes:
        out[f"mean_{metric}"] = sum(out[f"{k}/{metric}"] for k in kinds) / len(kinds)
        out[f"mean_{metric}_chance"] = chance[metric]
    return out
