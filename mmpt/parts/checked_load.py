"""Build a model from an export file's config and load its tensors, with the checks an untrusted file gets.

The config is checked against the tensor shapes before any weight is allocated (a budget on tensor
factories stops a tampered config at its first oversized tensor), and non-finite weights are refused
unless allowed. ``build`` is the caller's builder (``mmpt.pretrainer.build_pretrainer``), passed in so
this module stays below the pretrainer.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from mmpt.config import Config
from mmpt.registry import ConfigError


def check_shapes(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]], path: str | Path) -> None:
    """Refuse a file whose tensors do not match the model the config declares (names and shapes)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    left_out = export_excluded(model)
    missing = [k for k in expected if k not in shapes and not k.startswith(left_out)]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [k for k in expected if k in shapes and shapes[k] != expected[k]]
    if missing or unexpected or wrong:
        first = (f"{wrong[0]}: config declares {list(expected[wrong[0]])}, file has {list(shapes[wrong[0]])}" if wrong
                 else f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}")
        raise ConfigError(f"{path}: the embedded config does not match the file's tensors ({len(wrong)} shapes "
                          f"differ, {len(missing)} missing, {len(unexpected)} unexpected; {first})")


def export_excluded(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes an export leaves out (each objective's ``export_excludes``, an EMA teacher)."""
    objs = getattr(model, "objectives", None) or {}
    return tuple(f"objectives.{n}.{k}." for n, o in objs.items() for k in getattr(o, "export_excludes", ()))


def check_finite(state: dict[str, torch.Tensor], path: str | Path, allow: bool) -> None:
    """Refuse (or, when allowed, warn about) weights holding NaN or inf."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if not bad:
        return
    msg = f"{path}: {len(bad)} tensors hold NaN or inf (first: {bad[0]})"
    if not allow:
        raise ConfigError(f"{msg}; pass allow_nonfinite=True (or --allow-nonfinite) to load it anyway")
    warnings.warn(msg, stacklevel=3)


class _AllocationBudget(TorchFunctionMode):
    """Counts the bytes tensor factories are asked for while a model is built and stops at the first
    request past ``budget``, before it is allocated. Cheaper than a meta-device build (which imports
    torch._dynamo: ~1.2 s) and the model is built once."""

    FACTORIES = frozenset({torch.empty, torch.empty_strided, torch.zeros, torch.ones, torch.full, torch.rand,
                           torch.randn, torch.randint, torch.eye, torch.arange})

    def __init__(self, budget: int, path: str | Path, held: int):
        super().__init__()
        self.budget, self.path, self.held, self.used = budget, path, held, 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in self.FACTORIES:
            dtype = kwargs.get("dtype") or torch.get_default_dtype()
            self.used += _requested_numel(func, args, kwargs) * dtype.itemsize
            if self.used > self.budget:
                raise ConfigError(f"{self.path}: the embedded config does not match the file's tensors (building it "
                                  f"asks for more than {self.budget / 2**20:.0f} MB; the file holds "
                                  f"{self.held / 2**20:.1f} MB)")
        return func(*args, **kwargs)


def _requested_numel(func: Any, args: tuple, kwargs: dict) -> int:
    if func is torch.arange or func is torch.eye:
        return 0  # index helpers, sized by small config values
    size = kwargs.get("size")
    if size is None:
        size = next((a for a in args if isinstance(a, (tuple, list, torch.Size))), None)
    if size is None:  # torch.empty(3, 4)
        size = [a for a in args if isinstance(a, int) and not isinstance(a, bool)]
    return math.prod(int(n) for n in size)


def build_checked(build: Callable[[Config], nn.Module], cfg: Config, shapes: dict[str, tuple[int, ...]],
                  path: str | Path) -> nn.Module:
    """``build(cfg)`` within an allocation budget set by the file's tensors, then checked against their shapes."""
    held = 4 * sum(math.prod(s) for s in shapes.values())  # what the file's tensors take in float32
    # Twice the file plus slack covers non-persistent buffers and temporaries of any honest config;
    # a tampered one fails before its first oversized tensor exists.
    with _AllocationBudget(2 * held + 64 * 2**20, path, held):
        model = build(cfg)
    check_shapes(model, shapes, path)
    return model


def load_export_file(path: str | Path, build: Callable[[Config], nn.Module], *,
                     allow_nonfinite: bool = False) -> nn.Module:
    """The module an mmpt export file describes, built by ``build`` from its embedded config, weights loaded."""
    from safetensors.torch import load_file

    from mmpt.config.from_export import export_config
    from mmpt.formats.export_file import read_header

    meta, shapes = read_header(path)
    model = build_checked(build, export_config(path, meta), shapes, path)
    state = load_file(str(path))
    check_finite(state, path, allow_nonfinite)
    load_weights(model, state, path)
    return model


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """``model.load_state_dict(state)``, with an error naming ``path`` when the keys differ."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{path}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
