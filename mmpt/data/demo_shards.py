"""The embedded demo dataset: shared concepts (shape, colour, size, position on a background), rendered
by each requested modality's data side.

Generated, never downloaded, so ``clip-tiny`` trains and evaluates anywhere in minutes: a tiny CLIP
learns colour, shape, size and position words from these samples, and zero-shot classification of
shape and colour uses prompt templates written in the same grammar as the captions.

    python -m mmpt.data.demo_shards --out runs/demo/data

The generator samples the concepts (:mod:`mmpt.data.concepts`) and writes shards, class and template
files and ``info.json``; it names no modality beyond the documented default list. Two kinds of renderer:

- the *every-sample* modalities (``STREAM_MODALITIES``, the default ``image,text``: the picture and the
  captions every prompt is written in) draw from the split's own stream, in a fixed order, whether or
  not they are written, so a sample's concepts never depend on the modality list. Each is written when
  requested, and one whose data side has ``demo_templates`` (the zero-shot prompts, written in its
  members' grammar) always, as the class and template files are. Their data side's
  ``demo_split(rng)`` draws its split-wide state (before the concepts), then ``.plan(concepts, rng)``
  each sample's choices (after them, in the list's order), and ``.render(rows)`` the members;
- every other modality renders through ``ModalityData.render_demo(concepts, rng)`` with an RNG of its
  own, and is absent from about ``absent_fraction`` of the samples.
"""


from __future__ import annotations

import argparse
import json
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmpt.contracts import DemoConcepts
from mmpt.data.concepts import CLASSES, COLORS, POSITIONS, SHAPES, SIZES, concept_words
from mmpt.data.demo_options import DEFAULT_MODALITIES, add_modalities_argument
from mmpt.data.writer import ShardWriter
from mmpt.registry import ConfigError

_CHUNK = 64  # samples per vectorised batch: amortises numpy call overhead while temporaries stay in cache
# The documented default modalities (the picture and its captions) are drawn from each split's stream for every sample, in this order (see the module docstring).
STREAM_MODALITIES = DEFAULT_MODALITIES
# Share of samples lacking each other modality (drawn independently per modality), so presence
# masks are exercised; the every-sample modalities are in every sample.
ABSENT_FRACTION = 0.1


@dataclass(frozen=True)
class DemoScene(DemoConcepts):
    """The concepts plus each sample's background colour (an index into ``COLORS``, never the shape's),
    which the every-sample modalities show."""

    background: Any = None

    def __getitem__(self, index: Any) -> DemoConcepts:
        """The concepts (without the background) of the samples ``index``, for ``render_demo``."""
        return DemoConcepts(shape=self.shape[index], color=self.color[index], size=self.size[index],
                            position=self.position[index])


@dataclass
class DemoInfo:
    """Where ``generate_demo`` put everything."""

    root: Path
    train_shards: list[Path]
    eval_shards: list[Path]
    classes: dict[str, Path]  # task ("color", "shape") -> class names, one a line
    templates: dict[str, Path]  # task -> prompt templates with "{}", one a line
    info_file: Path
    train_samples: int
    eval_samples: int
    image_size: int
    seed: int
    modalities: tuple[str, ...] = DEFAULT_MODALITIES
    present: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> modality -> samples with it

    @property
    def train_pattern(self) -> str:
        """The train shards as one brace pattern, e.g. ``out/train/demo-train-{000000..000009}.tar``."""
        return _brace(self.train_shards)

    @property
    def eval_pattern(self) -> str:
        """The eval shards as one brace pattern."""
        return _brace(self.eval_shards)


