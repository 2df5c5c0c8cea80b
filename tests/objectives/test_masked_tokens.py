"""masked_tokens (MAE, Audio-MAE, Point-MAE) and the FLIP token drop: Chamfer distance against a brute-force
loop, visible-token selection, realised mask ratio, the loss against a naive per-sample loop, one-line errors.
The 2-rank ZeRO-3 step is in tests/train/_train_ranks.py (``masked_tokens_runs``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from mmpt.contracts import Batch, StemOutput
from mmpt.encoders.point_cloud import chamfer_distance
from mmpt.model import MultimodalModel
from mmpt.nn.layers import Transformer
from mmpt.nn.token_encoder import PrefixTokenEncoder, keep_count, random_keep
from mmpt.registry import ConfigError, encoders, objectives

B = 3


def tiny_towers() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {"image": encoders.build("image/vit", image_size=32, patch_size=8, width=32, depth=1, heads=2),
            "audio": encoders.build("audio/ast", **encoders.get("audio/ast").tiny_configs[0]),
            "point_cloud": encoders.build("point_cloud/point_transformer",
                                          **encoders.get("point_cloud/point_transformer").tiny_configs[0])}


def tiny_batch() -> Batch:
    g = torch.Generator().manual_seed(1)
    fields = {"image": {"pixels": torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8, generator=g)},
              # the last clip is half padding: its silent patches must count in no loss
              "audio": {"wave": torch.randn(B, 4000, generator=g) * 0.1, "lengths": torch.tensor([4000, 4000, 2000])},
              "point_cloud": {"points": torch.rand(B, 64, 3, generator=g) * 2 - 1}}
    return Batch(fields=fields, present={m: torch.ones(B, dtype=torch.bool) for m in fields}, keys=["a", "b", "c"])


TARGET_DIM = {"image": 8 * 8 * 3, "audio": 8 * 8, "point_cloud": 8 * 3}


def objective(modality: str, **kw) -> nn.Module:
    return objectives.build("masked_tokens", modality=modality, encoder_width=32, target_dim=TARGET_DIM[modality],
                            decoder_width=16, decoder_depth=1, decoder_heads=2, **kw)


# ------------------------------------------------------------------------------------------ distances

def test_chamfer_distance_matches_a_brute_force_loop() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 5, 3, generator=g), torch.randn(2, 3, 7, 3, generator=g)
    got = chamfer_distance(a, b)
    for i in range(2):
        for j in range(3):
            x, y = a[i, j].tolist(), b[i, j].tolist()
            sq = [[sum((p - q) ** 2 for p, q in zip(u, v)) for v in y] for u in x]
            want = sum(min(row) for row in sq) / len(x) + sum(min(col) for col in zip(*sq)) / len(y)
            assert got[i, j].item() == pytest.approx(want, rel=1e-5)
    assert chamfer_distance(a, a).abs().max() == 0  # a set against itself, in any order
    assert torch.allclose(chamfer_distance(a, a.flip(-2)), torch.zeros(2, 3))


def test_image_target_is_the_per_patch_normalised_patch() -> None:
    tower = tiny_towers()["image"]
    t = torch.randn(2, 4, 192) * 5 + 3
    got = tower.reconstruction_target(t)
    for i in range(2):
        for j in range(4):
            patch = t[i, j]
            want = (patch - patch.mean()) / math.sqrt(patch.var().item() + 1e-6)
            torch.testing.assert_close(got[i, j], want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- masking

def test_random_keep_realised_ratio_and_uniformity() -> None:
    torch.manual_seed(0)
    n, draws = 36, 4000
    for ratio in (0.75, 0.6, 0.4):
        k = keep_count(n, ratio)
        assert k == round(n * (1 - ratio))
        keep = random_keep(draws, n, k)
        assert keep.shape == (draws, k)
        assert (keep.diff(dim=1) > 0).all(), "indices unique and ascending in each row"
        dropped = 1 - torch.zeros(draws, n).scatter(1, keep, 1.0)
        assert dropped.sum(1).eq(n - k).all()
        freq = dropped.mean(0)  # every position dropped with probability (n - k) / n
        sd = math.sqrt(ratio * (1 - ratio) / draws)
        assert (freq - (n - k) / n).abs().max() < 5 * sd, freq
    assert keep_count(4, 0.99) == 1


def test_mask_ratio_defaults_come_from_the_encoder() -> None:
    towers = tiny_towers()
    model = MultimodalModel(towers, 16)
    batch = tiny_batch()
    for modality, want in (("image", 0.75), ("audio", 0.75), ("point_cloud", 0.6)):
        out = objective(modality)({}, batch, model)
        n = towers[modality].num_patches(batch.fields[modality])
        assert out.metrics["mask_ratio"].item() == pytest.approx(1 - keep_count(n, want) / n)
    out = objective("image", mask_ratio=0.5)({}, batch, model)
    assert out.metrics["mask_ratio"].item() == 0.5


class IdentityStem(PrefixTokenEncoder):
    """Patch tokens equal their targets, an identity trunk: what comes out at a slot shows which patch it was."""

    modality = "image"

    def __init__(self, patches: int = 10, dim: int = 6):
        super().__init__()
        self.width, self.pool, self.patches = dim, "cls", patches
        self.norm_pre, self.trunk, self.norm = nn.Identity(), Transformer(dim, 0, 1), nn.Identity()

    def stem(self, inputs: dict[str, Tensor], with_targets: bool = False) -> StemOutput:
        x = inputs["x"]
        b = x.shape[0]
        tokens = torch.cat([torch.zeros(b, 1, self.width), x], 1)
        coords = (torch.arange(self.patches, dtype=torch.float32)[:, None] / self.patches).expand(b, -1, 1)
        return StemOutput(tokens=tokens, positions=torch.arange(1 + self.patches).expand(b, -1),
                          targets=x if with_targets else None, prefix=1, coords=coords)

    def num_patches(self, inputs: dict[str, Tensor]) -> int:
        return self.patches


def test_visible_tokens_keep_their_positions_with_an_identity_decoder() -> None:
    """With identity towers, every visible patch is reconstructed exactly at its own slot and every dropped
    one gets the mask token, so the loss is the distance of the mask token to the dropped targets."""
    tower = IdentityStem()
    obj = objectives.build("masked_tokens", modality="image", encoder_width=6, target_dim=6, mask_ratio=0.6,
                           decoder_width=6, decoder_depth=0, decoder_heads=1)
    dec = obj.decoder
    with torch.no_grad():
        for lin in (dec.embed, dec.pred):
            lin.weight.copy_(torch.eye(6))
            lin.bias.zero_()
        dec.pos.weight.zero_()
        dec.pos.bias.zero_()
        dec.mask_token.fill_(7.0)
    dec.norm = nn.Identity()
    x = torch.randn(4, 10, 6)
    keep = random_keep(4, 10, 4)
    out = tower({"x": x, "keep": keep})
    torch.testing.assert_close(out.extras["targets"], x)
    pred = dec(out.tokens, keep, out.extras["coords"], 1)
    kept = torch.zeros(4, 10, dtype=torch.bool).scatter(1, keep, True)
    torch.testing.assert_close(pred[kept], x[kept], rtol=0, atol=0)
    assert (pred[~kept] == 7.0).all()
    model = MultimodalModel({"image": tower}, 6)
    batch = Batch(fields={"image": {"x": x}}, present={"image": torch.ones(4, dtype=torch.bool)}, keys=list("abcd"))
    torch.manual_seed(3)
    loss = obj({}, batch, model).loss
    torch.manual_seed(3)
    keep = random_keep(4, 10, 4)
    dropped = torch.ones(4, 10, dtype=torch.bool).scatter(1, keep, False)
    assert loss.item() == pytest.approx((x[dropped] - 7.0).square().mean().item(), rel=1e-6)


def test_real_vit_visible_tokens_are_the_full_stems_tokens_at_keep() -> None:
    """A ViT with a 0-block trunk (per-token norms only): the masked forward's patch tokens equal the full
    forward's at the kept indices, the CLS token first; targets are the patchified normalised pixels."""
    torch.manual_seed(0)
    vit = encoders.build("image/vit", image_size=32, patch_size=8, width=32, depth=0, heads=2).eval()
    fields = tiny_batch().fields["image"]
    keep = random_keep(B, 16, 5)
    with torch.no_grad():
        full, part = vit(fields), vit({**fields, "keep": keep})
    want = torch.cat([full.tokens[:, :1], full.tokens[:, 1:].gather(1, keep[..., None].expand(-1, -1, 32))], 1)
    torch.testing.assert_close(part.tokens, want, rtol=0, atol=0)
    pixels = vit.norm_in(fields["pixels"], torch.float32)
    first_patch = pixels[:, :, :8, 8:16].permute(0, 2, 3, 1).reshape(B, -1)  # row 0, column 1
    torch.testing.assert_close(part.extras["targets"][:, 1], first_patch)
    torch.testing.assert_close(part.extras["coords"][0, 1], torch.tensor([0.125, 0.375]))


