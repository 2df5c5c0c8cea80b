"""Image encoders and data side: SDPA attention vs torch's MultiheadAttention, ViT contract,
uint8 normalisation on the batch, timm trunk, decode/transform."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from torch import nn

from mmpt.encoders.image import OPENAI_MEAN, OPENAI_STD, DecompressionBomb
from mmpt.nn.layers import Attention
from mmpt.registry import encoders, modalities


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_torch_multihead(causal: bool) -> None:
    torch.manual_seed(0)
    attn = Attention(32, 4, causal=causal)
    ref = nn.MultiheadAttention(32, 4, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(attn.qkv.weight)
        ref.in_proj_bias.copy_(attn.qkv.bias)
        ref.out_proj.weight.copy_(attn.proj.weight)
        ref.out_proj.bias.copy_(attn.proj.bias)
    x = torch.randn(3, 7, 32)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 5:] = False
    causal_mask = torch.triu(torch.ones(7, 7, dtype=torch.bool), 1) if causal else None
    want, _ = ref(x, x, x, key_padding_mask=None if causal else ~mask, attn_mask=causal_mask, need_weights=False)
    got = attn(x, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def tiny_vit(**kw) -> nn.Module:
    return encoders.build("image/vit", **{"image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "heads": 2, **kw})


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_vit_contract(stem: str) -> None:
    torch.manual_seed(0)
    vit = tiny_vit(stem=stem)
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    out = vit({"pixels": pixels})
    assert out.tokens.shape == (2, 17, 32) and out.pooled.shape == (2, 32) and out.mask is None
    torch.testing.assert_close(out.pooled, out.tokens[:, 0])
    s = vit.stem({"pixels": pixels}, with_targets=True)
    assert s.prefix == 1 and s.positions.shape == (2, 17) and s.targets.shape == (2, 16, 8 * 8 * 3)
    # uint8 normalisation on the batch equals the usual float pipeline
    mean, std = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    manual = (pixels.float() / 255 - mean) / std
    torch.testing.assert_close(vit.norm_in(pixels, torch.float32), manual, rtol=1e-5, atol=1e-5)
    # patchify is the inverse of the patch layout: first patch = top-left 8x8 block
    torch.testing.assert_close(s.targets[0, 0].view(8, 8, 3).permute(2, 0, 1), manual[0, :, :8, :8])
    assert {"cls_token", "pos_embed"} <= vit.no_weight_decay()


def test_grad_checkpointing_same_result() -> None:
    torch.manual_seed(0)
    vit = tiny_vit()
    x = {"pixels": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)}
    a = vit(x).pooled.sum()
    a.backward()
    g = vit.pos_embed.grad.clone()
    vit.zero_grad()
    vit.set_grad_checkpointing(True)
    b = vit(x).pooled.sum()
    b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(vit.pos_embed.grad, g)


def test_timm_trunk() -> None:
    enc = encoders.build("image/timm", model_name="vit_tiny_patch16_224", image_size=32)
    out = enc({"pixels": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)})
    assert enc.width == 192 and out.pooled.shape == (2, 192) and out.tokens.shape == (2, 5, 192)
    assert any(n.startswith("trunk.") for n in enc.no_weight_decay())


def _jpeg(w: int, h: int) -> bytes:
    img = Image.new("RGB", (w, h), (10, 200, 30))
    img.paste((250, 0, 0), (0, 0, w // 2, h))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_image_data_decode_transform_collate() -> None:
    data = modalities.get("image")(image_size=32, max_image_pixels=10_000)
    img = data.decode(_jpeg(80, 40), "jpg")
    ev = data.transform(img, train=False)
    assert ev.dtype == torch.uint8 and ev.shape == (3, 32, 32)
    # centre crop of a 2:1 image keeps both halves equally: left red, right green
    assert ev[0, 16, 2] > 200 and ev[1, 16, 29] > 150
    tr = data.transform(img, train=True)
    assert tr.shape == (3, 32, 32)
    batch = data.collate([ev, None, tr])
    assert batch["pixels"].shape == (3, 3, 32, 32) and batch["pixels"][1].sum() == 0
    with pytest.raises(DecompressionBomb, match="max_image_pixels=10000"):
        data.decode(_jpeg(200, 100), "jpg")
    assert data.prepare([Image.new("RGB", (50, 60))])["pixels"].shape == (1, 3, 32, 32)


def test_timm_tower_loads_a_local_checkpoint(tmp_path) -> None:
    """`checkpoint_path` loads a weights file saved from the same timm architecture (no hub access)."""
    import timm
    from safetensors.torch import save_file

    kwargs = {"model_name": "vit_tiny_patch16_224", "image_size": 32, "model_kwargs": {"depth": 2}}
    torch.manual_seed(123)
    source = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, depth=2)
    path = tmp_path / "vit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    torch.manual_seed(0)
    fresh = encoders.build("image/timm", path="image", **kwargs)
    loaded = encoders.build("image/timm", path="image", checkpoint_path=str(path), **kwargs)
    for name, value in source.state_dict().items():
        assert torch.equal(loaded.trunk.state_dict()[name], value), name
    assert not torch.equal(fresh.trunk.pos_embed, loaded.trunk.pos_embed)
