"""The training loop. Accumulation, clipping, precision and ZeRO live in the DeepSpeed config."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mmpt.config import Config
from mmpt.contracts import Batch
from mmpt.data.loader import Loader, train_loader
from mmpt.nn.padding import trim_padding, trimmed_modalities
from mmpt.parts.init_from import record_init
from mmpt.pretrainer import build_data_specs, count_parameters, set_seed
from mmpt.training import checkpoint
from mmpt.training.engine import DistInfo, build_engine, init_distributed, with_resolved_precision
from mmpt.training.loader_check import resume_loader_state
from mmpt.training.lock import RunLock
from mmpt.training.logger import RunLogger, StepRecords
from mmpt.training.plot import headline, plot_run
from mmpt.training.rank0 import on_rank0
from mmpt.training.resume_config import check_resume_config, write_config_history


@dataclass
class RunSummary:
    """What a finished run reports."""

    run_dir: str
    steps: int
    seconds: float
    samples_per_s: float
    final_loss: float
    skips: dict[str, int] = field(default_factory=dict)
    checkpoint: str = ""
    eval: dict[str, Any] = field(default_factory=dict)
    engine: Any = field(default=None, repr=False, compare=False)
    start: int = 0  # the step this process started from: it ran steps - start steps in `seconds`

    def __str__(self) -> str:
        from mmpt.data.loader import format_skips

        ran = f"{self.steps - self.start} steps" + (f" ({self.start}->{self.steps})" if self.start else "")
        text = (f"done: {ran} in {self.seconds:.0f} s, {self.samples_per_s:.0f} samples/s, "
                f"final loss {self.final_loss:.4f}, {format_skips(self.skips)}, checkpoint {self.checkpoint}")
        return text + "".join(f"; {headline_metrics(task, m)}" for task, m in self.eval.items())


def headline_metrics(task: str, metrics: dict[str, Any]) -> str:
    """'task top1 0.998, ...': the metrics worth a glance in the one-line summary."""
    shown = [f"{k} {v:.3f}" for k, v in metrics.items() if headline(k) and isinstance(v, (int, float))]
    return f"{task} {', '.join(shown)}" if shown else task


def total_steps(cfg: Config, per_epoch: int, world: int) -> int:
    """train.steps, or train.epochs worth of optimizer steps."""
    if cfg.train.epochs is None:
        return cfg.train.steps
    return max(1, int(cfg.train.epochs * per_epoch // (cfg.data.batch_size * world * cfg.train.grad_accum)))


def train(cfg: Config, resume: str | None = None) -> RunSummary:
    """Train ``cfg`` (optionally resuming) and return the run summary; every rank calls this."""
    d = init_distributed()
    lock = on_rank0(RunLock(cfg.train.out_dir).acquire)  # one writer per run directory, for the run's life
    try:
        return _train(cfg, resume, d)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: Config, resume: str | None, d: DistInfo) -> RunSummary:
    set_seed(cfg.seed + d.rank)
    cfg, precision = with_resolved_precision(cfg, d.device)  # 'auto' -> what runs here, recorded as such
    run_dir, t = Path(cfg.train.out_dir), cfg.train
    specs = build_data_specs(cfg)
    ckpt = checkpoint.prepare_resume(resume, run_dir) if resume else None  # verified, on every rank
    changed = on_rank0(lambda: check_resume_config(ckpt, cfg, d.world)) if ckpt else None
    probe, per_epoch = train_loader(cfg, specs, d.rank, d.world)  # validates data before building the model
    steps = total_steps(cfg, per_epoch, d.world)
    if ckpt is not None and checkpoint.step_of(ckpt) >= steps:
        return _nothing_to_do(cfg, ckpt, steps, d.is_main)
    engine, ds_config = build_engine(cfg, d, steps)
    start, loader_state = 0, None
    if ckpt is not None:
        client, rank_state = checkpoint.load(engine, ckpt)
        shards = {u for urls, _ in probe.spec.sources for u in urls}
        start = int(client["step"])
        loader_state = resume_loader_state(ckpt, rank_state, engine, cfg, shards, d.rank, d.world)
    loader = probe if loader_state is None else train_loader(cfg, specs, d.rank, d.world, loader_state)[0]
    run_dir.mkdir(parents=True, exist_ok=True)  # every rank: per-rank files live here too
    logger = RunLogger(run_dir, enabled=d.is_main, start=start)  # drops records of steps about to re-run
    if d.is_main:
        write_config_history(run_dir, cfg, start)
        if start == 0:  # the export records the weights a fine-tune started from (mmpt soup checks them)
            record_init(run_dir, getattr(engine.module, "init_report", None))
        if changed:
            logger.log(start, {"changed": changed}, kind="resume")
        (run_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=1))
        print(f"mmpt: {cfg.name}: {count_parameters(engine.module) / 1e6:.2f} M params, {d.world} rank(s), "
              f"ZeRO {t.zero_stage}, {precision}, {ds_config['train_batch_size']} samples/step, steps {start}->{steps}", flush=True)
    keys_log = StepRecords(run_dir / f"keys_rank{d.rank}.jsonl", t.log_sample_keys, start)
    bar = _progress(d.is_main and t.progress, start, steps)
    it, last_ckpt, meter, step_fn = iter(loader), ckpt, _Meter(time.perf_counter()), step_strategy(cfg)
    trimmed = trimmed_modalities(engine.module.model)
    last, evals = {}, {}
    for step in range(start, steps):
        for micro in range(t.grad_accum):
            t0 = time.perf_counter()
            batch = trim_padding(next(it), trimmed, d.world, d.device).to(d.device)
            meter.wait += time.perf_counter() - t0
            out = step_fn(engine, batch)
            meter.samples += len(batch) * d.world
            if keys_log:
                keys_log.write({"step": step, "micro": micro, "keys": batch.keys, "loss": out["loss"].item()})
        done = step + 1
        if done % t.log_every == 0 or done == steps:
            last = _log_step(logger, engine, out, loader, meter, done, d.world)
            bar.set_postfix(loss=f"{last['loss']:.4f}")
        if cfg.eval and t.eval_every != 0 and ((t.eval_every and done % t.eval_every == 0) or done == steps):
            evals = run_eval(engine.module, cfg, specs, d, logger, done)
        if done % t.checkpoint_every == 0 or done == steps:
            keys_log.sync()  # what this checkpoint covers survives a kill -9
            logger.sync()
            last_ckpt = checkpoint.save(engine, run_dir, done, {"step": done}, {"loader": loader.state_dict()},
                                        t.keep_last, crash_in_save=t.crash_in_save == done, config=cfg.to_dict())
        bar.update(1)
        if t.crash_at_step == done:
            raise checkpoint.InjectedFault(f"injected crash at step {done}")
    bar.close()
    keys_log.close()
    elapsed = time.perf_counter() - meter.start
    summary = RunSummary(str(run_dir), steps, elapsed, meter.total_samples / max(elapsed, 1e-9),
                         last.get("loss", math.nan), _global_skips(loader), str(last_ckpt or ""), evals, engine,
                         start)
    if d.is_main:
        plot_run(run_dir)
        logger.log(steps, {"summary": str(summary)}, kind="summary")
        print(summary, flush=True)
    logger.close()
    return summary


def _nothing_to_do(cfg: Config, ckpt: Path, steps: int, is_main: bool) -> RunSummary:
    """A resume whose checkpoint is at or past the configured steps: say so, train and write nothing."""
    at, run_dir = checkpoint.step_of(ckpt), cfg.train.out_dir
    if is_main:
        goal = f"train.steps={steps}" if cfg.train.epochs is None else f"the {steps} steps of train.epochs"
        where = f"already finished at step {at} of {steps}" if at == steps else f"is at step {at}, past {goal}"
        print(f"mmpt: run {run_dir} {where}; nothing to do", flush=True)
    return RunSummary(str(run_dir), at, 0.0, 0.0, math.nan, checkpoint=str(ckpt), start=at)


def plain_step(engine: Any, batch: Batch) -> dict[str, Any]:
    """One micro-batch: forward, backward, step (DeepSpeed updates at the accumulation boundary)."""
    out = engine(batch)
    engine.backward(out["loss"])
    engine.step()
    return out


def step_strategy(cfg: Config) -> Callable[[Any, Batch], dict[str, Any]]:
    """The micro-step ``train.step`` names: plain, or GradCache (see mmpt.training.gradcache)."""
    if cfg.train.step == "gradcache":
        from mmpt.training.gradcache import GradCacheStep

        return GradCacheStep(cfg.train.gradcache_chunk, cfg.train.gradcache_mmap_threshold)
    return plain_step


class _Meter:
    """Throughput and data-wait accounting between two log lines."""

    def __init__(self, now: float):
        self.start = self.mark = now
        self.samples = self.total_samples = 0
        self.wait = 0.0

    def take(self) -> tuple[float, float]:
        now = time.perf_counter()
        span = max(now - self.mark, 1e-9)
        rate, wait = self.samples / span, self.wait / span
        self.total_samples += self.samples
        self.samples, self.wait, self.mark = 0, 0.0, now
        return rate, wait


def _log_step(logger: RunLogger, engine: Any, out: dict[str, Any], loader: Loader, meter: _Meter,
              step: int, world: int) -> dict[str, Any]:
    """Average loss/metrics over ranks with one all-reduce, then log (host sync only here)."""
    names = ["loss", *(f"loss/{k}" for k in out["losses"]), *out["metrics"]]
    values = [out["loss"].detach(), *out["losses"].values(), *out["metrics"].values()]
    vec = torch.stack([v.float().reshape(()) for v in values])
    if world > 1:
        dist.all_reduce(vec)
        vec /= world
    rate, wait = meter.take()
    rec = dict(zip(names, vec.tolist(), strict=True))
    rec.update(lr=engine.get_lr()[0], samples_per_s=round(rate, 2), data_wait=round(wait, 4))
    from mmpt.data.shards import SHARD_REASONS  # shard events are shards, not skipped samples

    rec.update({f"{'shards' if k in SHARD_REASONS else 'skipped'}/{k}": v for k, v in _global_skips(loader).items()})
    logger.log(step, rec)
    return rec


def _global_skips(loader: Loader) -> dict[str, int]:
    """Skipped samples per reason summed over every rank, and per shard-event reason the number of
    distinct shards (a collective: all ranks call it at the same steps)."""
    from mmpt.data.loader import skip_counts

    local = (loader.state.total_skips(), loader.state.shard_events())
    gathered = [local]
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [({}, {}) for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, local)
    return skip_counts([s for s, _ in gathered], [e for _, e in gathered])


def run_eval(module: Any, cfg: Config, specs: dict, d: Any, logger: RunLogger, step: int) -> dict[str, Any]:
    """Every rank embeds its part of the eval data (the same number of forwards: ZeRO-3 forwards are
    collectives), the parts are gathered, every rank gets the same metrics; rank 0 logs."""
    from mmpt.eval import run_tasks

    module.eval()
    with torch.no_grad():
        results = run_tasks(module, specs, cfg.eval, device=d.device, progress=False, rank=d.rank, world=d.world)
    module.train()
    for task, metrics in results.items():
        logger.log(step, {k: v for k, v in metrics.items() if isinstance(v, (int, float))}, kind=f"eval/{task}")
    if d.is_main:
        from tqdm import tqdm

        from mmpt.eval import format_table

        tqdm.write(f"eval at step {step}:\n{format_table(results)}")  # above the progress bar, not through it
    return results


def _progress(enabled: bool, start: int, total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)
