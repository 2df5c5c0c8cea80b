"""The demo generator's command-line options, importable without torch: ``mmpt --help`` builds every
command's parser, and the core's contracts import torch."""

from __future__ import annotations

import argparse

# Modalities every demo set renders unless told otherwise (a documented default, the CLIP demo's pair).
DEFAULT_MODALITIES = ("image", "text")


def parse_modalities(text: str) -> tuple[str, ...]:
    """``image,text,audio`` -> ('image', 'text', 'audio'); an empty list is an error."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated modality names, got {text!r}")
    return names


def add_modalities_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--modalities`` option shared by ``python -m mmpt.data.demo_shards`` and ``mmpt data demo``."""
    parser.add_argument("--modalities", type=parse_modalities, default=DEFAULT_MODALITIES, metavar="M,M",
                        help="modalities rendering the shared concepts through their registered data side; other "
                        "than the default image,text, each absent from ~10%% of samples (default: image,text)")