def generate_demo(
    out: str | Path,
    *,
    train_samples: int = 20000,
    eval_samples: int = 1000,
    image_size: int = 64,
    shard_size: int = 2000,
    seed: int = 0,
    progress: bool = True,
    modalities: Sequence[str] = DEFAULT_MODALITIES,
    modality_configs: dict[str, dict[str, Any]] | None = None,
    absent_fraction: float = ABSENT_FRACTION,
) -> DemoInfo:
    """Write the demo dataset (train/eval shards, class names, prompt templates, info.json) under ``out``.

    ``modalities`` other than the every-sample ones are rendered by their data side, built from
    ``modality_configs[m]`` (an encoder's keyword arguments) or its defaults; each is absent from
    about ``absent_fraction`` of the samples. ``image_size`` is the side of the pictures, in pixels
    (the every-sample data sides are built with it).
    """
    from tqdm import tqdm

    renderers = demo_renderers(modalities, modality_configs or {})
    if not 0 <= absent_fraction < 1:
        raise ConfigError(f"absent_fraction: expected a value in [0, 1), got {absent_fraction}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}")
    if train_samples < 0 or eval_samples < 0:
        raise ValueError(f"sample counts must be >= 0, got train_samples={train_samples}, eval_samples={eval_samples}")
    stream = stream_renderers(image_size)
    # The class and template files are always written, so the members their prompts describe are too.
    written = [m for m, spec in stream.items() if m in modalities or getattr(spec, "demo_templates", None)]
    root = Path(out)
    shards: dict[str, list[Path]] = {}
    present: dict[str, dict[str, int]] = {}
    with tqdm(total=train_samples + eval_samples, disable=not progress, unit="img", desc="demo data") as bar:
        # Separate child seeds: the eval split does not change when train_samples does, and vice versa.
        for stream_id, (split, count) in enumerate((("train", train_samples), ("eval", eval_samples))):
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream_id,)))
            extras = {m: _Rendered(spec, _modality_rng(seed, stream_id, m), count, absent_fraction)
                      for m, spec in renderers.items()}
            shards[split] = _write_split(root / split, split, count, shard_size, rng, bar.update,
                                         stream, written, extras)
            present[split] = {m: int(r.present.sum()) for m, r in extras.items()}
    templates: dict[str, tuple[str, ...]] = {}
    extra_info: dict[str, Any] = {}
    for spec in stream.values():
        templates.update(getattr(spec, "demo_templates", {}))
        extra_info.update(getattr(spec, "demo_info", {}))
    info = DemoInfo(
        root=root,
        train_shards=shards["train"],
        eval_shards=shards["eval"],
        classes=_write_lines(root / "classes", CLASSES),
        templates=_write_lines(root / "templates", templates),
        info_file=root / "info.json",
        train_samples=train_samples,
        eval_samples=eval_samples,
        image_size=image_size,
        seed=seed,
        modalities=tuple(dict.fromkeys(modalities)),
        present=present,
    )
    _write_info(info, shard_size, extra_info)
    return info


def stream_renderers(image_size: int) -> dict[str, Any]:
    """The data sides of the every-sample modalities (``STREAM_MODALITIES``), built with ``image_size``."""
    from mmpt.registry import modalities as registry

    return {m: registry.get(m, path="modalities").from_encoder_config(image_size=image_size)
            for m in STREAM_MODALITIES}


