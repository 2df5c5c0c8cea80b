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
    (lambda c: c["optim"].update(schedule="cosinee"), r"optim\.schedule: expected cosine\|constant, got 'cosinee' \(did you mean 'cosine'\?\)"),
    (lambda c: c["optim"].update(lr=0), r"optim\.lr: must be > 0, got 0"),
    (lambda c: c["optim"].update(lr=-1e-3), r"optim\.lr: must be > 0"),
    (lambda c: c["data"].update(shuffle_buffer=-1), r"data\.shuffle_buffer: must be >= 0, got -1"),
    (lambda c: c["data"].update(workers=-1), r"data\.workers: must be >= 0, got -1"),
    (lambda c: c["train"].update(epochs=0), r"train\.epochs: must be > 0"),
    (lambda c: c["train"].update(checkpoint_every=0), r"train\.checkpoint_every: must be >= 1, got 0"),
    (lambda c: c["objectives"]["clip"].update(pairs=[["image", "audio"]]), r"objectives\.clip: modality 'audio' has no encoder"),
    (lambda c: c["objectives"]["clip"].update(pairs=None, anchor="txt"), r"objectives\.clip: modality 'txt' has no encoder \(did you mean 'text'\?\)"),
    (lambda c: c["objectives"].update(mlm={"name": "mlm", "modality": "txt", "width": 32}),
     r"objectives\.mlm: modality 'txt' has no encoder \(did you mean 'text'\?\)"),
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
    assert load_config("clip-tiny").model.encoders["image"]["name"] == "image/timm"
    with pytest.raises(ConfigError, match="did you mean 'clip-tiny'"):
        load_config("clip-tinny")


