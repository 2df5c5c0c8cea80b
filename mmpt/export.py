"""Export a run to one safetensors file and load it back with no other file.

``export`` consolidates the newest checkpoint (ZeRO-1/2/3 partitions through DeepSpeed's
``zero_to_fp32``; stage 0 from the module state) into fp32 tensors of the whole Pretrainer (towers,
heads, logit scales, objective parameters) and embeds the resolved config as metadata. ``load``
rebuilds from that file (or straight from a run directory) without unpickling anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mmpt.config import Config, dump_config, load_config
from mmpt.pretrainer import Pretrainer, build_pretrainer
from mmpt.train import checkpoint

FORMAT = "mmpt-pretrainer/1"


def _run_dir_of(ckpt: Path) -> Path:
    return ckpt.parent.parent


def consolidate(path: str | Path) -> tuple[dict[str, torch.Tensor], Config, Path]:
    """fp32 state dict and config of a run directory (its latest checkpoint) or a ``step_*`` folder."""
    path = Path(path)
    ckpt = checkpoint.resolve(str(path), path)
    if ckpt is None:
        raise FileNotFoundError(f"{path}: no checkpoint to export")
    run_dir = _run_dir_of(ckpt)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} is missing: cannot rebuild the model of {ckpt}")
    cfg = load_config(str(cfg_file))
    if any(ckpt.glob("*optim_states.pt")) and cfg.train.zero_stage > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    else:
        # Our own checkpoint (stage 0): DeepSpeed pickles its module state with config objects.
        blob = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        state = blob["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, cfg, ckpt


def export(path: str | Path, out: str | Path) -> Path:
    """Write ``out`` (.safetensors) from a run directory or checkpoint folder; returns its path."""
    from safetensors.torch import save_file

    state, cfg, ckpt = consolidate(path)
    # safetensors refuses shared storage (tied weights): store a copy of each; load re-ties by
    # loading into the model, whose tied parameters receive the same values.
    tensors = {k: v.detach().clone().contiguous() for k, v in state.items()}
    meta = {"format": FORMAT, "config": dump_config(cfg), "source": str(ckpt),
            "step": ckpt.name.removeprefix("step_").lstrip("0") or "0"}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(out)
    return out


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[Pretrainer, dict[str, Any], Any]:
    """Rebuild ``(model, transforms, tokenizer)`` from an exported file or a run directory.

    model: the Pretrainer in eval mode (``model.encode("image", images)``); transforms: modality ->
    data side (``transforms["image"].prepare([pil_image])``); tokenizer: the text tokenizer or None.
    """
    path = Path(path)
    if path.is_dir():
        state, cfg, _ = consolidate(path)
    else:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not an mmpt export (metadata format {meta.get('format')!r}, expected {FORMAT})")
        import yaml

        cfg = load_config(yaml.safe_load(meta["config"]))
        state = load_file(str(path))
    model = build_pretrainer(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.to(device).eval()
    transforms = dict(model.model.data)
    text = transforms.get("text")
    return model, transforms, getattr(text, "tokenizer", None)


def describe(path: str | Path) -> dict[str, Any]:
    """Metadata of an export (format, step, source, config) without loading tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        meta["tensors"] = len(list(f.keys()))
    return json.loads(json.dumps(meta))
