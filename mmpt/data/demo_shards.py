"""The embedded demo dataset: coloured shapes on coloured backgrounds, captioned by a small grammar.

Generated, never downloaded, so ``clip-tiny`` trains and evaluates anywhere in minutes: a tiny CLIP
learns colour, shape, size and position words from these images, and zero-shot classification of
shape and colour uses prompt templates written in the same grammar as the captions.

    python -m mmpt.data.demo_shards --out runs/demo/data

Other modalities render the same concepts through their registered data side
(``ModalityData.render_demo``): ``--modalities image,text,audio`` adds each sample's sound, drawn
from the shape, colour, size and position the picture and caption show. The generator draws the
picture (``jpg``) and captions (``txt``, ``json``) itself; it names no other modality.
"""


from __future__ import annotations

import argparse
import io
import json
import math
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmpt.data.writer import ShardWriter
from mmpt.registry import ConfigError

# Every class name starts with a consonant because captions and templates write the article "a"
# (hence cyan rather than orange): a filled template must be a string the captions contain.
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "hexagon")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (245, 220, 40),
    "cyan": (40, 200, 220),
    "purple": (135, 50, 180),
    "pink": (250, 140, 200),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
# Shape extent (diameter of its bounding circle) as a fraction of the image side; "small" still
# covers over a third of the side so a 64 px image shows its outline.
SIZES: dict[str, float] = {"small": 0.38, "medium": 0.54, "large": 0.72}
POSITIONS: dict[str, tuple[int, int]] = {"center": (0, 0), "left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}
POSITION_PHRASES = {"center": "in the center", "left": "on the left", "right": "on the right",
                    "top": "at the top", "bottom": "at the bottom"}

# (form, weight). Descriptive forms name the colour, the shape and the background; partial forms use
# generic words ("shape", "a background") so zero-shot prompts are captions the model has seen.
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
CLASSES = {"color": tuple(COLORS), "shape": SHAPES}
CAPTION_VARIANTS = 3  # captions per image in its json, for multi-caption retrieval

_CHUNK = 64  # images per vectorised batch: amortises numpy call overhead while temporaries stay in cache
_NOISE_BANK = 64  # precomputed noise fields, reused across images (drawing fresh noise costs more than JPEG)
_NOISE_STD = 3.0
_COLOR_JITTER = 10
_SIZE_JITTER = 0.05
_POSITION_JITTER = 0.02
_ROTATION_JITTER = math.radians(10)  # small enough that a square never turns into a diamond
_EDGE_MARGIN = 0.01
_COLOR_NAMES = tuple(COLORS)
_SIZE_NAMES = tuple(SIZES)
_POSITION_NAMES = tuple(POSITIONS)
# Modalities whose members the generator draws itself (the picture and the captions every prompt is
# written in); any other modality renders through its registered data side.
OWN_MODALITIES = ("image", "text")
DEFAULT_MODALITIES = OWN_MODALITIES
# Share of samples lacking each rendered modality (drawn independently per modality), so presence
# masks are exercised; the picture and the captions are in every sample.
ABSENT_FRACTION = 0.1


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

    ``modalities`` beyond the picture and captions are rendered by their data side, built from
    ``modality_configs[m]`` (an encoder's keyword arguments) or its defaults; each is absent from
    about ``absent_fraction`` of the samples.
    """
    from tqdm import tqdm

    renderers = demo_renderers(modalities, modality_configs or {})
    if not 0 <= absent_fraction < 1:
        raise ConfigError(f"absent_fraction: expected a value in [0, 1), got {absent_fraction}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}")
    if train_samples < 0 or eval_samples < 0:
        raise ValueError(f"sample counts must be >= 0, got train_samples={train_samples}, eval_samples={eval_samples}")
    root = Path(out)
    shards: dict[str, list[Path]] = {}
    present: dict[str, dict[str, int]] = {}
    with tqdm(total=train_samples + eval_samples, disable=not progress, unit="img", desc="demo data") as bar:
        # Separate child seeds: the eval split does not change when train_samples does, and vice versa.
        for stream, (split, count) in enumerate((("train", train_samples), ("eval", eval_samples))):
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream,)))
            extras = {m: _Rendered(spec, _modality_rng(seed, stream, m), count, absent_fraction)
                      for m, spec in renderers.items()}
            shards[split] = _write_split(root / split, split, count, image_size, shard_size, rng, bar.update,
                                         draw_images="image" in modalities, extras=extras)
            present[split] = {m: int(r.present.sum()) for m, r in extras.items()}
    info = DemoInfo(
        root=root,
        train_shards=shards["train"],
        eval_shards=shards["eval"],
        classes=_write_lines(root / "classes", CLASSES),
        templates=_write_lines(root / "templates", TEMPLATES),
        info_file=root / "info.json",
        train_samples=train_samples,
        eval_samples=eval_samples,
        image_size=image_size,
        seed=seed,
        modalities=tuple(dict.fromkeys(modalities)),
        present=present,
    )
    _write_info(info, shard_size)
    return info


def demo_renderers(modalities: Sequence[str], configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The data side of every requested modality the generator does not draw itself, checked to have a
    demo renderer; a ConfigError names the first that is unknown or has none."""
    from mmpt.contracts import ModalityData
    from mmpt.registry import modalities as registry

    if isinstance(modalities, str) or not modalities:
        raise ConfigError(f"modalities: expected a list of modality names, got {modalities!r}")
    specs: dict[str, Any] = {}
    for name in dict.fromkeys(modalities):
        if name in OWN_MODALITIES:
            continue
        cls = registry.get(name, path="modalities")
        if getattr(cls, "render_demo", None) is ModalityData.render_demo:
            raise ConfigError(f"modalities: modality '{name}' has no demo renderer ({cls.__module__}.{cls.__name__} "
                              "does not implement ModalityData.render_demo)")
        specs[name] = cls.from_encoder_config(**configs.get(name, {}))
    return specs


def _modality_rng(seed: int, stream: int, modality: str) -> np.random.Generator:
    # Keyed by the modality's name: adding or removing one modality leaves every other one's bytes as they were.
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, 1 + zlib.crc32(modality.encode()))))