# ------------------------------------------------------------------------------------------------- loss

def naive_distance(modality: str, tower: nn.Module, pred: Tensor, target: Tensor) -> float:
    """One patch's distance written out: norm-pix MSE, plain MSE, or a brute-force Chamfer."""
    if modality == "image":
        t = (target - target.mean()) / (target.var() + 1e-6).sqrt()
        return float((pred - t).square().mean())
    if modality == "audio":
        return float((pred - target).square().mean())
    a, b = pred.view(-1, 3), target.view(-1, 3)
    d = torch.stack([torch.stack([(p - q).square().sum() for q in b]) for p in a])
    return float(d.min(1).values.mean() + d.min(0).values.mean())


@pytest.mark.parametrize("modality", ["image", "audio", "point_cloud"])
def test_loss_equals_a_naive_per_sample_loop(modality: str) -> None:
    towers = tiny_towers()
    model = MultimodalModel(towers, 16).eval()
    obj = objective(modality).eval()
    batch = tiny_batch()
    fields = batch.fields[modality]
    torch.manual_seed(5)
    with torch.no_grad():
        got = obj({}, batch, model)
    tower = towers[modality]
    n = tower.num_patches(fields)
    torch.manual_seed(5)
    keep = random_keep(B, n, keep_count(n, tower.mask_ratio_default))
    total, count, baseline_targets = 0.0, 0, []
    with torch.no_grad():
        for i in range(B):  # one sample at a time through tower and decoder
            one = {k: v[i:i + 1] for k, v in fields.items()}
            out = tower({**one, "keep": keep[i:i + 1]})
            pred = obj.decoder(out.tokens, keep[i:i + 1], out.extras["coords"], 1, out.extras["patch_mask"])[0]
            real = out.extras["patch_mask"][0] if out.extras["patch_mask"] is not None else torch.ones(n, dtype=torch.bool)
            for j in range(n):
                if j not in keep[i].tolist() and real[j]:
                    total += naive_distance(modality, tower, pred[j], out.extras["targets"][0, j])
                    count += 1
                    baseline_targets.append(tower.reconstruction_target(out.extras["targets"][0, j][None])[0])
    assert count > 0
    assert got.loss.item() == pytest.approx(total / count, rel=1e-4)
    if modality != "image":  # (image targets are normalised per patch, so naive_distance would do it twice)
        mean = torch.stack(baseline_targets).mean(0)
        want = sum(naive_distance(modality, tower, mean, t) for t in baseline_targets) / count
        assert got.metrics["mean_baseline"].item() == pytest.approx(want, rel=1e-4)
    if modality == "audio":  # the half-padded clip's silent patches never counted
        assert count < B * (n - keep.shape[1])


