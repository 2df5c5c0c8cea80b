"""Two-rank training scenarios, run once under torchrun by test_multirank.py.

usage: torchrun --nproc_per_node 2 tests/train/_train_ranks.py SHARD_DIR OUT_DIR
Writes OUT_DIR/<scenario>/... run directories and OUT_DIR/zero3_embeddings.pt (rank 0).
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _zero_init_cases import cases, digest, initial_weights  # noqa: E402
from shardkit import tiny_config  # noqa: E402

from mmpt.config import load_config  # noqa: E402
from mmpt.data.loader import eval_loader  # noqa: E402
from mmpt.pretrainer import build_data_specs  # noqa: E402
from mmpt.registry import ConfigError, encoders  # noqa: E402
from mmpt.training.checkpoint import InjectedFault  # noqa: E402
from mmpt.training.loop import train  # noqa: E402


def config(shards: list[str], out: Path, stage: int, **train_kw) -> dict:
    raw = tiny_config(shards, out, steps=6, checkpoint_every=2, zero_stage=stage,
                      stage3_param_persistence_threshold=0, **train_kw)
    raw["data"]["workers"] = 1
    return raw


def crash_then_resume(raw: dict, **fault) -> None:
    try:
        train(load_config({**raw, "train": {**raw["train"], **fault}}))
        raise AssertionError("the injected fault did not fire")
    except InjectedFault:
        pass
    dist.barrier()
    train(load_config(raw), resume="latest")


def main() -> None:
    shard_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    shards = sorted(str(p) for p in shard_dir.glob("*.tar"))
    if len(sys.argv) > 3:  # one scenario in a launch of its own (usage: ... SHARD_DIR OUT_DIR SCENARIO)
        SCENARIOS[sys.argv[3]](shards, out)
        dist.barrier()
        dist.destroy_process_group()
        return
    gradcache_gradients(shards, out)
    for stage in (2, 3):
        ref = config(shards, out / f"zero{stage}_ref", stage)
        summary = train(load_config(ref))
        if stage == 3:
            # embeddings of a fixed batch from the live ZeRO-3 engine (every rank joins the gathers)
            module = summary.engine.module
            module.eval()
            batch = next(iter(eval_loader(shards[:1], build_data_specs(load_config(ref)), 8, workers=0)))
            with torch.no_grad():
                emb = module.model.encode_fields("image", batch.fields["image"]).embedding
            if dist.get_rank() == 0:
                torch.save({"keys": batch.keys, "embedding": emb}, out / "zero3_embeddings.pt")
        fault = {"crash_at_step": 3} if stage == 2 else {"crash_in_save": 4}
        crash_then_resume(config(shards, out / f"zero{stage}_resume", stage), **fault)
    # same seed, same model: every registered part's step-0 weights at stages 0 and 3, rank seeds differing
    digests = {case: {stage: digest(initial_weights(raw, stage, seed_offset=dist.get_rank())) for stage in (0, 3)}
               for case, raw in cases().items()}
    if dist.get_rank() == 0:
        (out / "zero_init_digests.json").write_text(json.dumps(digests))
    damaged_then_refused(shards, out)
    adapted_runs(shards, out)
    mlm_tied_head(shards, out)
    masked_tokens_runs(shards, out)
    itm_runs(shards, out)
    coca_runs(shards, out)
    cleanclip_runs(shards, out)
    distill_runs(shards, out)
    siglip2_runs(shards, out)
    matryoshka_runs(shards, out)
    dist.barrier()
    dist.destroy_process_group()


def adapted_runs(shards: list[str], out: Path) -> None:
    """A frozen text tower (and head) beside LoRA on an OpenCLIP image tower (packed q/k/v) at ZeRO 2 and 3:
    which weights moved, and which parameters the ZeRO optimizer holds fp32 state for (rank 0 writes)."""
    import deepspeed

    for stage in (2, 3):
        raw = config(shards, out / f"adapt{stage}", stage)
        raw["model"]["encoders"]["image"] = {"name": "image/open_clip",
                                             **encoders.get("image/open_clip").tiny_configs[0]}
        raw["model"]["adapt"] = {"text": {"mode": "frozen", "train_head": False}, "image": {"mode": "lora", "rank": 2}}
        before = initial_weights(raw, stage, seed_offset=dist.get_rank())
        engine = train(load_config(raw)).engine
        params = dict(engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values()), enabled=stage == 3):
            moved = sorted(n for n, p in params.items() if not torch.equal(p.detach().cpu(), before[n]))
        opt = engine.optimizer
        held = {id(p) for g in (getattr(opt, "bit16_groups", None) or opt.fp16_groups) for p in g}
        flat = getattr(opt, "single_partition_of_fp32_groups", None) or opt.fp32_partitioned_groups_flat
        state = torch.tensor([sum(t.numel() for t in flat)])
        dist.all_reduce(state)
        report = {"moved": moved, "trainable": sorted(n for n, p in params.items() if p.requires_grad),
                  "in_optimizer": sorted(n for n, p in params.items() if id(p) in held),
                  "fp32_state_numel": int(state), "trainable_numel": sum(int(getattr(p, "ds_numel", p.numel()))
                                                                        for p in params.values() if p.requires_grad)}
        engine.destroy()
        if dist.get_rank() == 0:
            (out / f"adapt{stage}.json").write_text(json.dumps(report))


def zero0_then_zero3(out: Path, name: str, make_raw: Callable[[Path, int], dict],
                     crash_at_step: int | None = None) -> Iterator[tuple[int, list[str] | None, dict | None]]:
    """Train ``make_raw(run_dir, stage)`` into ``<name>_zero0`` and ``<name>_zero3`` (the ZeRO-3 run crashed at
    ``crash_at_step`` and resumed, when given); yields (stage, names of the weights that moved, consolidated
    state) on rank 0 and (stage, None, None) elsewhere. Per-step losses are in the runs' key logs."""
    from mmpt.commands.export import consolidate
    from mmpt.pretrainer import borrowed_prefixes

    for stage in (0, 3):
        raw = make_raw(out / f"{name}_zero{stage}", stage)
        borrowed = borrowed_prefixes(load_config(raw))  # a teacher is not part of the model
        before = {n: t for n, t in initial_weights(raw, stage, seed_offset=dist.get_rank()).items()
                  if not n.startswith(borrowed)}
        if stage == 3 and crash_at_step:
            crash_then_resume(raw, crash_at_step=crash_at_step)
        else:
            train(load_config(raw))
        dist.barrier()
        if dist.get_rank() != 0:
            yield stage, None, None
            continue
        state = consolidate(out / f"{name}_zero{stage}")[0]
        yield stage, sorted(n for n, t in before.items() if not torch.equal(state[n].float(), t)), state


