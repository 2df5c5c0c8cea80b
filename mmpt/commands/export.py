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
import hashlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from mmpt.config import Config, dump_config, load_config
from mmpt.formats.export_file import (
    FORMAT,
    MAX_TOKENIZER_BYTES,
    REMOTE_PREFIXES,
    TOKENIZER_FILES,
    TOKENIZER_META,
    read_header,
)
from mmpt.formats.messages import one_line
from mmpt.pretrainer import Pretrainer, build_pretrainer
from mmpt.registry import ConfigError
from mmpt.training import checkpoint


def _weight_sources(name: Any) -> dict[str, Any]:
    """The encoder's keys that load weights at construction, with their off values (none if unknown:
    validation names an unknown encoder a moment later)."""
    from mmpt.registry import encoders

    try:
        return dict(getattr(encoders.get(str(name)), "weight_sources", {}))
    except ConfigError:
        return {}


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
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, cfg, ckpt


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
    return write_export(state, cfg, out, source=str(ckpt), step=max(checkpoint.step_of(ckpt), 0))


def write_export(state: dict[str, torch.Tensor], cfg: Config, out: str | Path, *, source: str = "",
                 step: int = 0) -> Path:
    """Write a consolidated state and its config as one self-contained .safetensors file."""
    from safetensors.torch import save_file

    # safetensors refuses shared storage (tied weights): store a copy of each; load re-ties by
    # loading into the model, whose tied parameters receive the same values.
    from mmpt.parts.init_from import without_init

    tensors = {k: v.detach().clone().contiguous() for k, v in state.items()}
    meta = {"format": FORMAT, "config": dump_config(without_init(cfg)), "source": source, "step": str(step),
            **tokenizer_metadata(cfg)}
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


def _tokenizer_folder(blob: str, where: str) -> str:
    """Materialise embedded tokenizer files in a per-user cache folder named by their hash; returns it."""
    try:
        files = {Path(f).name: base64.b64decode(b) for f, b in json.loads(blob).items()}
    except (ValueError, AttributeError) as exc:
        raise ConfigError(f"{where}: embedded tokenizer files are unreadable ({exc})") from exc
    unknown = sorted(set(files) - set(TOKENIZER_FILES))
    if unknown:
        raise ConfigError(f"{where}: embedded tokenizer holds unexpected files {unknown[:3]}")
    digest = hashlib.sha256(json.dumps(sorted((f, hashlib.sha256(b).hexdigest()) for f, b in files.items()))
                            .encode()).hexdigest()[:20]
    root = Path(os.environ.get("MMPT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                / "mmpt") / "tokenizers"
    folder = root / digest
    if folder.is_dir() and all((folder / f).is_file() and (folder / f).read_bytes() == b for f, b in files.items()):
        return str(folder)
    root.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=f".{digest}.", dir=root))
    for f, b in files.items():
        (fresh / f).write_bytes(b)
    try:
        fresh.rename(folder)
    except OSError:  # another process won the race, or a stale folder differs: use ours as is
        return str(fresh)
    return str(folder)


def export_config(path: str | Path, meta: dict[str, str]) -> Config:
    """The validated config embedded in an export, with weight-fetching keys reset and embedded
    tokenizers materialised; any defect is a one-line ConfigError naming the file."""
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{path}: not an mmpt export (metadata format {meta.get('format')!r}, expected {FORMAT})")
    if "config" not in meta:
        raise ConfigError(f"{path}: export metadata has no 'config'")
    raw = data_yaml(meta["config"], f"{path}: embedded config")
    return data_config(raw, path, {k.removeprefix(TOKENIZER_META): v for k, v in meta.items()
                                   if k.startswith(TOKENIZER_META)})


def data_yaml(text: str, where: str) -> Any:
    """YAML from a file that is data (an export's metadata, a run's config.yaml), refusing anchors and aliases:
    a few lines of nested aliases ("billion laughs") expand to billions of nodes in whoever walks the result."""
    import yaml

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                line = event.start_mark.line + 1
                raise ConfigError(f"{where}: line {line}: YAML anchor or alias {event.anchor!r}; expected plain "
                                  "YAML without anchors or aliases (mmpt never writes them)")
            return super().compose_node(parent, index)

    try:
        return yaml.load(text, Loader=NoAliases)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML ({one_line(str(exc).splitlines()[0])})") from exc


