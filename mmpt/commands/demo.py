"""``mmpt demo``: the whole user path on generated data — data, train, eval, export, embed — for any recipe."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

DEFAULT_RECIPE = "clip-tiny"
# torch's intra-op thread count changes the order of float sums, hence the trained model's figures: the
# demo fixes it (to the 2 cores the README's figures come from) so two runs anywhere print the same table
DEMO_THREADS = 2


def demo_data(data: Path, modalities: list[str], encoders: dict[str, dict[str, Any]], n_train: int, n_eval: int,
              shard_size: int) -> None:
    """Generate the demo set under ``data`` unless one with these sample counts and every one of
    ``modalities`` is there; a regenerated set keeps the modalities the old one had (adding a modality
    leaves the others' bytes unchanged, so runs that used them see the same data)."""
    from mmpt.data.demo_options import DEFAULT_MODALITIES
    from mmpt.data.demo_shards import generate_demo

    info_file = data / "info.json"
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    have = info.get("modalities", list(DEFAULT_MODALITIES)) if info.get("train_samples") == n_train else []
    if have and set(modalities) <= set(have):
        return
    wanted = list(dict.fromkeys([*have, *modalities]))
    # a renderer builds from the recipe's encoder settings (e.g. an audio sample rate); "name" is the encoder's
    configs = {m: {k: v for k, v in encoders.get(m, {}).items() if k != "name"} for m in wanted}
    generate_demo(data, train_samples=n_train, eval_samples=n_eval, shard_size=shard_size, modalities=wanted,
                  modality_configs=configs)


def run_demo(out: str = "runs/demo", smoke: bool = False, overrides: list[str] | None = None,
             recipe: str = DEFAULT_RECIPE, threads: int = DEMO_THREADS) -> dict:
    """Generate demo data for the recipe's modalities, train it, evaluate the exported model, embed the
    held-out samples with every tower, print a results table and where everything is, with ``threads``
    torch threads (printed; the caller's count comes back after). ``smoke`` shrinks it to about a minute."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    print(f"demo: {threads} torch threads (the figures repeat exactly for a given thread count)", flush=True)
    try:
        return _run_demo(out, smoke, overrides, recipe)
    finally:
        torch.set_num_threads(previous)


def _run_demo(out: str, smoke: bool, overrides: list[str] | None, recipe: str) -> dict:
    import torch

    from mmpt.commands.embed import embed
    from mmpt.commands.export import export, load
    from mmpt.config import load_config
    from mmpt.eval import format_table, run_tasks, write_results
    from mmpt.training.loop import train

    start = time.time()
    root = Path(out)
    data = root / "data"
    name = Path(recipe).stem if recipe.endswith((".yaml", ".yml")) else recipe
    os.environ["MMPT_DEMO_DATA"] = str(data)
    os.environ["MMPT_RUN_DIR"] = str(root / name)
    smoke_set = ["train.steps=20", "optim.warmup_steps=5", "train.checkpoint_every=10", "data.batch_size=32",
                 "data.shuffle_buffer=200", "train.log_every=5"] if smoke else []
    # the demo evaluates the exported model below (proving export and load), not the live one again
    smoke_set.append("train.eval_every=0")
    cfg = load_config(recipe, smoke_set + list(overrides or []))
    modalities = list(cfg.model.encoders)
    n_train, n_eval = (2000, 300) if smoke else (20000, 1000)
    demo_data(data, modalities, cfg.model.encoders, n_train, n_eval, shard_size=1000 if smoke else 2000)
    summary = train(cfg)
    model_file = export(cfg.train.out_dir, root / f"{name}.safetensors")
    model, transforms, _ = load(model_file)
    results = run_tasks(model, transforms, cfg.eval, device="cpu")  # the Pretrainer: caption tasks need objectives
    write_results(results, root / "results.json")
    # a new model each run: its embeddings replace the last run's (embed refuses to mix two models)
    shutil.rmtree(root / "embeddings", ignore_errors=True)
    emb = [embed(str(model_file), str(data / "eval"), m, str(root / "embeddings"), progress=False) for m in modalities]
    print()
    print(format_table(results))
    print()
    print(f"loss curve:  {Path(cfg.train.out_dir) / 'loss.png'}")
    print(f"metrics:     {Path(cfg.train.out_dir) / 'metrics.jsonl'} (TensorBoard: {Path(cfg.train.out_dir) / 'tensorboard'})")
    print(f"model:       {model_file}")
    for m, e in zip(modalities, emb, strict=True):
        print(f"embeddings:  {e} [{m}]")
    print(f"results:     {root / 'results.json'}")
    print(f"demo finished in {time.time() - start:.0f} s ({summary.steps} steps, {summary.samples_per_s:.0f} samples/s, "
          f"{torch.get_num_threads()} threads)")
    return results
