"""``mmpt data poison``: a backdoor-poisoned copy of shards for experiments (BadNets / CleanCLIP style).

A seeded choice of ``round(fraction * N)`` samples gets a trigger pasted on its ``modality`` member (the
data side's ``add_trigger`` hook: images paste a patch; a modality without the hook is refused) and its
caption (the ``caption_modality`` member) replaced by the target label's caption. Every other sample is
copied byte for byte. The poisoned keys and the settings are written to ``poisoned.json`` beside the shards,
so an experiment knows exactly which samples carry the trigger. The same inputs and seed give the same bytes.

The eval side (:mod:`mmpt.eval.backdoor`) calls :func:`poison_shards` with ``fraction=1`` and no caption to
trigger a held-out set the same way.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmpt.data.shards import DataError, ShardEvent, expand_urls, iter_samples
from mmpt.registry import ConfigError


@dataclass(frozen=True)
class Trigger:
    """What is pasted and where: ``patch_size`` pixels (of the stored member), ``kind`` 'noise' or
    'checkerboard', ``location`` 'fixed' (bottom-right) or 'random', ``seed`` of the noise pattern and places."""

    patch_size: int = 8
    kind: str = "noise"
    location: str = "fixed"
    seed: int = 0

    def hook_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of a data side's ``add_trigger``."""
        return {"patch_size": self.patch_size, "kind": self.kind, "location": self.location, "seed": self.seed}


@dataclass
class PoisonSummary:
    """What :func:`poison_shards` wrote: sample counts, the poisoned keys and where everything went."""

    total: int = 0
    poisoned: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # chosen samples that could not carry the trigger, by reason
    shards: list[Path] = field(default_factory=list)
    record: Path | None = None

    def __str__(self) -> str:
        skips = f"; chosen but not poisoned: {', '.join(f'{k}={v}' for k, v in sorted(self.skipped.items()))}" \
            if self.skipped else ""
        return (f"poisoned {len(self.poisoned)} of {self.total} samples into {len(self.shards)} shard(s){skips}; "
                f"keys in {self.record}")


def trigger_side(modality: str) -> Any:
    """The default-built data side of ``modality``, checked to have an ``add_trigger`` hook."""
    from mmpt.registry import modalities

    spec = modalities.get(modality, path="--modality").from_encoder_config()
    if not callable(getattr(spec, "add_trigger", None)):
        raise ConfigError(f"--modality: modality '{modality}' has no trigger (its data side "
                          f"{type(spec).__module__}.{type(spec).__name__} defines no add_trigger hook)")
    return spec


def choose(n: int, fraction: float, seed: int) -> set[int]:
    """Indices (in stream order) of the ``round(fraction * n)`` samples to poison, drawn with ``seed``."""
    import numpy as np

    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"--fraction: expected a value in [0, 1], got {fraction}")
    k = int(round(fraction * n))
    return set(np.random.default_rng([seed, 0]).choice(n, size=k, replace=False).tolist())


def poison_shards(pattern: str, out: str, *, fraction: float, target: str | None, trigger: Trigger = Trigger(),
                  modality: str = "image", caption_modality: str = "text", max_count: int = 10000,
                  record: str | Path | None = None) -> PoisonSummary:
    """Write a copy of ``pattern``'s samples to ``out`` (a ``%06d`` shard pattern) with ``fraction`` of them
    triggered and captioned ``target`` (None: captions kept). ``record``: where the JSON of poisoned keys
    goes (default ``poisoned.json`` in the output folder)."""
    import numpy as np

    from mmpt.data.writer import ShardWriter  # torch-heavy: `mmpt --help` imports this module
    from mmpt.registry import modalities

    ShardWriter.check_pattern(out)
    spec = trigger_side(modality)
    caption_exts: tuple[str, ...] = ()
    if target is not None:
        caption_exts = modalities.get(caption_modality, path="--caption-modality").extensions
        if not target.strip():
            raise ConfigError("--target: the target caption is empty")
    urls = expand_urls(pattern)
    keys = [s["__key__"] for url in urls for s in iter_samples(url) if not isinstance(s, ShardEvent)]
    if not keys:
        raise DataError(f"{pattern}: no samples to poison")
    chosen = choose(len(keys), fraction, trigger.seed)
    places = np.random.default_rng([trigger.seed, 1])  # random trigger locations, in stream order
    summary = PoisonSummary()
    with ShardWriter(out, max_count=max_count) as writer:
        i = 0
        for url in urls:
            for sample in iter_samples(url):
                if isinstance(sample, ShardEvent):
                    continue
                key = sample["__key__"]
                members = {k: v for k, v in sample.items() if not k.startswith("__")}
                if i in chosen:
                    members = _poisoned(members, spec, trigger, places, target, caption_exts, summary.skipped, key)
                    if members is not None:
                        summary.poisoned.append(key)
                    else:
                        members = {k: v for k, v in sample.items() if not k.startswith("__")}
                if members:
                    writer.write(key, members)
                summary.total += 1
                i += 1
    summary.shards = writer.shards
    summary.record = Path(record) if record is not None else Path(out).parent / "poisoned.json"
    summary.record.parent.mkdir(parents=True, exist_ok=True)
    summary.record.write_text(json.dumps({
        "source": pattern, "fraction": fraction, "target": target, "modality": modality,
        "caption_modality": caption_modality, "trigger": trigger.hook_kwargs(), "total": summary.total,
        "skipped": dict(summary.skipped), "poisoned": summary.poisoned}, indent=1) + "\n", encoding="utf-8")
    return summary


