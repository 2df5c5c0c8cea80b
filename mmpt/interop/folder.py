"""``mmpt export --format folder``: any mmpt model as a hub-style model folder.

The folder holds ``config.json`` (format tag, the resolved config, each modality's preprocess settings and the
tokenizer manifest: JSON, no code), ``model.safetensors`` (tensors only), ``tokenizer/<encoder>/`` (the files of
each ``hf:`` tokenizer) and a generated ``README.md`` model card (YAML front matter, recipe, data, steps, eval
table, intended use). ``mmpt.load(folder)`` reads it through :mod:`mmpt.formats.model_folder` with the checks an
export file gets. The weights come from the existing export path: :func:`mmpt.commands.export.consolidate` and
``export_state`` for a run directory, the file itself for an export.
"""

from __future__ import annotations

import base64
import inspect
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from mmpt.formats.export_file import TOKENIZER_META
from mmpt.formats.model_folder import CARD, CONFIG, FOLDER_FORMAT, TOKENIZER_DIR, WEIGHTS, is_model_folder
from mmpt.registry import ConfigError

SHOWN_KEYS = 8  # metrics per eval task in the card's table


def model_source(src: str | Path, keep_adapters: bool = False) -> tuple[dict[str, torch.Tensor], Any, dict[str, Any]]:
    """(fp32 state, config, facts about where it came from: source, step, run directory, world size) of a run
    directory (consolidated as ``mmpt export`` does), an export file or a model folder."""
    from safetensors.torch import load_file

    from mmpt.commands.export import consolidate, export_config, export_state
    from mmpt.formats.export_file import read_header
    from mmpt.formats.model_folder import read_model_folder
    from mmpt.training import checkpoint

    src = Path(src)
    if is_model_folder(src) or not src.is_dir():
        if src.is_dir():
            meta, weights = read_model_folder(src)
            told = json.loads((src / CONFIG).read_text())  # read_model_folder checked it
        else:
            meta, weights = read_header(src)[0], src
            told = meta
        step = told.get("step", 0)
        facts = {"source": str(told.get("source") or src), "step": int(step) if str(step).isdigit() else 0,
                 "run": None, "world": 1}
        return load_file(str(weights)), export_config(src, meta), facts
    state, cfg, ckpt = consolidate(src)
    state, cfg = export_state(state, cfg, keep_adapters)
    saved = checkpoint.saved_run(ckpt) or {}
    facts = {"source": str(ckpt), "step": max(checkpoint.step_of(ckpt), 0), "run": ckpt.parent.parent,
             "world": int(saved.get("world_size", 1) or 1)}
    return state, cfg, facts


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def preprocess_settings(side: Any, encoder_cfg: dict[str, Any]) -> dict[str, Any]:
    """What a modality's data side does to raw inputs, in its own words: its ``preprocess_config()`` when it
    has one, else its constructor's settings (from the encoder config, defaults filled in), the file
    extensions it reads and its tokenizer's ids and vocabulary (an alphabet of a few hundred tokens is listed)."""
    own = getattr(side, "preprocess_config", None)
    if callable(own):
        return dict(own())
    out: dict[str, Any] = {"data_side": type(side).__name__, "extensions": list(side.extensions)}
    for name, param in inspect.signature(type(side).__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        value = encoder_cfg.get(name, param.default)
        if value is not param.empty and _jsonable(value):
            out[name] = value
    tok = getattr(side, "tokenizer", None)
    if tok is not None:
        out["vocabulary"] = {k: getattr(tok, k) for k in ("context_length", "vocab_size", "pad_id", "mask_id",
                                                         "bos_id", "eos_id") if _jsonable(getattr(tok, k, None))}
        tokens = getattr(tok, "tokens", None)
        if tokens is not None and len(tokens) <= 512:
            out["vocabulary"]["tokens"] = list(tokens)
    return out


def _write_tokenizers(cfg: Any, out: Path) -> dict[str, dict[str, list[str]]]:
    """Copy each ``hf:`` tokenizer's files to ``tokenizer/<encoder>/`` (checked as an export embeds them) and
    point the config at them; returns the manifest config.json lists."""
    from mmpt.commands.export import tokenizer_metadata

    manifest = {}
    for key, blob in tokenizer_metadata(cfg).items():
        name = key.removeprefix(TOKENIZER_META)
        folder = out / TOKENIZER_DIR / name
        folder.mkdir(parents=True)
        files = json.loads(blob)
        for file, data in files.items():
            (folder / file).write_bytes(base64.b64decode(data))
        cfg.model.encoders[name]["tokenizer"] = f"hf:{TOKENIZER_DIR}/{name}"
        manifest[name] = {"files": sorted(files)}
    return manifest


def export_folder(src: str | Path, out: str | Path, *, keep_adapters: bool = False, license: str = "other") -> Path:
    """Write the model folder ``out`` from a run directory, an export file or another model folder."""
    import copy

    from safetensors.torch import save_file

    from mmpt import __version__
    from mmpt.pretrainer import build_data_specs

    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_model_folder(out))):
        raise ConfigError(f"--out {out}: exists and is not an mmpt model folder; expected a new or empty folder")
    state, cfg, facts = model_source(src, keep_adapters)
    specs = build_data_specs(cfg)  # before the tokenizer entries point into the folder
    preprocess = {m: preprocess_settings(side, cfg.model.encoders[m]) for m, side in specs.items()}
    cfg = copy.deepcopy(cfg)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / TOKENIZER_DIR, ignore_errors=True)
    manifest = _write_tokenizers(cfg, out)
    # safetensors refuses shared storage (tied weights): one copy each; loading re-ties through the model
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(out / WEIGHTS),
              metadata={"format": "pt"})
    config = {"format": FOLDER_FORMAT, "library_name": "mmpt", "mmpt_version": __version__,
              "config": cfg.to_dict(), "preprocess": preprocess, "tokenizers": manifest,
              "step": facts["step"], "source": facts["source"]}
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (out / CARD).write_text(model_card(cfg, facts, specs, license, sum(v.numel() for v in state.values())))
    return out


