"""The demo's concept world: the shapes, colours, sizes and positions every demo renderer draws.

A leaf (imports nothing of mmpt): the generator (:mod:`mmpt.data.demo_shards`) samples indices into these
vocabularies, and each modality's data side renders them (``ModalityData.render_demo``).
"""

from __future__ import annotations

from typing import Any

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
# Shape extent (diameter of its bounding circle) as a fraction of the picture's side; "small" still
# covers over a third of the side so a 64 px image shows its outline.
SIZES: dict[str, float] = {"small": 0.38, "medium": 0.54, "large": 0.72}
# Unit direction of each position from the centre (image y points down).
POSITIONS: dict[str, tuple[int, int]] = {"center": (0, 0), "left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}
POSITION_PHRASES = {"center": "in the center", "left": "on the left", "right": "on the right",
                    "top": "at the top", "bottom": "at the bottom"}
# Zero-shot classification tasks: task -> class names (written to the demo's classes/<task>.txt).
CLASSES = {"color": tuple(COLORS), "shape": SHAPES}


def concept_words(concepts: Any, i: int) -> dict[str, str]:
    """Sample ``i``'s concepts (index arrays shape, color, background, size, position) as words, plus
    ``where``, its position as a caption phrase."""
    position = tuple(POSITIONS)[concepts.position[i]]
    return {
        "shape": SHAPES[concepts.shape[i]],
        "color": tuple(COLORS)[concepts.color[i]],
        "background": tuple(COLORS)[concepts.background[i]],
        "size": tuple(SIZES)[concepts.size[i]],
        "position": position,
        "where": POSITION_PHRASES[position],
    }