def _poisoned(members: dict[str, bytes], spec: Any, trigger: Trigger, places: Any, target: str | None,
              caption_exts: tuple[str, ...], skipped: Counter, key: str) -> dict[str, bytes] | None:
    """The sample's members with the trigger pasted and the caption replaced, or None (counted) when it
    has no member of the trigger's modality or the member does not decode."""
    ext = next((e for e in spec.extensions if e in members), None)
    if ext is None:
        skipped[f"missing_{spec.modality}"] += 1
        return None
    try:
        new_ext, data = spec.add_trigger(members[ext], ext, rng=places, **trigger.hook_kwargs())
    except Exception as exc:  # an undecodable member is a skipped sample; bad settings are one clear error
        if isinstance(exc, ValueError) and str(exc).startswith("trigger:"):
            raise ConfigError(str(exc)) from None
        skipped[f"decode_error_{spec.modality}"] += 1
        return None
    out = {k: v for k, v in members.items() if k != ext}
    out[new_ext] = data
    if target is not None:
        cap = next((e for e in caption_exts if e in out), caption_exts[0])
        out[cap] = target.encode("utf-8")
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``mmpt data poison SHARDS --out PATTERN --fraction F --target CAPTION``."""
    p = sub.add_parser("poison", help="backdoor-poison a fraction of samples (trigger patch + target caption)",
                       description="Copies SHARDS to --out with round(F x N) seeded samples triggered (a patch "
                       "pasted on the image, stored as PNG) and captioned --target; writes the poisoned keys to "
                       "poisoned.json beside the output. For backdoor experiments (CleanCLIP); see the backdoor "
                       "eval task.")
    p.add_argument("shards", help="input shards: path, glob or brace list")
    p.add_argument("--out", required=True, help="output pattern, e.g. poisoned/train-%%06d.tar")
    p.add_argument("--fraction", type=float, required=True, help="share of samples to poison, in [0, 1]")
    p.add_argument("--target", required=True, help="the caption every poisoned sample gets (the target label's, "
                   "e.g. 'a star')")
    p.add_argument("--patch-size", type=int, default=8, help="trigger side in pixels (default: %(default)s)")
    p.add_argument("--trigger", default="noise", choices=("noise", "checkerboard"), help="patch pattern")
    p.add_argument("--location", default="fixed", choices=("fixed", "random"),
                   help="bottom-right corner, or a random place per image (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the choice, the noise pattern and places")
    p.add_argument("--modality", default="image", help="modality carrying the trigger (default: %(default)s)")
    p.add_argument("--caption-modality", default="text", help="modality whose member gets the target caption")
    p.add_argument("--max-count", type=int, default=10000, help="samples per output shard at most")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    summary = poison_shards(args.shards, args.out, fraction=args.fraction, target=args.target,
                            trigger=Trigger(args.patch_size, args.trigger, args.location, args.seed),
                            modality=args.modality, caption_modality=args.caption_modality, max_count=args.max_count)
    print(summary)
    return 0