def mlm_config(shards: list[str], out: Path, stage: int) -> dict:
    """The tiny config with a bidirectional text tower alone, trained by mlm with its decoder tied to the
    tower's token embedding and a 40% -> 15% masking schedule over the first 4 steps."""
    raw = config(shards, out, stage)
    raw["model"]["encoders"] = {"text": {**raw["model"]["encoders"]["text"], "causal": False, "pool": "cls"}}
    raw["objectives"] = {"mlm": {"name": "mlm", "modality": "text", "width": 32, "rate": 0.15, "schedule": "linear",
                                 "rate_start": 0.4, "schedule_steps": 4}}
    raw["data"]["required"] = ["text"]
    return raw


def mlm_tied_head(shards: list[str], out: Path) -> None:
    """mlm at ZeRO 0, and at ZeRO 3 (the tied embedding is an external parameter of the objective there)
    crashed after step 3 and resumed: rank 0 writes which weights moved and the schedule's step counter of
    each final checkpoint."""
    report = {}
    for stage, moved, state in zero0_then_zero3(out, "mlm", partial(mlm_config, shards), crash_at_step=3):
        if state is not None:
            report[stage] = {"moved": moved, "step": int(state["objectives.mlm.step"].reshape(-1)[0])}
    if dist.get_rank() == 0:
        (out / "mlm_tied_head.json").write_text(json.dumps(report))


