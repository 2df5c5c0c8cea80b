"""Hugging Face ``CLIPModel`` folders in and out: features equal HF's within 1e-5 both ways, the round trip is
bit-exact, the exported folder carries a tokenizer that matches OpenCLIP's ids, and a folder with foreign
keys fails naming them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from interopkit import TEXTS, normalized_images

import mmpt
from mmpt.cli import main
from mmpt.registry import ConfigError

ATOL = 1e-5


def tiny_hf_clip(seed: int = 0, act: str = "quick_gelu") -> torch.nn.Module:
    from transformers import CLIPConfig, CLIPModel

    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "hidden_act": act}
    config = CLIPConfig(text_config={**tower, "max_position_embeddings": 16},
                        vision_config={**tower, "image_size": 32, "patch_size": 8}, projection_dim=16)
    torch.manual_seed(seed)
    return CLIPModel(config).eval()


def _features(hf: torch.nn.Module, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return (hf.get_image_features(pixel_values=images).pooler_output,
                hf.get_text_features(input_ids=ids).pooler_output)


def _import_with_parity(hf: torch.nn.Module, tmp_path: Path) -> tuple[Path, torch.Tensor, torch.Tensor, torch.Tensor,
                                                                       torch.Tensor]:
    """Save ``hf``, import it, check mmpt's features against HF's; returns (export, images, ids, HF features)."""
    hf.save_pretrained(tmp_path / "hf")
    export = tmp_path / "mmpt.safetensors"
    assert main(["import", "hf-clip", "--weights", str(tmp_path / "hf"), "--out", str(export)]) == 0
    model, _, _ = mmpt.create_model_and_transforms(str(export))
    images, ids = normalized_images(), mmpt.get_tokenizer(str(export))(TEXTS)
    want_image, want_text = _features(hf, images, ids)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), want_image, atol=ATOL, rtol=0)
        torch.testing.assert_close(model.encode_text(ids), want_text, atol=ATOL, rtol=0)
    assert torch.equal(model.logit_scale.reshape(()), hf.logit_scale)
    return export, images, ids, want_image, want_text


def test_hf_clip_with_exact_gelu_imports_with_parity(tmp_path: Path) -> None:
    _import_with_parity(tiny_hf_clip(seed=1, act="gelu"), tmp_path)


def test_hf_clip_import_parity_and_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from transformers import CLIPModel, CLIPTokenizer

    hf = tiny_hf_clip()
    export, images, ids, want_image, want_text = _import_with_parity(hf, tmp_path)
    assert "mmpt: warning: " in capsys.readouterr().err  # no tokenizer in the folder: OpenCLIP's BPE, said aloud

    # export: a folder CLIPModel.from_pretrained loads, every tensor bit-equal, with a CLIP tokenizer
    assert main(["export", str(export), "--format", "hf-clip", "--out", str(tmp_path / "back")]) == 0
    back = CLIPModel.from_pretrained(tmp_path / "back").eval()
    want = hf.state_dict()
    assert back.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in back.state_dict().items())
    hf_ids = CLIPTokenizer.from_pretrained(tmp_path / "back")(TEXTS, padding="max_length", max_length=16,
                                                               return_tensors="pt")["input_ids"]
    eot = ids.argmax(1)  # HF pads with EOT, OpenCLIP with 0: the same ids up to the first EOT
    assert all(torch.equal(hf_ids[i, : e + 1], ids[i, : e + 1]) for i, e in enumerate(eot.tolist()))
    torch.testing.assert_close(_features(back, images, hf_ids)[1], want_text, atol=ATOL, rtol=0)

    # the same model as an OpenCLIP one (HF -> mmpt -> OpenCLIP): OpenCLIP's own code gives HF's features
    import open_clip

    assert main(["export", str(export), "--format", "openclip", "--out", str(tmp_path / "oc")]) == 0
    oc = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    with torch.no_grad():
        torch.testing.assert_close(oc.encode_image(images), want_image, atol=ATOL, rtol=0)
        torch.testing.assert_close(oc.encode_text(ids), want_text, atol=ATOL, rtol=0)

    # and in again, now with the folder's own tokenizer: the mmpt tensors are bit-identical
    again = tmp_path / "again.safetensors"
    assert main(["import", "hf-clip", "--weights", str(tmp_path / "back"), "--out", str(again)]) == 0
    from safetensors.torch import load_file

    first, second = load_file(str(export)), load_file(str(again))
    assert first.keys() == second.keys() and all(torch.equal(v, second[k]) for k, v in first.items())
    with torch.no_grad():
        torch.testing.assert_close(mmpt.create_model_and_transforms(str(again))[0].encode_text(
            mmpt.get_tokenizer(str(again))(TEXTS)), want_text, atol=ATOL, rtol=0)


def test_hf_folder_with_foreign_keys_names_them(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from mmpt.interop.hf_clip import import_hf_clip

    tiny_hf_clip().save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    state = load_file(str(weights))
    state.pop("text_model.encoder.layers.1.self_attn.q_proj.bias")
    state["vision_model.head.weight"] = torch.zeros(3)
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ConfigError) as err:
        import_hf_clip(tmp_path / "hf", tmp_path / "out.safetensors")
    msg = str(err.value)
    assert "1 unmatched ['vision_model.head.weight']" in msg
    assert "1 missing ['text_model.encoder.layers.1.self_attn.q_proj.bias']" in msg


def test_openclip_vit_exports_to_hf_and_resnet_is_refused(tmp_path: Path) -> None:
    """OpenCLIP -> mmpt -> HF for a ViT (argmax pooling becomes HF's first-EOT pooling); a ResNet image tower
    has no CLIPModel layout and is refused in one message."""
    import open_clip
    from interopkit import openclip_model, save_state
    from transformers import CLIPModel

    from mmpt.interop.hf_clip import export_hf_clip
    from mmpt.interop.openclip import import_openclip

    oc = openclip_model("tiny-vit", seed=4)
    export = import_openclip("tiny-vit", save_state(oc, tmp_path / "oc.safetensors"), tmp_path / "vit.safetensors")
    hf = CLIPModel.from_pretrained(export_hf_clip(export, tmp_path / "hf")).eval()
    images, ids = normalized_images(), open_clip.get_tokenizer("tiny-vit")(TEXTS)
    got_image, got_text = _features(hf, images, ids)
    with torch.no_grad():
        torch.testing.assert_close(got_image, oc.encode_image(images), atol=ATOL, rtol=0)
        torch.testing.assert_close(got_text, oc.encode_text(ids), atol=ATOL, rtol=0)

    rn = import_openclip("tiny-rn", save_state(openclip_model("tiny-rn"), tmp_path / "rn.safetensors"),
                         tmp_path / "rn-mmpt.safetensors")
    with pytest.raises(ConfigError, match="needs a plain ViT image tower"):
        export_hf_clip(rn, tmp_path / "hf-rn")
