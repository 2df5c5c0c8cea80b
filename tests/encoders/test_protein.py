"""Protein modality: ESM-2 tokenizer parity, the data side (decode, crop, bad input through the loader),
the rotary ``protein/transformer`` and the demo renderer."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from shardkit import write_tar

from mmpt.contracts import DemoConcepts
from mmpt.data.loader import Loader, StreamSpec
from mmpt.encoders.protein import ProteinTokenizer, apply_rope, render_sequences, rope_angles
from mmpt.registry import ConfigError, encoders, modalities

# ESM's alphabet written out here, not imported, so the test checks the module's table against ESM's order.
ESM = ["<cls>", "<pad>", "<eos>", "<unk>", "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N",
       "F", "Y", "M", "H", "W", "C", "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>"]
SEQS = ["MKTAYIAKQRQISFVKSHFSRQ", "", "ACDEFGHIKLMNPQRSTVWYXBUZO.-", "M" * 40]


def tiny(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return encoders.build("protein/transformer", **{"context_length": 32, "width": 32, "depth": 2, "heads": 2,
                                                     **kw})


def test_tokenizer_follows_esm_ids() -> None:
    tok = ProteinTokenizer(16)
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.mask_id, tok.vocab_size) == (0, 1, 2, 32, 33)
    ids, mask = tok.encode(["LAC", "", "W" * 30])
    assert ids[0].tolist() == [0, 4, 5, 23, 2] + [1] * 11
    assert ids[1, :3].tolist() == [0, 2, 1] and mask.sum(1).tolist() == [5, 2, 16]
    assert ids[2, -1] == tok.eos_id and (ids[2, 1:-1] == ESM.index("W")).all()  # cut keeps eos last
    assert tok.encode(["L?j"])[0][0, 1:4].tolist() == [4, 3, 3]  # outside the alphabet: <unk>
    assert tok.decode(ids[0].tolist()) == "LAC"
    assert tok.word_ids(ids)[0].tolist() == [-1, 0, 1, 2, -1] + [-1] * 11


def test_tokenizer_matches_hf_esm_tokenizer(tmp_path: Path) -> None:
    from transformers import EsmTokenizer

    (tmp_path / "vocab.txt").write_text("\n".join(ESM) + "\n")
    ref = EsmTokenizer(str(tmp_path / "vocab.txt"))
    tok = ProteinTokenizer(32)
    ids, mask = tok.encode(SEQS)
    out = ref(SEQS, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    assert torch.equal(ids, out["input_ids"]) and torch.equal(mask, out["attention_mask"].bool())
    assert (ref.mask_token_id, ref.pad_token_id, ref.cls_token_id, ref.eos_token_id) == (32, 1, 0, 2)


def test_decode_seq_and_fasta_then_crop() -> None:
    data = modalities.get("protein")(context_length=10)  # 8 residues
    assert data.decode(b"mkt ay\niak*\n", "seq") == "MKTAYIAK"
    fasta = b";comment\n>sp|P1|first protein\nMKTA\nYIAK\n>second\nGGGG\n"
    assert data.decode(fasta, "fasta") == data.decode(fasta, "fa") == "MKTAYIAK"
    long = "ACDEFGHIKLMNPQRSTVWY"
    assert data.transform(long, train=False) == long[:8]
    random.seed(0)
    crops = {data.transform(long, train=True) for _ in range(30)}
    assert len(crops) > 3 and all(len(c) == 8 and c in long for c in crops)
    for bad, ext in [(b"MKJT", "seq"), (b"  \n", "seq"), (b"MKT\n", "fasta"), (b">h\n", "fa"), ("MKÄ".encode(), "seq")]:
        with pytest.raises(ValueError):
            data.decode(bad, ext)


def _sample(key: str, ext: str, seq: bytes) -> tuple[str, dict[str, bytes]]:
    return key, {ext: seq, "json": json.dumps({"id": key}).encode()}


def test_bad_sequences_are_skipped_and_counted_by_the_loader(tmp_path: Path) -> None:
    good = [_sample(f"g{i:02d}", "seq", b"MKTAYIAK" * (i + 1)) for i in range(6)]
    bad = [_sample("b0", "seq", b"MKT1AY"), _sample("b1", "seq", b" \n"), _sample("b2", "fasta", b"MKT"),
           _sample("b3", "seq", b""), _sample("b4", "seq", b"MKBZ*")]  # b4: B, Z are ESM letters, * a stop
    shard = write_tar(tmp_path / "p.tar", good[:3] + bad + good[3:])
    spec = StreamSpec(sources=[([shard], 1.0)], modalities={"protein": modalities.get("protein")(context_length=20)},
                      batch_size=4, train=False, workers=0, repeat=False, drop_last=False, required=("protein",))
    loader = Loader(spec)
    batches = list(loader)
    keys = [k for b in batches for k in b.keys]
    assert keys == ["g00", "g01", "g02", "b4", "g03", "g04", "g05"]
    assert loader.state.total_skips() == {"decode_error_protein": 3, "empty_seq": 1}
    fields = batches[0].fields["protein"]
    assert fields["ids"].shape == (4, 20) and fields["mask"].sum(1).tolist() == [10, 18, 20, 6]


def test_encoder_shapes_masks_and_pooling() -> None:
    data = modalities.get("protein")(context_length=32)
    fields = data.prepare(["MKTAYIAK", "gg", "ACDEFGHIKLMNPQRSTVWY"])
    for pool in ("cls", "mean"):
        out = tiny(pool=pool)(fields)
        assert out.tokens.shape == (3, 32, 32) and out.pooled.shape == (3, 32)
        # the mask marks residues only: not cls, eos or padding
        assert out.mask.sum(1).tolist() == [8, 2, 20] and not out.mask[:, 0].any()
    torch.testing.assert_close(out.pooled[1], out.tokens[1, 1:3].mean(0))
    with pytest.raises(ConfigError, match="even"):
        tiny(width=30, heads=2 * 5)


def test_padding_does_not_change_the_embedding() -> None:
    enc = tiny(pool="mean").eval()
    short = modalities.get("protein")(context_length=12).prepare(["MKTAYIAKQR"])
    longer = modalities.get("protein")(context_length=32).prepare(["MKTAYIAKQR"])
    longer["ids"][0, 12:] = 7  # garbage behind the padding mask must not leak in either
    a, b = enc(short), enc(longer)
    torch.testing.assert_close(a.pooled, b.pooled)
    torch.testing.assert_close(a.tokens, b.tokens[:, :12])
    torch.testing.assert_close(tiny(pool="cls")(short).pooled, tiny(pool="cls")(longer).pooled)


def test_rope_scores_depend_on_relative_position_only() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(2, 16)
    cos, sin = rope_angles(torch.arange(40), 16)
    score = [[float(apply_rope(q, cos[m], sin[m]) @ apply_rope(k, cos[n], sin[n])) for n in range(40)]
             for m in range(40)]
    for shift in (1, 7, 20):
        assert score[3][9] == pytest.approx(score[3 + shift][9 + shift], abs=1e-4)
    assert abs(score[3][9] - score[3][4]) > 1e-3  # positions matter at all
    # the encoder sees order: a reversed sequence gives another embedding (no positional table to hide behind)
    enc, data = tiny(pool="mean"), modalities.get("protein")(context_length=32)
    torch.manual_seed(1)
    assert not torch.allclose(enc(data.prepare(["MKTAYIAKQR"])).pooled, enc(data.prepare(["RQKAIYATKM"])).pooled)


def test_grad_checkpointing_gives_same_outputs_and_grads() -> None:
    data = modalities.get("protein")(context_length=32)
    fields = data.prepare(["MKTAYIAK", "ACDEFGHIKLMNPQRSTVWY"])
    results = []
    for ckpt in (False, True):
        enc = tiny(pool="mean")
        enc.set_grad_checkpointing(ckpt)
        out = enc(fields)
        out.pooled.square().sum().backward()
        results.append((out.pooled.detach(), {n: p.grad for n, p in enc.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for n, g in results[0][1].items():
        torch.testing.assert_close(g, results[1][1][n], msg=n)


def test_no_weight_decay_names_exist_and_a_train_step_lowers_the_loss() -> None:
    enc = tiny(pool="mean")
    names = dict(enc.named_parameters())
    assert enc.no_weight_decay() <= set(names)
    data = modalities.get("protein")(context_length=32)
    fields = data.prepare(["MKTAYIAK", "GGGGGGGG", "WCWCWCWC", "ACDEFGHI"])
    target = torch.eye(4, 32)
    opt = torch.optim.AdamW(enc.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = (enc(fields).pooled - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bare_id_tensor_and_bad_raw_input() -> None:
    data = modalities.get("protein")(context_length=16)
    fields = data.prepare(["MKT", "ACDEF"])
    again = data.fields_from_tensor(fields["ids"])
    assert torch.equal(again["mask"], fields["mask"])
    with pytest.raises(ConfigError, match="ids outside"):
        data.fields_from_tensor(torch.full((1, 4), 40))
    with pytest.raises(ConfigError, match="outside the ESM alphabet"):
        data.prepare(["MKT1"])


def concepts(n: int, seed: int = 0) -> DemoConcepts:
    rng = np.random.default_rng(seed)
    return DemoConcepts(shape=rng.integers(0, 8, n), color=rng.integers(0, 10, n), size=rng.integers(0, 3, n),
                        position=rng.integers(0, 5, n))


def test_demo_sequences_follow_the_concepts_and_read_back(tmp_path: Path) -> None:
    from mmpt.data.writer import ShardWriter

    c = concepts(64)
    data = modalities.get("protein")(context_length=128)
    members = data.render_demo(c, np.random.default_rng(1))
    assert members == data.render_demo(c, np.random.default_rng(1))  # deterministic by seed
    seqs, labels = render_sequences(c, np.random.default_rng(1))
    motifs = ["".join(s for s, lab_ in zip(seq, lab) if lab_) for seq, lab in zip(seqs, labels)]
    for i, (seq, lab) in enumerate(zip(seqs, labels)):
        assert len(seq) == len(lab) and 26 <= len(seq) <= 70
        assert set(lab) == {0, 1 + int(c.shape[i])}  # motif residues carry the shape's label
        assert len(motifs[i]) == 10 and not set(seq) - set("LAGVSERTIDKQWCHMYFPN")
    assert np.mean([ch in "WCHMYFPN" for m in motifs for ch in m]) > 0.85  # about 10% of motif residues mutate
    # same shape -> similar motifs, other shape -> different ones; longer sequences for larger sizes
    by_shape = {}
    for i in range(64):
        by_shape.setdefault(int(c.shape[i]), []).append(motifs[i])
    same = [sum(a != b for a, b in zip(m[0], m[1])) for m in by_shape.values() if len(m) > 1]
    firsts = [m[0] for m in by_shape.values()]
    other = [sum(a != b for a, b in zip(x, y)) for i, x in enumerate(firsts) for y in firsts[i + 1:]]
    assert np.mean(same) < 2.5 < np.mean(other)
    # each shape's motif uses three rare residues of its own
    assert len({frozenset(m[0]) for m in by_shape.values()}) == len(by_shape)
    sizes = np.asarray(c.size)
    lengths = np.array([len(s) for s in seqs])
    assert lengths[sizes == 0].max() < lengths[sizes == 2].min()
    # colour shows in the composition: the most common filler residue differs between colours
    colors = np.asarray(c.color)
    top = {int(k): max("LAGVSERTIDKQ", key="".join(seqs[i] for i in np.flatnonzero(colors == k)).count)
           for k in set(colors.tolist())}
    assert len(set(top.values())) >= 0.6 * len(top)
    with ShardWriter(str(tmp_path / "demo-%03d.tar"), max_count=100) as sink:
        for i, m in enumerate(members):
            sink.write(f"s{i:03d}", m)
    shard = sorted(tmp_path.glob("demo-*.tar"))[0]
    with tarfile.open(shard) as tar:
        assert json.load(io.BufferedReader(tar.extractfile("s000.json")))["residue_labels"] == labels[0]
    spec = StreamSpec(sources=[([str(shard)], 1.0)], modalities={"protein": data}, batch_size=64, train=False,
                      workers=0, repeat=False, drop_last=False, required=("protein",))
    batch = next(iter(Loader(spec)))
    assert batch.fields["protein"]["mask"].sum(1).tolist() == [len(s) + 2 for s in seqs]