def masked_tokens_runs(shards: list[str], out: Path) -> None:
    """clip + masked_tokens (MAE) on the image tower, which also drops half its patches in clip's forward
    (FLIP), at ZeRO 0 and at ZeRO 3 crashed after step 3 and resumed: the tower runs twice per step (clip's
    forward, the objective's masked one); rank 0 writes which weights moved."""
    def make_raw(run: Path, stage: int) -> dict:
        raw = config(shards, run, stage)
        raw["model"]["encoders"]["image"]["train_token_drop"] = 0.5
        raw["objectives"]["mae"] = {"name": "masked_tokens", "modality": "image", "encoder_width": 32,
                                    "target_dim": 192, "decoder_width": 16, "decoder_depth": 1, "decoder_heads": 2}
        return raw

    # resumed masks and token drops must be the uninterrupted run's
    report = {stage: moved for stage, moved, _ in zero0_then_zero3(out, "mae", make_raw, crash_at_step=3)}
    if dist.get_rank() == 0:
        (out / "masked_tokens.json").write_text(json.dumps(report))


def itm_runs(shards: list[str], out: Path) -> None:
    """albef-tiny's objectives, clip + itm with hard negatives from the global batch (token features gathered
    with gradient), at ZeRO 0 and 3; rank 0 writes which weights moved."""
    from mmpt.training.engine import init_distributed

    init_distributed()  # also launched on its own (SCENARIOS), before anything joined the group

    def make_raw(run: Path, stage: int) -> dict:
        raw = config(shards, run, stage)
        raw["objectives"]["itm"] = {"name": "itm", "pairs": [["image", "text"]], "widths": {"image": 32, "text": 32},
                                    "width": 16, "depth": 1, "heads": 2, "gather": "with_grad"}
        return raw

    report = {stage: moved for stage, moved, _ in zero0_then_zero3(out, "itm", make_raw)}
    if dist.get_rank() == 0:
        (out / "itm.json").write_text(json.dumps(report))


def distill_runs(shards: list[str], out: Path) -> None:
    """A half-width student (clip + distill from a frozen teacher export) at ZeRO 0 and at ZeRO 3 (the teacher
    partitioned like any frozen part; crashed after step 3 and resumed); rank 0 writes which weights moved
    and the consolidated keys, which must hold no teacher tensor."""
    from mmpt.commands.export import write_export
    from mmpt.pretrainer import build_pretrainer, set_seed
    from mmpt.training.engine import init_distributed

    init_distributed()
    teacher = out / "distill_teacher.safetensors"
    if dist.get_rank() == 0:
        cfg = load_config(config(shards, out / "unused", 0))
        set_seed(123)
        write_export(build_pretrainer(cfg).state_dict(), cfg, teacher)
    dist.barrier()

    def make_raw(run: Path, stage: int) -> dict:
        raw = config(shards, run, stage)
        for modality in ("image", "text"):
            raw["model"]["encoders"][modality]["width"] = 16
        raw["objectives"]["distill"] = {"name": "distill", "teachers": [str(teacher)], "pairs": [["image", "text"]],
                                        "feature_weight": 0.5}
        return raw

    report = {stage: {"moved": moved, "keys": sorted(state or {})}
              for stage, moved, state in zero0_then_zero3(out, "distill", make_raw, crash_at_step=3)}
    if dist.get_rank() == 0:
        (out / "distill.json").write_text(json.dumps(report))


def coca_runs(shards: list[str], out: Path) -> None:
    """coca-tiny's objective (clip + caption from multimodal layers on the text tower's tokens) at ZeRO 0 and 3;
    per-step losses come from the runs' key logs. At ZeRO 3 every rank also captions a fixed batch with the
    live engine (KV-cached greedy decoding through the partitioned towers and decoder); rank 0 writes those
    tokens, the tokens of the consolidated weights in a plain model, and which weights moved."""
    from mmpt.commands.export import consolidate
    from mmpt.nn.generate import GenerationConfig, generate
    from mmpt.pretrainer import build_pretrainer
    from mmpt.training.engine import init_distributed

    init_distributed()  # a launch of its own (SCENARIOS) has not joined the group yet

    def captions(module: torch.nn.Module, fields: dict) -> list[list[int]]:
        decoder = module.objectives["coca"].start_decoding(module.model, fields)
        return [h[0].tokens for h in generate(decoder, GenerationConfig(max_len=6))]

    report: dict = {"moved": {}}
    for stage in (0, 3):
        raw = config(shards, out / f"coca_zero{stage}", stage)
        raw["objectives"] = {"coca": {"name": "coca", "width": 32, "depth": 1, "heads": 2, "memory_width": 32}}
        before = initial_weights(raw, stage, seed_offset=dist.get_rank())
        engine = train(load_config(raw)).engine
        dist.barrier()
        if stage == 3:
            fields = next(iter(eval_loader(shards[:1], build_data_specs(load_config(raw)), 4, workers=0))).fields["image"]
            engine.module.eval()
            report["live"] = captions(engine.module, fields)
        if dist.get_rank() == 0:
            state = consolidate(out / f"coca_zero{stage}")[0]
            report["moved"][stage] = sorted(n for n, t in before.items() if not torch.equal(state[n].float(), t))
            if stage == 3:
                plain = build_pretrainer(load_config(raw))
                plain.load_state_dict(state)
                report["reloaded"] = captions(plain.eval(), fields)
        engine.destroy()
    if dist.get_rank() == 0:
        (out / "coca.json").write_text(json.dumps(report))


