"""Outside checkpoints as data: a state dict read without unpickling code (safetensors, or a weights-only
``torch.load``), and an explicit name mapping that refuses a partial load, naming what did not match."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmpt.registry import ConfigError

SHOWN = 8  # keys named per list in an error message


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """An OpenCLIP checkpoint's state dict: safetensors, or a .pt/.bin read weights-only (a training checkpoint's
    ``state_dict`` entry and DDP's ``module.`` prefix are unwrapped, as OpenCLIP's own loader does)."""
    from mmpt.formats.safe_load import safe_torch_load

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (expected an OpenCLIP checkpoint: .safetensors, .pt or .bin)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path))
        except SafetensorError as exc:
            raise ConfigError(f"{path}: not a safetensors file ({exc})") from exc
    else:
        try:
            state = safe_torch_load(path, map_location="cpu")
        except RuntimeError as exc:  # TorchScript archives (OpenAI's JIT files) and damaged files
            raise ConfigError(f"{path}: not a weights-only torch checkpoint ({str(exc).splitlines()[0][:120]}); "
                              "convert it to a state dict saved with torch.save or safetensors first") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"{path}: expected a state dict of tensors (or a checkpoint with 'state_dict')")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def listed_keys(title: str, keys: list[str]) -> str:
    """``3 missing [a, b, c]``: a count, a title and the first SHOWN keys."""
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return f"{len(keys)} {title} {keys[:SHOWN]}{more}"


def _same_shape(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Equal shapes, or two one-element shapes (a 0-dim scale and a (1,) parameter)."""
    return a == b or (torch.Size(a).numel() == 1 and torch.Size(b).numel() == 1)


def take(source: dict[str, Tensor], names: dict[str, str], shapes: dict[str, tuple[int, ...]], where: str,
         *, exhaustive: bool = True) -> dict[str, Tensor]:
    """``{target: source[names[target]]}`` for every target, one-element tensors reshaped (OpenCLIP's
    0-dim logit scale is (1,) in mmpt). Raises one ConfigError naming the unmatched source keys (when
    ``exhaustive``), the missing ones and those of another shape."""
    wanted = set(names.values())
    unmatched = sorted(set(source) - wanted) if exhaustive else []
    missing = sorted(n for n in wanted if n not in source)
    wrong = sorted(f"{names[t]} {list(source[names[t]].shape)} != {list(s)}" for t, s in shapes.items()
                   if names[t] in source and not _same_shape(tuple(source[names[t]].shape), s))
    if unmatched or missing or wrong:
        parts = [listed_keys(title, keys) for title, keys in (("unmatched", unmatched), ("missing", missing),
                                                          ("of another shape", wrong)) if keys]
        raise ConfigError(f"{where}: keys do not match the model: {'; '.join(parts)}")
    return {t: source[n].reshape(shapes[t]) for t, n in names.items()}
