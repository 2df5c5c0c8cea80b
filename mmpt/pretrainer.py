"""Pretrainer: the one module DeepSpeed wraps — model + objectives + loss weights.

``forward(batch) = loss(embed(batch), batch)``; eval, embedding export and step strategies such as
GradCache call the two phases separately.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from mmpt.config import Config
from mmpt.contracts import Batch, EncoderOutput, ModalityData, Objective
from mmpt.model import MultimodalModel
from mmpt.registry import ConfigError
from mmpt.registry import encoders as encoder_registry
from mmpt.registry import modalities as modality_registry
from mmpt.registry import objectives as objective_registry


class Pretrainer(nn.Module):
    """Model + objectives; returns ``{"loss", "losses", "metrics"}``.

    Mixed precision (:meth:`set_autocast`, ``train.precision: bf16``): the towers run under ``torch.autocast``
    with fp32 weights; objectives that read encoder outputs get them in fp32 and compute with autocast off
    (an autocast matmul would give bf16 logits whatever the objective casts to); objectives that run a tower
    themselves (``uses_model``) keep autocast for it (their losses are autocast's fp32 ops: cross-entropy, MSE).
    """

    autocast_device: str = "cpu"
    autocast_dtype: torch.dtype | None = None  # None: no autocast (fp32, or DeepSpeed's fp16 parameters)

    def __init__(self, model: MultimodalModel, objectives: dict[str, Objective], weights: dict[str, float] | None = None):
        super().__init__()
        self.model = model
        self.objectives = nn.ModuleDict(objectives)
        self.weights = {k: float((weights or {}).get(k, 1.0)) for k in objectives}
        self.needed = encoded_modalities(model, objectives.values())
        self.token_needed = tuple(dict.fromkeys(m for obj in objectives.values() for m in obj.token_modalities))

    def set_autocast(self, device_type: str, dtype: torch.dtype | None) -> None:
        """Compute the towers in ``dtype`` under ``torch.autocast(device_type)`` (None: off, the default)."""
        self.autocast_device, self.autocast_dtype = device_type, dtype

    def _autocast(self, enabled: bool = True) -> Any:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.autocast_device, dtype=self.autocast_dtype, enabled=enabled)

    def embed(self, batch: Batch) -> dict[str, EncoderOutput]:
        """Encode the modalities the objectives read (per token too where an objective asks)."""
        with self._autocast():
            return self.model(batch.fields, self.needed, self.token_needed)

    def loss(self, outputs: dict[str, EncoderOutput], batch: Batch) -> dict[str, Any]:
        """Weighted sum of objective losses plus per-objective losses and metrics (all tensors)."""
        losses: dict[str, Tensor] = {}
        metrics: dict[str, Tensor] = {}
        total: Tensor | None = None
        if self.autocast_dtype is not None:
            outputs = to_fp32(outputs)
        for name, obj in self.objectives.items():
            with self._autocast(enabled=obj.uses_model):
                out = obj(outputs, batch, self.model) if obj.uses_model else obj(outputs, batch)
            losses[name] = out.loss.detach()
            metrics.update({f"{name}/{k}": v for k, v in out.metrics.items()})
            term = self.weights[name] * out.loss
            total = term if total is None else total + term
        assert total is not None, "a Pretrainer needs at least one objective"
        return {"loss": total, "losses": losses, "metrics": metrics}

    def forward(self, batch: Batch, phase: Callable[[Pretrainer, Batch], Any] | None = None) -> Any:
        """``loss(embed(batch), batch)``, or ``phase(self, batch)``: a step strategy (GradCache) runs its
        phases through the engine's forward, where DeepSpeed's hooks (ZeRO-3 fetch and release, external
        parameters, backward bookkeeping) wrap them as they wrap a plain step."""
        if phase is not None:
            return phase(self, batch)
        return self.loss(self.embed(batch), batch)

    def encode(self, modality: str, inputs: Any, normalize: bool = True) -> Tensor:
        """Shortcut to :meth:`MultimodalModel.encode`."""
        return self.model.encode(modality, inputs, normalize)

    def no_weight_decay(self) -> set[str]:
        """Full parameter names excluded from weight decay by the parts themselves."""
        names: set[str] = set()
        for m, enc in self.model.encoders.items():
            names |= {f"model.encoders.{m}.{n}" for n in enc.no_weight_decay()}
        for k, obj in self.objectives.items():
            fn = getattr(obj, "no_weight_decay", None)
            names |= {f"objectives.{k}.{n}" for n in (fn() if fn else ())}
        return names


def to_fp32(x: Any) -> Any:
    """A copy of nested dicts/lists/tuples (dict subclasses kept) with every bf16/fp16 tensor cast to fp32."""
    if isinstance(x, Tensor):
        return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    if isinstance(x, dict):
        out = dict.__new__(type(x))  # EncoderOutput and other records: same class, no __init__
        dict.update(out, {k: to_fp32(v) for k, v in x.items()})
        return out
    if isinstance(x, (list, tuple)):
        return type(x)(to_fp32(v) for v in x)
    return x


def encoded_modalities(model: MultimodalModel, objectives: Any) -> list[str]:
    """The modalities a step encodes: those the objectives read; every modality when one does not say
    (``modalities is None``) or there is no objective; none when every objective encodes its own inputs."""
    declared = [obj.modalities for obj in objectives]
    if not declared or any(d is None for d in declared):
        return model.modalities
    return list(dict.fromkeys(m for d in declared for m in d))


def build_data_specs(cfg: Config) -> dict[str, ModalityData]:
    """The data side of every configured modality, built from the encoder's own keyword arguments."""
    specs = {}
    for modality, enc in cfg.model.encoders.items():
        cls = encoder_registry.get(enc["name"], path=f"model.encoders.{modality}.name")
        data_cls = modality_registry.get(cls.modality)
        specs[modality] = data_cls.from_encoder_config(**{k: v for k, v in enc.items() if k != "name"})
        if modality in cfg.data.max_sample_bytes:
            specs[modality].max_sample_bytes = cfg.data.max_sample_bytes[modality]
    return specs


def tower_kwargs(enc: dict[str, Any]) -> dict[str, Any]:
    """An encoder section's keys for the tower itself: the keys only its data side takes (``max_image_pixels``,
    ``train_views``; config validation accepts both) stay with the data side."""
    import inspect

    cls = encoder_registry.get(enc["name"])
    own = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in own.values()) or cls.modality not in modality_registry.names():
        return {k: v for k, v in enc.items() if k != "name"}
    data_only = set(inspect.signature(modality_registry.get(cls.modality).__init__).parameters) - set(own)
    return {k: v for k, v in enc.items() if k != "name" and k not in data_only}


