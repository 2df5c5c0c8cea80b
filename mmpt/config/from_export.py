"""Configs read from data: an export's embedded config or a run directory's, under the rules for untrusted files.

Keys that would fetch weights (an encoder's or objective's ``weight_sources``) are reset, remote sources
and commands are refused, ``init_from`` is dropped, YAML anchors are refused and embedded tokenizer files
are materialised in a cache folder named by their hash. Every defect is one ConfigError naming the file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from mmpt.config import Config, load_config
from mmpt.formats.export_file import FORMAT, REMOTE_PREFIXES, TOKENIZER_FILES, TOKENIZER_META
from mmpt.formats.messages import one_line
from mmpt.registry import ConfigError


def _weight_sources(name: Any, kind: str = "encoders") -> dict[str, Any]:
    """The keys of an encoder (or objective: ``kind="objectives"``) that load weights or read files at
    construction, with their off values (none if unknown: validation names an unknown part a moment later)."""
    from mmpt import registry

    try:
        return dict(getattr(getattr(registry, kind).get(str(name)), "weight_sources", {}))
    except ConfigError:
        return {}


def _tokenizer_folder(blob: str, where: str) -> str:
    """Materialise embedded tokenizer files in a per-user cache folder named by their hash; returns it."""
    try:
        files = {Path(f).name: base64.b64decode(b) for f, b in json.loads(blob).items()}
    except (ValueError, AttributeError) as exc:
        raise ConfigError(f"{where}: embedded tokenizer files are unreadable ({exc})") from exc
    unknown = sorted(set(files) - set(TOKENIZER_FILES))
    if unknown:
        raise ConfigError(f"{where}: embedded tokenizer holds unexpected files {unknown[:3]}")
    digest = hashlib.sha256(json.dumps(sorted((f, hashlib.sha256(b).hexdigest()) for f, b in files.items()))
                            .encode()).hexdigest()[:20]
    root = Path(os.environ.get("MMPT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                / "mmpt") / "tokenizers"
    folder = root / digest
    if folder.is_dir() and all((folder / f).is_file() and (folder / f).read_bytes() == b for f, b in files.items()):
        return str(folder)
    root.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=f".{digest}.", dir=root))
    for f, b in files.items():
        (fresh / f).write_bytes(b)
    try:
        fresh.rename(folder)
    except OSError:  # another process won the race, or a stale folder differs: use ours as is
        return str(fresh)
    return str(folder)


def export_config(path: str | Path, meta: dict[str, str]) -> Config:
    """The validated config embedded in an export, with weight-fetching keys reset and embedded
    tokenizers materialised; any defect is a one-line ConfigError naming the file."""
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{path}: not an mmpt export (metadata format {meta.get('format')!r}, expected {FORMAT})")
    if "config" not in meta:
        raise ConfigError(f"{path}: export metadata has no 'config'")
    raw = data_yaml(meta["config"], f"{path}: embedded config")
    return data_config(raw, path, {k.removeprefix(TOKENIZER_META): v for k, v in meta.items()
                                   if k.startswith(TOKENIZER_META)})


def data_yaml(text: str, where: str) -> Any:
    """YAML from a file that is data (an export's metadata, a run's config.yaml), refusing anchors and aliases:
    a few lines of nested aliases ("billion laughs") expand to billions of nodes in whoever walks the result."""
    import yaml

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                line = event.start_mark.line + 1
                raise ConfigError(f"{where}: line {line}: YAML anchor or alias {event.anchor!r}; expected plain "
                                  "YAML without anchors or aliases (mmpt never writes them)")
            return super().compose_node(parent, index)

    try:
        return yaml.load(text, Loader=NoAliases)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML ({one_line(str(exc).splitlines()[0])})") from exc


def data_config(raw: Any, path: str | Path, tokenizers: dict[str, str] | None = None) -> Config:
    """A config read from data (an export, a run directory's checkpoint), validated, with the keys that would
    fetch weights reset, remote sources and commands refused, ``init_from`` dropped and embedded tokenizer
    files (``tokenizers``: encoder name -> metadata blob) materialised; errors name ``path``."""
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict) \
            or not isinstance(raw["model"].get("encoders"), dict):
        raise ConfigError(f"{path}: embedded config is not a mapping with model.encoders (got {type(raw).__name__})")
    for name, enc in raw["model"]["encoders"].items():
        if not isinstance(enc, dict):
            continue  # validation below names it
        enc.update(_weight_sources(enc.get("name")))  # also where the default loads (text/hf's pretrained)
        for key, value in _strings(enc, f"model.encoders.{name}"):
            if value.startswith(REMOTE_PREFIXES) or "://" in value:
                raise ConfigError(f"{path}: {key}: {value[:60]!r} names a remote source or a command; a model "
                                  "file's config may not fetch or run anything")
        blob = (tokenizers or {}).get(name)
        if blob is not None:
            where = f"{path}: model.encoders.{name}.tokenizer"
            enc["tokenizer"] = "hf:" + _check_tokenizer(_tokenizer_folder(blob, where), where)
    for name, obj in (raw.get("objectives") or {}).items():  # a distillation teacher is another file
        if isinstance(obj, dict):
            obj.update(_weight_sources(obj.get("name", name), "objectives"))
    raw["model"].pop("init_from", None)  # the file holds every weight: it reads no other file
    raw["model"].pop("init_towers", None)
    try:
        return load_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: embedded config: {exc}") from exc


def _strings(tree: Any, key: str) -> list[tuple[str, str]]:
    """Every string value under ``tree`` with its key path (nested kwargs reach constructors too)."""
    if isinstance(tree, str):
        return [(key, tree)]
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else []
    return [pair for k, v in items for pair in _strings(v, f"{key}.{k}")]


def _check_tokenizer(folder: str, where: str) -> str:
    """``folder`` if the Hugging Face tokenizer files in it load offline without remote code, else one line
    naming the export (transformers' own text spans many lines)."""
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # any failure of a tokenizer that came with the file is the file's defect
        raise ConfigError(f"{where}: the embedded Hugging Face tokenizer does not load ({one_line(exc)}); expected "
                          "tokenizer files that AutoTokenizer reads offline without remote code") from exc
    return folder
