"""OpenCLIP checkpoints in and out: embeddings equal OpenCLIP's within 1e-5 both ways for a ViT, a ResNet and a
ConvNeXt (random-init models saved by the test), round trips are bit-exact, and a mismatched checkpoint fails
with one message naming the unmatched and missing keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from interopkit import TEXTS, normalized_images, openclip_model, register_tiny, save_state

import mmpt
from mmpt.cli import main
from mmpt.registry import ConfigError

ATOL = 1e-5


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_parity(oc: torch.nn.Module, export: Path, name: str) -> None:
    """mmpt's OpenCLIP-shaped model encodes OpenCLIP's own inputs (normalised images, OpenCLIP's tokenizer's
    ids) as the OpenCLIP model does."""
    import open_clip

    model, _, _ = mmpt.create_model_and_transforms(str(export))
    images, ids = normalized_images(), open_clip.get_tokenizer(name)(TEXTS)
    assert torch.equal(mmpt.get_tokenizer(str(export))(TEXTS), ids)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), oc.encode_image(images), atol=ATOL, rtol=0)
        torch.testing.assert_close(model.encode_text(ids), oc.encode_text(ids), atol=ATOL, rtol=0)
    assert torch.equal(model.logit_scale.reshape(()), oc.logit_scale.reshape(()))
    assert (model.logit_bias is None) == (oc.logit_bias is None)
    if oc.logit_bias is not None:
        assert torch.equal(model.logit_bias.reshape(()), oc.logit_bias.reshape(()))


@pytest.mark.parametrize(("name", "suffix"), [("tiny-vit", ".safetensors"), ("tiny-rn", ".pt"),
                                              ("tiny-convnext", ".safetensors"), ("tiny-sigmoid", ".safetensors")])
def test_openclip_import_parity_and_round_trip(name: str, suffix: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    import open_clip

    oc = openclip_model(name)
    weights = save_state(oc, tmp_path / f"openclip{suffix}")  # .pt: a training checkpoint, read weights-only
    export = tmp_path / "mmpt.safetensors"
    assert main(["import", "openclip", "--model", name, "--weights", str(weights), "--out", str(export)]) == 0
    _assert_parity(oc, export, name)

    # back to OpenCLIP: create_model(NAME, pretrained=FILE) loads it strictly, every tensor bit-equal
    back = tmp_path / "back.safetensors"
    assert main(["export", str(export), "--format", "openclip", "--out", str(back)]) == 0
    assert f"open_clip.create_model('{name}'" in capsys.readouterr().out
    reloaded = open_clip.create_model(name, pretrained=str(back)).eval()
    want = oc.state_dict()
    assert reloaded.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in reloaded.state_dict().items())

    # and in again: the mmpt file is bit-identical
    again = tmp_path / "again.safetensors"
    assert main(["import", "openclip", "--model", name, "--weights", str(back), "--out", str(again)]) == 0
    first, second = _tensors(export), _tensors(again)
    assert first.keys() == second.keys() and all(torch.equal(v, second[k]) for k, v in first.items())


def test_mmpt_model_exports_to_openclip_with_parity(tmp_path: Path) -> None:
    """A model that starts in mmpt (its own init, one step of changed weights) -> OpenCLIP -> mmpt."""
    import open_clip

    from mmpt.commands.export import write_export
    from mmpt.config import load_config
    from mmpt.encoders.image import OPENAI_MEAN
    from mmpt.encoders.open_clip import TINY_VIT
    from mmpt.interop.openclip import mmpt_recipe
    from mmpt.pretrainer import build_pretrainer

    register_tiny()
    cfg = load_config(mmpt_recipe("tiny-vit", TINY_VIT))
    torch.manual_seed(3)
    pretrainer = build_pretrainer(cfg)
    with torch.no_grad():
        for p in pretrainer.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # not OpenCLIP's init: every tensor must really travel
    export = write_export(pretrainer.state_dict(), cfg, tmp_path / "native.safetensors")
    back = tmp_path / "openclip.pt"
    assert main(["export", str(export), "--format", "openclip", "--out", str(back)]) == 0
    oc = open_clip.create_model("tiny-vit", pretrained=str(back)).eval()
    _assert_parity(oc, export, "tiny-vit")

    again = tmp_path / "again.safetensors"
    assert main(["import", "openclip", "--model", "tiny-vit", "--weights", str(back), "--out", str(again)]) == 0
    first, second = _tensors(export), _tensors(again)
    assert first.keys() == second.keys() and all(torch.equal(v, second[k]) for k, v in first.items())

    # a folder in OpenCLIP's local-dir: format carries the config (no registration) and the preprocessing
    assert main(["export", str(export), "--format", "openclip", "--out", str(tmp_path / "folder")]) == 0
    local, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'folder'}")
    _assert_parity(local.eval(), export, "tiny-vit")
    assert local.visual.preprocess_cfg["mean"] == pytest.approx(OPENAI_MEAN)


def test_mismatched_checkpoint_names_unmatched_and_missing_keys(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    from safetensors.torch import save_file

    from mmpt.interop.openclip import import_openclip

    state = {k: v.contiguous() for k, v in openclip_model("tiny-vit").state_dict().items()}
    state.pop("ln_final.weight")
    state["visual.extra_head.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConfigError) as err:
        import_openclip("tiny-vit", tmp_path / "bad.safetensors", tmp_path / "out.safetensors")
    msg = str(err.value)
    assert "1 unmatched ['visual.extra_head.weight']" in msg and "1 missing ['ln_final.weight']" in msg
    assert not (tmp_path / "out.safetensors").exists()

    # another architecture's weights: every difference listed, in one line from the CLI (exit 2)
    save_state(openclip_model("tiny-rn"), tmp_path / "rn.safetensors")
    code = main(["import", "openclip", "--model", "tiny-vit", "--weights", str(tmp_path / "rn.safetensors"),
                 "--out", str(tmp_path / "out.safetensors")])
    err_text = capsys.readouterr().err
    assert code == 2 and err_text.count("\n") == 1
    assert "unmatched ['visual.attnpool" in err_text and "missing ['visual.class_embedding'" in err_text


def test_import_registers_a_model_config_file(tmp_path: Path) -> None:
    """``--model-config FILE`` registers an architecture the way ``open_clip.add_model_config`` does."""
    import json

    from interopkit import TINY

    (tmp_path / "my-arch.json").write_text(json.dumps(TINY["tiny-rn"]))
    weights = save_state(openclip_model("tiny-rn", seed=2), tmp_path / "oc.safetensors")
    args = ["import", "openclip", "--model", "my-arch", "--weights", str(weights), "--out", str(tmp_path / "m.safetensors")]
    assert main([*args, "--model-config", str(tmp_path / "my-arch.json")]) == 0
    assert mmpt.load(str(tmp_path / "m.safetensors"))[0].model.encoders["image"].model_name == "my-arch"


def test_checkpoint_is_data_not_code(tmp_path: Path) -> None:
    """A .pt that would run code when unpickled is refused by the weights-only reader."""
    from mmpt.formats.state_dict import read_state_dict

    torch.save({"state_dict": {"logit_scale": torch.zeros(())}, "hook": Path("x")}, tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match="refusing to unpickle"):
        read_state_dict(tmp_path / "evil.pt")


def test_towers_load_pretrained_openclip_weights(tmp_path: Path) -> None:
    """``image/open_clip`` and ``text/open_clip`` with ``pretrained: FILE`` start from that checkpoint."""
    from mmpt.encoders.open_clip import TINY_VIT
    from mmpt.registry import encoders

    oc = openclip_model("tiny-vit", seed=5)
    weights = save_state(oc, tmp_path / "oc.safetensors")
    image = encoders.build("image/open_clip", model_name="tiny-vit", model_cfg=TINY_VIT, image_size=32,
                           pretrained=str(weights))
    text = encoders.build("text/open_clip", model_name="tiny-vit", model_cfg=TINY_VIT, context_length=16,
                          pretrained=str(weights))
    assert all(torch.equal(v, oc.visual.state_dict()[k]) for k, v in image.visual.state_dict().items())
    assert torch.equal(text.text.token_embedding.weight, oc.token_embedding.weight)
    assert torch.equal(text.text.text_projection, oc.text_projection)


def test_tower_config_errors(tmp_path: Path) -> None:
    from mmpt.encoders.open_clip import TINY_VIT
    from mmpt.interop.openclip import import_openclip
    from mmpt.registry import encoders

    # an architecture whose OpenCLIP tokenizer is not the BPE: never guessed
    with pytest.raises(ConfigError, match="tokenizes with 'timm/ViT-B-16-SigLIP'.*--tokenizer hf:"):
        import_openclip("ViT-B-16-SigLIP", tmp_path / "weights.safetensors", tmp_path / "out.safetensors")

    with pytest.raises(ConfigError, match=r"image_size: 224 does not match the OpenCLIP config's image_size 32"):
        encoders.build("image/open_clip", model_name="x", model_cfg=TINY_VIT)
    with pytest.raises(ConfigError, match="unknown OpenCLIP architecture 'ViT-B-3'.*did you mean"):
        encoders.build("image/open_clip", model_name="ViT-B-3")
    remote = {**TINY_VIT, "vision_cfg": {"timm_model_name": "hf-hub:someone/model", "image_size": 32}}
    with pytest.raises(ConfigError, match="names a remote source"):
        encoders.build("image/open_clip", model_name="x", model_cfg=remote, image_size=32)


def test_crafted_export_cannot_reach_the_network(tmp_path: Path) -> None:
    """A model file whose embedded OpenCLIP config names a hub model (timm fetches hf-hub: configs even without
    weights) is refused on load, before anything is built."""
    from exportkit import config_of, with_config

    from mmpt.interop.openclip import import_openclip

    export = import_openclip("tiny-convnext", save_state(openclip_model("tiny-convnext"), tmp_path / "oc.safetensors"),
                             tmp_path / "model.safetensors")
    cfg = config_of(export)
    cfg["model"]["encoders"]["image"]["model_cfg"]["vision_cfg"]["timm_model_name"] = "hf-hub:someone/model"
    with pytest.raises(ConfigError, match="'hf-hub:someone/model' names a remote source"):
        mmpt.load(str(with_config(export, tmp_path / "crafted.safetensors", cfg)))


def test_towers_train_in_mmpt_and_a_run_exports_to_openclip(color_shards: list[str], tmp_path: Path) -> None:
    """Two training steps of the OpenCLIP towers in mmpt's loop, then ``mmpt export RUN --format openclip``."""
    import open_clip
    from shardkit import tiny_config

    from mmpt.config import load_config
    from mmpt.encoders.open_clip import TINY_VIT
    from mmpt.interop.openclip import mmpt_recipe
    from mmpt.training.loop import train

    register_tiny()
    raw = tiny_config(color_shards, tmp_path / "run", steps=2, log_sample_keys=False)
    raw["model"] = mmpt_recipe("tiny-vit", TINY_VIT)["model"]
    raw["data"]["workers"] = 1
    train(load_config(raw))
    back = tmp_path / "openclip.safetensors"
    assert main(["export", str(tmp_path / "run"), "--format", "openclip", "--out", str(back)]) == 0
    _assert_parity(open_clip.create_model("tiny-vit", pretrained=str(back)).eval(), tmp_path / "run", "tiny-vit")