class _Rendered:
    """One extra modality of a split: which samples carry it, and its renderer with its own RNG."""

    def __init__(self, spec: Any, rng: np.random.Generator, n: int, absent_fraction: float):
        self.spec, self.rng = spec, rng
        self.present = rng.random(n) >= absent_fraction

    def render(self, attrs: _Attributes, rows: slice) -> dict[int, dict[str, bytes]]:
        """Members of the chunk's samples that carry this modality, by sample index."""
        from mmpt.contracts import DemoConcepts

        index = np.arange(rows.start, rows.stop)[self.present[rows]]
        if not index.size:
            return {}
        concepts = DemoConcepts(shape=attrs.shape[index], color=attrs.color[index], size=attrs.size[index],
                                position=attrs.position[index])
        members = self.spec.render_demo(concepts, self.rng)
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


def render_shapes(
    shapes: np.ndarray,
    centers: np.ndarray,
    radii: np.ndarray,
    angles: np.ndarray,
    fg: np.ndarray,
    bg: np.ndarray,
    image_size: int,
    noise: np.ndarray | None = None,
) -> np.ndarray:
    """Draw N anti-aliased shapes: shape ids (N,), centers (N,2) and radii (N,) in pixels, angles (N,)
    in radians, fg/bg RGB (N,3), optional additive noise (N,S,S,3) -> uint8 images (N,S,S,3)."""
    coverage = np.empty((len(shapes), image_size, image_size), np.float32)
    # Pixel centres, shared by every image; each shape group broadcasts its own parameters over them.
    grid = np.arange(image_size, dtype=np.float32) + 0.5
    for shape_id, distance in enumerate(_SHAPE_DISTANCES):
        rows = np.flatnonzero(shapes == shape_id)
        if rows.size:
            u, v, scale = _local_coordinates(grid, centers[rows], radii[rows], angles[rows])
            # Signed distance in pixels -> fraction of the pixel covered: a one-pixel soft edge.
            coverage[rows] = np.clip(0.5 - distance(u, v) * scale, 0.0, 1.0)
    fg, bg = fg.astype(np.float32), bg.astype(np.float32)
    pixels = np.empty((*coverage.shape, 3), np.float32)
    # One channel at a time: broadcasting a trailing axis of 3 runs numpy's inner loop 3 elements
    # long, about six times slower than these whole-plane strided loops.
    for c in range(3):
        np.multiply(coverage, (fg[:, c] - bg[:, c])[:, None, None], out=pixels[..., c])
        pixels[..., c] += bg[:, c, None, None]
    if noise is not None:
        pixels += noise
    return np.clip(pixels, 0, 255, out=pixels).astype(np.uint8)


