"""Typed configuration: dataclasses with docstrings, YAML load, ``--set a.b=c`` overrides.

Sections mirror the components they configure. Free-form sections (encoder and objective keyword
arguments) are validated later against the constructor of the registered part
(:func:`mmpt.registry.check_kwargs`), so every bad key fails before training starts, naming its
path and the closest valid key.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmpt.registry import ConfigError, _type_name, _type_ok, closest


@dataclass
class Source:
    """One shard source with a sampling weight.

    url: a path, glob, brace list (``train-{000..099}.tar``), folder of ``.tar`` files or ``pipe:`` URL.
    weight: relative share of samples drawn from this source when several are mixed.
    """

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
    prefetch: batches each worker prepares ahead. max_sample_bytes: per-modality byte budget of one
    decoded sample (``{audio: 536870912}``; on the command line ``--set data.max_sample_bytes.audio=536870912``),
    over the data side's default (image: 3 x its ``max_image_pixels``, audio 256 MiB, point_cloud 128 MiB,
    text and protein 16 MiB); a sample over it, by its size, its header's claim or after decoding, is
    skipped and counted as ``too_large_<modality>``. Limits of one modality's data side (an image's
    ``max_image_pixels``, audio's ``max_audio_seconds``) are keys of its encoder section.
    max_consecutive_skips: stop with an error naming the shards and reasons after this many skipped
    samples in a row (or two passes over a worker's shards with nothing usable): one shard of bad
    samples among good ones passes, data that is all bad cannot spin forever.
    """

    sources: list[Source] = field(default_factory=list)
    resampled: bool = False
    batch_size: int = 64
    workers: int = 1
    shuffle_buffer: int = 1000
    samples_per_epoch: int | None = None
    required: list[str] = field(default_factory=list)
    prefetch: int = 2
    max_sample_bytes: dict[str, int] = field(default_factory=dict)
    max_consecutive_skips: int = 10_000


@dataclass
class TowerAdapt:
    """How one tower trains (``model.adapt.<modality>``); see :mod:`mmpt.parts.adapt`.

    mode: 'full' (every weight trains) | 'frozen' (no gradient, eval mode, out of the optimizer) |
    'last_blocks' (only the last ``blocks`` transformer blocks and what follows them train) | 'lora'
    (the tower is frozen; low-rank adapters on its attention projections train).
    blocks: trainable trailing blocks in 'last_blocks' mode.
    rank / alpha / dropout: LoRA rank, scaling numerator (the update is scaled by alpha / rank) and dropout
    on the adapter input (not applied on packed ``nn.MultiheadAttention`` projections).
    targets: LoRA targets, module names or dotted name suffixes (``query``, ``attn.qkv``); empty: every
    ``nn.MultiheadAttention`` and every linear layer inside a module named ``*attn*``/``*attention*``.
    packed: which projections of a packed ``nn.MultiheadAttention`` get adapters: letters of 'qkvo'.
    train_head: whether this modality's projection head trains (false locks the embedding, as LiT does).
    """

    mode: str = "full"
    blocks: int = 1
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=list)
    packed: str = "qkvo"
    train_head: bool = True


@dataclass
class ModelConfig:
    """The model: one encoder per modality plus projection heads to ``embed_dim``.

    embed_dim: size of the shared embedding every tower projects to.
    encoders: modality -> {name: registered encoder, ...its keyword arguments} (``mmpt info`` lists them).
    head: 'linear' | 'mlp' | 'none' projection from each encoder's width to embed_dim.
    grad_checkpointing: recompute each tower's trunk in backward (less memory, ~30% more compute).
    adapt: modality -> how that tower trains: {mode: full|frozen|last_blocks|lora, blocks, rank, alpha,
    dropout, targets, packed, train_head} (``TowerAdapt``); towers not named train fully.
    init_from: an mmpt export (.safetensors) whose weights the model starts from; its keys must match the
    model exactly unless ``init_towers`` names the towers to take (each with its projection head).
    init_towers: modalities whose tower and head come from ``init_from`` (empty: the whole model).
    """

    embed_dim: int = 512
    encoders: dict[str, dict[str, Any]] = field(default_factory=dict)
    head: str = "linear"
    grad_checkpointing: bool = False
    adapt: dict[str, TowerAdapt] = field(default_factory=dict)
    init_from: str | None = None
    init_towers: list[str] = field(default_factory=list)