def data_config(raw: Any, path: str | Path, tokenizers: dict[str, str] | None = None) -> Config:
    """A config read from data (an export, a run directory's checkpoint), validated, with the keys that would
    fetch weights reset, remote sources and commands refused, ``init_from`` dropped and embedded tokenizer
    files (``tokenizers``: encoder name -> metadata blob) materialised; errors name ``path``."""
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict) \
            or not isinstance(raw["model"].get("encoders"), dict):
        raise ConfigError(f"{path}: embedded config is not a mapping with model.encoders (got {type(raw).__name__})")
    for name, enc in raw["model"]["encoders"].items():
        if not isinstance(enc, dict):
            continue  # validation below names it
        enc.update(_weight_sources(enc.get("name")))  # also where the default loads (text/hf's pretrained)
        for key, value in _strings(enc, f"model.encoders.{name}"):
            if value.startswith(REMOTE_PREFIXES) or "://" in value:
                raise ConfigError(f"{path}: {key}: {value[:60]!r} names a remote source or a command; a model "
                                  "file's config may not fetch or run anything")
        blob = (tokenizers or {}).get(name)
        if blob is not None:
            where = f"{path}: model.encoders.{name}.tokenizer"
            enc["tokenizer"] = "hf:" + _check_tokenizer(_tokenizer_folder(blob, where), where)
    raw["model"].pop("init_from", None)  # the file holds every weight: it reads no other file
    raw["model"].pop("init_towers", None)
    try:
        return load_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: embedded config: {exc}") from exc


def _strings(tree: Any, key: str) -> list[tuple[str, str]]:
    """Every string value under ``tree`` with its key path (nested kwargs reach constructors too)."""
    if isinstance(tree, str):
        return [(key, tree)]
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else []
    return [pair for k, v in items for pair in _strings(v, f"{key}.{k}")]


def _check_tokenizer(folder: str, where: str) -> str:
    """``folder`` if the Hugging Face tokenizer files in it load offline without remote code, else one line
    naming the export (transformers' own text spans many lines)."""
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # any failure of a tokenizer that came with the file is the file's defect
        raise ConfigError(f"{where}: the embedded Hugging Face tokenizer does not load ({one_line(exc)}); expected "
                          "tokenizer files that AutoTokenizer reads offline without remote code") from exc
    return folder


def check_shapes(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]], path: str | Path) -> None:
    """Refuse a file whose tensors do not match the model the config declares (names and shapes)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [k for k in expected if k in shapes and shapes[k] != expected[k]]
    if missing or unexpected or wrong:
        first = (f"{wrong[0]}: config declares {list(expected[wrong[0]])}, file has {list(shapes[wrong[0]])}" if wrong
                 else f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}")
        raise ConfigError(f"{path}: the embedded config does not match the file's tensors ({len(wrong)} shapes "
                          f"differ, {len(missing)} missing, {len(unexpected)} unexpected; {first})")


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


def _build_checked(cfg: Config, shapes: dict[str, tuple[int, ...]], path: str | Path) -> Pretrainer:
    held = 4 * sum(math.prod(s) for s in shapes.values())  # what the file's tensors take in float32
    # Twice the file plus slack covers non-persistent buffers and temporaries of any honest config;
    # a tampered one fails before its first oversized tensor exists.
    with _AllocationBudget(2 * held + 64 * 2**20, path, held):
        model = build_pretrainer(cfg)
    check_shapes(model, shapes, path)
    return model


def load(path: str | Path, device: str | torch.device = "cpu", *,
         allow_nonfinite: bool = False) -> tuple[Pretrainer, dict[str, Any], Any]:
    """Rebuild ``(model, transforms, tokenizer)`` from an exported file or a run directory.

    model: the Pretrainer in eval mode (``model.encode("image", images)``); transforms: modality ->
    data side (``transforms["image"].prepare([pil_image])``); tokenizer: that of the natural-language data side
    (``ModalityData.natural_language``), or None.
    """
    path = Path(path)
    if path.is_dir():  # a run directory is data, like an export: the same rules for its stored config
        state, _, ckpt = consolidate(path)
        raw, source = checkpoint_config(ckpt)
        model = _build_checked(data_config(raw, source), {k: tuple(v.shape) for k, v in state.items()}, source)
    else:
        from safetensors.torch import load_file

        meta, shapes = read_header(path)
        cfg = export_config(path, meta)
        model = _build_checked(cfg, shapes, path)
        state = load_file(str(path))
    check_finite(state, path, allow_nonfinite)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{path}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
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
