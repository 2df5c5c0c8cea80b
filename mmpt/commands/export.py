"""Export a run to one safetensors file and load it back with no other file.

``export`` consolidates the newest checkpoint (ZeRO-1/2/3 partitions through DeepSpeed's
``zero_to_fp32``; stage 0 from the module state) into fp32 tensors of the whole Pretrainer (towers,
heads, logit scales, objective parameters) and embeds the resolved config as metadata, plus the files
of any ``hf:`` tokenizer, so the export is self-contained. ``load`` rebuilds from that file (or
straight from a run directory) without unpickling anything, and treats either as untrusted data with
the same rules (:func:`data_config`): the config is checked against the tensor shapes before any weight
is allocated, keys that would fetch weights (``pretrained``, ``checkpoint_path``) are reset, remote
sources, commands and YAML aliases are refused, and non-finite weights are refused unless allowed.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import torch

from mmpt.config import Config, dump_config, load_config
from mmpt.config.from_export import data_config, data_yaml, export_config  # noqa: F401 - re-exported
from mmpt.formats.export_file import FORMAT, MAX_TOKENIZER_BYTES, TOKENIZER_FILES, TOKENIZER_META, read_header
from mmpt.parts.checked_load import build_checked, check_finite, check_shapes, load_export_file, load_weights  # noqa: F401
from mmpt.pretrainer import Pretrainer, borrowed_prefixes, build_pretrainer
from mmpt.registry import ConfigError
from mmpt.training import checkpoint


def _run_dir_of(ckpt: Path) -> Path:
    return ckpt.parent.parent


def consolidate(path: str | Path) -> tuple[dict[str, torch.Tensor], Config, Path]:
    """fp32 state dict and config of a run directory (its newest intact checkpoint) or a ``step_*`` folder.
    The checkpoint is verified against its manifest and unpickled with DeepSpeed's allow-list only."""
    from mmpt.formats.safe_load import check_pickles, restricted_unpickling, safe_torch_load

    path = Path(path)
    ckpt = checkpoint.find(str(path), path)  # a run directory with none raises; "latest" is never passed
    check_pickles(ckpt)
    raw, source = checkpoint_config(ckpt)
    try:
        cfg = load_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    with restricted_unpickling():
        if any(ckpt.glob("*optim_states.pt")) and cfg.train.zero_stage > 0:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        else:
            state = safe_torch_load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu")["module"]
    borrowed = borrowed_prefixes(cfg)  # at ZeRO-2/3 DeepSpeed saves every frozen tensor, a teacher's too
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()
            if not k.startswith(borrowed)}, cfg, ckpt


def checkpoint_config(ckpt: Path) -> tuple[dict[str, Any], Path]:
    """The raw config a checkpoint was written with (its checkpoint.json, else its run's config.yaml, read as
    data: no anchors, no environment expansion) and the file it came from."""
    saved = checkpoint.saved_run(ckpt) or {}
    if saved.get("config"):
        return saved["config"], ckpt / checkpoint.META
    cfg_file = _run_dir_of(ckpt) / "config.yaml"
    if not cfg_file.exists():
        raise ConfigError(f"{ckpt}: no config stored with the checkpoint and no {cfg_file}: cannot rebuild its model")
    raw = data_yaml(cfg_file.read_text(), str(cfg_file))
    if not isinstance(raw, dict):
        raise ConfigError(f"{cfg_file}: expected a mapping of config sections, got {type(raw).__name__}")
    return raw, cfg_file


def export(path: str | Path, out: str | Path, keep_adapters: bool = False) -> Path:
    """Write ``out`` (.safetensors) from a run directory or checkpoint folder; returns its path. LoRA adapters
    are merged into their base weights (the file loads as a plain model) unless ``keep_adapters``."""

    state, cfg, ckpt = consolidate(path)
    state, cfg = export_state(state, cfg, keep_adapters)
    from mmpt.parts.init_from import recorded_init

    return write_export(state, cfg, out, source=str(ckpt), step=max(checkpoint.step_of(ckpt), 0),
                        extra=recorded_init(_run_dir_of(ckpt)))


