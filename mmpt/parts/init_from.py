"""``model.init_from``: start a recipe from the weights of an mmpt export, with a report of what loaded.

The weights are handed to each part while the model is built (before adapters change key names and
before ZeRO-3 partitions the part, see :func:`mmpt.pretrainer.build_pretrainer`). Either the whole model
comes from the file, which must then match it key for key and shape for shape, or ``model.init_towers``
names the towers taken (each with its projection head) and the rest of the file is reported as not
requested. Anything else is refused: a silently partial load trains a model nobody asked for.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmpt.registry import ConfigError

log = logging.getLogger("mmpt")


@dataclass
class InitReport:
    """What ``model.init_from`` did: tensors loaded, missing from the file, in the file but unused (of the
    requested parts), shapes that differ, and the file's tensors outside the requested towers."""

    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    not_requested: list[str] = field(default_factory=list)
    digest: str = ""  # weights_digest of the file: what the run started from (recorded in its export)

    def summary(self) -> str:
        """One line for the log: counts, and the loaded tensors per part (``model.encoders.image: 68``)."""
        parts = Counter(".".join(k.split(".")[:3]) for k in self.loaded)
        return (f"init_from {self.path}: loaded {len(self.loaded)} tensors "
                f"({', '.join(f'{p}: {n}' for p, n in parts.items())}), {len(self.missing)} missing, "
                f"{len(self.unexpected)} unexpected, {len(self.mismatched)} of another shape, "
                f"{len(self.not_requested)} not requested")


class InitFrom:
    """The tensors of one export, loaded part by part into a model under construction."""

    def __init__(self, path: str, towers: list[str]):
        from safetensors.torch import load_file

        from mmpt.formats.export_file import FORMAT, read_header

        meta, _ = read_header(path)
        if meta.get("format") != FORMAT:
            raise ConfigError(f"model.init_from: {path} is not an mmpt export (format {meta.get('format')!r}, "
                              f"expected {FORMAT}); export a run with `mmpt export`")
        self.state = load_file(path)
        self.towers = list(towers)
        self.report = InitReport(path, digest=weights_digest(self.state))
        self.taken: set[str] = set()

    @classmethod
    def from_config(cls, model_cfg: Any) -> InitFrom | None:
        """The loader for ``model.init_from`` (None when unset)."""
        return cls(model_cfg.init_from, model_cfg.init_towers) if model_cfg.init_from else None

    def wanted(self, key: str) -> bool:
        """Whether a full parameter name belongs to what the recipe takes from the file."""
        if not self.towers:
            return True
        return any(key.startswith((f"model.encoders.{m}.", f"model.heads.{m}.")) for m in self.towers)

    def load(self, prefix: str, module: nn.Module) -> None:
        """Copy the file's tensors under ``prefix`` into ``module`` (a tower, head or objective)."""
        own = module.state_dict()
        if not own or not self.wanted(prefix):
            return
        found = {}
        for name, tensor in own.items():
            key = prefix + name
            if key not in self.state:
                self.report.missing.append(key)
            elif tuple(self.state[key].shape) != tuple(tensor.shape):
                self.report.mismatched.append(f"{key}: model {list(tensor.shape)}, file {list(self.state[key].shape)}")
            else:
                found[name] = self.state[key]
        with torch.no_grad():
            module.load_state_dict(found, strict=False)
        self.report.loaded += [prefix + n for n in found]
        self.taken.update(prefix + n for n in own)

    def finish(self) -> InitReport:
        """Check the load was complete for what was requested; raise listing what was not, else log and return
        the report."""
        r = self.report
        r.unexpected = sorted(k for k in self.state if self.wanted(k) and k not in self.taken)
        r.not_requested = sorted(k for k in self.state if not self.wanted(k))
        if r.missing or r.unexpected or r.mismatched:
            first = (r.mismatched or r.missing or r.unexpected)[0]
            hint = "" if self.towers else "; name the towers to take with model.init_towers"
            raise ConfigError(f"model.init_from: {r.path} does not match the model ({len(r.missing)} missing, "
                              f"{len(r.unexpected)} unexpected, {len(r.mismatched)} of another shape; first: "
                              f"{first}){hint}")
        if self.towers:
            empty = [m for m in self.towers if not any(k.startswith(f"model.encoders.{m}.") for k in r.loaded)]
            if empty:
                raise ConfigError(f"model.init_towers: {r.path} holds no weights for tower(s) {empty}")
        log.info(r.summary())
        return r


def without_init(cfg: Any) -> Any:
    """``cfg`` with ``model.init_from`` cleared: a model rebuilt from its own weights (an export, a run's
    checkpoint) must not read the file it once started from."""
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.model.init_from, cfg.model.init_towers = None, []
    return cfg


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names, dtypes, shapes and values: the identity of a set of weights, whatever
    file or metadata holds them (``mmpt soup`` checks its ingredients share one init by it)."""
    import hashlib

    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim: BN counters
    return h.hexdigest()


INIT_FILE = "init.json"  # in a run directory: what model.init_from started it from
INIT_META = "init_digest"  # export metadata: weights_digest of the export the model was fine-tuned from


def record_init(run_dir: Any, report: InitReport | None) -> None:
    """Write (or, for a run from scratch, remove) the run directory's record of the weights it started from."""
    import json
    from pathlib import Path

    path = Path(run_dir) / INIT_FILE
    if report is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(json.dumps({"init_from": report.path, "digest": report.digest}) + "\n")


def recorded_init(run_dir: Any) -> dict[str, str]:
    """Export metadata for a run's recorded init (``{INIT_META: digest}``), empty when it started from scratch."""
    import json
    from pathlib import Path

    path = Path(run_dir) / INIT_FILE
    try:
        digest = json.loads(path.read_text()).get("digest")
    except (OSError, ValueError, AttributeError):
        return {}
    return {INIT_META: digest} if isinstance(digest, str) and digest else {}
