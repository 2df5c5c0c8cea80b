"""Point-cloud modality: decode/normalise/sample/augment, bad input skipped through the loader, batched FPS and
kNN against naive loops, the point transformer's contract, and the demo solids read back from a shard."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from shardkit import write_tar

from mmpt.contracts import DemoConcepts
from mmpt.data.loader import eval_loader
from mmpt.encoders.point_cloud import SOLIDS, BadPointCloud, farthest_point_sample, group_points, knn
from mmpt.registry import encoders, modalities


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def data(**kw):
    return modalities.get("point_cloud")(**{"num_points": 64, "groups": 8, **kw})


def tiny(**kw):
    return encoders.build("point_cloud/point_transformer", **{
        "num_points": 64, "groups": 8, "group_size": 8, "width": 32, "depth": 2, "heads": 2,
        "pointnet_hidden": 16, **kw})


# ---------------------------------------------------------------------------------------------- data side

def test_decode_normalises_to_the_unit_sphere() -> None:
    rng = np.random.default_rng(0)
    cloud = rng.normal(size=(100, 6)) * 5 + 3
    d = data(channels="xyzrgb")
    for member, ext in ((npy(cloud), "npy"), (npz(points=cloud, other=cloud[:2]), "npz"), (npz(x=cloud), "npz")):
        got = d.decode(member, ext)
        assert got.dtype == np.float32 and got.shape == (100, 6)
        np.testing.assert_allclose(got[:, :3].mean(0), 0, atol=1e-5)
        assert np.sqrt((got[:, :3] ** 2).sum(1)).max() == pytest.approx(1, abs=1e-5)
        np.testing.assert_allclose(got[:, 3:], cloud[:, 3:], rtol=1e-6)  # extra channels untouched
    kept = data(normalize="center").decode(npy(cloud[:, :3]), "npy")
    assert np.sqrt((kept ** 2).sum(1)).max() > 5  # 'center' keeps absolute size


def test_sampling_fixed_in_eval_random_in_training() -> None:
    d = data(train_dropout=0.5)
    cloud = d.decode(npy(np.random.default_rng(0).normal(size=(500, 3))), "npy")
    a, b = d.transform(cloud, train=False), d.transform(cloud, train=False)
    assert a.shape == (64, 3) and torch.equal(a, b)
    import random

    random.seed(1)
    t1 = d.transform(cloud, train=True)
    random.seed(1)
    t2 = d.transform(cloud, train=True)
    random.seed(2)
    t3 = d.transform(cloud, train=True)
    assert torch.equal(t1, t2) and not torch.equal(t1, t3)  # seeded by the loader's per-sample reseed
    assert t1.shape == (64, 3)
    # fewer points than num_points (but at least groups): sampled with replacement
    assert d.transform(cloud[:10], train=True).shape == (64, 3) and d.transform(cloud[:10], False).shape == (64, 3)


def test_rotation_about_the_up_axis_keeps_height_and_rotates_normals() -> None:
    import random

    d = data(channels="xyznormal", train_scale=(1, 1), train_jitter=0, train_dropout=0)
    xyz = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    cloud = np.concatenate([xyz, xyz / np.linalg.norm(xyz, axis=1, keepdims=True)], 1)
    cloud = d.decode(npy(cloud), "npy")
    random.seed(0)
    out = d.transform(cloud, train=True).numpy()
    src = {tuple(np.round(p[:3], 4)): p for p in cloud}
    # every output point is an input point rotated about y: same height, same radius in xz, normal follows
    for p in out:
        match = min(src.values(), key=lambda q: abs(q[1] - p[1]) + abs(np.hypot(q[0], q[2]) - np.hypot(p[0], p[2])))
        assert abs(match[1] - p[1]) < 1e-5
        np.testing.assert_allclose(np.dot(p[3:], p[:3]), np.dot(match[3:], match[:3]), atol=1e-4)
    assert not np.allclose(np.sort(out[:, 0]), np.sort(cloud[:, 0]))


def test_bad_input_is_skipped_and_counted_through_the_loader(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    good = [(f"g{i}", {"npy": npy(rng.normal(size=(80, 3)))}) for i in range(4)]
    nan = rng.normal(size=(80, 3))
    nan[3, 1] = np.nan
    inf = rng.normal(size=(80, 3))
    inf[0, 0] = np.inf
    obj = io.BytesIO()
    np.save(obj, np.array([{"x": 1}, None], dtype=object), allow_pickle=True)
    bad = [("nan", {"npy": npy(nan)}), ("inf", {"npy": npy(inf)}),
           ("rank1", {"npy": npy(rng.normal(size=240))}), ("rank3", {"npy": npy(rng.normal(size=(2, 40, 3)))}),
           ("channels", {"npy": npy(rng.normal(size=(80, 4)))}), ("few", {"npy": npy(rng.normal(size=(5, 3)))}),
           ("pickled", {"npy": obj.getvalue()}), ("text", {"npy": npy(np.array(["a", "b"]))}),
           ("garbage", {"npz": b"PK\x03\x04 not a zip"}), ("twoarrays", {"npz": npz(a=nan, b=nan)})]
    shard = write_tar(tmp_path / "pc.tar", good[:2] + bad + good[2:])
    loader = eval_loader([shard], {"point_cloud": data()}, 4, workers=0)
    loader.spec.required = ("point_cloud",)
    batches = list(loader)
    assert [k for b in batches for k in b.keys] == ["g0", "g1", "g2", "g3"]
    assert batches[0].fields["point_cloud"]["points"].shape == (4, 64, 3)
    assert loader.state.total_skips() == {"decode_error_point_cloud": len(bad)}


def test_each_bad_case_raises_in_decode() -> None:
    d = data()
    obj = io.BytesIO()
    np.save(obj, np.array([None], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):  # numpy refuses to unpickle: data is not code
        d.decode(obj.getvalue(), "npy")
    with pytest.raises(BadPointCloud, match="fewer than groups=8"):
        d.decode(npy(np.zeros((7, 3))), "npy")
    with pytest.raises(BadPointCloud, match=r"expected \(N, 3\)"):
        d.decode(npy(np.zeros((20, 3, 1))), "npy")
    with pytest.raises(BadPointCloud, match="NaN"):
        d.decode(npy(np.full((20, 3), np.nan)), "npy")


def test_collate_fills_absent_samples_and_prepare_takes_arrays() -> None:
    d = data()
    present = d.transform(d.decode(npy(np.random.default_rng(0).normal(size=(70, 3))), "npy"), False)
    batch = d.collate([present, None])
    assert batch["points"].shape == (2, 64, 3) and batch["points"][1].abs().sum() == 0
    prepared = d.prepare([np.random.default_rng(1).normal(size=(90, 3)), torch.randn(64, 3)])
    assert prepared["points"].shape == (2, 64, 3)
    with pytest.raises(ValueError, match="expected float"):
        d.fields_from_tensor(torch.zeros(2, 64, 4))


# ---------------------------------------------------------------------------------------------- grouping

def naive_fps(xyz: torch.Tensor, groups: int, start: int) -> list[int]:
    idx, dist = [start], torch.full((xyz.shape[0],), float("inf"))
    for _ in range(groups - 1):
        dist = torch.minimum(dist, ((xyz - xyz[idx[-1]]) ** 2).sum(-1))
        idx.append(int(dist.argmax()))
    return idx


def test_fps_and_knn_match_naive_loops() -> None:
    torch.manual_seed(0)
    xyz = torch.randn(3, 200, 3)
    start = torch.tensor([0, 17, 199])
    got = farthest_point_sample(xyz, 16, start)
    for b in range(3):
        assert got[b].tolist() == naive_fps(xyz[b], 16, int(start[b]))
    centres = xyz[torch.arange(3)[:, None], got]
    nn_idx = knn(xyz, centres, 5, chunk_elems=16 * 200)  # one cloud per chunk: exercises chunking
    for b in range(3):
        for g in range(16):
            d = ((xyz[b] - centres[b, g]) ** 2).sum(-1)
            torch.testing.assert_close(d[nn_idx[b, g]], d.sort().values[:5])
            assert nn_idx[b, g, 0] == got[b, g]  # a centre is its own nearest neighbour


def test_group_points_relative_to_centre_with_extra_channels() -> None:
    torch.manual_seed(0)
    points = torch.randn(2, 100, 6)
    centres, groups = group_points(points, 10, 4)
    assert centres.shape == (2, 10, 3) and groups.shape == (2, 10, 4, 6)
    assert groups[:, :, 0, :3].abs().max() == 0  # the centre itself, at the origin of its group
    assert (groups[..., :3].norm(dim=-1) <= groups[..., -1:, :3].norm(dim=-1) + 1e-6).all()
    # extra channels are gathered, not shifted
    rgb = {tuple(p[3:].tolist()) for p in points[0]}
    assert all(tuple(g[3:].tolist()) in rgb for g in groups[0].reshape(-1, 6))


def test_eval_fps_start_does_not_depend_on_point_order() -> None:
    torch.manual_seed(0)
    xyz = torch.randn(2, 300, 3)
    perm = torch.randperm(300)
    a = xyz[torch.arange(2)[:, None], farthest_point_sample(xyz, 12)]
    b = xyz[:, perm][torch.arange(2)[:, None], farthest_point_sample(xyz[:, perm], 12)]
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------- encoder

def test_encoder_contract_and_targets() -> None:
    torch.manual_seed(0)
    enc = tiny(channels="xyzrgb")
    x = {"points": torch.randn(3, 64, 6)}
    out = enc(x)
    assert out.tokens.shape == (3, 9, 32) and out.pooled.shape == (3, 32) and out.mask is None
    s = enc.stem(x, with_targets=True)
    assert s.prefix == 1 and s.positions.shape == (3, 9) and s.targets.shape == (3, 8, 8 * 3)
    names = dict(enc.named_parameters())
    assert enc.no_weight_decay() <= set(names) and {"cls_token", "cls_pos"} <= enc.no_weight_decay()
    mean = tiny(pool="mean").eval()
    torch.testing.assert_close(mean(x | {"points": x["points"][..., :3]}).pooled,
                               mean(x | {"points": x["points"][..., :3]}).tokens[:, 1:].mean(1))
    with pytest.raises(ValueError, match="expects 6"):
        enc({"points": torch.randn(1, 64, 3)})


def test_shuffled_cloud_gives_the_same_embedding_in_eval() -> None:
    torch.manual_seed(0)
    enc = tiny().eval()
    points = torch.randn(2, 64, 3)
    shuffled = points[:, torch.randperm(64)]
    with torch.no_grad():
        torch.testing.assert_close(enc({"points": shuffled}).pooled, enc({"points": points}).pooled,
                                   rtol=1e-4, atol=1e-5)
        enc.train()
        a = enc({"points": points}).pooled
        torch.manual_seed(2)  # the forward draws no random numbers: a re-forward sees the same groups
        torch.testing.assert_close(enc({"points": points}).pooled, a)
        b = enc({"points": shuffled}).pooled
    assert not torch.allclose(a, b)  # training starts FPS at the first point, random after the data side


def test_grad_checkpointing_same_result() -> None:
    enc = tiny()
    x = {"points": torch.randn(2, 64, 3)}

    def run(ckpt: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        enc.zero_grad()
        enc.set_grad_checkpointing(ckpt)
        loss = enc(x).pooled.square().sum()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in enc.named_parameters()}

    loss_a, grads_a = run(False)
    loss_b, grads_b = run(True)
    torch.testing.assert_close(loss_a, loss_b)
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], msg=n)


def test_tiny_train_step_lowers_a_loss() -> None:
    torch.manual_seed(0)
    enc = tiny()
    x = {"points": torch.randn(4, 64, 3)}
    target = torch.randn(4, 32)
    opt = torch.optim.AdamW(enc.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        loss = (enc(x).pooled - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is not None for p in enc.parameters())


# ---------------------------------------------------------------------------------------------- demo

def test_demo_solids_written_and_read_back(tmp_path: Path) -> None:
    from mmpt.data.writer import ShardWriter

    n = 16
    concepts = DemoConcepts(shape=np.arange(n) % 8, color=np.arange(n) % 10, size=np.arange(n) % 3,
                            position=np.zeros(n, np.int64))
    d = data(num_points=128, channels="xyzrgb", normalize="center")
    members = d.render_demo(concepts, np.random.default_rng(0))
    again = d.render_demo(concepts, np.random.default_rng(0))
    assert all(a == b for a, b in zip(members, again))  # deterministic by seed
    assert all(set(m) == {"npz"} for m in members)
    with ShardWriter(str(tmp_path / "demo-%06d.tar"), max_count=100) as w:
        for i, m in enumerate(members):
            w.write(f"k{i:03d}", {**m, "json": json.dumps({"shape": int(concepts.shape[i])})})
    shards = sorted(str(p) for p in tmp_path.glob("demo-*.tar"))
    batches = list(eval_loader(shards, {"point_cloud": d}, n, workers=0))
    points = batches[0].fields["point_cloud"]["points"]
    assert points.shape == (n, 128, 6) and not batches[0].keys == []
    from mmpt.data.concepts import COLORS, SIZES

    rgb = torch.tensor(list(COLORS.values()), dtype=torch.float32)[torch.as_tensor(concepts.color)] / 255
    torch.testing.assert_close(points[:, :, 3:].mean(1), rgb, atol=0.02, rtol=0)  # colour as rgb
    radius = points[:, :, :3].norm(dim=-1).max(1).values
    sizes = torch.tensor(list(SIZES.values()))[torch.as_tensor(concepts.size)]
    assert (radius / sizes).std() / (radius / sizes).mean() < 0.2  # size as scale, kept by 'center'
    # the same shards read by an xyz-only data side: the demo's named arrays serve any layout
    xyz_only = list(eval_loader(shards, {"point_cloud": data(num_points=128, normalize="center")}, n, workers=0))
    torch.testing.assert_close(xyz_only[0].fields["point_cloud"]["points"], points[..., :3])


def test_npz_named_channels() -> None:
    rng = np.random.default_rng(0)
    xyz, rgb = rng.normal(size=(50, 3)), rng.random((50, 3))
    got = data(channels="xyzrgb").decode(npz(points=xyz, rgb=rgb), "npz")
    np.testing.assert_allclose(got[:, 3:], rgb, rtol=1e-6)
    with pytest.raises(BadPointCloud, match=r"needs \['normal'\]"):
        data(channels="xyzrgbnormal").decode(npz(points=xyz, rgb=rgb), "npz")
    with pytest.raises(BadPointCloud, match="expected numeric"):
        data(channels="xyzrgb").decode(npz(points=xyz, rgb=rgb[:10]), "npz")


def test_demo_solids_are_distinct_shapes() -> None:
    rng = np.random.default_rng(0)
    clouds = [torch.tensor(solid(rng.random((512, 3))), dtype=torch.float32) for solid in SOLIDS]
    for cloud in clouds:
        assert cloud.shape == (512, 3) and cloud.norm(dim=1).max() <= 1.05
    # symmetric Chamfer distance between every pair of solids is far above the within-solid distance
    def chamfer(a: torch.Tensor, b: torch.Tensor) -> float:
        d = torch.cdist(a, b)
        return float(d.min(1).values.mean() + d.min(0).values.mean())

    resample = [torch.tensor(solid(rng.random((512, 3))), dtype=torch.float32) for solid in SOLIDS]
    within = max(chamfer(a, b) for a, b in zip(clouds, resample))
    between = min(chamfer(clouds[i], clouds[j]) for i in range(8) for j in range(i + 1, 8))
    assert between > 1.5 * within, (between, within)


def test_color_drop_grays_whole_training_clouds_only() -> None:
    import random

    from mmpt.registry import ConfigError

    rng = np.random.default_rng(0)
    cloud = np.concatenate([rng.normal(size=(200, 3)), rng.uniform(0, 1, (200, 3))], 1).astype(np.float32)
    d = data(channels="xyzrgb", train_color_drop=0.5)
    cloud = d.decode(npy(cloud), "npy")
    grayed = []
    for seed in range(40):
        random.seed(seed)
        rgb = d.transform(cloud, train=True)[:, 3:].numpy()
        grayed.append(bool(np.all(rgb == 0.5)))
        assert grayed[-1] or not np.any(rgb == 0.5)  # a cloud keeps all its colours or loses all of them
    assert 10 <= sum(grayed) <= 30, sum(grayed)
    assert not np.any(d.transform(cloud, train=False)[:, 3:].numpy() == 0.5)  # eval never drops colour
    assert not np.any(data(channels="xyzrgb").transform(cloud, train=True)[:, 3:].numpy() == 0.5)  # off by default
    with pytest.raises(ConfigError, match="train_color_drop must be in"):
        data(channels="xyzrgb", train_color_drop=1.5)


def test_inflating_npz_is_refused_from_its_headers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 18: a 0.93 MB npz inflated to 0.96 GB (16.7 s, 2.1 GB RSS) and was kept. The member headers
    (zip directory + npy header) state the size; nothing is inflated past them."""
    sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
    from bad_samples import npz_bomb  # the bench's hostile sample, smaller

    bomb = npz_bomb(4_000_000)  # 48 MB inflated, ~50 KB on disk
    d = data()
    d.max_sample_bytes = 16 << 20
    assert len(bomb) < 200_000 and d.decoded_size(bomb, "npz") == 48_000_000
    assert d.decoded_size(npy(np.zeros((100, 3), np.float32)), "npy") == 1200
    shard = write_tar(tmp_path / "bomb.tar", [("bomb", {"npz": bomb}), ("ok", {"npy": npy(np.ones((100, 3)))})])
    loader = eval_loader([shard], {"point_cloud": d}, 4, workers=0)
    loader.spec.required = ("point_cloud",)
    with monkeypatch.context() as m:
        real = np.load
        m.setattr(np, "load", lambda data, **k: real(data, **k) if data.getbuffer().nbytes < 10_000
                  else pytest.fail("decoded a sample its header refuses"))
        assert [k for b in loader for k in b.keys] == ["ok"]
    assert loader.state.total_skips() == {"too_large_point_cloud": 1}