def damaged_then_refused(shards: list[str], out: Path) -> None:
    """A flipped byte in the newest checkpoint: every rank falls back to the same older one (rank 0 warns);
    then a ZeRO-stage change is refused on every rank with one line, none left waiting in a collective."""
    run, rank = out / "zero2_damaged", dist.get_rank()
    if rank == 0:
        shutil.copytree(out / "zero2_resume", run)
        optim = run / "checkpoints" / "step_00000006" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        data = bytearray(optim.read_bytes())
        data[-4096] ^= 0x10
        optim.write_bytes(bytes(data))
    dist.barrier()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(load_config(config(shards, run, 2)), resume="latest")
    if rank == 0:
        (out / "zero2_damaged_warnings.json").write_text(json.dumps([str(w.message) for w in caught]))
    try:
        train(load_config(config(shards, run, 3)), resume="latest")
        (out / f"refused_rank{rank}.txt").write_text("not refused")
    except ConfigError as exc:
        (out / f"refused_rank{rank}.txt").write_text(str(exc))


def gradcache_gradients(shards: list[str], out: Path) -> None:
    """GradCache against one plain step on each rank's own batch at ZeRO 0-3 (stage 3 also with gather
    with_grad + local_loss; SigLIP's neighbour exchange at stage 2): per rank, the gradient gaps beyond
    test_gradcache's tolerance and a checksum of the reduced gradients (equal on every rank)."""
    from test_gradcache import boundary_grads, first_batches, gradcache_config, gradient_gaps

    from mmpt.training.engine import init_distributed

    d = init_distributed()  # the first scenario of the launch: nothing has joined the group yet
    rank, world = d.rank, d.world
    cases = {f"clip_zero{stage}": (stage, "clip", {}) for stage in (0, 1, 2, 3)}
    cases["clip_with_grad_local_loss_zero3"] = (3, "clip", {"gather": "with_grad", "local_loss": True})
    cases["siglip_zero2"] = (2, "siglip", {})
    report = {}
    for name, (stage, objective, kw) in cases.items():
        common = {"objective": objective, "objective_kw": kw, "zero_stage": stage,
                  "stage3_param_persistence_threshold": 0}
        plain = gradcache_config(shards, out / "gradcache", **common)
        batches = first_batches(plain, 1, rank, world)
        ref = boundary_grads(plain, batches)
        got = boundary_grads(gradcache_config(shards, out / "gradcache", "gradcache", **common), batches)
        report[name] = {"gaps": gradient_gaps(ref, got), "keys": batches[0].keys,
                        "checksums": [sum(float(g.double().sum()) for g in step.values()) for step in ref]}
    (out / f"gradcache_rank{rank}.json").write_text(json.dumps(report))


def sharded_eval_tasks(shards: list[str]) -> list[dict]:
    """Zero-shot over every shard (whole shards per rank) and retrieval over one (every other batch)."""
    return [{"name": "zero_shot", "data": "::".join(shards), "label_key": "color", "batch_size": 16},
            {"name": "retrieval", "data": shards[0], "batch_size": 8}]