def build_pretrainer(cfg: Config, on_part: Callable[[nn.Module], None] | None = None) -> Pretrainer:
    """Build the whole trainable module from a validated config; ``on_part`` is called on each encoder
    and objective as soon as it is built (ZeRO-3 partitions it there, see :mod:`mmpt.parts.build`)."""
    def built(part: nn.Module) -> nn.Module:
        if on_part is not None:
            on_part(part)
        return part

    from mmpt.parts.adapt import adapt_heads, adapt_tower
    from mmpt.parts.init_from import InitFrom

    init = InitFrom.from_config(cfg.model)  # weights go in before adapters rename keys and ZeRO-3 partitions
    towers = {}
    for modality, enc in cfg.model.encoders.items():
        kwargs = tower_kwargs(enc)
        tower = encoder_registry.build(enc["name"], path=f"model.encoders.{modality}", **kwargs)
        if cfg.model.grad_checkpointing:
            tower.set_grad_checkpointing(True)
        if init is not None:
            init.load(f"model.encoders.{modality}.", tower)
        adapt_tower(tower, cfg.model.adapt.get(modality), f"model.adapt.{modality}")
        towers[modality] = built(tower)
    model = MultimodalModel(towers, cfg.model.embed_dim, cfg.model.head, build_data_specs(cfg))
    for modality, head in model.heads.items():
        if init is not None:
            init.load(f"model.heads.{modality}.", head)
    adapt_heads(model, cfg.model.adapt)
    objs, weights = {}, {}
    for name, obj in cfg.objectives.items():
        kwargs = {k: v for k, v in obj.items() if k not in ("name", "weight")}
        cls = objective_registry.get(obj.get("name", name), path=f"objectives.{name}.name")
        for key in cls.frozen_models:
            if kwargs.get(key):
                kwargs[key] = frozen_models(kwargs[key], f"objectives.{name}.{key}")
        objs[name] = objective_registry.build(obj.get("name", name), path=f"objectives.{name}", **kwargs)
        if objs[name].copied_modalities:
            objs[name].adopt_copies(*tower_copies(cfg, objs[name].copied_modalities, f"objectives.{name}"),
                                    cfg.train.grad_accum)
        if init is not None:
            init.load(f"objectives.{name}.", objs[name])
        objs[name] = built(objs[name])
        weights[name] = obj.get("weight", 1.0)
    pretrainer = Pretrainer(model, objs, weights)
    pretrainer.init_report = init.finish() if init is not None else None
    return pretrainer


def tower_copies(cfg: Config, modalities: tuple[str, ...], key: str) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """Fresh towers and heads of ``modalities`` built from their config sections as the students are (adapters
    included, so names and shapes match), drawing nothing from the run's RNG (the copy's values come from the
    student later); for an objective's ``copied_modalities``."""
    from mmpt.model import build_head
    from mmpt.parts.adapt import adapt_tower

    towers, heads = {}, {}
    with torch.random.fork_rng(devices=[]):
        for m in modalities:
            if m not in cfg.model.encoders:
                raise ConfigError(f"{key}: no encoder for modality {m!r} (have {', '.join(cfg.model.encoders)})")
            enc = cfg.model.encoders[m]
            towers[m] = encoder_registry.build(enc["name"], path=f"model.encoders.{m}", **tower_kwargs(enc))
            adapt_tower(towers[m], cfg.model.adapt.get(m), f"model.adapt.{m}")
            heads[m] = build_head(cfg.model.head, towers[m].width, cfg.model.embed_dim)
    return towers, heads


def frozen_models(paths: str | list[str], key: str) -> list[Pretrainer]:
    """The frozen models of an objective's ``frozen_models`` key: each export file loaded (checked as untrusted
    data), in inference mode, without gradients."""
    from pathlib import Path

    from mmpt.parts.checked_load import load_export_file

    models = []
    for i, path in enumerate([paths] if isinstance(paths, str) else list(paths)):
        if not isinstance(path, str) or not Path(path).is_file():
            raise ConfigError(f"{key}[{i}]: {path!r} is not a file; expected an mmpt export (.safetensors)")
        model = load_export_file(path, build_pretrainer)
        models.append(model.requires_grad_(False).eval())
    return models


def borrowed_prefixes(cfg: Config) -> tuple[str, ...]:
    """State-dict key prefixes of the frozen models objectives borrow (not part of the model, see
    ``Objective.frozen_models``) and of what they keep out of exports (``Objective.export_excludes``)."""
    out = []
    for name, obj in cfg.objectives.items():
        cls = objective_registry.get(obj.get("name", name), path=f"objectives.{name}.name")
        out += [f"objectives.{name}.{key}." for key in (*cls.frozen_models, *cls.export_excludes)]
    return tuple(out)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (ZeRO-3 aware: uses ds_numel where partitioned)."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in module.parameters())


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
