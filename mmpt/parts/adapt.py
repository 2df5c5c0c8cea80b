"""Per-tower training modes (``model.adapt``): frozen, last-N blocks, LoRA; and merging adapters for export.

Applied to each tower right after it is built and before ZeRO-3 partitions it (see
:func:`mmpt.pretrainer.build_pretrainer`), so every mode works at every stage: a parameter with
``requires_grad=False`` is left out of the optimizer's groups (:func:`mmpt.training.engine.param_groups`),
and DeepSpeed keeps optimizer state (and, at stages 1-3, gradient partitions) only for what the
optimizer holds.

LoRA on ``nn.Linear`` layers is peft's (``inject_adapter_in_model``). ``nn.MultiheadAttention`` packs q/k/v
into one ``in_proj_weight`` and its forward reads ``out_proj.weight`` directly, so there is no linear layer to
wrap; peft's own MultiheadAttention layer merges the adapter into the weight before every forward by deleting
and re-registering ``in_proj_weight`` as a new parameter (checked in peft 0.21.2), which DeepSpeed cannot
follow (ZeRO-3 partitions, gradient hooks and optimizer state are bound to the parameter object). Here a
packed projection gets a ``torch.nn.utils.parametrize`` parametrization instead, ``W + scale * B @ A`` on
the chosen q/k/v/out rows: the base weight stays one registered parameter, the module's own forward runs
unchanged, and merging is ``remove_parametrizations(leave_parametrized=True)``.
"""

from __future__ import annotations

import math
import re
import types
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from mmpt.registry import ConfigError

DEFAULT_LORA_SCOPE = re.compile(r"attn|attention", re.IGNORECASE)


def adapt_tower(tower: nn.Module, spec: Any, where: str) -> None:
    """Apply one ``TowerAdapt`` (or None: train fully) to a freshly built tower, in place."""
    if spec is None or spec.mode == "full":
        return
    tower.requires_grad_(False)
    if spec.mode == "frozen":
        freeze(tower)
    elif spec.mode == "last_blocks":
        unfreeze_last_blocks(tower, spec.blocks, where)
    else:
        add_lora(tower, spec, where)


def freeze(tower: nn.Module) -> None:
    """No gradients, no dropout or batch-statistics updates: the forward runs under ``no_grad`` in eval mode
    whatever mode the model is put in."""
    tower.requires_grad_(False)
    # bound methods (not closures): a deep copy of the model rebinds them to the copy
    tower.forward = types.MethodType(_no_grad_forward, tower)
    tower.train = types.MethodType(_always_eval, tower)
    tower.eval()


def _no_grad_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    with torch.no_grad():
        return type(self).forward(self, *args, **kwargs)


