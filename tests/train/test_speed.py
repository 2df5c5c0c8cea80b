"""Exactness of each training speed-up: trimmed text padding, rows grouped by length in the text trunk,
fused AdamW, no all-reduce on one rank."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from shardkit import tiny_config

from mmpt.config import load_config
from mmpt.contracts import Batch
from mmpt.data.loader import train_loader
from mmpt.encoders.text import TextData, TextTransformer
from mmpt.nn.layers import Transformer
from mmpt.nn.padding import by_length, length_groups, trim_padding, trimmed_modalities, used_length
from mmpt.pretrainer import build_data_specs, set_seed
from mmpt.training.engine import build_engine, init_distributed
from mmpt.training.loop import plain_step, train

CAPTIONS = ["a red square", "a small green circle on a white background with a thin border", "blue", ""]


def text_batch(spec: TextData, captions: list[str]) -> Batch:
    return Batch(fields={"text": spec.collate(captions)}, present={"text": torch.ones(len(captions), dtype=torch.bool)},
                 keys=[str(i) for i in range(len(captions))])


@pytest.mark.parametrize(("causal", "pool"), [(True, "eot"), (False, "cls"), (False, "mean")])
def test_trimmed_text_batch_gives_the_padded_outputs(causal: bool, pool: str) -> None:
    """Causal+EOT and masked bidirectional+CLS/mean towers: real tokens and pooled vectors of the trimmed
    batch equal the fully padded batch's within 2e-6 (fp32; only matmul blocking differs)."""
    torch.manual_seed(0)
    tower = TextTransformer(context_length=32, width=32, depth=2, heads=2, causal=causal, pool=pool).eval()
    spec = TextData(context_length=32)
    full = text_batch(spec, CAPTIONS)
    cut = trim_padding(full, ("text",))
    longest = int(full.fields["text"]["mask"].sum(1).max())
    assert cut.fields["text"]["ids"].shape == (4, longest) and cut.fields["text"]["mask"].shape == (4, longest)
    assert longest < 32
    with torch.no_grad():
        a, b = tower(full.fields["text"]), tower(cut.fields["text"])
    torch.testing.assert_close(b.pooled, a.pooled, rtol=0, atol=2e-6)
    mask = cut.fields["text"]["mask"]
    torch.testing.assert_close(b.tokens[mask], a.tokens[:, :longest][mask], rtol=0, atol=2e-6)


def test_trim_cuts_every_sequence_field_and_only_flagged_modalities() -> None:
    spec = TextData(context_length=16)
    batch = text_batch(spec, ["a red square", "blue"])
    batch.fields["text"]["word_ids"] = torch.zeros(2, 16, dtype=torch.long)
    batch.fields["text"]["lengths"] = torch.tensor([5, 3])
    batch.fields["other"] = {"mask": torch.zeros(2, 16, dtype=torch.bool), "x": torch.zeros(2, 16)}
    cut = trim_padding(batch, ("text",))
    n = used_length(batch.fields["text"]["mask"])
    assert n == 5 and {k: tuple(v.shape) for k, v in cut.fields["text"].items()} == {
        "ids": (2, 5), "mask": (2, 5), "word_ids": (2, 5), "lengths": (2,)}
    assert cut.fields["other"]["x"].shape == (2, 16)  # not listed: untouched
    assert batch.fields["text"]["ids"].shape == (2, 16)  # the input batch is not modified
    assert used_length(torch.zeros(2, 7, dtype=torch.bool)) == 0
    assert trim_padding(text_batch(spec, ["", ""]), ("text",)).fields["text"]["ids"].shape == (2, 2)


def test_towers_declare_trimming() -> None:
    from mmpt.encoders.open_clip import OpenCLIPTextEncoder

    assert TextTransformer.trims_padding
    assert not getattr(OpenCLIPTextEncoder, "trims_padding", False)  # its causal mask is a full-context buffer


