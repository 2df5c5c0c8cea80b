"""Two real ranks (torchrun, gloo): ZeRO-2 and ZeRO-3 training, fault-injected resume, and a
ZeRO-3 export that reproduces the live engine's embeddings."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmpt.training.engine import free_port

pytestmark = [pytest.mark.multirank, pytest.mark.slow]


@pytest.fixture(scope="module")
def ranks_out(color_shards: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ranks")
    script = Path(__file__).with_name("_train_ranks.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MMPT_DIST_TIMEOUT": "120"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(script), str(Path(color_shards[0]).parent), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


def steps(run: Path, rank: int) -> dict[tuple[int, int], tuple[list[str], float]]:
    out = {}
    for line in open(run / f"keys_rank{rank}.jsonl"):
        r = json.loads(line)
        out[(r["step"], r["micro"])] = (r["keys"], r["loss"])
    return out

def assert_zero3_steps_match_zero0(ranks_out: Path, name: str, n_steps: int = 6) -> None:
    """Runs ``<name>_zero0`` and ``<name>_zero3`` logged the same steps on both ranks, finite losses equal
    to rel 1e-4 (the ZeRO-3 run crashed and resumed in between, where the scenario says so)."""
    for r in range(2):
        ref, got = steps(ranks_out / f"{name}_zero0", r), steps(ranks_out / f"{name}_zero3", r)
        assert sorted(got) == sorted(ref) and len(ref) == n_steps
        for k in ref:
            assert got[k][0] == ref[k][0] and math.isfinite(got[k][1]), k
            assert got[k][1] == pytest.approx(ref[k][1], rel=1e-4), f"{name}: rank {r} loss at {k}"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", [2, 3])
def test_two_rank_training_and_resume(ranks_out: Path, stage: int) -> None:
    ref_dir, res_dir = ranks_out / f"zero{stage}_ref", ranks_out / f"zero{stage}_resume"
    metrics = [json.loads(x) for x in open(ref_dir / "metrics.jsonl")]
    losses = [m["loss"] for m in metrics if m["kind"] == "train"]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert json.loads((ref_dir / "deepspeed.json").read_text())["zero_optimization"]["stage"] == stage
    per_rank = [steps(ref_dir, r) for r in range(2)]
    # ranks read disjoint samples in the same steps
    for k in per_rank[0]:
        assert not set(per_rank[0][k][0]) & set(per_rank[1][k][0])
    for r in range(2):
        ref, got = per_rank[r], steps(res_dir, r)
        assert sorted(ref) == sorted(got)
        for k in ref:
            assert got[k][0] == ref[k][0], f"rank {r} keys differ at {k}"
            assert got[k][1] == pytest.approx(ref[k][1], rel=1e-5, abs=1e-6), f"rank {r} loss at {k}"


@pytest.mark.timeout(600)
def test_two_rank_gradcache_gradients_equal_one_plain_step(ranks_out: Path) -> None:
    """Each rank's batch in chunks of 2: the reduced gradients of GradCache equal those of one plain step
    (tolerance in test_gradcache) at ZeRO 0-3, two steps each; every rank holds the same reduced gradient."""
    reports = [json.loads((ranks_out / f"gradcache_rank{r}.json").read_text()) for r in range(2)]
    assert sorted(reports[0]) == sorted(reports[1]) and len(reports[0]) == 6
    for case in reports[0]:
        a, b = reports[0][case], reports[1][case]
        assert not a["gaps"] and not b["gaps"], f"{case}: {a['gaps'][:3]} {b['gaps'][:3]}"
        assert not set(a["keys"]) & set(b["keys"]), f"{case}: the ranks read the same samples"
        assert a["checksums"] == b["checksums"] and len(a["checksums"]) == 2, case


@pytest.mark.timeout(600)
def test_two_ranks_fall_back_from_a_damaged_checkpoint_and_refuse_together(ranks_out: Path) -> None:
    warned = json.loads((ranks_out / "zero2_damaged_warnings.json").read_text())
    assert any("zero_pp_rank_1_mp_rank_00_optim_states.pt does not match its checksum" in w for w in warned)
    for r in range(2):  # resumed from step 4 after the fallback: the same steps as the uninterrupted run
        ref, got = steps(ranks_out / "zero2_ref", r), steps(ranks_out / "zero2_damaged", r)
        assert sorted(got) == sorted(ref)
        assert all(got[k][0] == ref[k][0] for k in ref)
        refused = (ranks_out / f"refused_rank{r}.txt").read_text()
        assert "train.zero_stage" in refused and "\n" not in refused


@pytest.mark.timeout(600)
def test_zero3_export_reproduces_engine_embeddings(ranks_out: Path, tmp_path: Path) -> None:
    import mmpt
    from mmpt.commands.export import export

    path = export(ranks_out / "zero3_ref", tmp_path / "z3.safetensors")
    model, transforms, _ = mmpt.load(str(path))
    saved = torch.load(ranks_out / "zero3_embeddings.pt")
    from mmpt.data.loader import eval_loader

    shard = sorted(Path(p) for p in (ranks_out.parent.glob("shards*/*.tar")))[0]
    batch = next(iter(eval_loader([str(shard)], transforms, 8, workers=0)))
    assert batch.keys == saved["keys"]
    got = model.encode("image", batch.fields["image"])
    torch.testing.assert_close(got, saved["embedding"], rtol=1e-4, atol=1e-5)
    # the objective's logit scale came through the ZeRO-3 consolidation as well
    assert model.objectives["clip"].logit_scale.shape == (1,)


@pytest.mark.timeout(600)
def test_zero3_two_ranks_start_from_the_one_rank_model(ranks_out: Path) -> None:
    """Each registered part's step-0 weights at ZeRO 0 and 3 on two ranks (seeded seed + rank, as
    train() does) equal the one-rank stage-0 weights bit for bit."""
    from _zero_init_cases import cases, digest, initial_weights

    two_ranks = json.loads((ranks_out / "zero_init_digests.json").read_text())
    assert sorted(two_ranks) == sorted(cases())
    for case, raw in cases().items():
        one_rank = digest(initial_weights(raw, stage=0))
        for stage, got in two_ranks[case].items():
            differ = [n for n in one_rank if got.get(n) != one_rank[n]]
            assert sorted(got) == sorted(one_rank) and not differ, f"{case} ZeRO-{stage} on 2 ranks: {differ[:5]}"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", [2, 3])
def test_frozen_and_lora_towers_on_two_ranks(ranks_out: Path, stage: int) -> None:
    """Frozen text tower and head bit-identical, LoRA base weights too; only adapters and the rest train, and
    the ZeRO optimizer holds fp32 state for exactly those parameters (padding aside)."""
    r = json.loads((ranks_out / f"adapt{stage}.json").read_text())
    assert not [n for n in r["moved"] if n.startswith(("model.encoders.text.", "model.heads.text."))]
    assert not [n for n in r["moved"] if n.startswith("model.encoders.image.") and "lora_" not in n]
    assert any("lora_" in n for n in r["moved"])
    assert r["in_optimizer"] == r["trainable"]
    assert not [n for n in r["trainable"] if n.startswith(("model.encoders.text.", "model.heads.text."))]
    assert r["trainable_numel"] <= r["fp32_state_numel"] <= r["trainable_numel"] + 2 * 64 * len(r["trainable"])


@pytest.mark.timeout(600)
def test_mlm_tied_head_zero3_matches_zero0_and_resumes(ranks_out: Path) -> None:
    """mlm with its decoder tied to the text tower's token embedding on 2 ranks: ZeRO-3 (the tied weight an
    external parameter of the objective; crashed after step 3, resumed) gives ZeRO-0's per-step losses, the
    embedding, the head and the tower move, and the schedule's step counter resumed with the checkpoint."""
    assert_zero3_steps_match_zero0(ranks_out, "mlm")
    report = json.loads((ranks_out / "mlm_tied_head.json").read_text())
    for stage in ("0", "3"):
        moved = report[stage]["moved"]
        assert {"model.encoders.text.token_embed.weight", "objectives.mlm.transform.0.weight",
                "model.encoders.text.trunk.blocks.0.attn.qkv.weight"} <= set(moved), moved
        assert report[stage]["step"] == 6