def _always_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def block_list(tower: nn.Module, where: str) -> tuple[str, nn.ModuleList]:
    """The tower's stack of transformer blocks: the ``nn.ModuleList`` of same-type modules holding the most
    parameters (``trunk.blocks``, ``encoder.layer``, ``transformer.resblocks``)."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in tower.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and len({type(m) for m in mod}) == 1:
            size = sum(int(getattr(p, "ds_numel", p.numel())) for p in mod.parameters())
            if best is None or size > best[0]:
                best = (size, name, mod)
    if best is None:
        raise ConfigError(f"{where}: mode last_blocks: the tower has no list of blocks (nn.ModuleList) to train the end of")
    return best[1], best[2]


def unfreeze_last_blocks(tower: nn.Module, n: int, where: str) -> None:
    """Train the last ``n`` blocks and every parameter registered after the block list (final norms)."""
    name, blocks = block_list(tower, where)
    if n > len(blocks):
        raise ConfigError(f"{where}.blocks: {n} trailing blocks asked, {name} has {len(blocks)}")
    for block in list(blocks)[-n:]:
        block.requires_grad_(True)
    last = f"{name}.{len(blocks) - 1}."
    seen_last = False
    for pname, p in tower.named_parameters():
        if pname.startswith(last):
            seen_last = True
        elif seen_last and not pname.startswith(f"{name}."):
            p.requires_grad_(True)


class PackedLoRA(nn.Module):
    """Parametrization ``W + (alpha / rank) * B @ A`` of a weight whose rows are ``parts`` stacked projections
    (3 for a packed q/k/v ``in_proj_weight``); rows of parts not in ``use`` are left unchanged. B starts at
    zero, so the adapted module starts equal to the base one (A as peft: Kaiming-uniform)."""

    def __init__(self, weight: Tensor, rank: int, alpha: float, use: tuple[bool, ...]):
        super().__init__()
        rows, cols = weight.shape
        part = rows // len(use)
        self.lora_A = nn.Parameter(torch.empty(rank, cols, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(rows, rank, dtype=weight.dtype))
        self.scale = alpha / rank
        self.register_buffer("rows", torch.tensor(use).repeat_interleave(part).to(weight.dtype).unsqueeze(1),
                             persistent=False)

    def forward(self, weight: Tensor) -> Tensor:
        return weight + (self.lora_B * self.rows) @ self.lora_A * self.scale


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_targets(tower: nn.Module, targets: list[str]) -> tuple[list[str], list[str]]:
    """(qualified names of linear layers for peft, of ``nn.MultiheadAttention`` modules) that ``targets``
    (or, empty, the default attention scope) selects."""
    mha = [n for n, m in tower.named_modules() if isinstance(m, nn.MultiheadAttention)]
    inside_mha = tuple(f"{n}." for n in mha)
    linear = [n for n, m in tower.named_modules() if isinstance(m, nn.Linear) and not n.startswith(inside_mha)]
    if targets:
        return [n for n in linear if _matches(n, targets)], [n for n in mha if _matches(n, targets)]
    return [n for n in linear if DEFAULT_LORA_SCOPE.search(n.rpartition(".")[0])], mha


def add_lora(tower: nn.Module, spec: Any, where: str) -> None:
    """Freeze the tower and add LoRA adapters (peft on linear layers, :class:`PackedLoRA` on packed attention)."""
    linear, mha = lora_targets(tower, list(spec.targets))
    if not linear and not mha:
        raise ConfigError(f"{where}: mode lora: targets {spec.targets or '(default: attention projections)'} "
                          f"match no linear or nn.MultiheadAttention module in the tower")
    tower.requires_grad_(False)
    if linear:
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=linear,
                            bias="none")
        inject_adapter_in_model(config, tower)
    qkv = tuple(c in spec.packed for c in "qkv")
    for name in mha:
        attn = tower.get_submodule(name)
        if not attn._qkv_same_embed_dim:
            raise ConfigError(f"{where}: {name}: LoRA needs a packed in_proj_weight (kdim == vdim == embed_dim)")
        if any(qkv):
            parametrize.register_parametrization(
                attn, "in_proj_weight", PackedLoRA(attn.in_proj_weight, spec.rank, spec.alpha, qkv))
        if "o" in spec.packed:
            parametrize.register_parametrization(
                attn.out_proj, "weight", PackedLoRA(attn.out_proj.weight, spec.rank, spec.alpha, (True,)))
    for pname, p in tower.named_parameters():
        if "lora_" in pname:
            p.requires_grad_(True)


def adapt_heads(model: nn.Module, adapt: dict[str, Any]) -> None:
    """Lock the projection heads of modalities whose ``train_head`` is false."""
    for modality, spec in adapt.items():
        if not spec.train_head and modality in model.heads:
            model.heads[modality].requires_grad_(False)


def has_adapters(module: nn.Module) -> bool:
    """Whether any LoRA adapter (peft or packed) is in ``module``."""
    return any("lora_" in n for n, _ in module.named_parameters())


def merge_adapters(module: nn.Module) -> int:
    """Fold every LoRA adapter into its base weight and remove it, in place; returns how many were merged.
    The module's state dict then has the plain (un-adapted) key names."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = 0
    for name, sub in list(module.named_modules()):
        if isinstance(sub, BaseTunerLayer):
            sub.merge()
            parent, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, attr, sub.get_base_layer())
            merged += 1
    for sub in list(module.modules()):
        if not parametrize.is_parametrized(sub):
            continue
        for pname in list(sub.parametrizations):
            if any(isinstance(p, PackedLoRA) for p in sub.parametrizations[pname]):
                parametrize.remove_parametrizations(sub, pname, leave_parametrized=True)
                merged += 1
    return merged