def test_loss_trains_the_tower_and_decoder_and_skips_absent_samples() -> None:
    towers = tiny_towers()
    model = MultimodalModel(towers, 16)
    obj = objective("image")
    batch = tiny_batch()
    batch.present["image"] = torch.tensor([True, False, True])
    torch.manual_seed(0)
    loss = obj({}, batch, model).loss
    loss.backward()
    assert towers["image"].patch_embed.weight.grad.abs().sum() > 0 and towers["image"].pos_embed.grad is not None
    assert obj.decoder.mask_token.grad.abs().sum() > 0
    # the absent sample's row gets no gradient through its pixels' targets: changing its pixels changes nothing
    other = tiny_batch()
    other.present["image"] = batch.present["image"]
    other.fields["image"]["pixels"][1] = 0
    torch.manual_seed(0)
    assert obj({}, other, model).loss.item() == pytest.approx(loss.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------- errors

def test_size_mismatch_and_wrong_tower_are_one_line_errors() -> None:
    model = MultimodalModel(tiny_towers(), 16)
    bad = objectives.build("masked_tokens", modality="image", encoder_width=32, target_dim=100, decoder_width=16,
                           decoder_depth=1, decoder_heads=2)
    with pytest.raises(ConfigError, match=r"target_dim: 100, but the image tower gives 192; set target_dim: 192"):
        bad({}, tiny_batch(), model)
    text = encoders.build("text/transformer", context_length=8, width=32, depth=1, heads=2)
    with pytest.raises(ConfigError, match="stem/trunk split") as exc:
        objective("image")({}, tiny_batch(), MultimodalModel({"image": text}, 16))
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="mask_ratio"):
        objective("image", mask_ratio=1.0)
    with pytest.raises(ConfigError, match="train_token_drop"):
        encoders.build("image/vit", image_size=32, patch_size=8, width=32, depth=1, heads=2, train_token_drop=1.0)


# ------------------------------------------------------------------------------------------------ FLIP

@pytest.mark.parametrize("modality", ["image", "audio", "point_cloud"])
def test_flip_token_drop_in_training_forwards_only(modality: str) -> None:
    cfg = {"image": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2}}.get(modality)
    name = {"image": "image/vit", "audio": "audio/ast", "point_cloud": "point_cloud/point_transformer"}[modality]
    cfg = cfg or encoders.get(name).tiny_configs[0]
    torch.manual_seed(0)
    tower = encoders.build(name, **cfg, train_token_drop=0.5)
    fields = tiny_batch().fields[modality]
    n = tower.num_patches(fields)
    tower.train()
    a, b = tower(fields), tower(fields)
    assert a.tokens.shape[1] == 1 + keep_count(n, 0.5) and not torch.equal(a.pooled, b.pooled)
    assert not a.extras, "a FLIP forward is a normal forward: no reconstruction extras"
    a.pooled.sum().backward()
    tower.eval()
    with torch.no_grad():
        full = tower(fields)
    assert full.tokens.shape[1] == 1 + n
    plain = encoders.build(name, **cfg).eval()
    plain.load_state_dict(tower.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(fields).pooled, full.pooled, rtol=0, atol=0)
