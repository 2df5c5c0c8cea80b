"""The hub-style model folder (``mmpt export --format folder``) read as data.

Layout: ``config.json`` (format tag, the resolved mmpt config, per-modality preprocess settings, the tokenizer
manifest), ``model.safetensors`` (tensors only), ``tokenizer/<encoder>/<file>`` (the files of each ``hf:``
tokenizer) and ``README.md`` (the model card, never read). :func:`read_model_folder` turns the folder into what
an export file's header holds (metadata entries and the tensor file), so the loader checks it with the same
rules as an export: nothing is unpickled or run, tokenizer files are named from a fixed list (no path in the
folder's own words reaches the filesystem) and must lie inside the folder (or its hub-cache blob store).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import yaml

from mmpt.formats.export_file import FORMAT, MAX_TOKENIZER_BYTES, TOKENIZER_FILES, TOKENIZER_META
from mmpt.registry import ConfigError, closest

FOLDER_FORMAT = "mmpt-folder/1"
CONFIG, WEIGHTS, CARD, TOKENIZER_DIR = "config.json", "model.safetensors", "README.md", "tokenizer"
MAX_CONFIG_BYTES = 16 * 2**20
# config.json's top-level keys; anything else is refused (a hand-edited or crafted file says what it is)
CONFIG_KEYS = ("format", "library_name", "mmpt_version", "config", "preprocess", "tokenizers", "step", "source")


def is_model_folder(path: str | Path) -> bool:
    """A folder holding a ``config.json`` (an mmpt model folder, or another library's folder refused by name)."""
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


def plain_name(name: Any) -> bool:
    """A single path component that names nothing outside its folder (no separator, no dot prefix)."""
    return isinstance(name, str) and bool(name) and Path(name).name == name and "\\" not in name \
        and not name.startswith(".")


def inside(path: Path, folder: Path) -> Path:
    """``path`` if it (after symlinks) lies in ``folder`` or, for a Hugging Face hub snapshot
    (``.../snapshots/<rev>/``), in that cache's ``blobs``; otherwise a ConfigError naming it."""
    target, root = path.resolve(), folder.resolve()
    roots = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    if not any(target.is_relative_to(r) for r in roots):
        raise ConfigError(f"{path}: resolves to {target}, outside the model folder {folder}; expected the folder's "
                          "own file")
    if not target.is_file():
        raise ConfigError(f"{path}: not a regular file")
    return path


def read_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of a model folder as a dict, checked: size, JSON, format tag, known keys."""
    path = folder / CONFIG
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size / 2**20:.0f} MB, more than the {MAX_CONFIG_BYTES // 2**20} "
                          "MB a model folder's config may take")
    try:
        raw = json.loads(inside(path, folder).read_bytes())
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({type(exc).__name__}); expected an mmpt model folder's "
                          "config") from None
    if not isinstance(raw, dict) or raw.get("format") != FOLDER_FORMAT:
        got = raw.get("format", raw.get("model_type")) if isinstance(raw, dict) else type(raw).__name__
        raise ConfigError(f"{path}: format {got!r}; expected an mmpt model folder ({FOLDER_FORMAT}; Hugging Face "
                          "CLIP folders: mmpt import hf-clip)")
    unknown = [k for k in raw if k not in CONFIG_KEYS]
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}{closest(unknown[0], CONFIG_KEYS)}; expected "
                          f"{', '.join(CONFIG_KEYS)}")
    if not isinstance(raw.get("config"), dict):
        raise ConfigError(f"{path}: 'config' is not a mapping of config sections")
    return raw


def _tokenizer_blob(folder: Path, encoder: Any, entry: Any) -> str:
    """The files of one manifest entry, as the JSON blob an export's metadata holds for it."""
    where = f"{folder / CONFIG}: tokenizers.{encoder}"
    files = entry.get("files") if isinstance(entry, dict) else None
    if not plain_name(encoder) or not isinstance(files, list) or not files:
        raise ConfigError(f"{where}: expected a plain encoder name with {{'files': [names]}}")
    bad = [f for f in files if not plain_name(f) or f not in TOKENIZER_FILES]
    if bad:
        raise ConfigError(f"{where}: file name {str(bad[0])[:80]!r}; expected names from {', '.join(TOKENIZER_FILES)}")
    blobs, size = {}, 0
    for name in files:
        path = inside(folder / TOKENIZER_DIR / encoder / name, folder)
        size += path.stat().st_size
        if size > MAX_TOKENIZER_BYTES:
            raise ConfigError(f"{where}: tokenizer files take more than {MAX_TOKENIZER_BYTES // 2**20} MB")
        blobs[name] = base64.b64encode(path.read_bytes()).decode()
    return json.dumps(blobs)


def read_model_folder(folder: str | Path) -> tuple[dict[str, str], Path]:
    """(export metadata, tensor file) of a model folder: the config as an export embeds it and each ``hf:``
    tokenizer's files as an embedded blob, so the export loader validates both the same way."""
    folder = Path(folder)
    raw = read_config(folder)
    encoders = raw["config"].get("model", {}).get("encoders", {}) if isinstance(raw["config"].get("model"), dict) else {}
    manifest = raw.get("tokenizers") or {}
    if not isinstance(manifest, dict):
        raise ConfigError(f"{folder / CONFIG}: 'tokenizers' is not a mapping of encoder -> files")
    # as YAML, the text an export embeds (PyYAML reads JSON's 1e-06 as a string)
    meta = {"format": FORMAT, "config": yaml.safe_dump(raw["config"], sort_keys=False)}
    for encoder, entry in manifest.items():
        if encoder not in encoders:
            raise ConfigError(f"{folder / CONFIG}: tokenizers.{str(encoder)[:40]}: no such encoder in config.model.encoders")
        meta[TOKENIZER_META + encoder] = _tokenizer_blob(folder, encoder, entry)
    for name, enc in encoders.items():
        tok = enc.get("tokenizer") if isinstance(enc, dict) else None
        if isinstance(tok, str) and tok.startswith("hf:") and name not in manifest:
            raise ConfigError(f"{folder / CONFIG}: config.model.encoders.{name}.tokenizer {tok[:60]!r} names a folder "
                              "outside the model folder; expected its files under tokenizer/ and listed in 'tokenizers'")
    weights = folder / WEIGHTS
    if not weights.exists():
        raise ConfigError(f"{folder}: no {WEIGHTS} (a model folder's weights are read from safetensors only)")
    return meta, inside(weights, folder)