def demo_renderers(modalities: Sequence[str], configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The data side of every requested modality that is not an every-sample one, checked to have a
    demo renderer; a ConfigError names the first that is unknown or has none."""
    from mmpt.contracts import ModalityData
    from mmpt.registry import modalities as registry

    if isinstance(modalities, str) or not modalities:
        raise ConfigError(f"modalities: expected a list of modality names, got {modalities!r}")
    specs: dict[str, Any] = {}
    for name in dict.fromkeys(modalities):
        if name in STREAM_MODALITIES:
            continue
        cls = registry.get(name, path="modalities")
        if getattr(cls, "render_demo", None) is ModalityData.render_demo:
            raise ConfigError(f"modalities: modality '{name}' has no demo renderer ({cls.__module__}.{cls.__name__} "
                              "does not implement ModalityData.render_demo)")
        specs[name] = cls.from_encoder_config(**configs.get(name, {}))
    return specs


def sample_concepts(rng: np.random.Generator, n: int) -> DemoScene:
    """Draw ``n`` samples' concepts: shape, colour, a background unlike the colour, size, position."""
    shape = rng.integers(0, len(SHAPES), n)
    color = rng.integers(0, len(COLORS), n)
    # Adding 1..len-1 modulo the palette size guarantees a background unlike the shape.
    background = (color + rng.integers(1, len(COLORS), n)) % len(COLORS)
    size = rng.integers(0, len(SIZES), n)
    position = rng.integers(0, len(POSITIONS), n)
    return DemoScene(shape=shape, color=color, size=size, position=position, background=background)


def _modality_rng(seed: int, stream: int, modality: str) -> np.random.Generator:
    # Keyed by the modality's name: adding or removing one modality leaves every other one's bytes as they were.
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, 1 + zlib.crc32(modality.encode()))))


class _Rendered:
    """One extra modality of a split: which samples carry it, and its renderer with its own RNG."""

    def __init__(self, spec: Any, rng: np.random.Generator, n: int, absent_fraction: float):
        self.spec, self.rng = spec, rng
        self.present = rng.random(n) >= absent_fraction

    def render(self, scene: DemoScene, rows: slice) -> dict[int, dict[str, bytes]]:
        """Members of the chunk's samples that carry this modality, by sample index."""
        index = np.arange(rows.start, rows.stop)[self.present[rows]]
        if not index.size:
            return {}
        members = self.spec.render_demo(scene[index], self.rng)
        name = self.spec.modality
        if len(members) != index.size:
            raise ValueError(f"{type(self.spec).__name__}.render_demo: returned {len(members)} samples for "
                             f"{index.size} concepts")
        allowed = set(self.spec.extensions) | {"json"}
        for sample in members:
            bad = set(sample) - allowed
            if bad or not set(sample) & set(self.spec.extensions):
                raise ValueError(f"{type(self.spec).__name__}.render_demo: members {sorted(sample)} of modality "
                                 f"'{name}' must include one of its extensions {list(self.spec.extensions)} "
                                 "(plus an optional json)")
        return dict(zip(index.tolist(), members, strict=True))


def _sample_members(scene: DemoScene, i: int, rendered: Sequence[dict[str, bytes]]) -> dict[str, bytes]:
    """One sample's members: each modality's, then the json of its concepts and the modalities' own keys."""
    words = concept_words(scene, i)
    meta: dict[str, Any] = {k: words[k] for k in ("shape", "color", "background", "size", "position")}
    members: dict[str, bytes] = {}
    for own in rendered:
        for ext, data in own.items():
            if ext == "json":  # a modality's own labels (e.g. one per token) join the sample's json
                labels = json.loads(data)
                if set(labels) & set(meta):
                    raise ValueError(f"render_demo: json keys {sorted(set(labels) & set(meta))} are already the sample's")
                meta.update(labels)
            else:
                members[ext] = data
    members["json"] = json.dumps(meta).encode("utf-8")
    return members


def _write_split(folder: Path, split: str, n: int, shard_size: int, rng: np.random.Generator,
                 advance: Callable[[int], object], stream: dict[str, Any], written: Sequence[str],
                 extras: dict[str, _Rendered]) -> list[Path]:
    """Render, encode and shard one split; returns its shard paths."""
    folder.mkdir(parents=True, exist_ok=True)
    # A previous, larger run may have left more shards; a glob over the folder must not pick them up.
    for stale in [*folder.glob(f"demo-{split}-*.tar"), *folder.glob(f"demo-{split}-*.tar.tmp")]:
        stale.unlink()
    # The split's stream, in a fixed order: each every-sample modality's split-wide draws, the concepts,
    # then each one's per-sample draws.
    splits = {m: spec.demo_split(rng) for m, spec in stream.items()}
    scene = sample_concepts(rng, n)
    for renderer in splits.values():
        renderer.plan(scene, rng)
    with ShardWriter(str(folder / f"demo-{split}-%06d.tar"), max_size=1 << 40, max_count=shard_size) as writer:
        for start in range(0, n, _CHUNK):
            rows = slice(start, min(n, start + _CHUNK))
            every = [splits[m].render(rows) for m in written]
            rendered = [r.render(scene, rows) for r in extras.values()]
            for i in range(start, rows.stop):
                own = [r[i - start] for r in every] + [r[i] for r in rendered if i in r]
                writer.write(f"{split}_{i:08d}", _sample_members(scene, i, own))
            advance(rows.stop - start)
    return writer.shards