@contextmanager
def eval_rows() -> Iterator[Counter]:
    """Rows through each tower in forwards without gradients (eval), counted per modality."""
    from mmpt.model import MultimodalModel

    rows: Counter[str] = Counter()
    forward = MultimodalModel.encode_fields

    def counted(self, modality: str, fields: dict, tokens: bool = False):
        if not torch.is_grad_enabled():
            rows[modality] += len(next(iter(fields.values())))
        return forward(self, modality, fields, tokens)

    MultimodalModel.encode_fields = counted
    try:
        yield rows
    finally:
        MultimodalModel.encode_fields = forward


def sharded_eval(shards: list[str], out: Path) -> None:
    """Eval during training at ZeRO 0 and 3, each rank embedding its part: the loop's metrics, the rows each
    rank's towers embedded for the same eval again, the gathered embeddings (rank 0 saves them), and a rank
    without input of its own padding its forwards with one sent by another rank."""
    from mmpt.eval import run_tasks
    from mmpt.eval.common import embed_data
    from mmpt.eval.sharding import EvalRanks, in_lockstep, split_over_ranks
    from mmpt.training.engine import init_distributed

    d = init_distributed()
    for stage in (0, 3):
        raw = config(shards, out / f"eval{stage}", stage)
        raw["train"].update(steps=2, checkpoint_every=2)
        raw["eval"] = sharded_eval_tasks(shards)
        with eval_rows() as loop_rows:
            summary = train(load_config(raw))
        model, specs = summary.engine.module.model, build_data_specs(load_config(raw))
        with eval_rows() as rows:
            again = run_tasks(model, specs, raw["eval"], d.device, progress=False, rank=d.rank, world=d.world)
        with split_over_ranks(d.rank, d.world):
            embedded = {name: embed_data(model, specs, pattern, 8, progress=False)
                        for name, pattern in (("all", "::".join(shards)), ("one", shards[0]))}
        if d.rank == 0:
            torch.save({name: {"keys": e.keys, "embeddings": e.embeddings, "skipped": e.skipped}
                        for name, e in embedded.items()}, out / f"eval{stage}_embedded.pt")
        numbers = {task: {k: v for k, v in m.items() if isinstance(v, (int, float))} for task, m in summary.eval.items()}
        again = {task: {k: v for k, v in m.items() if isinstance(v, (int, float))} for task, m in again.items()}
        (out / f"eval{stage}_rank{d.rank}.json").write_text(json.dumps(
            {"loop": numbers, "again": again, "loop_rows": dict(loop_rows), "rows": dict(rows), "tasks": raw["eval"]}))
        summary.engine.destroy()
    # rank 0 has two inputs, rank 1 none: rank 1 pads twice with a template rank 0 sends
    calls: list[list[float]] = []
    items = [({"x": torch.tensor([7.0, 8.0])}, True)] * 2 if d.rank == 0 else []
    got = list(in_lockstep(items, lambda item: {"x": item["x"][:1]}, lambda fields: calls.append(fields["x"].tolist()),
                           EvalRanks(d.rank, d.world)))
    (out / f"pad_rank{d.rank}.json").write_text(json.dumps({"items": len(got), "calls": calls}))


def multinode(shards: list[str], out: Path) -> None:
    """One rank per node (tests/train/test_multinode.py): the rendezvous each rank sees, then ZeRO-2 training
    that crashes at step 3 and resumes from step 2's checkpoint in the shared run directory."""
    import os

    from mmpt.training.engine import init_distributed

    d = init_distributed()
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK", "CROSS_RANK")}
    (out / f"node_rank{d.rank}.json").write_text(json.dumps({"rank": d.rank, "world": d.world, "env": env}))
    raw = config(shards, out / "run", 2)
    raw["train"].update(steps=4, checkpoint_every=2)
    crash_then_resume(raw, crash_at_step=3)