@pytest.mark.timeout(600)
def test_itm_global_hard_negatives_zero3_match_zero0(ranks_out: Path) -> None:
    """clip + itm drawing hard negatives from the global batch (tokens gathered with gradient) on 2 ranks:
    ZeRO-3, where the fusion's parameters are partitioned, gives ZeRO-0's per-step losses, and the fusion
    (its directly owned first token included), its head and both towers move."""
    assert_zero3_steps_match_zero0(ranks_out, "itm")
    report = json.loads((ranks_out / "itm.json").read_text())
    for stage in ("0", "3"):
        assert {"objectives.itm.fusions.image__text.first", "objectives.itm.fusions.image__text.head.weight",
                "objectives.itm.fusions.image__text.cross_blocks.0.cross.kv.weight",
                "model.encoders.text.token_embed.weight", "model.encoders.image.patch_embed.weight"} <= set(report[stage]), \
            report[stage]


@pytest.mark.timeout(600)
def test_coca_zero3_matches_zero0_and_decodes_partitioned(ranks_out: Path) -> None:
    """coca (clip + caption from multimodal layers on the text tower's tokens) on 2 ranks: ZeRO-3 gives ZeRO-0's
    per-step losses, the decoder, the logit scale and both towers move, and KV-cached greedy captions from the
    live ZeRO-3 engine equal those of its consolidated weights in a plain model."""
    assert_zero3_steps_match_zero0(ranks_out, "coca")
    report = json.loads((ranks_out / "coca.json").read_text())
    for stage in ("0", "3"):
        assert {"objectives.coca.logit_scale", "objectives.coca.decoder.head.weight",
                "objectives.coca.decoder.cross.0.cross.kv.weight", "model.encoders.text.token_embed.weight",
                "model.encoders.image.patch_embed.weight"} <= set(report["moved"][stage]), report["moved"][stage]
    assert len(report["live"]) == 4 and report["live"] == report["reloaded"]


