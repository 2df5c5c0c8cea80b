"""The demo dataset: layout, determinism, caption grammar vs class/template files, pixels, speed."""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmpt.contracts import DemoConcepts, ModalityData
from mmpt.data import demo_shards as demo
from mmpt.data.concepts import COLORS, POSITIONS, SHAPES, SIZES
from mmpt.data.demo_shards import DemoInfo, generate_demo
from mmpt.encoders.text import CAPTION_VARIANTS
from mmpt.nn.token_encoder import stack_present
from mmpt.registry import ConfigError

SMALL = {"train_samples": 300, "eval_samples": 50, "shard_size": 128}


def read_samples(paths: list[Path]) -> list[dict]:
    """Every sample of the shards as {"__key__", "jpg", "txt", "json"}, with txt/json decoded."""
    samples: list[dict] = []
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                if not samples or samples[-1]["__key__"] != key:
                    samples.append({"__key__": key})
                data = tar.extractfile(member).read()
                samples[-1][ext] = {"txt": bytes.decode, "json": json.loads}.get(ext, bytes)(data)
    return samples


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> DemoInfo:
    return generate_demo(tmp_path_factory.mktemp("demo"), train_samples=3000, eval_samples=200, progress=False)


@pytest.fixture(scope="module")
def train(dataset: DemoInfo) -> list[dict]:
    return read_samples(dataset.train_shards)


def test_layout_and_info(dataset: DemoInfo) -> None:
    root = dataset.root
    assert [p.relative_to(root).as_posix() for p in dataset.train_shards] == ["train/demo-train-000000.tar", "train/demo-train-000001.tar"]
    assert [p.relative_to(root).as_posix() for p in dataset.eval_shards] == ["eval/demo-eval-000000.tar"]
    assert dataset.classes == {"color": root / "classes/color.txt", "shape": root / "classes/shape.txt"}
    assert dataset.templates == {"color": root / "templates/color.txt", "shape": root / "templates/shape.txt"}
    info = json.loads(dataset.info_file.read_text())
    assert (info["train_samples"], info["eval_samples"], info["seed"], info["image_size"]) == (3000, 200, 0, 64)
    assert info["shapes"] == list(SHAPES) and info["colors"] == list(COLORS)
    assert info["train_shards"] == ["train/demo-train-000000.tar", "train/demo-train-000001.tar"]
    assert dataset.train_pattern == str(root / "train" / "demo-train-{000000..000001}.tar")
    assert dataset.eval_pattern == str(root / "eval" / "demo-eval-000000.tar")
    assert not list(root.rglob("*.tmp"))


def test_samples_have_keys_members_and_metadata(dataset: DemoInfo, train: list[dict]) -> None:
    assert len(train) == 3000
    assert train[12]["__key__"] == "train_00000012"
    eval_samples = read_samples(dataset.eval_shards)
    assert [s["__key__"] for s in eval_samples[:2]] == ["eval_00000000", "eval_00000001"]
    for sample in train[:200]:
        meta = sample["json"]
        assert set(sample) == {"__key__", "jpg", "txt", "json"}
        assert meta["shape"] in SHAPES and meta["color"] in COLORS and meta["background"] in COLORS
        assert meta["background"] != meta["color"]
        assert meta["size"] in SIZES and meta["position"] in POSITIONS
        assert len(set(meta["captions"])) == CAPTION_VARIANTS
        for caption in meta["captions"]:
            assert re.search(rf"\b{meta['color']} {meta['shape']}\b", caption), caption
            assert f"a {meta['background']} background" in caption
        # Whatever form the training caption takes, every word it uses is true of the image.
        words = set(sample["txt"].split())
        assert not (words & set(COLORS)) - {meta["color"], meta["background"]}
        assert not (words & set(SHAPES)) - {meta["shape"]}


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    first = generate_demo(tmp_path / "a", **SMALL, progress=False)
    second = generate_demo(tmp_path / "b", **SMALL, progress=False)
    other = generate_demo(tmp_path / "c", **SMALL, seed=1, progress=False)
    shards = first.train_shards + first.eval_shards
    assert len(first.train_shards) == 3
    assert [p.read_bytes() for p in shards] == [p.read_bytes() for p in second.train_shards + second.eval_shards]
    assert first.train_shards[0].read_bytes() != other.train_shards[0].read_bytes()


def test_eval_split_does_not_depend_on_train(tmp_path: Path) -> None:
    small = generate_demo(tmp_path / "a", **{**SMALL, "train_samples": 10}, progress=False)
    large = generate_demo(tmp_path / "b", **SMALL, progress=False)
    assert small.eval_shards[0].read_bytes() == large.eval_shards[0].read_bytes()
    train_images = {s["jpg"] for s in read_samples(large.train_shards)}
    assert not train_images & {s["jpg"] for s in read_samples(large.eval_shards)}