def matryoshka_runs(shards: list[str], out: Path) -> None:
    """Nested sizes at ZeRO 0 and 3 on 2-block towers: clip with Starbucks (layer, dim) pairs (the towers run
    again, stopped after block 1) + siglip with Matryoshka dims; and mlm with Starbucks pairs sampled per step
    (crashed after step 3 and resumed: the draws continue from the checkpointed counter). Rank 0 writes which
    weights moved."""
    from mmpt.training.engine import init_distributed

    init_distributed()  # also launched on its own (SCENARIOS), before anything joined the group

    def towers(raw: dict) -> dict:
        for enc in raw["model"]["encoders"].values():
            enc["depth"] = 2
        raw["train"]["precision"] = "fp32"  # the stages compared to rel 1e-4, whatever 'auto' means on this CPU
        return raw

    def pairs(run: Path, stage: int) -> dict:
        raw = towers(config(shards, run, stage))
        raw["objectives"] = {"clip": {"name": "clip", "pairs": [["image", "text"]], "starbucks": [[1, 16], [2, 32]]},
                             "siglip": {"name": "siglip", "pairs": [["image", "text"]], "matryoshka_dims": [8, 32],
                                        "matryoshka_weights": [1.0, 0.5]}}
        return raw

    def mlm(run: Path, stage: int) -> dict:
        raw = mlm_config(shards, run, stage)
        raw["objectives"]["mlm"].update(starbucks=[[1, 8], [1, 16], [2, 32]], starbucks_sample=True)
        return towers(raw)

    report: dict = {"pairs": {stage: moved for stage, moved, _ in zero0_then_zero3(out, "nested", pairs)}, "mlm": {}}
    for stage, moved, state in zero0_then_zero3(out, "nested_mlm", mlm, crash_at_step=3):
        if state is not None:
            report["mlm"][stage] = {"moved": moved, "draws": int(state["objectives.mlm.nesting.step"].reshape(-1)[0])}
    if dist.get_rank() == 0:
        (out / "matryoshka.json").write_text(json.dumps(report))


def cleanclip_runs(shards: list[str], out: Path) -> None:
    """cleanclip (clip + in-modality terms on the data sides' second views, encoded by the objective through
    the towers) at ZeRO 0 and 3; rank 0 writes which weights moved."""
    from mmpt.training.engine import init_distributed

    init_distributed()  # also launched on its own (SCENARIOS)

    def make_raw(run: Path, stage: int) -> dict:
        raw = config(shards, run, stage)
        for m in ("image", "text"):
            raw["model"]["encoders"][m]["train_views"] = 2
        raw["objectives"] = {"clip": {"name": "cleanclip", "pairs": [["image", "text"]]}}
        return raw

    report = {stage: moved for stage, moved, _ in zero0_then_zero3(out, "cleanclip", make_raw)}
    if dist.get_rank() == 0:
        (out / "cleanclip.json").write_text(json.dumps(report))


def siglip2_runs(shards: list[str], out: Path) -> None:
    """siglip2-tiny's objective mix (siglip + caption + self_distill: an EMA teacher of the image tower, SILC on two
    local crops, TIPS on masked patches) with 2 micro-batches a step, at ZeRO 0 and at ZeRO 3 (the teacher sharded
    like its student, updated on the shards; crashed after step 3 and resumed); rank 0 writes which weights moved."""
    from mmpt.training.engine import init_distributed

    init_distributed()  # also launched on its own (SCENARIOS)

    def make_raw(run: Path, stage: int) -> dict:
        raw = config(shards, run, stage, grad_accum=2)
        raw["model"]["encoders"]["image"].update(train_views=3, view_crop_scale=[0.1, 0.4])
        raw["objectives"] = {
            "siglip": {"name": "siglip", "pairs": [["image", "text"]]},
            "caption": {"name": "caption", "context_length": 16, "width": 32, "depth": 1, "heads": 2,
                        "memory_width": 32},
            "self_distill": {"name": "self_distill", "modality": "image", "width": 32, "embed_dim": 32,
                             "momentum": 0.9, "prototypes": 16, "head_hidden": 16, "decoder_width": 16,
                             "decoder_depth": 1, "decoder_heads": 2}}
        return raw

    report = {stage: {"moved": moved, "keys": sorted(state or {})}
              for stage, moved, state in zero0_then_zero3(out, "siglip2", make_raw, crash_at_step=3)}
    if dist.get_rank() == 0:
        (out / "siglip2.json").write_text(json.dumps(report))


SCENARIOS = {"siglip2": siglip2_runs, "cleanclip": cleanclip_runs, "matryoshka": matryoshka_runs, "sharded_eval": sharded_eval, "itm": itm_runs, "coca": coca_runs, "multinode": multinode,
             "distill": distill_runs}

if __name__ == "__main__":
    main()