def test_training_feeds_the_text_tower_trimmed_batches(color_shards: list[str], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    widths: list[int] = []
    forward = TextTransformer.forward

    def spy(self: TextTransformer, inputs: dict) -> object:
        widths.append(inputs["ids"].shape[1])
        assert int(inputs["mask"][:, -1].sum()) > 0  # the last column is some caption's EOT
        return forward(self, inputs)

    monkeypatch.setattr(TextTransformer, "forward", spy)
    train(load_config(tiny_config(color_shards, tmp_path / "run", steps=2, log_sample_keys=False)))
    assert widths and max(widths) < 16, widths  # captions "a <colour> square" are 5-6 tokens of 16


def _engine_and_batches(color_shards: list[str], out: Path, steps: int = 4):
    cfg = load_config(tiny_config(color_shards, out, steps=steps))
    cfg.data.workers = 1
    d = init_distributed()
    set_seed(0)
    engine, _ = build_engine(cfg, d, steps)
    loader, _ = train_loader(cfg, build_data_specs(cfg), d.rank, d.world)
    it = iter(loader)
    batches = [trim_padding(next(it), trimmed_modalities(engine.module.model)) for _ in range(steps)]
    return engine, batches


def _params(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def _train_steps(engine, batches: list[Batch]) -> dict[str, torch.Tensor]:
    for b in batches:
        plain_step(engine, b)
    return _params(engine)


def test_fused_adamw_and_skipped_allreduce_match_the_previous_step(color_shards: list[str], tmp_path: Path) -> None:
    """One rank, stage 0: the engine skips DeepSpeed's all-reduce (bitwise the same parameters) and uses
    fused AdamW: after 4 steps (updates of ~3e-3 per weight) within 5e-6 of the per-tensor AdamW, the gap
    being rounding in the update carried through the later steps' gradients (1.1e-6 measured)."""
    new, batches = _engine_and_batches(color_shards, tmp_path / "a")
    assert not new.enable_backward_allreduce
    assert all(g["fused"] for g in new.optimizer.param_groups)
    start = _params(new)
    got = _train_steps(new, batches)

    def rebuilt(fused: bool, allreduce: bool):
        engine, _ = _engine_and_batches(color_shards, tmp_path / f"b{fused}{allreduce}")
        for n, p in engine.module.named_parameters():
            assert torch.equal(p, start[n]), n
        engine.enable_backward_allreduce = allreduce
        for g in engine.optimizer.param_groups:
            g["fused"] = fused
        return _train_steps(engine, batches)

    with_allreduce = rebuilt(fused=True, allreduce=True)
    assert all(torch.equal(got[n], with_allreduce[n]) for n in got)
    previous = rebuilt(fused=False, allreduce=True)
    moved = [n for n in got if not torch.equal(previous[n], start[n])]
    assert len(moved) == len(got)
    for n in got:
        torch.testing.assert_close(got[n], previous[n], rtol=0, atol=5e-6, msg=n)


def test_batch_replace_keeps_other_members() -> None:
    spec = TextData(context_length=16)
    batch = dataclasses.replace(text_batch(spec, ["a"]), meta={"raw": ["a"]})
    assert trim_padding(batch, ("text",)).meta == {"raw": ["a"]}


def test_length_groups_cover_every_row_once() -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 78, (64,), generator=gen).tolist()
    groups = length_groups(lengths, max_groups=4)
    assert 1 < len(groups) <= 4
    assert sorted(r for rows, _ in groups for r in rows) == list(range(64))
    assert all(lengths[r] <= width for rows, width in groups for r in rows)
    assert max(w for _, w in groups) == max(lengths)
    assert sum(len(rows) * w for rows, w in groups) < 64 * max(lengths)
    assert length_groups([7] * 8) == [(list(range(8)), 7)]


@pytest.mark.parametrize("causal", [True, False])
def test_trunk_by_length_matches_one_call(causal: bool) -> None:
    """Outputs on real tokens and input gradients within 2e-6 of one padded call, parameter gradients within
    1e-5 (fp32 rounding only)."""
    torch.manual_seed(0)
    trunk = Transformer(32, 2, 2, causal=causal)
    lengths = torch.tensor([3, 30, 5, 4, 31, 12, 2, 29, 6, 3, 28, 7])
    mask = torch.arange(32)[None] < lengths[:, None]
    x = torch.randn(12, 32, 32, requires_grad=True)
    weight = torch.randn(12, 32, 32) * mask[..., None]  # a loss on real tokens only

    def grads(fn):
        x.grad = None
        trunk.zero_grad()
        y = fn()
        (y * weight).sum().backward()
        return y.detach(), x.grad.clone(), [p.grad.clone() for p in trunk.parameters()]

    y1, gx1, gp1 = grads(lambda: trunk(x, mask))
    y2, gx2, gp2 = grads(lambda: by_length(trunk, x, mask))
    torch.testing.assert_close(y2[mask], y1[mask], rtol=0, atol=2e-6)
    assert torch.equal(y2[:, 31:], x[:, 31:].detach())  # past the longest row: the input, never read
    torch.testing.assert_close(gx2, gx1, rtol=0, atol=2e-6)
    for a, b in zip(gp2, gp1, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # sums over 384 tokens: rounding grows


def test_text_tower_runs_its_trunk_on_length_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    widths: list[tuple[int, int]] = []
    forward = Transformer.forward

    def spy(self: Transformer, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        widths.append(tuple(x.shape[:2]))
        return forward(self, x, mask)

    monkeypatch.setattr(Transformer, "forward", spy)
    tower = TextTransformer(context_length=77, width=32, depth=1, heads=2)
    captions = ["blue"] * 24 + ["a small green circle on a white background, " * 5]
    out = tower(TextData(context_length=77).collate(captions))
    assert out.tokens.shape[:2] == (25, 77) and len(widths) == 2
    assert sorted(widths) == [(1, 47), (24, 3)]  # "blue": start, blue, end; the long caption: 47 tokens


def test_train_compile_compiles_each_tower_in_place(color_shards: list[str], tmp_path: Path) -> None:
    """Opt-in (no speed-up measured on CPU, minutes of compilation); compiled lazily at the first step."""
    plain = load_config(tiny_config(color_shards, tmp_path / "a"))
    assert plain.train.compile is False
    engine, _ = build_engine(load_config(tiny_config(color_shards, tmp_path / "b", compile=True)), init_distributed(), 2)
    towers = engine.module.model.encoders.values()
    assert all(t._compiled_call_impl is not None for t in towers)
    assert not any("_orig_mod" in k for k in engine.module.state_dict())  # checkpoints and exports unchanged