def test_rerun_into_same_folder_removes_stale_shards(tmp_path: Path) -> None:
    generate_demo(tmp_path, **SMALL, progress=False)
    info = generate_demo(tmp_path, **{**SMALL, "train_samples": 100}, progress=False)
    assert sorted((tmp_path / "train").iterdir()) == info.train_shards == [tmp_path / "train" / "demo-train-000000.tar"]


def test_class_files_use_caption_words(dataset: DemoInfo, train: list[dict]) -> None:
    captions = [s["txt"] for s in train] + [c for s in train for c in s["json"]["captions"]]
    vocabulary = {word for caption in captions for word in caption.split()}
    for task, names in {"color": list(COLORS), "shape": list(SHAPES)}.items():
        assert dataset.classes[task].read_text().splitlines() == names
        assert set(names) <= vocabulary, task
        # The templates carry the article "a", so a name starting with a vowel would read "a orange".
        assert not [n for n in names if n[0] in "aeiou"]


def test_filled_templates_are_training_captions(dataset: DemoInfo, train: list[dict]) -> None:
    captions = {s["txt"] for s in train}
    for task in ("color", "shape"):
        templates = dataset.templates[task].read_text().splitlines()
        assert len(templates) >= 2 and all(t.count("{}") == 1 for t in templates)
        names = dataset.classes[task].read_text().splitlines()
        missing = [t.format(n) for t in templates for n in names if t.format(n) not in captions]
        assert not missing, missing