def _write_lines(folder: Path, entries: dict[str, tuple[str, ...]]) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, lines in entries.items():
        paths[name] = folder / f"{name}.txt"
        paths[name].write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return paths


def _write_info(info: DemoInfo, shard_size: int, extra: dict[str, Any]) -> None:
    def rel(path: Path) -> str:
        return path.relative_to(info.root).as_posix()

    content = {
        "generator": "mmpt.data.demo_shards",
        "seed": info.seed,
        "image_size": info.image_size,
        "train_samples": info.train_samples,
        "eval_samples": info.eval_samples,
        "shard_size": shard_size,
        "shapes": list(SHAPES),
        "colors": list(COLORS),
        "sizes": list(SIZES),
        "positions": list(POSITIONS),
        "modalities": list(info.modalities),
        "present": info.present,
        **extra,  # the every-sample data sides' own entries (the caption forms)
        "train_shards": [rel(p) for p in info.train_shards],
        "eval_shards": [rel(p) for p in info.eval_shards],
        "classes": {k: rel(p) for k, p in info.classes.items()},
        "templates": {k: rel(p) for k, p in info.templates.items()},
    }
    info.info_file.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def _brace(shards: list[Path]) -> str:
    if len(shards) <= 1:
        return str(shards[0]) if shards else ""
    # demo-train-000000.tar .. demo-train-000009.tar -> demo-train-{000000..000009}.tar
    prefix, first = shards[0].name.removesuffix(".tar").rsplit("-", 1)
    last = shards[-1].name.removesuffix(".tar").rsplit("-", 1)[1]
    return str(shards[0].parent / f"{prefix}-{{{first}..{last}}}.tar")


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m mmpt.data.demo_shards --out DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m mmpt.data.demo_shards",
        description="Generate the demo dataset (shared concepts rendered by each modality) as WebDataset shards.",
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (train/, eval/, classes/, templates/, info.json)")
    parser.add_argument("--train-samples", type=int, metavar="N", default=20000, help="training images (default: %(default)s)")
    parser.add_argument("--eval-samples", type=int, metavar="N", default=1000, help="evaluation images (default: %(default)s)")
    parser.add_argument("--image-size", type=int, metavar="N", default=64, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--shard-size", type=int, metavar="N", default=2000, help="samples per shard (default: %(default)s)")
    parser.add_argument("--seed", type=int, metavar="N", default=0, help="random seed; same seed, same bytes (default: %(default)s)")
    add_modalities_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    info = generate_demo(args.out, train_samples=args.train_samples, eval_samples=args.eval_samples,
                         image_size=args.image_size, shard_size=args.shard_size, seed=args.seed,
                         progress=not args.no_progress, modalities=args.modalities)
    seconds = time.perf_counter() - start
    total = info.train_samples + info.eval_samples
    print(f"wrote {info.train_samples} train + {info.eval_samples} eval samples "
          f"({len(info.train_shards)} + {len(info.eval_shards)} shards) to {info.root} "
          f"in {seconds:.1f} s ({total / max(seconds, 1e-9):,.0f} samples/s)")


if __name__ == "__main__":
    main()