@pytest.mark.timeout(600)
def test_masked_tokens_and_flip_zero3_match_zero0(ranks_out: Path) -> None:
    """clip (on half the image patches, FLIP) + masked_tokens on 2 ranks: ZeRO-3, where the objective runs the
    image tower a second time through its forward (crashed after step 3, resumed: the same masks and drops),
    gives ZeRO-0's per-step losses, and the tower, its directly owned pos_embed and the decoder all move."""
    assert_zero3_steps_match_zero0(ranks_out, "mae")
    report = json.loads((ranks_out / "masked_tokens.json").read_text())
    for stage in ("0", "3"):
        assert {"model.encoders.image.pos_embed", "model.encoders.image.patch_embed.weight",
                "objectives.mae.decoder.mask_token", "objectives.mae.decoder.pred.weight",
                "objectives.clip.logit_scale"} <= set(report[stage]), report[stage]


@pytest.mark.timeout(600)
def test_matryoshka_and_starbucks_zero3_match_zero0(ranks_out: Path) -> None:
    """Nested sizes on 2 ranks: clip with Starbucks (layer, dim) pairs (the towers run again, stopped after block 1)
    + siglip with Matryoshka dims, and mlm sampling a Starbucks pair per step (crashed after step 3, resumed): ZeRO-3
    gives ZeRO-0's per-step losses, both blocks of each tower move, and the draw counter resumed."""
    assert_zero3_steps_match_zero0(ranks_out, "nested")
    assert_zero3_steps_match_zero0(ranks_out, "nested_mlm")
    report = json.loads((ranks_out / "matryoshka.json").read_text())
    for stage in ("0", "3"):
        assert {"model.encoders.image.trunk.blocks.0.mlp.2.weight", "model.encoders.text.trunk.blocks.1.mlp.2.weight",
                "objectives.clip.logit_scale", "objectives.siglip.logit_bias"} <= set(report["pairs"][stage])
        assert {"objectives.mlm.transform.0.weight", "model.encoders.text.trunk.blocks.1.attn.qkv.weight"} <= set(
            report["mlm"][stage]["moved"])
        assert report["mlm"][stage]["draws"] == 6


@pytest.mark.timeout(600)
def test_distill_zero3_matches_zero0_and_leaves_the_teacher_out(ranks_out: Path) -> None:
    """clip + distill from a frozen teacher export on 2 ranks: ZeRO-3, where the teacher is partitioned like any
    frozen part (crashed after step 3, resumed), gives ZeRO-0's per-step losses; the student's towers and KD
    scale move, and no teacher tensor reaches the consolidated weights."""
    assert_zero3_steps_match_zero0(ranks_out, "distill")
    report = json.loads((ranks_out / "distill.json").read_text())
    for stage in ("0", "3"):
        assert {"objectives.distill.logit_scale", "model.encoders.image.patch_embed.weight",
                "model.encoders.text.token_embed.weight"} <= set(report[stage]["moved"]), report[stage]["moved"]
        assert not [k for k in report[stage]["keys"] if "teachers" in k]


@pytest.mark.timeout(600)
def test_siglip2_zero3_matches_zero0(ranks_out: Path) -> None:
    """siglip + caption + self_distill (EMA teacher updated on ZeRO-3 shards once per 2-micro-batch step, SILC,
    TIPS) on 2 ranks: ZeRO-3, crashed after step 3 and resumed, gives ZeRO-0's per-step losses; the student's
    tower, the projection head and the TIPS decoder move; no teacher tensor reaches the consolidated weights."""
    assert_zero3_steps_match_zero0(ranks_out, "siglip2", n_steps=12)
    report = json.loads((ranks_out / "siglip2.json").read_text())
    for stage in ("0", "3"):
        assert {"objectives.self_distill.proj.0.weight", "objectives.self_distill.decoder.pred.weight",
                "objectives.caption.decoder.token_embed.weight",
                "model.encoders.image.patch_embed.weight"} <= set(report[stage]["moved"]), report[stage]["moved"]
        assert not [k for k in report[stage]["keys"] if ".teacher." in k]


@pytest.mark.timeout(600)
def test_cleanclip_zero3_matches_zero0(ranks_out: Path) -> None:
    """cleanclip on 2 ranks (the objective encodes each tower's second view itself): ZeRO-3 gives ZeRO-0's
    per-step losses, and both towers and the logit scale move."""
    assert_zero3_steps_match_zero0(ranks_out, "cleanclip")
    report = json.loads((ranks_out / "cleanclip.json").read_text())
    for stage in ("0", "3"):
        assert {"objectives.clip.logit_scale", "model.encoders.image.patch_embed.weight",
                "model.encoders.text.token_embed.weight"} <= set(report[stage]), report[stage]
