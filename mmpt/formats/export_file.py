"""The export file: a safetensors file whose metadata holds the format tag, the resolved config and embedded
tokenizer files. Shared by the exporter, the loader and ``model.init_from``; names that would make a model file
reach outside itself are listed here (``REMOTE_PREFIXES``)."""

from __future__ import annotations

from pathlib import Path

from mmpt.registry import ConfigError

FORMAT = "mmpt-pretrainer/1"
TOKENIZER_META = "tokenizer_files."  # + encoder (modality) name -> JSON {file name: base64 bytes}
# What AutoTokenizer reads from a folder; config.json tells it the tokenizer class when
# tokenizer_config.json does not.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model", "config.json")
MAX_TOKENIZER_BYTES = 64 * 2**20
# The export holds every weight: encoder keys that would fetch weights (hub downloads, pickled files)
# are reset on load, so a crafted export cannot reach the network or unpickle through them.
REMOTE_PREFIXES = ("pipe:", "hf-hub:", "hf_hub:")  # timm fetches an hf-hub: model's config even unpretrained


def read_header(path: str | Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """(metadata, tensor shapes) of a safetensors file, from its header only (no tensor data read)."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise ConfigError(f"{path}: no such file (expected an exported .safetensors file or a run directory)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError as exc:
        raise ConfigError(f"{path}: not a safetensors file ({exc}); expected an mmpt export") from exc