# ---- the model card -------------------------------------------------------------------------------------------

def eval_results(run: Path | None, step: int) -> dict[str, dict[str, float]]:
    """task -> metrics of the last eval the run logged at or before ``step`` (metrics.jsonl; none: empty)."""
    from mmpt.training.logger import read_jsonl

    path = None if run is None else run / "metrics.jsonl"
    if path is None or not path.is_file():
        return {}
    try:
        records = read_jsonl(path)
    except (ValueError, OSError):
        return {}
    results: dict[str, dict[str, float]] = {}
    for rec in records:
        kind = rec.get("kind") if isinstance(rec, dict) else None
        if isinstance(kind, str) and kind.startswith("eval/") and isinstance(rec.get("step"), int) \
                and rec["step"] <= step:
            results[kind.removeprefix("eval/")] = {k: v for k, v in rec.items() if k not in ("step", "kind", "time")
                                                   and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return results


def _last_train_record(run: Path | None) -> dict[str, Any]:
    from mmpt.training.logger import read_jsonl

    path = None if run is None else run / "metrics.jsonl"
    if path is None or not path.is_file():
        return {}
    try:
        records = [r for r in read_jsonl(path) if isinstance(r, dict) and not r.get("kind")]
    except (ValueError, OSError):
        return {}
    return records[-1] if records else {}


def pipeline_tag(cfg: Any, specs: dict[str, Any]) -> str:
    """The hub's pipeline tag: 'fill-mask' for a masked language model of one word tower; else what a data side
    declares for zero-shot use beside a word tower (``hub_pipeline_tag``); else 'feature-extraction'."""
    words = [m for m, side in specs.items() if side.natural_language]
    mlm = {o.get("modality") for o in cfg.objectives.values() if o.get("name") == "mlm"}
    if len(specs) == 1 and words and mlm & set(words):
        return "fill-mask"
    declared = [getattr(side, "hub_pipeline_tag", None) for m, side in specs.items() if m not in words]
    return next((t for t in declared if words and isinstance(t, str) and t), "feature-extraction")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(cfg: Any, facts: dict[str, Any], specs: dict[str, Any], license: str, n_params: int) -> str:
    """README.md of a model folder: YAML front matter, then recipe, data, training, evaluation, use, limits."""
    import yaml

    modalities = list(cfg.model.encoders)
    objectives = [o.get("name", k) for k, o in cfg.objectives.items()]
    tags = ["mmpt", *modalities, *dict.fromkeys(objectives), cfg.name]
    front = {"license": license, "library_name": "mmpt", "tags": list(dict.fromkeys(str(t) for t in tags)),
             "pipeline_tag": pipeline_tag(cfg, specs)}
    step, world = facts["step"], facts["world"]
    samples = step * cfg.data.batch_size * cfg.train.grad_accum * world
    last = _last_train_record(facts["run"])
    skipped = {k.removeprefix("skipped/"): v for k, v in last.items() if k.startswith("skipped/") and v}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {cfg.name}", "",
             f"An mmpt model with {len(modalities)} tower(s) ({', '.join(modalities)}) trained with "
             f"{', '.join(objectives) or 'no objective'}; {n_params / 1e6:.2f} M parameters. Exported from "
             f"`{facts['source']}` at step {step}.", "", "## Recipe", "",
             "| modality | encoder | settings |", "|---|---|---|"]
    for m, enc in cfg.model.encoders.items():
        settings = ", ".join(f"{k}={v}" for k, v in enc.items() if k != "name" and not isinstance(v, (dict, list)))
        lines.append(f"| {m} | `{enc.get('name')}` | {settings} |")
    lines += ["", f"Shared embedding: {cfg.model.embed_dim} wide, head `{cfg.model.head}`. Objectives: "
              + "; ".join(f"`{k}` ({o.get('name')})" for k, o in cfg.objectives.items()) + ".", "",
              "## Data", "", "| source (shard pattern) | weight |", "|---|---|"]
    lines += [f"| `{s.url}` | {s.weight:g} |" for s in cfg.data.sources] or ["| (none recorded) | |"]
    lines += ["", f"Samples seen: {samples:,} ({step} steps x batch {cfg.data.batch_size} x "
              f"{cfg.train.grad_accum} accumulation x {world} rank(s)); required modalities: "
              f"{', '.join(cfg.data.required) or 'none'}."]
    if skipped:
        lines.append("Samples skipped by the loader (last logged): "
                     + ", ".join(f"{k} {_fmt(v)}" for k, v in skipped.items()) + ".")
    lines += ["", "## Training", "", f"{step} of {cfg.train.steps} steps, AdamW lr {cfg.optim.lr:g} "
              f"({cfg.optim.schedule}, {cfg.optim.warmup_steps} warmup steps, weight decay {cfg.optim.weight_decay:g}), "
              f"ZeRO stage {cfg.train.zero_stage}, precision {cfg.train.precision}, seed {cfg.seed}."]
    if last.get("loss") is not None:
        lines.append(f"Last logged training loss: {_fmt(last['loss'])} (step {last.get('step')}).")
    results = eval_results(facts["run"], step)
    lines += ["", "## Evaluation", ""]
    if results:
        lines += ["| task | metric | value |", "|---|---|---|"]
        lines += [f"| {task} | {k} | {_fmt(v)} |" for task, metrics in results.items()
                  for k, v in list(metrics.items())[:SHOWN_KEYS]]
    else:
        lines.append("No eval results were logged by the run (run `mmpt eval` on this folder).")
    lines += ["", "## How to use", "", "```python", "import mmpt", "",
              'model, transforms, tokenizer = mmpt.load("path/to/this/folder")',
              f'emb = model.encode("{modalities[0]}", [...])  # raw inputs of that modality', "```", "",
              "`mmpt.create_model_and_transforms(folder)` and `mmpt.get_tokenizer(folder)` give OpenCLIP's API. "
              "Loading runs no code from the folder: weights are safetensors, the config is JSON checked key by key.",
              "", "## Intended use and limitations", "",
              f"Intended for research on {' / '.join(modalities)} representations: embedding, retrieval, zero-shot "
              "classification against text prompts, linear probes, fine-tuning.",
              "It knows only what its training data above holds: check that data's licence and content before use, "
              "and evaluate on your own task; the table above covers only the tasks listed. Inputs are cut to each "
              "tower's context (see `preprocess` in config.json). No safety or bias evaluation was run.", ""]
    return "\n".join(lines)
