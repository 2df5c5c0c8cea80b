"""Config errors fail before training and name the key path and the closest valid key."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmpt.cli import main
from mmpt.config import apply_overrides, load_config
from mmpt.registry import ConfigError


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["train"].update(stpes=3), r"train\.stpes: unknown key \(did you mean 'steps'\?\)"),
    (lambda c: c.update(optimm={}), r"optimm: unknown key \(did you mean 'optim'\?\)"),
    (lambda c: c["train"].update(steps="many"), r"train\.steps: expected int, got 'many'"),
    (lambda c: c["model"]["encoders"]["image"].update(name="image/vitt"), r"model\.encoders\.image\.name: unknown encoder 'image/vitt' \(did you mean 'image/vit'\?\)"),
    (lambda c: c["model"]["encoders"]["image"].update(patch_sise=4), r"model\.encoders\.image\.patch_sise: unknown key \(did you mean 'patch_size'\?\)"),
    (lambda c: c["model"]["encoders"]["text"].update(width="wide"), r"model\.encoders\.text\.width: expected int"),
    (lambda c: c["objectives"]["clip"].update(gahter="local"), r"objectives\.clip\.gahter: unknown key \(did you mean 'gather'\?\)"),
    (lambda c: c["objectives"]["clip"].update(name="clipp"), r"unknown objective 'clipp' \(did you mean 'clip'\?\)"),
    (lambda c: c["train"].update(zero_stage=4), r"train\.zero_stage: expected 0, 1, 2 or 3"),
    (lambda c: c["data"].update(required=["imag"]), r"data\.required: 'imag' has no encoder \(did you mean 'image'\?\)"),
])
def test_bad_config_names_the_key(tiny_cfg: dict, mutate, message: str) -> None:
    mutate(tiny_cfg)
    with pytest.raises(ConfigError, match=message):
        load_config(tiny_cfg)


def test_overrides_are_typed_and_validated(tiny_cfg: dict) -> None:
    cfg = load_config(tiny_cfg, ["optim.lr=3e-4", "train.steps=5", "data.required=[image]"])
    assert cfg.optim.lr == 3e-4 and cfg.train.steps == 5 and cfg.data.required == ["image"]
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown key \(did you mean 'lr'\?\)"):
        load_config(tiny_cfg, ["optim.lrr=1"])


def test_shipped_recipe_and_unknown_recipe() -> None:
    assert load_config("clip-tiny").model.encoders["image"]["name"] == "image/vit"
    with pytest.raises(ConfigError, match="did you mean 'clip-tiny'"):
        load_config("clip-tinny")


def test_data_errors_fail_before_training(tiny_cfg: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mmpt.train.loop import train

    tiny_cfg["data"]["sources"] = [str(tmp_path / "missing-{000..003}.tar")]
    with pytest.raises(ConfigError, match=r"missing-000\.tar"):
        train(load_config(tiny_cfg))
    tiny_cfg["data"]["sources"] = [str(tmp_path / "none-*.tar")]
    with pytest.raises(ConfigError, match=r"no shards match .*none-\*\.tar"):
        train(load_config(tiny_cfg))
    assert not (tmp_path / "run").exists()


def test_impossible_batch_fails_before_training(tiny_cfg: dict) -> None:
    from mmpt.train.loop import train

    tiny_cfg["data"]["batch_size"] = 400
    with pytest.raises(ConfigError, match=r"data\.batch_size: 400 x 1 ranks x 1 accumulation = 400 .* only 150"):
        train(load_config(tiny_cfg))


def test_cli_reports_config_errors_in_one_line(tiny_cfg: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import yaml

    tiny_cfg["train"]["stpes"] = 2
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tiny_cfg))
    assert main(["train", str(path)]) == 2
    assert "train.stpes: unknown key (did you mean 'steps'?)" in capsys.readouterr().err