def _local_coordinates(grid: np.ndarray, centers: np.ndarray, radii: np.ndarray,
                       angles: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel grid -> each shape's unit frame (its bounding circle is the unit circle), plus radii to
    turn unit distances back into pixels."""
    dx = grid[None, None, :] - centers[:, 0, None, None].astype(np.float32)
    dy = grid[None, :, None] - centers[:, 1, None, None].astype(np.float32)
    inv = (1.0 / radii).astype(np.float32)[:, None, None]
    cos = np.cos(angles).astype(np.float32)[:, None, None] * inv
    sin = np.sin(angles).astype(np.float32)[:, None, None] * inv
    return dx * cos + dy * sin, dy * cos - dx * sin, radii.astype(np.float32)[:, None, None]


def _half_planes(vertices: list[tuple[float, float]]) -> np.ndarray:
    """Convex polygon -> rows (nx, ny, d): the outward unit normal and offset of each edge."""
    points = np.asarray(vertices, np.float64)
    centroid = points.mean(0)
    planes = []
    for a, b in zip(points, np.roll(points, -1, axis=0)):
        normal = np.array([b[1] - a[1], a[0] - b[0]])
        normal /= np.linalg.norm(normal)
        if normal @ (centroid - a) > 0:
            normal = -normal
        planes.append((normal[0], normal[1], normal @ a))
    return np.asarray(planes, np.float32)


def _convex_distance(planes: np.ndarray) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Distance function of a convex polygon (exact inside and along edges, which is all the
    one-pixel anti-aliasing reads)."""

    def distance(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        result = u * planes[0, 0] + v * planes[0, 1] - planes[0, 2]
        for nx, ny, d in planes[1:]:
            np.maximum(result, u * nx + v * ny - d, out=result)
        return result

    return distance


def _regular(count: int, radius: float, start_deg: float, dy: float = 0.0) -> list[tuple[float, float]]:
    """Vertices of a regular polygon; image y points down, so -90 degrees is straight up."""
    step = 360.0 / count
    return [(radius * math.cos(math.radians(start_deg + k * step)),
             radius * math.sin(math.radians(start_deg + k * step)) + dy) for k in range(count)]


def _circle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.sqrt(u * u + v * v) - 1.0


def _ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.abs(np.sqrt(u * u + v * v) - 0.75) - 0.25


def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) - 0.85


def _diamond(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (np.abs(u) + np.abs(v) - 1.0) * np.float32(math.sqrt(0.5))


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    return np.minimum(np.maximum(au - 0.95, av - 0.32), np.maximum(au - 0.32, av - 0.95))


def _star(u: np.ndarray, v: np.ndarray, inner: float = 0.55, dy: float = 0.1) -> np.ndarray:
    # Inigo Quilez's exact five-point star distance: fold the plane into one tenth of the star by
    # mirroring, then measure to a single edge. A union of triangles would leave seams at 64 px.
    k1x, k1y = 0.809016994, -0.587785252  # cos and -sin of 36 degrees
    x, y = np.abs(u), dy - v  # y up, and shifted so the star's bounding box is centred
    for kx, ky in ((k1x, k1y), (-k1x, k1y)):
        fold = 2.0 * np.maximum(kx * x + ky * y, 0.0)
        x, y = x - fold * kx, y - fold * ky
    x, y = np.abs(x), y - 1.0
    bax, bay = -inner * k1y, inner * k1x - 1.0
    h = np.clip((x * bax + y * bay) / (bax * bax + bay * bay), 0.0, 1.0)
    return np.hypot(x - bax * h, y - bay * h) * np.sign(y * bax - x * bay)


def _hexagon(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au = np.abs(u)
    return np.maximum(au, 0.5 * au + np.float32(math.sqrt(0.75)) * np.abs(v)) - np.float32(math.sqrt(0.75))


# The triangle points up; shifting it down centres its bounding box on the shape's centre.
_SHAPE_DISTANCES = (
    _circle,
    _square,
    _convex_distance(_half_planes(_regular(3, 1.15, -90.0, dy=0.29))),
    _diamond,
    _star,
    _cross,
    _ring,
    _hexagon,
)
assert len(_SHAPE_DISTANCES) == len(SHAPES)


@dataclass
class _Attributes:
    """Every random choice for a split, drawn up front as arrays so rendering can be vectorised."""

    shape: np.ndarray
    color: np.ndarray
    background: np.ndarray
    size: np.ndarray
    position: np.ndarray
    centers: np.ndarray  # (N, 2) pixels
    radii: np.ndarray  # (N,) pixels
    angles: np.ndarray
    fg: np.ndarray  # (N, 3) RGB after jitter
    bg: np.ndarray
    noise: np.ndarray  # (N,) index into the noise bank
    caption_form: np.ndarray  # (N,) index into FORMS
    variant_forms: np.ndarray  # (N, CAPTION_VARIANTS) distinct indices into DESCRIPTIVE_FORMS


def _sample_attributes(rng: np.random.Generator, n: int, image_size: int) -> _Attributes:
    palette = np.asarray(list(COLORS.values()), np.int16)
    shape = rng.integers(0, len(SHAPES), n)
    color = rng.integers(0, len(COLORS), n)
    # Adding 1..len-1 modulo the palette size guarantees a background unlike the shape.
    background = (color + rng.integers(1, len(COLORS), n)) % len(COLORS)
    size = rng.integers(0, len(SIZES), n)
    position = rng.integers(0, len(POSITIONS), n)
    radius = np.asarray(list(SIZES.values()))[size] / 2 * rng.uniform(1 - _SIZE_JITTER, 1 + _SIZE_JITTER, n)
    # Off-centre shapes sit near their edge: the offset shrinks as the shape grows so it stays in view.
    direction = np.asarray(list(POSITIONS.values()), np.float64)[position]
    offset = (0.5 - radius - _EDGE_MARGIN)[:, None] * direction
    centers = 0.5 + offset + rng.uniform(-_POSITION_JITTER, _POSITION_JITTER, (n, 2))
    jitter = rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, (n, 2, 3))
    weights = np.asarray([w for _, w in DESCRIPTIVE_FORMS + PARTIAL_FORMS])
    return _Attributes(
        shape=shape,
        color=color,
        background=background,
        size=size,
        position=position,
        centers=centers * image_size,
        radii=radius * image_size,
        angles=rng.uniform(-_ROTATION_JITTER, _ROTATION_JITTER, n),
        fg=np.clip(palette[color] + jitter[:, 0], 0, 255),
        bg=np.clip(palette[background] + jitter[:, 1], 0, 255),
        noise=rng.integers(0, _NOISE_BANK, n),
        caption_form=rng.choice(len(weights), size=n, p=weights / weights.sum()),
        # argsort of uniform keys = a random permutation per row; its first columns are distinct draws.
        variant_forms=rng.random((n, len(DESCRIPTIVE_FORMS))).argsort(axis=1)[:, :CAPTION_VARIANTS],
    )


def _words(attrs: _Attributes, i: int) -> dict[str, str]:
    position = _POSITION_NAMES[attrs.position[i]]
    return {
        "shape": SHAPES[attrs.shape[i]],
        "color": _COLOR_NAMES[attrs.color[i]],
        "background": _COLOR_NAMES[attrs.background[i]],
        "size": _SIZE_NAMES[attrs.size[i]],
        "position": position,
        "where": POSITION_PHRASES[position],
    }


def _sample_members(attrs: _Attributes, i: int, pixels: np.ndarray | None,
                    extra: Sequence[dict[str, bytes]] = ()) -> dict[str, bytes]:
    from PIL import Image

    words = _words(attrs, i)
    variants = [DESCRIPTIVE_FORMS[k][0].format(**words) for k in attrs.variant_forms[i]]
    meta: dict[str, Any] = {k: words[k] for k in ("shape", "color", "background", "size", "position")}
    meta["captions"] = variants
    members: dict[str, bytes] = {}
    if pixels is not None:
        jpeg = io.BytesIO()
        # 4:4:4 chroma: colour is half of what the captions say, so keep it sharp at 64 px.
        Image.fromarray(pixels).save(jpeg, format="JPEG", quality=90, subsampling=0)
        members["jpg"] = jpeg.getvalue()
    members["txt"] = FORMS[attrs.caption_form[i]].format(**words).encode("utf-8")
    for rendered in extra:
        for ext, data in rendered.items():
            if ext == "json":  # a modality's own labels (e.g. one per token) join the sample's json
                own = json.loads(data)
                if set(own) & set(meta):
                    raise ValueError(f"render_demo: json keys {sorted(set(own) & set(meta))} are already the sample's")
                meta.update(own)
            else:
                members[ext] = data
    members["json"] = json.dumps(meta).encode("utf-8")
    return members


def _write_split(folder: Path, split: str, n: int, image_size: int, shard_size: int,
                 rng: np.random.Generator, advance: Callable[[int], object], draw_images: bool = True,
                 extras: dict[str, _Rendered] | None = None) -> list[Path]:
    """Render, encode and shard one split; returns its shard paths."""
    folder.mkdir(parents=True, exist_ok=True)
    # A previous, larger run may have left more shards; a glob over the folder must not pick them up.
    for stale in [*folder.glob(f"demo-{split}-*.tar"), *folder.glob(f"demo-{split}-*.tar.tmp")]:
        stale.unlink()
    noise_bank = rng.normal(0.0, _NOISE_STD, (_NOISE_BANK, image_size, image_size, 3)).astype(np.float32)
    attrs = _sample_attributes(rng, n, image_size)
    with ShardWriter(str(folder / f"demo-{split}-%06d.tar"), max_size=1 << 40, max_count=shard_size) as writer:
        for start in range(0, n, _CHUNK):
            rows = slice(start, min(n, start + _CHUNK))
            images = (render_shapes(attrs.shape[rows], attrs.centers[rows], attrs.radii[rows], attrs.angles[rows],
                                    attrs.fg[rows], attrs.bg[rows], image_size, noise_bank[attrs.noise[rows]])
                      if draw_images else [None] * (rows.stop - start))
            rendered = [r.render(attrs, rows) for r in (extras or {}).values()]
            for offset, pixels in enumerate(images):
                i = start + offset
                extra = [r[i] for r in rendered if i in r]
                writer.write(f"{split}_{i:08d}", _sample_members(attrs, i, pixels, extra))
            advance(len(images))
    return writer.shards


def _write_lines(folder: Path, entries: dict[str, tuple[str, ...]]) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, lines in entries.items():
        paths[name] = folder / f"{name}.txt"
        paths[name].write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return paths


def _write_info(info: DemoInfo, shard_size: int) -> None:
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
        "caption_forms": list(FORMS),
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


def parse_modalities(text: str) -> tuple[str, ...]:
    """``image,text,audio`` -> ('image', 'text', 'audio'); an empty list is an error."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated modality names, got {text!r}")
    return names


def add_modalities_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--modalities`` option shared by ``python -m mmpt.data.demo_shards`` and ``mmpt data demo``."""
    parser.add_argument("--modalities", type=parse_modalities, default=DEFAULT_MODALITIES, metavar="M,M",
                        help="modalities rendering the shared concepts; other than image and text, each "
                        "through its registered data side, absent from ~10%% of samples (default: image,text)")


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m mmpt.data.demo_shards --out DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m mmpt.data.demo_shards",
        description="Generate the demo dataset (coloured shapes with captions) as WebDataset shards.",
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
