"""Typed configuration: dataclasses with docstrings, YAML load, ``--set a.b=c`` overrides.

Sections mirror the components they configure. Free-form sections (encoder and objective keyword
arguments) are validated later against the constructor of the registered part
(:func:`mmpt.registry.check_kwargs`), so every bad key fails before training starts, naming its
path and the closest valid key.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmpt.registry import ConfigError, _type_name, _type_ok, closest


@dataclass
class Source:
    """One shard source: a path, glob, brace list or ``pipe:`` URL, with a sampling weight."""

    url: str = ""
    weight: float = 1.0


@dataclass
class DataConfig:
    """Training data.

    sources: shard sources (a bare string is one source of weight 1). resampled: draw shards with
    replacement (``ResampledShards`` style) instead of epochs over the shard list. batch_size: per
    rank micro-batch. workers: DataLoader workers per rank. shuffle_buffer: samples held for
    shuffling (0: off). samples_per_epoch: defines the epoch length; None counts the members of
    local shards at start. required: modalities a sample must have (others are optional and masked).
    max_image_pixels: larger images are rejected as decompression bombs.
    """

    sources: list[Source] = field(default_factory=list)
    resampled: bool = False
    batch_size: int = 64
    workers: int = 1
    shuffle_buffer: int = 1000
    samples_per_epoch: int | None = None
    required: list[str] = field(default_factory=list)
    max_image_pixels: int = 64_000_000
    prefetch: int = 2


@dataclass
class ModelConfig:
    """The model: one encoder per modality plus projection heads to ``embed_dim``.

    encoders: modality -> {name: registered encoder, ...its keyword arguments}.
    head: 'linear' | 'mlp' | 'none' projection from each encoder's width to embed_dim.
    """

    embed_dim: int = 512
    encoders: dict[str, dict[str, Any]] = field(default_factory=dict)
    head: str = "linear"
    grad_checkpointing: bool = False


@dataclass
class OptimConfig:
    """AdamW with decay off for norms, biases, logit scales and embeddings; cosine schedule.

    lr_scale: per-module multipliers of ``lr`` keyed by prefix (e.g. ``model.encoders.text: 0.5``).
    """

    lr: float = 5e-4
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    lr_scale: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """The run: steps, precision, ZeRO, checkpoints, logging.

    precision: 'auto' (fp32 on CPU, bf16 on CUDA) | 'fp32' | 'bf16' | 'fp16'.
    zero_stage: 0-3. offload_optimizer / offload_param: CPU offload (needs DeepSpeed's CPU Adam
    build; see docs/design.md). steps: optimizer steps in total (epochs: alternatively, whole epochs).
    crash_at_step / crash_in_save: fault injection for resume tests (crash after that step / inside its save).
    """

    out_dir: str = "runs/run"
    steps: int = 1000
    epochs: float | None = None
    grad_accum: int = 1
    grad_clip: float = 1.0
    precision: str = "auto"
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    stage3_param_persistence_threshold: int = 100_000
    checkpoint_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    eval_every: int = 0
    log_sample_keys: bool = False
    progress: bool = True
    crash_at_step: int | None = None
    crash_in_save: int | None = None
    deepspeed: dict[str, Any] = field(default_factory=dict)


@dataclass
class Config:
    """A whole recipe."""

    name: str = "run"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: dict[str, dict[str, Any]] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from nested dicts, naming the key path of any error."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if key not in names:
            raise ConfigError(f"{where}: unknown key{closest(key, names)}; valid: {', '.join(sorted(names))}")
        kwargs[key] = _convert(hints[key], value, where)
    return cls(**kwargs)


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if tp is Source and isinstance(value, str):
            return Source(url=value)
        return from_dict(tp, value, path)
    if origin is list and args and value is not None:
        if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
            value = [value]
        return [_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict and isinstance(value, dict):
        return {k: _convert(args[1], v, f"{path}.{k}") if args else v for k, v in value.items()}
    if not _type_ok(value, tp):
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is float or (float in args and isinstance(value, int) and not isinstance(value, bool)):
        return float(value)
    return value


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` (value read as YAML, so numbers, bools and lists work)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. optim.lr=3e-4")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.load(raw, Loader=_float_yaml_loader()) if raw.strip() else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to a raw config dict (before validation)."""
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for i, k in enumerate(keys[:-1]):
            if isinstance(node, list):
                node = node[int(k)]
                continue
            if node.get(k) is None:
                node[k] = {}
            node = node[k]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"--set {item}: '{'.'.join(keys[: i + 1])}' is a value, not a section")
        if isinstance(node, list):
            node[int(keys[-1])] = value
        else:
            node[keys[-1]] = value
    return data