@dataclass
class OptimConfig:
    """AdamW with decay off for norms, biases, logit scales and embeddings; warmup then a schedule.

    lr: peak learning rate. weight_decay: AdamW decay of matrices (not norms, biases, embeddings, scales).
    betas: AdamW moment coefficients. eps: AdamW epsilon. warmup_steps: linear warmup from 0 to lr.
    schedule: 'cosine' (decay to min_lr_ratio x lr at the last step) or 'constant'.
    min_lr_ratio: floor of the cosine decay as a fraction of lr.
    lr_scale: per-module multipliers of ``lr`` keyed by parameter-name prefix (e.g.
    ``model.encoders.text: 0.5``; on the command line ``--set optim.lr_scale.model.encoders.text=0.5``).
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

    out_dir: run directory (checkpoints, logs, config). steps: optimizer steps in total.
    epochs: alternatively, whole epochs (overrides steps). grad_accum: micro-batches per optimizer step
    (does not enlarge the contrastive batch: each micro-batch is its own softmax). grad_clip: max
    gradient norm (0: off). precision: 'auto' (bf16 autocast with fp32 weights where the CPU/GPU has native bf16, else fp32;
    fp16 on older GPUs) | 'fp32' | 'bf16' | 'fp16'.
    zero_stage: DeepSpeed ZeRO stage 0-3. offload_optimizer / offload_param: CPU offload of optimizer
    states / parameters (parameters need stage 3). stage3_param_persistence_threshold: parameters smaller
    than this stay whole on every rank at stage 3. checkpoint_every: steps between checkpoints (and one
    at the end). keep_last: checkpoints kept. log_every: steps between log lines.
    eval_every: run the recipe's ``eval`` list every N steps and at the end; unset: at the end only
    (when there is an ``eval`` list); 0: never.
    log_sample_keys: write every micro-batch's sample keys to keys_rank<r>.jsonl (resume audits).
    step: 'plain' (forward, backward on the whole batch) | 'gradcache' (the same gradients with the
    activation memory of one chunk: embed chunks without grad, loss on all, re-forward each chunk).
    gradcache_chunk: samples per forward with step 'gradcache'; divides data.batch_size.
    gradcache_mmap_threshold: with step 'gradcache' on glibc, fix malloc's mmap threshold at this many bytes
    on the first step (1048576: freed chunk activations return to the OS, peak -20% at batch 2048, for page
    faults costing ~20% of a step's CPU); unset leaves the allocator alone.
    progress: show a progress bar.
    compile: torch.compile each tower (opt-in: on 2 CPU cores the first steps spent ~4 min compiling and
    later steps were no faster; worth trying on GPUs).
    crash_at_step / crash_in_save: fault injection for resume tests (crash after that step / inside its save).
    deepspeed: entries merged into the generated DeepSpeed config (unknown keys warn).
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
    eval_every: int | None = None
    log_sample_keys: bool = False
    step: str = "plain"
    gradcache_chunk: int | None = None
    gradcache_mmap_threshold: int | None = None
    progress: bool = True
    compile: bool = False
    crash_at_step: int | None = None
    crash_in_save: int | None = None
    deepspeed: dict[str, Any] = field(default_factory=dict)


@dataclass
class Config:
    """A whole recipe.

    name: run name (logs, plots). seed: seeds weights, data order and augmentation. model: towers and
    heads. objectives: name -> {name: registered objective, weight, ...its keyword arguments}.
    data: training shards. optim: optimizer and schedule. train: the run. eval: eval tasks run during
    and after training (``mmpt info --tasks`` lists their keys).
    """

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
    if not key.strip() or any(not k for k in key.strip().split(".")):
        raise ConfigError(f"--set {item!r}: empty key (expected e.g. optim.lr=3e-4)")
    try:
        value = yaml.load(raw, Loader=_float_yaml_loader()) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item}: the value is not valid YAML ({_yaml_problem(exc)})") from None
    return key.strip().split("."), value


def _split_key(schema: Any, keys: list[str]) -> list[str]:
    """Join the tail of ``keys`` that names one entry of a ``dict[str, scalar]`` field.

    ``optim.lr_scale.model.encoders.text`` is the key ``model.encoders.text`` of ``lr_scale`` (a
    dict of floats keyed by parameter prefix), not four nested sections.
    """
    tp = schema
    for i, key in enumerate(keys):
        if dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp).get(key)
            continue
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is dict:
            value_type = args[1] if args else Any
            if value_type in (int, float, str, bool):
                return keys[:i] + [".".join(keys[i:])]
            tp = value_type
        elif origin is list:
            tp = args[0] if args else Any
        else:  # Any, a scalar or unknown: plain nesting
            return keys
    return keys


def apply_overrides(data: dict[str, Any], overrides: list[str], schema: Any = None) -> dict[str, Any]:
    """Apply ``--set`` overrides to a raw config dict (before validation); ``schema`` (a config
    dataclass) tells where a dotted tail is one key of a dict-valued field."""
    for item in overrides:
        keys, value = parse_override(item)
        if schema is not None:
            keys = _split_key(schema, keys)
        node = data
        for i, k in enumerate(keys[:-1]):
            if isinstance(node, list):
                node = node[_list_index(node, k, item)]
                continue
            if node.get(k) is None:
                node[k] = {}
            node = node[k]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"--set {item}: '{'.'.join(keys[: i + 1])}' is a value, not a section")
        if isinstance(node, list):
            node[_list_index(node, keys[-1], item)] = value
        else:
            node[keys[-1]] = value
    return data


def _list_index(node: list, key: str, item: str) -> int:
    """``key`` as an index into ``node``, or a ConfigError naming the override."""
    if not key.lstrip("-").isdigit() or not -len(node) <= int(key) < len(node):
        raise ConfigError(f"--set {item}: '{key}' is not an index of a list of {len(node)} entries")
    return int(key)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """'line L, column C: problem' of a YAML error (1-based, as editors count)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


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
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        data = yaml.load(expand_env(text), Loader=_float_yaml_loader()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML at {_yaml_problem(exc)}") from None
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
    # a deep copy: overrides must not leak into the caller's nested dicts
    data = copy.deepcopy(recipe) if isinstance(recipe, dict) else load_yaml(recipe_path(str(recipe)))
    data = apply_overrides(data, overrides or [], schema=Config)
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


SCHEDULES = ("cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
HEADS = ("linear", "mlp", "none")
STEPS = ("plain", "gradcache")
ADAPT_MODES = ("full", "frozen", "last_blocks", "lora")

# (key path, lowest allowed value, what it means): ranges the dataclass types cannot express.
_MINIMUMS = (
    ("train.steps", 1), ("train.grad_accum", 1), ("train.log_every", 1), ("train.keep_last", 1),
    ("train.checkpoint_every", 1), ("train.eval_every", 0), ("train.grad_clip", 0), ("train.gradcache_chunk", 1), ("train.gradcache_mmap_threshold", 4096),
    ("data.batch_size", 1), ("data.workers", 0), ("data.shuffle_buffer", 0), ("data.prefetch", 1),
("optim.warmup_steps", 0), ("optim.weight_decay", 0), ("optim.eps", 0),
    ("model.embed_dim", 1),
)


def _get(cfg: Config, path: str) -> Any:
    node: Any = cfg
    for key in path.split("."):
        node = getattr(node, key)
    return node


def _one_of(path: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{path}: expected {'|'.join(choices)}, got {value!r}{closest(str(value), choices)}")


def validate(cfg: Config) -> None:
    """Check what dataclass types cannot: registered names, encoder/objective kwargs, ranges."""
    import torch  # here, not at the top: `mmpt eval` reads task files before paying for torch

    from mmpt.registry import check_kwargs, encoders, modalities, objectives

    if not cfg.model.encoders:
        raise ConfigError("model.encoders: at least one modality encoder is required")
    for modality, enc in cfg.model.encoders.items():
        where = f"model.encoders.{modality}"
        if not isinstance(enc, dict) or "name" not in enc:
            raise ConfigError(f"{where}: expected a mapping with 'name' (e.g. image/vit)")
        kwargs = {k: v for k, v in enc.items() if k != "name"}
        cls = encoders.get(enc["name"], path=f"{where}.name")
        data_side = modalities.get(cls.modality) if cls.modality in modalities.names() else None
        check_kwargs(cls, kwargs, path=where, also=data_side)
    for name, obj in cfg.objectives.items():
        where = f"objectives.{name}"
        if not isinstance(obj, dict):
            raise ConfigError(f"{where}: expected a mapping")
        kwargs = {k: v for k, v in obj.items() if k not in ("name", "weight")}
        # Built on the meta device (no memory, no RNG draws), so its own argument checks run now.
        with torch.device("meta"):
            built = objectives.build(obj.get("name", name), path=where, **kwargs)
        _check_objective_modalities(where, built, cfg.model.encoders)
    for path, low in _MINIMUMS:
        value = _get(cfg, path)
        if value is not None and value < low:
            raise ConfigError(f"{path}: must be >= {low}, got {value}")
    t, o = cfg.train, cfg.optim
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage: expected 0, 1, 2 or 3, got {t.zero_stage}")
    _one_of("train.precision", t.precision, PRECISIONS)
    _one_of("train.step", t.step, STEPS)
    _check_gradcache(t, cfg.data.batch_size)
    _one_of("optim.schedule", o.schedule, SCHEDULES)
    _one_of("model.head", cfg.model.head, HEADS)
    check_adapt(cfg.model)
    if t.epochs is not None and t.epochs <= 0:
        raise ConfigError(f"train.epochs: must be > 0 (or unset to use train.steps), got {t.epochs}")
    if o.lr <= 0:
        raise ConfigError(f"optim.lr: must be > 0, got {o.lr}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio: must be within [0, 1], got {o.min_lr_ratio}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas: expected two values in [0, 1), got {o.betas}")
    for m in cfg.data.required:
        if m not in cfg.model.encoders:
            raise ConfigError(f"data.required: '{m}' has no encoder{closest(m, list(cfg.model.encoders))}; encoders: {', '.join(cfg.model.encoders)}")
    for m, limit in cfg.data.max_sample_bytes.items():
        if m not in cfg.model.encoders:
            raise ConfigError(f"data.max_sample_bytes.{m}: no encoder for '{m}'{closest(m, list(cfg.model.encoders))}; "
                              f"encoders: {', '.join(cfg.model.encoders)}")
        if not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"data.max_sample_bytes.{m}: expected a byte count >= 1, got {limit!r}")
    if cfg.data.samples_per_epoch is not None and cfg.data.samples_per_epoch < 1:
        raise ConfigError(f"data.samples_per_epoch: must be >= 1 (or unset to count), got {cfg.data.samples_per_epoch}")
    from mmpt.config.deepspeed_keys import check_deepspeed_keys

    check_deepspeed_keys(t.deepspeed, "train.deepspeed")


def check_adapt(model_cfg: Any) -> None:
    """Validate ``model.adapt`` and ``model.init_towers`` against the configured towers (one-line errors)."""
    towers = list(model_cfg.encoders)
    for modality, spec in model_cfg.adapt.items():
        where = f"model.adapt.{modality}"
        if modality not in model_cfg.encoders:
            raise ConfigError(f"{where}: no encoder for '{modality}'{closest(modality, towers)}; "
                              f"model.encoders has {', '.join(towers)}")
        if spec.mode not in ADAPT_MODES:
            raise ConfigError(f"{where}.mode: expected {'|'.join(ADAPT_MODES)}, got {spec.mode!r}{closest(spec.mode, ADAPT_MODES)}")
        if spec.blocks < 1 or spec.rank < 1 or not 0 <= spec.dropout < 1 or spec.alpha <= 0:
            raise ConfigError(f"{where}: blocks and rank must be >= 1, alpha > 0 and dropout in [0, 1) "
                              f"(got blocks={spec.blocks}, rank={spec.rank}, alpha={spec.alpha}, dropout={spec.dropout})")
        if not spec.packed or set(spec.packed) - set("qkvo"):
            raise ConfigError(f"{where}.packed: letters of 'qkvo' (got {spec.packed!r})")
    for modality in model_cfg.init_towers:
        if modality not in model_cfg.encoders:
            raise ConfigError(f"model.init_towers: no encoder for '{modality}'{closest(modality, towers)}")
    if model_cfg.init_towers and not model_cfg.init_from:
        raise ConfigError("model.init_towers: set model.init_from to the export the towers come from")


def _check_gradcache(t: TrainConfig, batch_size: int) -> None:
    """train.gradcache_chunk: required by, and only read with, train.step=gradcache; divides the batch."""
    chunk = t.gradcache_chunk
    if t.step != "gradcache":
        if chunk is not None:
            warnings.warn(f"train.gradcache_chunk: {chunk} is ignored with train.step={t.step} "
                          "(set train.step=gradcache to use it)", stacklevel=3)
        return
    if chunk is None:
        raise ConfigError("train.gradcache_chunk: required with train.step=gradcache (samples per forward, "
                          f"a divisor of data.batch_size {batch_size})")
    if batch_size % chunk:
        divisors = [d for d in range(chunk, 0, -1) if batch_size % d == 0][:1]
        raise ConfigError(f"train.gradcache_chunk: {chunk} does not divide data.batch_size {batch_size} "
                          f"(e.g. {divisors[0]} does)")
    if chunk == batch_size:
        warnings.warn(f"train.gradcache_chunk: {chunk} == data.batch_size: one chunk per batch saves no memory "
                      "and adds a forward (use a smaller chunk or train.step=plain)", stacklevel=3)


def _check_objective_modalities(where: str, objective: Any, encoders: dict[str, Any]) -> None:
    """Every modality an objective reads (its pairs, its anchor, the one it masks) needs an encoder."""
    named = [*(getattr(objective, "modalities", None) or ()), getattr(objective, "anchor", None),
             getattr(objective, "modality", None)]
    for m in (m for m in named if m is not None):
        if m not in encoders:
            raise ConfigError(f"{where}: modality '{m}' has no encoder{closest(m, list(encoders))}; "
                              f"model.encoders has {', '.join(encoders)}")


def dump_config(cfg: Config) -> str:
    """Resolved config as YAML text (embedded in checkpoints and exports)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