def test_data_errors_fail_before_training(tiny_cfg: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mmpt.training.loop import train

    tiny_cfg["data"]["sources"] = [str(tmp_path / "missing-{000..003}.tar")]
    with pytest.raises(ConfigError, match=r"missing-000\.tar"):
        train(load_config(tiny_cfg))
    tiny_cfg["data"]["sources"] = [str(tmp_path / "none-*.tar")]
    with pytest.raises(ConfigError, match=r"no shards match .*none-\*\.tar"):
        train(load_config(tiny_cfg))
    assert not (tmp_path / "run").exists()


def test_impossible_batch_fails_before_training(tiny_cfg: dict) -> None:
    from mmpt.training.loop import train

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


@pytest.mark.parametrize("change, message", [
    ({"patch_size": 7}, r"model\.encoders\.image: image_size 32 is not a multiple of patch_size 7"),
    ({"stem": "conv2"}, r"model\.encoders\.image: stem must be 'patch' or 'conv', got 'conv2'"),
])
def test_encoder_argument_errors_name_the_section_before_training(tiny_cfg: dict, change: dict, message: str) -> None:
    from mmpt.training.loop import train

    tiny_cfg["model"]["encoders"]["image"].update(change)
    with pytest.raises(ConfigError, match=message):
        train(load_config(tiny_cfg))
    assert not (Path(tiny_cfg["train"]["out_dir"]) / "checkpoints").exists()


def test_dotted_keys_inside_a_dict_field(tiny_cfg: dict) -> None:
    # the README's own example: lr_scale is a dict keyed by parameter-name prefix
    cfg = load_config(tiny_cfg, ["optim.lr_scale.model.encoders.text=0.5", "train.deepspeed.zero_optimization.stage=1"])
    assert cfg.optim.lr_scale == {"model.encoders.text": 0.5}
    assert cfg.train.deepspeed == {"zero_optimization": {"stage": 1}}  # Any-valued dicts still nest
    cfg = load_config(tiny_cfg, ["model.encoders.text.width=48", "eval=[]"])
    assert cfg.model.encoders["text"]["width"] == 48


def test_unknown_deepspeed_keys_warn_with_the_closest_key(tiny_cfg: dict) -> None:
    with pytest.warns(UserWarning, match=r"train\.deepspeed\.gradient_clippin: .*did you mean 'gradient_clipping'"):
        load_config(tiny_cfg, ["train.deepspeed.gradient_clippin=1.0"])
    with pytest.warns(UserWarning, match=r"zero_optimization\.stage3_param_persistance_threshold: .*"
                                         r"did you mean 'stage3_param_persistence_threshold'"):
        load_config(tiny_cfg, ["train.deepspeed.zero_optimization.stage3_param_persistance_threshold=0"])


def test_yaml_syntax_errors_name_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel:\n  embed_dim: [1, 2\n  head: linear\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML at line \d+, column \d+"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match=r"--set optim\.lr=\[1: the value is not valid YAML"):
        apply_overrides({}, ["optim.lr=[1"])
    with pytest.raises(ConfigError, match=r"--set eval\.5\.data=x: '5' is not an index of a list of 0 entries"):
        apply_overrides({"eval": []}, ["eval.5.data=x"])


@pytest.mark.parametrize("argv, code, message", [
    (["train", "clip-tinny"], 2, "unknown recipe 'clip-tinny' (did you mean 'clip-tiny'?)"),
    (["train", "clip-tiny", "--set", "optim.lr=[1"], 2, "--set optim.lr=[1: the value is not valid YAML"),
    (["train", "{bad_yaml}"], 2, "bad.yaml: invalid YAML at line 2"),
    (["train", "clip-tiny", "--set", "optim.schedule=cosinee"], 2, "did you mean 'cosine'"),
])
def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str], code: int,
                                 message: str) -> None:
    (tmp_path / "bad.yaml").write_text("name: x\n  model: : :\n")
    argv = [a.format(bad_yaml=tmp_path / "bad.yaml") for a in argv]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("mmpt: error: ") and message in err
    assert len(err.strip().splitlines()) == 1, err


def test_debug_flag_shows_the_traceback() -> None:
    with pytest.raises(ConfigError, match="unknown recipe"):
        main(["train", "clip-tinny", "--debug"])


def test_every_recipe_and_part_key_is_documented() -> None:
    """`mmpt train --help` / `mmpt info --keys --tasks` read descriptions from the classes' docstrings."""
    from mmpt.config import Config, DataConfig, ModelConfig, OptimConfig, Source, TrainConfig
    from mmpt.config.keys import UNDOCUMENTED, describe
    from mmpt.registry import encoders, objectives, tasks

    parts = [Config, ModelConfig, DataConfig, OptimConfig, TrainConfig, Source]
    parts += [reg.get(n) for reg in (encoders, objectives, tasks) for n in reg.names()]
    missing = [f"{getattr(p, 'registry_name', p.__name__)}.{key}" for p in parts
               for key, _, _, text in describe(p) if text == UNDOCUMENTED]
    assert not missing, f"keys without a 'key: description.' in their class docstring: {missing}"


def test_every_shipped_recipe_loads() -> None:
    """Each recipe in recipes/ validates (keys, types, registered names) and evaluates something."""
    from importlib import resources

    names = sorted(p.name.removesuffix(".yaml") for p in resources.files("mmpt.recipes").iterdir()
                   if p.name.endswith(".yaml"))
    assert {"clip-tiny", "clap-tiny", "ulip-tiny", "protst-tiny", "imagebind-tiny"} <= set(names), names
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name and cfg.eval, name


def test_objective_that_does_not_name_its_modalities_passes_the_check() -> None:
    from types import SimpleNamespace

    from mmpt.config import _check_objective_modalities

    _check_objective_modalities("objectives.custom", SimpleNamespace(modalities=None), {"text": {}})


def test_encoder_section_takes_its_data_side_keys_and_names_typos() -> None:
    """A modality's data-side limits are keys of its encoder section (``max_image_pixels`` left the core's
    data section); a misspelt one is named with the closest valid key, data-side keys included."""
    cfg = load_config("clip-tiny", ["model.encoders.image.max_image_pixels=1000"])
    assert cfg.model.encoders["image"]["max_image_pixels"] == 1000
    with pytest.raises(ConfigError, match="model.encoders.image.max_image_pixel: unknown key.*max_image_pixels"):
        load_config("clip-tiny", ["model.encoders.image.max_image_pixel=1000"])
    with pytest.raises(ConfigError, match="model.encoders.image.max_image_pixels: expected int"):
        load_config("clip-tiny", ["model.encoders.image.max_image_pixels=many"])
    with pytest.raises(ConfigError, match="data.max_image_pixels: unknown key"):
        load_config("clip-tiny", ["data.max_image_pixels=1000"])
