"""The image side of the demo: each sample's concepts drawn as an anti-aliased shape on a noisy background.

A helper of :mod:`mmpt.encoders.image` (its leading underscore keeps the registry's plugin discovery out):
``ImageData.demo_split`` returns a :class:`ShapeScenes`, which draws from the split's stream in the
generator's order (:mod:`mmpt.data.demo_shards`): its noise bank before the concepts, each sample's
jitter after them.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from mmpt.data.concepts import COLORS, POSITIONS, SHAPES, SIZES

_NOISE_BANK = 64  # precomputed noise fields, reused across images (drawing fresh noise costs more than JPEG)
_NOISE_STD = 3.0
_COLOR_JITTER = 10
_SIZE_JITTER = 0.05
_POSITION_JITTER = 0.02
_ROTATION_JITTER = math.radians(10)  # small enough that a square never turns into a diamond
_EDGE_MARGIN = 0.01


class ShapeScenes:
    """One split's pictures: the noise bank (drawn on creation), each sample's geometry and colours
    (drawn by :meth:`plan`), JPEG members for a range of samples (:meth:`render`)."""

    def __init__(self, image_size: int, rng: np.random.Generator):
        self.image_size = image_size
        self.noise_bank = rng.normal(0.0, _NOISE_STD, (_NOISE_BANK, image_size, image_size, 3)).astype(np.float32)

    def plan(self, concepts: Any, rng: np.random.Generator) -> None:
        """Draw every sample's jittered size, position, rotation, colours and noise field up front, so
        rendering is vectorised; ``concepts`` carries shape, color, background, size and position indices."""
        n, side = len(concepts), self.image_size
        palette = np.asarray(list(COLORS.values()), np.int16)
        radius = np.asarray(list(SIZES.values()))[concepts.size] / 2 * rng.uniform(1 - _SIZE_JITTER, 1 + _SIZE_JITTER, n)
        # Off-centre shapes sit near their edge: the offset shrinks as the shape grows so it stays in view.
        direction = np.asarray(list(POSITIONS.values()), np.float64)[concepts.position]
        offset = (0.5 - radius - _EDGE_MARGIN)[:, None] * direction
        centers = 0.5 + offset + rng.uniform(-_POSITION_JITTER, _POSITION_JITTER, (n, 2))
        jitter = rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, (n, 2, 3))
        self.shapes = concepts.shape
        self.centers, self.radii = centers * side, radius * side  # pixels
        self.angles = rng.uniform(-_ROTATION_JITTER, _ROTATION_JITTER, n)
        self.fg = np.clip(palette[concepts.color] + jitter[:, 0], 0, 255)
        self.bg = np.clip(palette[concepts.background] + jitter[:, 1], 0, 255)
        self.noise = rng.integers(0, _NOISE_BANK, n)  # index into the noise bank

    def render(self, rows: slice) -> list[dict[str, bytes]]:
        """``{"jpg": bytes}`` for the planned samples ``rows``."""
        from PIL import Image

        pixels = render_shapes(self.shapes[rows], self.centers[rows], self.radii[rows], self.angles[rows],
                               self.fg[rows], self.bg[rows], self.image_size, self.noise_bank[self.noise[rows]])
        members = []
        for image in pixels:
            jpeg = io.BytesIO()
            # 4:4:4 chroma: colour is half of what the captions say, so keep it sharp at 64 px.
            Image.fromarray(image).save(jpeg, format="JPEG", quality=90, subsampling=0)
            members.append({"jpg": jpeg.getvalue()})
        return members


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
