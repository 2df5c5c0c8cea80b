"""itc_momentum (ALBEF momentum distillation + feature queue): the loss against a naive per-row
reference and against clip, the EMA formula, the FIFO queue, state through state_dict, ZeRO-3 refused,
and a short training run that resumes after a crash with the same losses."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from shardkit import tiny_config

from mmpt.config import load_config
from mmpt.contracts import Batch
from mmpt.objectives.contrastive import GatherMode, clip_loss
from mmpt.objectives.matching import MomentumITC, input_fingerprints, momentum_itc_loss
from mmpt.pretrainer import Pretrainer, build_pretrainer
from mmpt.registry import ConfigError
from mmpt.training.checkpoint import InjectedFault
from mmpt.training.loop import train

MOMENTUM = {"name": "itc_momentum", "pairs": [["image", "text"]], "momentum": 0.9, "alpha": 0.4,
            "queue_size": 5, "init_logit_scale": 10.0}


def unit(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape), dim=-1)


def test_loss_equals_a_naive_per_row_reference() -> None:
    torch.manual_seed(0)
    b, q, e, alpha, scale = 5, 3, 8, 0.3, torch.tensor(7.0)
    a, bb, a_m, b_m, qa, qb = unit(b, e), unit(b, e), unit(b, e), unit(b, e), unit(q, e), unit(q, e)
    valid = torch.tensor([True, True, False, True, True])
    forbidden = torch.zeros(b, q, dtype=torch.bool)
    forbidden[0, 1] = forbidden[3, 0] = forbidden[3, 2] = True
    got, _ = momentum_itc_loss(a, bb, a_m, b_m, qa, qb, scale, alpha, valid, forbidden)
    total, rows = 0.0, [i for i in range(b) if valid[i]]
    for x, y, x_m, y_m, queue in ((a, bb, a_m, b_m, qb), (bb, a, b_m, a_m, qa)):
        for n, i in enumerate(rows):
            kept = [queue[j] for j in range(q) if not forbidden[i, j]]
            cols, cols_m = [y[j] for j in rows] + kept, [y_m[j] for j in rows] + kept
            logits = torch.stack([scale * x[i] @ c for c in cols])
            soft = torch.softmax(torch.stack([scale * x_m[i] @ c for c in cols_m]), 0)
            target = alpha * soft
            target[n] += 1 - alpha
            total -= float((target * torch.log_softmax(logits, 0)).sum())
    assert got.item() == pytest.approx(total / (2 * len(rows)), rel=1e-5)


def test_alpha_zero_without_queue_is_clip() -> None:
    torch.manual_seed(1)
    a, b = unit(6, 8).requires_grad_(), unit(6, 8).requires_grad_()
    valid = torch.tensor([True, False, True, True, True, False])
    scale, empty = torch.tensor(12.0), torch.zeros(0, 8)
    ours, m = momentum_itc_loss(a, b, unit(6, 8), unit(6, 8), empty, empty, scale, 0.0, valid)
    ref, m_ref = clip_loss(a, b, scale, gather=GatherMode.parse("local"), valid=valid)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    g_ours, g_ref = torch.autograd.grad(ours, (a, b)), torch.autograd.grad(ref, (a, b))
    for x, y in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(x, y)
    assert m["acc"] == m_ref["acc"] and m["acc_ba"] == m_ref["acc_ba"]


def test_no_valid_row_gives_a_finite_zero() -> None:
    a = unit(3, 4).requires_grad_()
    loss, _ = momentum_itc_loss(a, unit(3, 4), unit(3, 4), unit(3, 4), unit(2, 4), unit(2, 4), torch.tensor(5.0),
                                0.5, torch.zeros(3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(a.grad).all()


def pretrainer(**kw: object) -> Pretrainer:
    raw = tiny_config(["unused.tar"], Path("unused"))
    raw["objectives"] = {"itc": {**MOMENTUM, **kw}}
    torch.manual_seed(0)
    return build_pretrainer(load_config(raw))


def batch_of(pre: Pretrainer, n: int = 3) -> Batch:
    pixels = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    fields = {"image": pre.model.data["image"].fields_from_tensor(pixels),
              "text": pre.model.data["text"].prepare([f"a red square {i}" for i in range(n)], train=False)}
    return Batch(fields=fields, present={}, keys=[str(i) for i in range(n)])


def momentum_params(obj: MomentumITC) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in obj.copies.named_parameters()}


def test_ema_update_follows_the_formula() -> None:
    pre = pretrainer()
    obj = pre.objectives["itc"]
    batch = batch_of(pre)
    pre.train()
    pre(batch)  # first forward: the copies are made, equal to the online towers
    online = {f"{kind}.{n}": p for kind, mods in (("towers", pre.model.encoders), ("heads", pre.model.heads))
              for n, p in mods.named_parameters()}
    before = momentum_params(obj)
    assert set(online) == set(before) and all(torch.equal(before[n], online[n]) for n in online)
    assert not any(p.requires_grad for p in obj.copies.parameters())
    assert [n for n, _ in pre.named_parameters() if "itc" in n] == ["objectives.itc.logit_scale"]  # DeepSpeed sees no copy
    with torch.no_grad():
        for p in pre.model.parameters():
            p.add_(torch.randn_like(p))
    pre(batch)
    after = momentum_params(obj)
    for n in online:
        torch.testing.assert_close(after[n], 0.9 * before[n] + 0.1 * online[n].detach(), rtol=0, atol=1e-6)
    pre.eval()
    pre(batch)  # no update outside training
    assert all(torch.equal(after[n], p) for n, p in momentum_params(obj).items())


def test_queue_is_fifo_and_persists_through_state_dict() -> None:
    pre = pretrainer()
    obj = pre.objectives["itc"]
    pre.train()
    pre(batch_of(pre))
    assert int(obj.fifo_filled) == 3
    first = {m: obj.queue(m).clone() for m in ("image", "text")}
    torch.manual_seed(3)
    e2 = {m: unit(3, 32) for m in ("image", "text")}
    ids = {m: torch.arange(6).view(3, 2) for m in ("image", "text")}
    obj._enqueue(e2, ids, torch.tensor([True, True, True]))
    # six in, five kept: the oldest (slot 0) was overwritten by the newest
    for m in ("image", "text"):
        expect = torch.cat([e2[m][2:3], first[m][1:3], e2[m][:2]])
        assert torch.equal(obj.queue(m), expect)
    assert int(obj.fifo_ptr) == 1 and int(obj.fifo_filled) == 5
    obj._enqueue(e2, ids, torch.tensor([False, True, False]))  # absent samples never enter
    assert torch.equal(obj.queue("text")[1], e2["text"][1]) and int(obj.fifo_ptr) == 2

    with torch.no_grad():  # copies unlike the online towers, so a copy made afresh would not pass
        for p in obj.copies.parameters():
            p.add_(1.0)
    assert obj.queue_ids_text[1].tolist() == [2, 3] and obj.queue_ids_image[0].tolist() == [4, 5]
    state = copy.deepcopy(pre.state_dict())
    fresh = pretrainer(momentum=0.5)
    fresh.load_state_dict(state)  # strict: the lazily made state is held until the first forward
    fresh.eval()
    fresh(batch_of(fresh))
    got = fresh.state_dict()
    assert any(k.startswith("objectives.itc.momentum.towers.image.") for k in state) and set(got) == set(state)
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_queue_entries_of_the_same_inputs_are_not_negatives() -> None:
    pre = pretrainer(queue_size=8)
    obj = pre.objectives["itc"]
    pre.train()
    batch = batch_of(pre)
    pre(batch)
    fingerprints = {m: input_fingerprints(batch.fields[m]) for m in ("image", "text")}
    assert torch.equal(obj.queue_forbidden(fingerprints), torch.eye(3, dtype=torch.bool))
    other = batch_of(pre)  # new images, the same captions: still the same items
    fingerprints["image"] = input_fingerprints(other.fields["image"])
    assert torch.equal(obj.queue_forbidden(fingerprints), torch.eye(3, dtype=torch.bool))
    fingerprints["text"] = input_fingerprints(pre.model.data["text"].prepare(["x", "y", "z"], train=False))
    assert not obj.queue_forbidden(fingerprints).any()


def test_zero3_partitioned_towers_are_refused_in_one_line() -> None:
    pre = pretrainer()
    next(pre.model.parameters()).ds_status = "NOT_AVAILABLE"
    with pytest.raises(ConfigError, match="train.zero_stage <= 2"):
        pre(batch_of(pre))


@pytest.mark.parametrize("kw", [{"momentum": 1.0}, {"alpha": 1.5}, {"queue_size": -1}, {"queue_size": True}])
def test_settings_out_of_range_fail_in_one_line(kw: dict) -> None:
    key = next(iter(kw))
    with pytest.raises(ConfigError, match=f"itc_momentum.{key}"):
        MomentumITC(pairs=[["image", "text"]], **kw)


def losses(run_dir: Path) -> dict[tuple[int, int], float]:
    return {(r["step"], r["micro"]): r["loss"] for r in map(json.loads, open(run_dir / "keys_rank0.jsonl"))}


@pytest.mark.parametrize("stage", [0, 2])
def test_training_with_it_resumes_exactly(stage: int, color_shards: list[str], tmp_path: Path) -> None:
    def config(out: Path, **train_kw: object) -> dict:
        raw = tiny_config(color_shards, out, steps=6, zero_stage=stage, **train_kw)
        raw["objectives"] = {"clip": {"name": "clip", "pairs": [["image", "text"]]},
                             "itc": {**MOMENTUM, "queue_size": 12, "weight": 1.0}}
        return raw

    ref = tmp_path / "ref"
    summary = train(load_config(config(ref)))
    assert summary.steps == 6
    metrics = [json.loads(line) for line in open(ref / "metrics.jsonl")]
    assert any("queue_filled" in json.dumps(r) for r in metrics)
    out = tmp_path / "run"
    with pytest.raises(InjectedFault):
        train(load_config(config(out, crash_at_step=5)))
    train(load_config(config(out)), resume="latest")
    want, got = losses(ref), losses(out)
    assert sorted(want) == sorted(got) and all(got[k] == want[k] for k in want)
