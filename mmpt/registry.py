"""One small registry per kind of part (encoders, objectives, modalities, eval tasks).

Parts register by name with a decorator; ``build(name, **cfg)`` checks the keyword arguments
against the constructor's signature before calling it, so a typo in a recipe fails before training
with the key path and the closest valid key.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from collections.abc import Callable
from typing import Any


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the key path and what was expected."""


def closest(name: str, choices: list[str] | tuple[str, ...] | set[str]) -> str:
    """Return a 'did you mean' hint for ``name`` among ``choices`` (empty string if nothing is close)."""
    match = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


class Registry:
    """Maps names to classes or factories of one kind of part."""

    def __init__(self, kind: str, package: str | None = None, entry_point_group: str | None = None):
        self.kind = kind
        self._package = package
        self._entry_point_group = entry_point_group
        self._items: dict[str, Callable[..., Any]] = {}
        self._discovered = False

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering a class or factory under ``name``."""

        def deco(obj: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._items and self._items[name] is not obj:
                raise KeyError(f"{self.kind} '{name}' is registered twice ({self._items[name]} and {obj})")
            self._items[name] = obj
            obj.registry_name = name  # type: ignore[attr-defined]
            return obj

        return deco

    def discover(self) -> None:
        """Import every module of the package and every entry point so their decorators run."""
        if self._discovered:
            return
        self._discovered = True
        if self._package:
            pkg = importlib.import_module(self._package)
            for info in pkgutil.iter_modules(pkg.__path__):
                if not info.name.startswith("_"):
                    importlib.import_module(f"{self._package}.{info.name}")
        if self._entry_point_group:
            from importlib.metadata import entry_points

            for ep in entry_points(group=self._entry_point_group):
                ep.load()

    def names(self) -> list[str]:
        """All registered names, sorted."""
        self.discover()
        return sorted(self._items)

    def get(self, name: str, *, path: str = "") -> Callable[..., Any]:
        """Return the registered object, or raise naming the closest registered names."""
        self.discover()
        if name not in self._items:
            where = f"{path}: " if path else ""
            raise ConfigError(
                f"{where}unknown {self.kind} '{name}'{closest(name, self._items)}; "
                f"registered: {', '.join(sorted(self._items))}"
            )
        return self._items[name]

    def build(self, name: str, *, path: str = "", **cfg: Any) -> Any:
        """Validate ``cfg`` against the constructor signature, then build."""
        obj = self.get(name, path=path)
        check_kwargs(obj, cfg, path=path or name)
        try:
            return obj(**cfg)
        except ConfigError:
            raise
        except (ValueError, TypeError) as exc:  # a constructor rejecting its arguments: name the section
            raise ConfigError(f"{path or name}: {exc}") from exc


def check_kwargs(fn: Callable[..., Any], cfg: dict[str, Any], *, path: str, also: Callable[..., Any] | None = None) -> None:
    """Raise ConfigError for keys ``fn`` does not accept or values of an obviously wrong type. Keys ``also``
    accepts are valid too (an encoder section also configures its modality's data side)."""
    params = {k: p for k, p in inspect.signature(fn).parameters.items() if k != "self"}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    hints = _hints(fn)
    if also is not None:
        extra = {k: p for k, p in inspect.signature(also).parameters.items() if k != "self" and k not in params
                 and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}
        hints = {**{k: v for k, v in _hints(also).items() if k in extra}, **hints}
        params = {**params, **{k: p.replace(default=None) for k, p in extra.items()}}  # never required here
    for key, value in cfg.items():
        if key not in params:
            raise ConfigError(f"{path}.{key}: unknown key{closest(key, list(params))}; valid: {', '.join(params)}")
        expected = hints.get(key)
        if expected is not None and not _type_ok(value, expected):
            raise ConfigError(f"{path}.{key}: expected {_type_name(expected)}, got {value!r} ({type(value).__name__})")
    missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in cfg
               and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    if missing:
        raise ConfigError(f"{path}: missing required key(s) {', '.join(missing)}")


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    import typing

    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        return typing.get_type_hints(target)
    except Exception:  # forward references to optional heavy imports: skip type checks
        return {}


def _type_ok(value: Any, expected: Any) -> bool:
    import types
    import typing

    origin = typing.get_origin(expected)
    if expected is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(expected)
    if origin is not None:
        expected = origin
    if not isinstance(expected, type):
        return True
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected in (tuple, list):
        return isinstance(value, (tuple, list))
    return isinstance(value, expected)


def _type_name(t: Any) -> str:
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


# The registries. Packages are discovered lazily on first lookup.
encoders = Registry("encoder", "mmpt.encoders", "mmpt.encoders")
objectives = Registry("objective", "mmpt.objectives", "mmpt.objectives")
modalities = Registry("modality", "mmpt.encoders", "mmpt.encoders")
tasks = Registry("eval task", "mmpt.eval", "mmpt.eval_tasks")