def write_export(state: dict[str, torch.Tensor], cfg: Config, out: str | Path, *, source: str = "",
                 step: int = 0, extra: dict[str, str] | None = None) -> Path:
    """Write a consolidated state and its config as one self-contained .safetensors file (``extra``: more
    metadata entries, e.g. the init a fine-tune started from, a soup's ingredients)."""
    from safetensors.torch import save_file

    # safetensors refuses shared storage (tied weights): store a copy of each; load re-ties by
    # loading into the model, whose tied parameters receive the same values.
    from mmpt.parts.init_from import without_init

    tensors = {k: v.detach().clone().contiguous() for k, v in state.items()}
    meta = {"format": FORMAT, "config": dump_config(without_init(cfg)), "source": source, "step": str(step),
            **tokenizer_metadata(cfg), **(extra or {})}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    # safetensors creates its file 0600; an export is meant to be shared like any file the user writes.
    os.chmod(tmp, 0o666 & ~_umask())
    tmp.replace(out)
    return out


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def tokenizer_metadata(cfg: Config) -> dict[str, str]:
    """The files of every ``hf:<folder>`` tokenizer, as export metadata entries (no pickle, no paths)."""
    meta = {}
    for name, enc in cfg.model.encoders.items():
        tok = enc.get("tokenizer")
        if not (isinstance(tok, str) and tok.startswith("hf:")):
            continue
        folder, key = Path(tok[3:]), f"model.encoders.{name}.tokenizer"
        files = {f: (folder / f).read_bytes() for f in TOKENIZER_FILES if (folder / f).is_file()}
        if not files:
            raise ConfigError(f"{key}: {folder} holds none of {', '.join(TOKENIZER_FILES[:4])}, ...: "
                              "cannot embed the tokenizer in the export")
        size = sum(map(len, files.values()))
        if size > MAX_TOKENIZER_BYTES:
            raise ConfigError(f"{key}: tokenizer files in {folder} take {size / 2**20:.0f} MB, more than the "
                              f"{MAX_TOKENIZER_BYTES // 2**20} MB an export embeds")
        meta[TOKENIZER_META + name] = json.dumps({f: base64.b64encode(b).decode() for f, b in files.items()})
    return meta


def load(path: str | Path, device: str | torch.device = "cpu", *,
         allow_nonfinite: bool = False) -> tuple[Pretrainer, dict[str, Any], Any]:
    """Rebuild ``(model, transforms, tokenizer)`` from an exported file, a model folder or a run directory.

    model: the Pretrainer in eval mode (``model.encode("image", images)``); transforms: modality ->
    data side (``transforms["image"].prepare([pil_image])``); tokenizer: that of the natural-language data side
    (``ModalityData.natural_language``), or None.
    """
    from mmpt.formats.model_folder import is_model_folder, read_model_folder

    path = Path(path)
    if is_model_folder(path):  # `export --format folder`: its files stand in for an export's header
        from safetensors.torch import load_file

        meta, weights = read_model_folder(path)
        model = build_checked(build_pretrainer, export_config(path, meta), read_header(weights)[1], path)
        state = load_file(str(weights))
        check_finite(state, path, allow_nonfinite)
        load_weights(model, state, path)
    elif path.is_dir():  # a run directory is data, like an export: the same rules for its stored config
        state, _, ckpt = consolidate(path)
        raw, source = checkpoint_config(ckpt)
        model = build_checked(build_pretrainer, data_config(raw, source), {k: tuple(v.shape) for k, v in state.items()},
                              source)
        check_finite(state, path, allow_nonfinite)
        load_weights(model, state, path)
    else:
        model = load_export_file(path, build_pretrainer, allow_nonfinite=allow_nonfinite)
    model.to(device).eval()
    transforms = dict(model.model.data)
    words = next((side for side in transforms.values() if side.natural_language), None)
    return model, transforms, getattr(words, "tokenizer", None)


def describe(path: str | Path) -> dict[str, Any]:
    """Metadata of an export (format, step, source, config, embedded tokenizers) without loading tensors."""
    meta, shapes = read_header(path)
    out: dict[str, Any] = {k: v for k, v in meta.items() if not k.startswith(TOKENIZER_META)}
    out["tokenizers"] = sorted(k.removeprefix(TOKENIZER_META) for k in meta if k.startswith(TOKENIZER_META))
    out["tensors"] = len(shapes)
    return out


def export_state(state: dict[str, torch.Tensor], cfg: Any, keep_adapters: bool = False) -> tuple[dict[str, torch.Tensor], Any]:
    """A consolidated state and config as an export stores them: LoRA towers merged (plain key names; unless
    ``keep_adapters``) and ``model.adapt`` reduced to the kept LoRA entries: freezing is how a run trained,
    not a property of the model a user loads and fine-tunes."""
    import copy

    from mmpt.parts.adapt import merge_adapters
    from mmpt.parts.init_from import without_init

    cfg = without_init(cfg)
    lora = [m for m, spec in cfg.model.adapt.items() if spec.mode == "lora"]
    if lora and not keep_adapters:
        model = build_pretrainer(cfg)
        model.load_state_dict(state)
        merge_adapters(model)
        state = {k: v.detach() for k, v in model.state_dict().items()}
    cfg = copy.deepcopy(cfg)
    cfg.model.adapt = {m: cfg.model.adapt[m] for m in lora} if keep_adapters else {}
    return state, cfg