def decode(sample: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"), dtype=np.int16)


def test_images_decode_to_requested_size(train: list[dict], tmp_path: Path) -> None:
    assert decode(train[0]).shape == (64, 64, 3)
    info = generate_demo(tmp_path, train_samples=4, eval_samples=1, image_size=40, progress=False)
    assert decode(read_samples(info.train_shards)[0]).shape == (40, 40, 3)


def test_centered_shape_colour_fills_the_centre(train: list[dict]) -> None:
    centred = [s for s in train if s["json"]["position"] == "center" and s["json"]["shape"] != "ring"]
    assert len(centred) > 100
    for sample in centred:
        meta = sample["json"]
        patch = decode(sample)[28:36, 28:36].reshape(-1, 3)
        fg, bg = np.array(COLORS[meta["color"]]), np.array(COLORS[meta["background"]])
        nearer_fg = np.abs(patch - fg).sum(1) < np.abs(patch - bg).sum(1)
        assert nearer_fg.mean() > 0.9, (sample["__key__"], meta)
        assert np.abs(patch.mean(0) - fg).max() < 30, (sample["__key__"], meta, patch.mean(0))


def test_small_shapes_still_cover_a_third_of_the_side(train: list[dict]) -> None:
    sample = next(s for s in train if s["json"]["size"] == "small" and s["json"]["shape"] == "circle")
    fg = np.array(COLORS[sample["json"]["color"]])
    covered = np.abs(decode(sample) - fg).sum(-1) < 60
    assert covered.any(0).sum() >= 0.3 * 64 and covered.any(1).sum() >= 0.3 * 64


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--help"])
    assert exit_info.value.code == 0
    assert "--train-samples" in capsys.readouterr().out


def test_bench_generation_speed(tmp_path: Path) -> None:
    """Bench-style: print samples/s (run with OMP_NUM_THREADS=1 taskset -c 0 for the one-core figure)."""
    count = 2000
    start = time.perf_counter()
    generate_demo(tmp_path, train_samples=count, eval_samples=0, progress=False)
    rate = count / (time.perf_counter() - start)
    print(f"\ndemo generation: {rate:,.0f} samples/s at 64 px (render + JPEG + tar)")


# Extra modalities render the shared concepts through their registered data side (a fake one here:
# the core and the generator name no modality beyond the picture and the captions they draw).

class ToyDemoData(ModalityData):
    """Two bytes per sample: the concept's shape and colour index; per-token labels in its json."""

    modality = "toy_demo"
    extensions = ("toy",)

    def decode(self, data: bytes, ext: str) -> torch.Tensor:
        return torch.tensor(list(data), dtype=torch.long)

    def collate(self, values: list) -> dict[str, torch.Tensor]:
        return {"codes": stack_present(values)}

    def render_demo(self, concepts: DemoConcepts, rng: np.random.Generator) -> list[dict[str, bytes]]:
        noise = rng.integers(0, 100, len(concepts))  # draws from its own RNG, like a real renderer
        return [{"toy": bytes([int(s), int(c)]), "json": json.dumps({"toy_noise": int(n)}).encode()}
                for s, c, n in zip(concepts.shape, concepts.color, noise)]


class OtherToyData(ToyDemoData):
    modality = "toy_other"
    extensions = ("toy2",)

    def render_demo(self, concepts: DemoConcepts, rng: np.random.Generator) -> list[dict[str, bytes]]:
        return [{"toy2": bytes([int(s)])} for s in rng.permutation(concepts.size)]


class NoRendererData(ToyDemoData):
    modality = "toy_silent"
    extensions = ("toy3",)
    render_demo = ModalityData.render_demo


@pytest.fixture(scope="module")
def toy_modalities() -> Iterator[None]:
    from mmpt.registry import modalities

    added = {cls.modality: cls for cls in (ToyDemoData, OtherToyData, NoRendererData)}
    for name, cls in added.items():
        modalities.register(name)(cls)
    yield
    for name in added:
        modalities._items.pop(name)


def members_by_key(paths: list[Path]) -> dict[str, dict]:
    return {s["__key__"]: s for s in read_samples(paths)}


def test_extra_modality_renders_each_samples_concepts(tmp_path: Path, toy_modalities: None) -> None:
    info = generate_demo(tmp_path, **SMALL, modalities=("image", "text", "toy_demo"), progress=False)
    samples = read_samples(info.train_shards)
    with_toy = [s for s in samples if "toy" in s]
    # ~10% of samples lack it (presence masks get exercised); every sample keeps its picture and captions
    assert 0.8 * len(samples) < len(with_toy) < 0.97 * len(samples)
    assert all("jpg" in s and "txt" in s for s in samples)
    for s in with_toy:
        assert s["toy"] == bytes([SHAPES.index(s["json"]["shape"]), list(COLORS).index(s["json"]["color"])])
        assert isinstance(s["json"]["toy_noise"], int)  # the renderer's json joins the sample's json
    assert all("toy_noise" not in s["json"] for s in samples if "toy" not in s)
    meta = json.loads(info.info_file.read_text())
    assert meta["modalities"] == ["image", "text", "toy_demo"]
    assert meta["present"]["train"] == {"toy_demo": len(with_toy)}
    # read back through the loader: the presence mask says which rows carry the modality
    from mmpt.data.loader import eval_loader

    present = torch.cat([b.present["toy_demo"] for b in eval_loader(info.train_pattern, {"toy_demo": ToyDemoData()}, 64)])
    assert present.tolist() == ["toy" in s for s in samples]


def test_adding_a_modality_changes_no_other_bytes(tmp_path: Path, toy_modalities: None) -> None:
    base = members_by_key(generate_demo(tmp_path / "a", **SMALL, progress=False).train_shards)
    one = members_by_key(generate_demo(tmp_path / "b", **SMALL, modalities=("image", "text", "toy_demo"),
                                       progress=False).train_shards)
    two = members_by_key(generate_demo(tmp_path / "c", **SMALL, modalities=("image", "text", "toy_other", "toy_demo"),
                                       progress=False).train_shards)
    assert base.keys() == one.keys() == two.keys()
    for key, sample in base.items():
        assert (one[key]["jpg"], one[key]["txt"]) == (sample["jpg"], sample["txt"])
        assert {k: v for k, v in one[key]["json"].items() if k != "toy_noise"} == sample["json"]
        assert one[key].get("toy") == two[key].get("toy") and one[key]["json"] == two[key]["json"]
    assert any("toy2" in s for s in two.values())


def test_without_image_the_picture_is_left_out(tmp_path: Path, toy_modalities: None) -> None:
    info = generate_demo(tmp_path, **SMALL, modalities=("text", "toy_demo"), progress=False)
    samples = read_samples(info.eval_shards)
    assert samples and not any("jpg" in s for s in samples) and all("txt" in s for s in samples)


def test_modality_without_renderer_or_unknown_is_one_clear_error(tmp_path: Path, toy_modalities: None,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="modality 'toy_silent' has no demo renderer"):
        generate_demo(tmp_path, **SMALL, modalities=("image", "text", "toy_silent"), progress=False)
    assert not (tmp_path / "train").exists()  # refused before writing anything
    from mmpt.cli import main as cli

    code = cli(["data", "demo", "--out", str(tmp_path), "--modalities", "image,text,toy_demoo"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "unknown modality 'toy_demoo'" in err and "toy_demo" in err


def test_demo_data_for_a_recipe_adds_its_modalities_and_reuses_a_set_that_has_them(
        tmp_path: Path, toy_modalities: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from mmpt.commands.demo import demo_data

    calls: list[tuple[str, ...]] = []
    real = demo.generate_demo

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(tuple(kwargs["modalities"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(demo, "generate_demo", spy)
    data = tmp_path / "data"
    demo_data(data, ["image", "text"], {}, 200, 20, 128)
    first = {p.name: p.read_bytes() for p in (data / "train").iterdir()}
    demo_data(data, ["toy_demo", "text"], {"toy_demo": {"name": "toy/enc", "unused_width": 8}}, 200, 20, 128)
    demo_data(data, ["text", "toy_demo"], {}, 200, 20, 128)  # already there: nothing regenerated
    assert calls == [("image", "text"), ("image", "text", "toy_demo")]
    samples = read_samples(sorted((data / "train").iterdir()))
    assert any("toy" in s for s in samples) and all("jpg" in s for s in samples)  # the earlier modalities stay
    assert json.loads((data / "info.json").read_text())["modalities"] == ["image", "text", "toy_demo"]
    assert first.keys() == {p.name for p in (data / "train").iterdir()}
