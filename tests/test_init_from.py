"""model.init_from: a recipe starts from an mmpt export, whole or tower by tower, with a report; partial
loads that the recipe did not ask for are refused."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from mmpt.commands.export import write_export
from mmpt.config import load_config
from mmpt.pretrainer import build_pretrainer, set_seed
from mmpt.registry import ConfigError


@pytest.fixture()
def source(tiny_cfg: dict, tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """An export of the tiny CLIP with seed 123 (weights unlike a seed-0 build)."""
    cfg = load_config({**tiny_cfg, "seed": 123})
    set_seed(123)
    state = build_pretrainer(cfg).state_dict()
    return write_export(state, cfg, tmp_path / "source.safetensors"), state


def with_init(raw: dict, path: Path, towers: list[str] | None = None, **model) -> dict:
    raw = copy.deepcopy(raw)
    raw["model"].update(init_from=str(path), **({"init_towers": towers} if towers else {}), **model)
    return raw


def test_whole_model_starts_from_the_export(tiny_cfg: dict, source) -> None:
    path, state = source
    set_seed(0)
    model = build_pretrainer(load_config(with_init(tiny_cfg, path)))
    got = model.state_dict()
    assert sorted(got) == sorted(state) and all(torch.equal(got[k], state[k]) for k in state)
    report = model.init_report
    assert sorted(report.loaded) == sorted(state) and not (report.missing or report.unexpected or report.not_requested)


def test_a_partial_match_is_refused_unless_the_towers_are_named(tiny_cfg: dict, source, tmp_path: Path) -> None:
    path, state = source
    raw = copy.deepcopy(tiny_cfg)
    raw["model"]["encoders"]["text"]["depth"] = 2  # the file's text tower has one block
    with pytest.raises(ConfigError, match=r"does not match the model \(\d+ missing, 0 unexpected, 0 of another "
                                          r"shape; first: model.encoders.text.trunk.blocks.1.*model.init_towers"):
        build_pretrainer(load_config(with_init(raw, path)))
    set_seed(0)
    model = build_pretrainer(load_config(with_init(raw, path, ["image"])))
    got, report = model.state_dict(), model.init_report
    image = [k for k in state if k.startswith(("model.encoders.image.", "model.heads.image."))]
    assert sorted(report.loaded) == sorted(image) and all(torch.equal(got[k], state[k]) for k in image)
    assert "model.encoders.text.token_embed.weight" in report.not_requested
    assert f"loaded {len(image)} tensors (model.encoders.image: {len(image) - 1}, model.heads.image: 1)" in report.summary()
    assert not torch.equal(got["model.heads.text.weight"], state["model.heads.text.weight"])
    raw["model"]["encoders"]["image"]["width"] = 48
    with pytest.raises(ConfigError, match="1 of another shape|of another shape; first: model.encoders.image"):
        build_pretrainer(load_config(with_init(raw, path, ["image"])))


def test_init_before_lora_and_exports_forget_the_source(tiny_cfg: dict, source, tmp_path: Path) -> None:
    import mmpt

    path, state = source
    adapt = {"image": {"mode": "lora", "rank": 2}}
    model = build_pretrainer(load_config(with_init(tiny_cfg, path, ["image"], adapt=adapt)))
    got = model.state_dict()
    key = "model.encoders.image.trunk.blocks.0.attn.qkv"
    assert torch.equal(got[f"{key}.base_layer.weight"], state[f"{key}.weight"])  # loaded, then adapted
    out = write_export(got, load_config(with_init(tiny_cfg, path, ["image"], adapt=adapt)), tmp_path / "o.safetensors")
    path.unlink()
    loaded = mmpt.load(str(out))[0]  # no longer reads the file it started from
    assert loaded.init_report is None


def test_refusals_are_one_line(tiny_cfg: dict, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match="is not an mmpt export"):
        build_pretrainer(load_config(with_init(tiny_cfg, tmp_path / "other.safetensors")))
    with pytest.raises(ConfigError, match="no such file"):
        build_pretrainer(load_config(with_init(tiny_cfg, tmp_path / "missing.safetensors")))
    with pytest.raises(ConfigError, match="model.init_towers: set model.init_from"):
        load_config({**tiny_cfg, "model": {**tiny_cfg["model"], "init_towers": ["image"]}})
    with pytest.raises(ConfigError, match="model.init_towers: no encoder for 'audio'"):
        load_config(with_init(tiny_cfg, tmp_path / "x", ["audio"]))


def test_lit_tiny_locks_the_image_tower_of_a_clip_tiny_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped recipe: image tower and head from the export, frozen; text trains; the report says so."""
    clip = load_config("clip-tiny")
    set_seed(7)
    state = build_pretrainer(clip).state_dict()
    monkeypatch.setenv("MMPT_LIT_IMAGE", str(write_export(state, clip, tmp_path / "clip-tiny.safetensors")))
    model = build_pretrainer(load_config("lit-tiny"))
    got = model.state_dict()
    image = [k for k in state if k.startswith(("model.encoders.image.", "model.heads.image."))]
    assert all(torch.equal(got[k], state[k]) for k in image) and sorted(model.init_report.loaded) == sorted(image)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not [n for n in trainable if n in image] and any(n.startswith("model.encoders.text.") for n in trainable)
    model.train()
    assert not model.model.encoders["image"].training  # frozen: eval mode whatever the model's mode