def _float_yaml_loader() -> type:
    """YAML 1.1 reads '1e-3' as a string; accept it as a float like every other config system."""
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)$|^[-+]?\d+\.\d*$|^[-+]?\.\d+$"),
        list("-+0123456789."),
    )
    return Loader


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}`` (so one recipe serves any data location)."""
    return _ENV_REF.sub(lambda m: os.environ.get(m.group(1), m.group(2) if m.group(2) is not None else m.group(0)), text)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML file into a dict, expanding ``${VAR:-default}`` environment references."""
    with open(path) as f:
        data = yaml.load(expand_env(f.read()), Loader=_float_yaml_loader()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def recipe_path(name_or_path: str) -> Path:
    """Resolve a shipped recipe name or a YAML path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"recipe file {p} does not exist")
        return p
    from importlib import resources

    folder = resources.files("mmpt.recipes")
    names = sorted(f.name[:-5] for f in folder.iterdir() if f.name.endswith(".yaml"))
    if name_or_path not in names:
        raise ConfigError(f"unknown recipe '{name_or_path}'{closest(name_or_path, names)}; shipped: {', '.join(names)}")
    return Path(str(folder / f"{name_or_path}.yaml"))


def load_config(recipe: str | Path | dict[str, Any], overrides: list[str] | None = None) -> Config:
    """Load a recipe (name, path or dict), apply overrides, validate every section."""
    data = dict(recipe) if isinstance(recipe, dict) else load_yaml(recipe_path(str(recipe)))
    data = apply_overrides(data, overrides or [])
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Check what dataclass types cannot: registered names, encoder/objective kwargs, ranges."""
    from mmpt.registry import check_kwargs, encoders, objectives

    if not cfg.model.encoders:
        raise ConfigError("model.encoders: at least one modality encoder is required")
    for modality, enc in cfg.model.encoders.items():
        where = f"model.encoders.{modality}"
        if not isinstance(enc, dict) or "name" not in enc:
            raise ConfigError(f"{where}: expected a mapping with 'name' (e.g. image/vit)")
        kwargs = {k: v for k, v in enc.items() if k != "name"}
        check_kwargs(encoders.get(enc["name"], path=f"{where}.name"), kwargs, path=where)
    for name, obj in cfg.objectives.items():
        where = f"objectives.{name}"
        if not isinstance(obj, dict):
            raise ConfigError(f"{where}: expected a mapping")
        kwargs = {k: v for k, v in obj.items() if k not in ("name", "weight")}
        check_kwargs(objectives.get(obj.get("name", name), path=f"{where}.name"), kwargs, path=where)
    t = cfg.train
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage: expected 0, 1, 2 or 3, got {t.zero_stage}")
    if t.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"train.precision: expected auto|fp32|bf16|fp16{closest(t.precision, ['auto', 'fp32', 'bf16', 'fp16'])}, got {t.precision!r}")
    for key in ("steps", "grad_accum", "log_every", "keep_last"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key}: must be >= 1, got {getattr(t, key)}")
    if cfg.data.batch_size < 1:
        raise ConfigError(f"data.batch_size: must be >= 1, got {cfg.data.batch_size}")
    if cfg.model.head not in ("linear", "mlp", "none"):
        raise ConfigError(f"model.head: expected linear|mlp|none{closest(cfg.model.head, ['linear', 'mlp', 'none'])}")
    for m in cfg.data.required:
        if m not in cfg.model.encoders:
            raise ConfigError(f"data.required: '{m}' has no encoder{closest(m, list(cfg.model.encoders))}; encoders: {', '.join(cfg.model.encoders)}")


def dump_config(cfg: Config) -> str:
    """Resolved config as YAML text (embedded in checkpoints and exports)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
