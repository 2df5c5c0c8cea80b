"""mmpt's own towers out to OpenCLIP: a trained clip-tiny (image/timm half-width ResNet + text/transformer)
exports to OpenCLIP's local-dir: folder, ``open_clip.create_model_and_transforms`` loads it unchanged and gives
the same embeddings on real demo images and captions (max abs diff ~1e-6), ``open_clip.get_tokenizer`` the same
ids, and its preprocessing the same pixels on square images; towers OpenCLIP cannot express are refused in one
line naming the format, what is missing and the alternative."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from clipbenchkit import RECIPE, image_member
from shardkit import read_shards

import mmpt
from mmpt.cli import main

TEXTS = ["a red circle on a blue background", "A Small GREEN square, top-left!", "a triangle",
         "a large yellow star in the bottom right corner of a black background " * 3, ""]


def _demo_images(demo: Any, n: int) -> list[Any]:
    from PIL import Image

    return [Image.open(io.BytesIO(m[image_member(m)])).convert("RGB") for _, m in read_shards(demo.eval_shards)[:n]]


def test_clip_tiny_loads_in_openclip_with_the_same_embeddings(clip_tiny: Any, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    import open_clip

    out = tmp_path / "openclip"
    assert main(["export", str(clip_tiny.run), "--format", "openclip", "--out", str(out)]) == 0
    assert f"open_clip.create_model_and_transforms('local-dir:{out}')" in capsys.readouterr().out
    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    oc.eval()
    model, transforms, tokenizer = mmpt.load(clip_tiny.export)
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["preprocess_cfg"] == {"size": 48, "mode": "RGB", "mean": list(mmpt.encoders.image.OPENAI_MEAN),
                                        "std": list(mmpt.encoders.image.OPENAI_STD), "interpolation": "bicubic",
                                        "resize_mode": "shortest", "fill_color": 0}

    # the tokenizer OpenCLIP picks for the folder gives mmpt's ids (cleaning, truncation keeping EOT, padding)
    captions = [json.loads(m["json"])["captions"][0] for _, m in read_shards(clip_tiny.demo.eval_shards)[:16]]
    ids, mask = tokenizer.encode(TEXTS + captions)
    assert torch.equal(open_clip.get_tokenizer(f"local-dir:{out}")(TEXTS + captions), ids)

    # the same towers: demo images (mmpt's eval pixels, normalised as OpenCLIP expects) and captions
    pixels = transforms["image"].prepare(_demo_images(clip_tiny.demo, 32), train=False)["pixels"]
    mean, std = (torch.tensor(preprocess.transforms[-1].mean).view(1, 3, 1, 1),
                 torch.tensor(preprocess.transforms[-1].std).view(1, 3, 1, 1))
    with torch.no_grad():
        image_diff = (model.model.encode("image", {"pixels": pixels})
                      - oc.encode_image((pixels.float() / 255 - mean) / std, normalize=True)).abs().max()
        text_diff = (model.model.encode("text", {"ids": ids, "mask": mask})
                     - oc.encode_text(ids, normalize=True)).abs().max()
    assert float(image_diff) < 1e-5 and float(text_diff) < 1e-5, (image_diff, text_diff)
    assert torch.equal(oc.logit_scale.reshape(1), model.objectives["clip"].logit_scale.reshape(1))


def test_openclip_preprocessing_matches_mmpt(clip_tiny: Any, tmp_path: Path) -> None:
    """OpenCLIP's transform from the exported config gives mmpt's eval pixels on square images (the demo's 64 px,
    resized to 48): Pillow's bicubic and torch's antialiased bicubic differ by at most 2 grey levels (measured:
    max 2, mean < 0.01); non-square ones differ by the crop's sub-pixel placement (OpenCLIP
    resizes then crops, mmpt crops then resizes), which leaves the embeddings nearly unchanged."""
    import open_clip
    from PIL import Image

    out = tmp_path / "openclip"
    main(["export", str(clip_tiny.export), "--format", "openclip", "--out", str(out)])
    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    model, transforms, _ = mmpt.load(clip_tiny.export)
    data = transforms["image"]
    norm = preprocess.transforms[-1]
    mean, std = torch.tensor(norm.mean).view(3, 1, 1), torch.tensor(norm.std).view(3, 1, 1)
    images = _demo_images(clip_tiny.demo, 16)
    diffs = torch.stack([((preprocess(image) * std + mean) * 255 - data.transform(data.coerce(image), False)).abs()
                         for image in images])
    assert float(diffs.max()) <= 2 + 1e-3 and float(diffs.mean()) < 0.05
    wide = [image.resize((97, 61), Image.BICUBIC) for image in images]
    with torch.no_grad():
        theirs = oc.eval().encode_image(torch.stack([preprocess(image) for image in wide]), normalize=True)
        ours = model.model.encode("image", data.prepare(wide, train=False))
    assert float(F.cosine_similarity(theirs, ours).min()) > 0.99


def _native(tmp_path: Path, edit: dict[str, Any]) -> Path:
    """An mmpt export (untrained) of the clip-tiny recipe with ``edit`` in its model section (an encoder with a
    name replaces the recipe's, other keys are merged)."""
    from mmpt.commands.export import write_export
    from mmpt.config import load_config, load_yaml
    from mmpt.pretrainer import build_pretrainer

    raw = load_yaml(RECIPE)
    raw["eval"] = []
    for key, value in edit.items():
        if key == "head":
            raw["model"]["head"] = value
        else:
            old = raw["model"]["encoders"][key]
            raw["model"]["encoders"][key] = value if "name" in value else {**old, **value}
    cfg = load_config(raw)
    return write_export(build_pretrainer(cfg).state_dict(), cfg, tmp_path / "model.safetensors")


@pytest.mark.parametrize(("edit", "missing"), [
    ({"image": {"name": "image/vit", "image_size": 48, "patch_size": 8, "width": 32, "depth": 1, "heads": 2, "stem": "conv"}},
     "OpenCLIP has no equivalent of the image tower image/vit"),
    ({"text": {"pool": "mean"}}, "OpenCLIP pools text by EOT (argmax) or the first token; this text tower pools 'mean'"),
    ({"head": "mlp"}, "one bias-free linear map (model.head: linear); this model's image head is an MLP"),
])
def test_unmappable_towers_are_refused_in_one_line(edit: dict[str, Any], missing: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    export = _native(tmp_path, edit)
    assert main(["export", str(export), "--format", "openclip", "--out", str(tmp_path / "oc")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mmpt: error: OpenCLIP export (--format openclip): ")
    assert missing in err and "--format folder" in err
    assert not (tmp_path / "oc" / "open_clip_config.json").exists()


def test_clip_tiny_file_and_hf_clip_refusals_name_their_format(clip_tiny: Any, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    # one file cannot carry the config of towers OpenCLIP has no name for: the folder is the way
    assert main(["export", str(clip_tiny.export), "--format", "openclip", "--out", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err
    assert "OpenCLIP export (--format openclip): --out" in err and "give a folder" in err
    # Hugging Face's CLIPModel has no ResNet image tower: the refusal names hf-clip and the way out
    assert main(["export", str(clip_tiny.export), "--format", "hf-clip", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmpt: error: Hugging Face CLIP export (--format hf-clip) needs towers")
    assert "--format openclip" in err and err.count("\n") == 1
