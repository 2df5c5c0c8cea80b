"""``mmpt demo``: the whole user path on generated data — data, train, eval, export, embed."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path


def run_demo(out: str = "runs/demo", smoke: bool = False, overrides: list[str] | None = None) -> dict:
    """Generate the demo set, train ``clip-tiny``, evaluate the exported model, embed the held-out
    images, print a results table and where everything is. ``smoke`` shrinks it to about a minute."""
    from mmpt.config import load_config
    from mmpt.data.demo import generate_demo
    from mmpt.embed import embed
    from mmpt.eval import format_table, run_tasks, write_results
    from mmpt.export import export, load
    from mmpt.train.loop import train

    start = time.time()
    root = Path(out)
    data = root / "data"
    n_train, n_eval = (2000, 300) if smoke else (20000, 1000)
    info_file = data / "info.json"
    if not (info_file.exists() and json.loads(info_file.read_text()).get("train_samples") == n_train):
        generate_demo(data, train_samples=n_train, eval_samples=n_eval, shard_size=1000 if smoke else 2000)
    os.environ["MMPT_DEMO_DATA"] = str(data)
    os.environ["MMPT_RUN_DIR"] = str(root / "clip-tiny")
    smoke_set = ["train.steps=20", "optim.warmup_steps=5", "train.checkpoint_every=10", "data.batch_size=32",
                 "data.shuffle_buffer=200", "train.log_every=5"] if smoke else []
    # the demo evaluates the exported model below (proving export and load), not the live one again
    smoke_set.append("train.eval_every=0")
    cfg = load_config("clip-tiny", smoke_set + list(overrides or []))
    summary = train(cfg)
    model_file = export(cfg.train.out_dir, root / "clip-tiny.safetensors")
    model, transforms, _ = load(model_file)
    results = run_tasks(model.model, transforms, cfg.eval, device="cpu")
    write_results(results, root / "results.json")
    # a new model each run: its embeddings replace the last run's (embed refuses to mix two models)
    shutil.rmtree(root / "embeddings", ignore_errors=True)
    emb = embed(str(model_file), str(data / "eval"), "image", str(root / "embeddings"), progress=False)
    print()
    print(format_table(results))
    print()
    print(f"loss curve:  {Path(cfg.train.out_dir) / 'loss.png'}")
    print(f"metrics:     {Path(cfg.train.out_dir) / 'metrics.jsonl'} (TensorBoard: {Path(cfg.train.out_dir) / 'tensorboard'})")
    print(f"model:       {model_file}")
    print(f"embeddings:  {emb}")
    print(f"results:     {root / 'results.json'}")
    print(f"demo finished in {time.time() - start:.0f} s ({summary.steps} steps, {summary.samples_per_s:.0f} samples/s)")
    return results
