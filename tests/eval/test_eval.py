"""Eval tasks: config errors, metrics against naive references, and run_tasks end to end on a tiny model."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from mmpt.contracts import ModalityData
from mmpt.eval import build_tasks, format_table, run_tasks, write_results
from mmpt.eval.common import accuracy_metrics
from mmpt.eval.linear_probe import fit_logistic_regression
from mmpt.eval.retrieval import recall_at_k, relevance_matrix
from mmpt.eval.zero_shot import match_folders, ranked_classes, read_list
from mmpt.registry import ConfigError

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (245, 220, 40),
          "purple": (135, 50, 180), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "star")


# Shards and image folders, written by hand so the tests depend on no generator.

def jpeg(rgb: tuple[int, int, int] | np.ndarray, size: int = 32) -> bytes:
    pixels = rgb if isinstance(rgb, np.ndarray) else np.full((size, size, 3), rgb, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()


def write_shard(path: Path, samples: list[dict[str, Any]]) -> str:
    """samples: {key, rgb | pixels, txt?, json?} -> a WebDataset tar."""
    with tarfile.open(path, "w") as tar:
        for s in samples:
            members = {"jpg": s["jpg"] if "jpg" in s else jpeg(s["pixels"] if "pixels" in s else s["rgb"])}
            if "txt" in s:
                members["txt"] = s["txt"].encode()
            if "json" in s:
                members["json"] = json.dumps(s["json"]).encode()
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def shape_samples(n: int, seed: int, prefix: str) -> list[dict[str, Any]]:
    """Coloured squares of random size with demo-style json (3 caption variants) and one txt caption."""
    rng = np.random.default_rng(seed)
    names = list(COLORS)
    out = []
    for i in range(n):
        color, shape = names[rng.integers(len(names))], SHAPES[rng.integers(len(SHAPES))]
        pixels = np.full((32, 32, 3), 255, dtype=np.uint8)
        half = int(rng.integers(5, 14))
        pixels[16 - half:16 + half, 16 - half:16 + half] = COLORS[color]
        caps = [f"a {color} {shape}", f"a {color} {shape} on a white background", f"a {shape} that is {color}"]
        out.append({"key": f"{prefix}{i:04d}", "pixels": pixels, "txt": caps[0],
                    "json": {"shape": shape, "color": color, "background": "white", "captions": caps}})
    return out


# A real tiny model, built once.

@pytest.fixture(scope="module")
def tiny_model() -> nn.Module:
    from mmpt.config import load_config
    from mmpt.pretrainer import build_pretrainer

    torch.manual_seed(0)
    model_cfg = {"embed_dim": 32, "encoders": {
        "image": {"name": "image/vit", "image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
        "text": {"name": "text/transformer", "context_length": 16, "width": 32, "depth": 1, "heads": 2}}}
    try:
        cfg = load_config({"model": model_cfg, "objectives": {"clip": {"name": "clip", "pairs": [["image", "text"]]}}})
    except ConfigError:  # the clip objective is not registered: the towers are all eval needs
        cfg = load_config({"model": model_cfg})
    return build_pretrainer(cfg).model


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("shards")
    samples = shape_samples(40, seed=0, prefix="e")
    samples[3]["json"]["color"] = "teal"  # not a class: counted, not scored
    del samples[5]["json"]["color"]  # no label at all
    test = [write_shard(root / "eval-000.tar", samples[:25]), write_shard(root / "eval-001.tar", samples[25:])]
    train = write_shard(root / "train-000.tar", shape_samples(60, seed=1, prefix="t"))
    (root / "colors.txt").write_text("\n".join(COLORS) + "\n")
    (root / "templates.txt").write_text("a {} shape\na photo of a {} thing\n")
    return {"eval": f"{root}/eval-{{000..001}}.tar", "eval_files": test, "train": train,
            "classes": str(root / "colors.txt"), "templates": str(root / "templates.txt"), "root": str(root)}


# Config errors.

def test_unknown_key_names_closest_key(shards: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"eval\[0\]\.lable_key: unknown key \(did you mean 'label_key'\?\)"):
        build_tasks([{"name": "zero_shot", "data": shards["eval"], "lable_key": "color"}])
    with pytest.raises(ConfigError, match=r"eval\[1\].*unknown eval task 'retreival'.*did you mean 'retrieval'"):
        build_tasks([{"name": "retrieval", "data": shards["eval"]}, {"name": "retreival", "data": shards["eval"]}])


def test_bad_values_fail_before_running(shards: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"eval\[0\]\.classnames: no file"):
        build_tasks([{"name": "zero_shot", "data": shards["eval"], "label_key": "color", "classnames": "nope.txt"}])
    with pytest.raises(ConfigError, match=r"eval\[0\]\.templates: .*needs '\{\}'"):
        build_tasks([{"name": "zero_shot", "data": shards["eval"], "label_key": "color", "templates": ["a photo"]}])
    with pytest.raises(ConfigError, match=r"eval\[0\]\.label_key: required"):
        build_tasks([{"name": "zero_shot", "data": shards["eval"]}])
    with pytest.raises(ConfigError, match=r"eval\[0\]\.data: no shards match"):
        build_tasks([{"name": "retrieval", "data": str(tmp_path / "missing-*.tar")}])
    with pytest.raises(ConfigError, match=r"eval\[0\]\.batch_size: expected int"):
        build_tasks([{"name": "retrieval", "data": shards["eval"], "batch_size": "8"}])
    with pytest.raises(ConfigError, match=r"eval\[1\]: result name 'retrieval' is also eval\[0\]'s"):
        build_tasks([{"name": "retrieval", "data": shards["eval"]}, {"name": "retrieval", "data": shards["eval"]}])


def test_default_and_explicit_result_names(shards: dict[str, str]) -> None:
    built = build_tasks([
        {"name": "zero_shot", "data": shards["eval"], "label_key": "color"},
        {"name": "retrieval", "data": shards["eval"]},
        {"name": "retrieval", "data": shards["eval"], "id": "retrieval/again", "ks": [1, 2]},
        {"name": "linear_probe", "train_data": shards["train"], "data": shards["eval"], "label_key": "shape"},
    ])
    assert [name for name, _ in built] == ["zero_shot/color", "retrieval", "retrieval/again", "linear_probe/shape"]


def test_wrong_label_key_in_data_suggests_the_json_key(tiny_model: nn.Module, shards: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"eval\[0\]\.label_key: 'colour' is in no sample's json \(did you mean 'color'"):
        run_tasks(tiny_model, tiny_model.data, [{"name": "zero_shot", "data": shards["eval"], "label_key": "colour"}],
                  device="cpu", progress=False)


def test_class_and_template_lists() -> None:
    assert read_list(["a", " b "], "classnames") == ["a", "b"]
    names = read_list("openclip:imagenet", "classnames")
    templates = read_list("openclip:imagenet", "templates")
    assert len(names) == 1000 and names[0] == "tench"
    assert len(templates) == 80 and all("{}" in t for t in templates)
    assert templates[0].replace("{}", "dog") == "a bad photo of a dog."
    with pytest.raises(ConfigError, match="did you mean 'imagenet'"):
        read_list("openclip:imagenett", "templates")


# Zero-shot.

def test_zero_shot_scoring_matches_naive_loop() -> None:
    g = torch.Generator().manual_seed(0)
    x, w = F.normalize(torch.randn(50, 8, generator=g), dim=-1), F.normalize(torch.randn(7, 8, generator=g), dim=-1)
    labels = torch.randint(0, 7, (50,), generator=g)
    top = ranked_classes(x, w, 5, chunk=16)
    metrics = accuracy_metrics(top, labels, [f"c{i}" for i in range(7)])
    top1 = top5 = 0
    for xi, yi in zip(x.tolist(), labels.tolist()):
        scores = [sum(a * b for a, b in zip(xi, wc)) for wc in w.tolist()]
        order = sorted(range(7), key=lambda c: -scores[c])
        top1 += order[0] == yi
        top5 += yi in order[:5]
    assert metrics["top1"] == pytest.approx(top1 / 50) and metrics["top5"] == pytest.approx(top5 / 50)
    assert metrics["chance"] == pytest.approx(1 / 7) and metrics["top5_chance"] == pytest.approx(5 / 7)
    assert metrics["top1_over_chance"] == pytest.approx(7 * top1 / 50)


def test_zero_shot_task_matches_naive_reference(tiny_model: nn.Module, shards: dict[str, str]) -> None:
    templates = ["a {} shape", "a photo of a {} thing"]
    res = run_tasks(tiny_model, tiny_model.data, [
        {"name": "zero_shot", "data": shards["eval"], "label_key": "color", "classnames": shards["classes"],
         "templates": shards["templates"], "batch_size": 16}], device="cpu", progress=False)["zero_shot/color"]

    # Reference: one image and one prompt at a time through model.encode, scored in plain Python.
    classes = list(COLORS)
    weights = []
    for c in classes:
        mean = torch.stack([tiny_model.encode("text", [t.replace("{}", c)])[0] for t in templates]).mean(0)
        weights.append((mean / mean.norm()).tolist())
    hits1 = hits5 = n = 0
    for path in shards["eval_files"]:
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for name in sorted(k for k in members if k.endswith(".jpg")):
            label = json.loads(members[name.replace(".jpg", ".json")]).get("color")
            if label not in classes:
                continue
            image = Image.open(io.BytesIO(members[name])).convert("RGB")
            emb = tiny_model.encode("image", [image])[0].tolist()
            scores = [sum(a * b for a, b in zip(emb, wc)) for wc in weights]
            order = sorted(range(len(classes)), key=lambda c: -scores[c])
            hits1 += classes[order[0]] == label
            hits5 += label in [classes[c] for c in order[:5]]
            n += 1
    assert res["n"] == n == 38 and res["n_unknown_label"] == 2
    assert res["top1"] == pytest.approx(hits1 / n) and res["top5"] == pytest.approx(hits5 / n)
    assert res["num_classes"] == 6 and res["chance"] == pytest.approx(1 / 6)


def test_zero_shot_oracle_embeddings_match_naive_loop(tmp_path: Path) -> None:
    from mmpt.encoders.image import ImageData

    classes, templates = ["red", "blue", "gray", "pink"], ["a {}", "the {} one", "{} stuff"]
    prompts = [t.replace("{}", c) for c in classes for t in templates]
    g = torch.Generator().manual_seed(3)
    image_table = F.normalize(torch.randn(30, 5, generator=g), dim=-1)
    text_table = F.normalize(torch.randn(len(prompts), 5, generator=g), dim=-1)
    # Class 0's prompts agree, so their mean is far longer than the others': re-normalising matters.
    text_table[1:3] = text_table[0]
    labels = [classes[i % 4] for i in range(30)]
    pattern = write_shard(tmp_path / "zs.tar", [{"key": f"s{i:03d}", "rgb": (8 * i, 0, 0), "json": {"c": labels[i]}}
                                                for i in range(30)])
    model = OracleModel(image_table, text_table)
    specs = {"image": ImageData(image_size=32), "text": TableText({p: i for i, p in enumerate(prompts)})}
    res = run_tasks(model, specs, [{"name": "zero_shot", "data": pattern, "label_key": "c", "classnames": classes,
                                    "templates": templates, "batch_size": 7}], device="cpu", progress=False)["zero_shot/c"]
    weights = []
    for c in range(4):
        rows = text_table[c * 3:(c + 1) * 3].tolist()
        mean = [sum(col) / 3 for col in zip(*rows)]
        norm = math.sqrt(sum(v * v for v in mean))
        weights.append([v / norm for v in mean])
    hits1 = 0
    per_class = dict.fromkeys(classes, 0)
    for emb, label in zip(image_table.tolist(), labels):
        scores = [sum(a * b for a, b in zip(emb, w)) for w in weights]
        order = sorted(range(4), key=lambda c: -scores[c])
        hits1 += classes[order[0]] == label
        per_class[label] += classes[order[0]] == label
    assert res["top1"] == pytest.approx(hits1 / 30) and res["n"] == 30 and res["top5"] == 1.0
    assert res["per_class_top1"] == pytest.approx({c: v / (30 // 4 + (classes.index(c) < 30 % 4))
                                                   for c, v in per_class.items()})


def test_zero_shot_image_folder(tiny_model: nn.Module, tmp_path: Path) -> None:
    for i, (folder, color) in enumerate([("n001", "red"), ("n002", "blue"), ("n003", "gray")]):
        (tmp_path / "val" / folder).mkdir(parents=True)
        for j in range(3 + i):
            (tmp_path / "val" / folder / f"{j}.jpg").write_bytes(jpeg(COLORS[color]))
    (tmp_path / "val" / "n003" / "broken.jpg").write_bytes(b"not an image")
    res = run_tasks(tiny_model, tiny_model.data, [
        {"name": "zero_shot", "data": str(tmp_path / "val"), "classnames": ["red", "blue", "gray"],
         "templates": "openclip:imagenet", "batch_size": 4, "workers": 0}], device="cpu", progress=False)["zero_shot/val"]
    assert res["n"] == 12 and res["skipped"] == 1 and res["num_classes"] == 3
    assert res["top5"] == 1.0 and 0.0 <= res["top1"] <= 1.0
    # Folder names that are class names map by name; others by sorted position (torchvision's order).
    assert match_folders(["b", "a", None], ["a", "b", "c"]) == ["b", "a", None]
    assert match_folders(["n2", "n1"], ["tench", "goldfish"]) == ["goldfish", "tench"]


def test_zero_shot_integer_labels_index_classnames(tiny_model: nn.Module, tmp_path: Path) -> None:
    # ImageNet-style: json holds the class's position in classnames (a JSON integer), not its name.
    names = list(COLORS)
    samples = shape_samples(30, seed=3, prefix="i")
    for s in samples:
        s["json"]["color_id"] = names.index(s["json"]["color"])
        s["json"]["color_digits"] = str(names.index(s["json"]["color"]))
    data = write_shard(tmp_path / "ids-000.tar", samples)
    by_name = {"name": "zero_shot", "data": data, "label_key": "color", "classnames": names, "id": "n"}
    by_index = {"name": "zero_shot", "data": data, "label_key": "color_id", "classnames": names, "id": "i"}
    digits = {**by_index, "label_key": "color_digits", "label_type": "index", "id": "d"}
    res = run_tasks(tiny_model, tiny_model.data, [by_name, by_index, digits], device="cpu", progress=False)
    assert res["i"]["n"] == 30 and res["i"]["n_unknown_label"] == 0
    for task in ("i", "d"):
        assert res[task]["top1"] == res["n"]["top1"] and res[task]["per_class_top1"] == res["n"]["per_class_top1"]
    # digit strings are names unless label_type says index; integers are names when label_type says so
    for wrong in ({**digits, "label_type": "auto"}, {**by_index, "label_type": "name"}):
        with pytest.raises(ConfigError, match=r"label_type: the labels are integers .*set label_type: index"):
            run_tasks(tiny_model, tiny_model.data, [wrong], device="cpu", progress=False)
    with pytest.raises(ConfigError, match=r"label_type: 'index' needs classnames"):
        build_tasks([{"name": "zero_shot", "data": data, "label_key": "color_id", "label_type": "index"}])
    with pytest.raises(ConfigError, match=r"label_type: expected auto\|index\|name \(did you mean 'index'"):
        build_tasks([{**by_index, "label_type": "indx"}])


def test_zero_shot_without_classnames_warns_naming_task_and_labels(tiny_model: nn.Module, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    samples = shape_samples(20, seed=4, prefix="w")
    for s in samples:
        s["json"]["digit"] = list(COLORS).index(s["json"]["color"])
    data = write_shard(tmp_path / "digits-000.tar", samples)
    with caplog.at_level("WARNING"):
        run_tasks(tiny_model, tiny_model.data, [{"name": "zero_shot", "data": data, "label_key": "digit"}],
                  device="cpu", progress=False)
    warning = next(r.getMessage() for r in caplog.records if "no classnames" in r.getMessage())
    assert warning.startswith("zero_shot/digit: no classnames")
    assert "(1, 2, 3" in warning and "prompts unchanged" in warning and "label_type: index" in warning


def test_class_folders_work_for_any_modality(tiny_model: nn.Module, tmp_path: Path) -> None:
    # The eval core names no modality: a folder of class subfolders of .txt files is read like an ImageFolder.
    for color in ("red", "blue"):
        (tmp_path / "texts" / color).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "texts" / color / f"{i}.txt").write_text(f"a {color} thing number {i}")
    res = run_tasks(tiny_model, tiny_model.data, [{"name": "zero_shot", "data": str(tmp_path / "texts"),
                                                   "modality": "text", "templates": ["a {} thing"]}],
                    device="cpu", progress=False)["zero_shot/texts"]
    assert res["n"] == 6 and res["num_classes"] == 2


# Retrieval oracles: a fake model whose embeddings are chosen by the test.

class TableText(ModalityData):
    """Text 'tokenizer' mapping each string to its row in a table of embeddings."""

    modality = "text"
    extensions = ("txt",)

    def __init__(self, rows: dict[str, int]):
        self.rows = rows

    def collate(self, values: list[Any]) -> dict[str, Tensor]:
        return {"row": torch.tensor([self.rows[v] for v in values])}


class OracleModel(nn.Module):
    """Image embedding = table row given by the image's red level / 8; text embedding = table row of the string."""

    def __init__(self, image_table: Tensor, text_table: Tensor):
        super().__init__()
        self.embed_dim = image_table.shape[1]
        self.image_table, self.text_table = image_table, text_table
        self.modes: list[bool] = []

    def encode_fields(self, modality: str, fields: dict[str, Tensor]) -> SimpleNamespace:
        self.modes.append(self.training or torch.is_grad_enabled())
        if modality == "text":
            return SimpleNamespace(embedding=self.text_table[fields["row"]])
        idx = (fields["pixels"][:, 0].float().mean((1, 2)) / 8).round().long()
        return SimpleNamespace(embedding=self.image_table[idx])


def retrieval_run(tmp_path: Path, captions: list[list[str]], image_table: Tensor, text_table: Tensor,
                  text_rows: dict[str, int], **task: Any) -> dict[str, Any]:
    from mmpt.encoders.image import ImageData

    # A sample without captions has neither json captions nor txt (else its txt would be its caption).
    samples = [{"key": f"s{i:03d}", "rgb": (8 * i, 0, 0), "json": {"captions": caps}} | ({"txt": caps[0]} if caps else {})
               for i, caps in enumerate(captions)]
    pattern = write_shard(tmp_path / "ret.tar", samples)
    model = OracleModel(image_table, text_table)
    model.train()
    specs = {"image": ImageData(image_size=32), "text": TableText(text_rows)}
    res = run_tasks(model, specs, [{"name": "retrieval", "data": pattern, "batch_size": 3, **task}], device="cpu",
                    progress=False)["retrieval"]
    assert model.training and not any(model.modes), "run_tasks must run in eval mode without grad, then restore"
    return res


def test_retrieval_duplicate_captions_count_as_matches(tmp_path: Path) -> None:
    captions = [["a red circle", "a big red circle"], ["a blue square", "A Red  circle"], ["a green star"],
                ["a pink ring", "a gray cross"]]
    # Each text points exactly at one image; the two "red circle" captions point at each other's image.
    points_at = {"a red circle": 1, "a big red circle": 0, "a blue square": 1, "A Red  circle": 0,
                 "a green star": 2, "a pink ring": 3, "a gray cross": 3}
    rows = {t: i for i, t in enumerate(points_at)}
    res = retrieval_run(tmp_path, captions, torch.eye(4), torch.eye(4)[list(points_at.values())], rows)
    assert res["t2i_r1"] == 1.0 and res["i2t_r1"] == 1.0  # only right because duplicates match
    assert res["i2t_r1_chance"] == pytest.approx((3 + 3 + 1 + 2) / 4 / 7)
    assert res["t2i_r1_chance"] == pytest.approx((2 + 1 + 1 + 2 + 1 + 1 + 1) / 7 / 4)
    assert res["i2t_r1_over_chance"] == pytest.approx(1 / res["i2t_r1_chance"])
    assert (res["n_images"], res["n_texts"], res["n_images_without_captions"]) == (4, 7, 0)


def naive_recall(sim: list[list[float]], relevant: list[set[int]], ks: tuple[int, ...]) -> tuple[dict, float]:
    """Rank of the first relevant candidate per query, by sorting; answerable queries only."""
    hits = dict.fromkeys(ks, 0)
    chance, n = 0.0, 0
    for scores, rel in zip(sim, relevant):
        if not rel:
            continue
        order = sorted(range(len(scores)), key=lambda j: -scores[j])
        first = next(r for r, j in enumerate(order) if j in rel)
        for k in ks:
            hits[k] += first < k
        chance += len(rel) / len(scores)
        n += 1
    return {k: hits[k] / n for k in ks}, chance / n


def test_retrieval_matches_naive_reference(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pool = [f"caption number {i}" for i in range(12)] + ["Caption Number 3", "caption   Number 4"]
    captions = [[pool[j] for j in rng.choice(len(pool), size=rng.integers(1, 4), replace=False)] for _ in range(30)]
    captions[7] = []  # an image without captions: a candidate, never an answerable query
    texts = [c for caps in captions for c in caps]
    g = torch.Generator().manual_seed(1)
    image_table = F.normalize(torch.randn(30, 6, generator=g), dim=-1)
    text_table = F.normalize(torch.randn(len(pool), 6, generator=g), dim=-1)
    rows = {t: i for i, t in enumerate(pool)}
    res = retrieval_run(tmp_path, captions, image_table, text_table, rows, ks=[1, 3, 5, 10])

    norm = [" ".join(c.lower().split()) for c in texts]
    image_caps = [{" ".join(c.lower().split()) for c in caps} for caps in captions]
    text_emb = [text_table[rows[t]].tolist() for t in texts]
    image_emb = image_table.tolist()

    def dot(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b))

    i2t, i2t_chance = naive_recall([[dot(im, t) for t in text_emb] for im in image_emb],
                                   [{t for t, c in enumerate(norm) if c in caps} for caps in image_caps], (1, 3, 5, 10))
    t2i, t2i_chance = naive_recall([[dot(t, im) for im in image_emb] for t in text_emb],
                                   [{i for i, caps in enumerate(image_caps) if c in caps} for c in norm], (1, 3, 5, 10))
    for k in (1, 3, 5, 10):
        assert res[f"i2t_r{k}"] == pytest.approx(i2t[k]) and res[f"t2i_r{k}"] == pytest.approx(t2i[k])
    assert res["i2t_r1_chance"] == pytest.approx(i2t_chance) and res["t2i_r1_chance"] == pytest.approx(t2i_chance)
    assert res["n_texts"] == len(texts) and res["n_images_without_captions"] == 1
    assert res["mean_recall"] == pytest.approx((sum(i2t.values()) + sum(t2i.values())) / 8)


def test_recall_chunking_and_relevance() -> None:
    text_ids = torch.tensor([0, 1, 1, 2, 3])
    image_ids = torch.tensor([[0, 1], [1, -1], [3, -1]])
    expected = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 0], [0, 0, 0], [0, 0, 1]], dtype=torch.bool)
    assert torch.equal(relevance_matrix(text_ids, image_ids), expected)
    g = torch.Generator().manual_seed(0)
    q, c = torch.randn(5, 4, generator=g), torch.randn(3, 4, generator=g)
    whole = recall_at_k(q, c, lambda r: relevance_matrix(text_ids[r], image_ids), (1, 2, 10))
    chunked = recall_at_k(q, c, lambda r: relevance_matrix(text_ids[r], image_ids), (1, 2, 10), chunk=2)
    assert whole == chunked and whole[2] == 4 and whole[0][10] == 1.0  # text id 2 has no image: left out


# Linear probe.

def test_logistic_regression_separates_blobs_deterministically() -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 3
    y = torch.arange(400) % 4
    x = centers[y] + torch.randn(400, 16, generator=g)
    probe = fit_logistic_regression(x[:300], y[:300], 4, weight_decay=1e-3, max_iter=100)
    assert (probe(x[300:]).argmax(1) == y[300:]).float().mean() >= 0.95
    again = fit_logistic_regression(x[:300], y[:300], 4, weight_decay=1e-3, max_iter=100)
    assert torch.equal(probe.weight, again.weight)


def test_linear_probe_task_on_separable_embeddings(tmp_path: Path) -> None:
    from mmpt.encoders.image import ImageData

    # Three classes, each a band of red levels: embeddings (table rows) are separable by class.
    rng = np.random.default_rng(0)
    image_table = F.normalize(torch.randn(32, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    band = {"circle": range(0, 10), "square": range(11, 21), "star": range(22, 32)}
    table = torch.zeros(32, 8)
    for c, levels in enumerate(band.values()):
        table[list(levels)] = F.normalize(image_table[list(levels)] * 0.3 + 3 * torch.eye(8)[c], dim=-1)

    def samples(n: int, prefix: str) -> list[dict[str, Any]]:
        out = []
        for i in range(n):
            shape = SHAPES[i % 3]
            level = int(rng.choice(list(band[shape])))
            out.append({"key": f"{prefix}{i:03d}", "rgb": (8 * level, 0, 0), "json": {"shape": shape}})
        return out

    test = samples(30, "e")
    test[0]["json"]["shape"] = "hexagon"  # not a training class
    test.append({"key": "broken", "jpg": b"not a jpeg", "json": {"shape": "circle"}})  # skipped, not scored
    train, data = write_shard(tmp_path / "tr.tar", samples(60, "t")), write_shard(tmp_path / "te.tar", test)
    model = OracleModel(table, torch.zeros(1, 8))
    res = run_tasks(model, {"image": ImageData(image_size=32)}, [
        {"name": "linear_probe", "train_data": train, "data": data, "label_key": "shape", "batch_size": 16}],
        device="cpu", progress=False)["linear_probe/shape"]
    assert res["top1"] >= 0.95 and res["train_top1"] >= 0.95
    assert (res["n"], res["n_train"], res["n_unknown_label"], res["num_classes"], res["skipped"]) == (29, 60, 1, 3, 1)
    assert res["chance"] == pytest.approx(1 / 3) and res["top1_over_chance"] >= 2.8


# End to end on the tiny random model.

def test_run_tasks_end_to_end(tiny_model: nn.Module, shards: dict[str, str], tmp_path: Path) -> None:
    tiny_model.train()
    results = run_tasks(tiny_model, tiny_model.data, [
        {"name": "zero_shot", "data": shards["eval"], "label_key": "color", "classnames": shards["classes"],
         "templates": shards["templates"]},
        {"name": "zero_shot", "data": shards["eval"], "label_key": "shape", "classnames": list(SHAPES)},
        {"name": "retrieval", "data": shards["eval"], "batch_size": 7},
        {"name": "linear_probe", "train_data": shards["train"], "data": shards["eval"], "label_key": "shape",
         "max_iter": 50},
    ], device="cpu", progress=False)
    assert tiny_model.training
    assert list(results) == ["zero_shot/color", "zero_shot/shape", "retrieval", "linear_probe/shape"]
    zs = results["zero_shot/shape"]
    assert zs["top5"] == 1.0 and zs["chance"] == pytest.approx(1 / 3) and zs["n"] == 40
    for name in ("zero_shot/color", "zero_shot/shape", "linear_probe/shape"):
        m = results[name]
        assert {"top1", "top5", "n", "chance", "top1_over_chance", "mean_per_class_top1"} <= set(m)
        assert 0.0 <= m["top1"] <= m["top5"] <= 1.0
    ret = results["retrieval"]
    expected = {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} | {
        "i2t_r1_chance", "t2i_r1_chance", "i2t_r1_over_chance", "mean_recall", "n_images", "n_texts"}
    assert expected <= set(ret) and (ret["n_images"], ret["n_texts"]) == (40, 120)
    for d in ("i2t", "t2i"):
        assert 0.0 <= ret[f"{d}_r1"] <= ret[f"{d}_r5"] <= ret[f"{d}_r10"] <= 1.0
        assert 0.0 < ret[f"{d}_r1_chance"] < 1.0
    for metrics in results.values():
        assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, (int, float)))

    table = format_table(results)
    assert "retrieval" in table and "i2t_r1_over_chance" in table and "chance" in table.splitlines()[0]
    write_results(results, tmp_path / "out" / "eval.json")
    assert json.loads((tmp_path / "out" / "eval.json").read_text()) == json.loads(json.dumps(results))


# Any modality: fake "vec" modalities (ragged sequences of 4-d vectors) prove the tasks name none.

VEC_DIM = 4


class VecData(ModalityData):
    """Data side of a fake modality: float32 bytes of a (T, 4) sequence; collate pads and masks."""

    def __init__(self, modality: str = "vec"):
        self.modality, self.extensions = modality, (modality,)

    def decode(self, data: bytes, ext: str) -> Tensor:
        return torch.from_numpy(np.frombuffer(data, dtype=np.float32).reshape(-1, VEC_DIM).copy())

    def collate(self, values: list[Any]) -> dict[str, Tensor]:
        length = max((len(v) for v in values if v is not None), default=1)
        x = torch.zeros(len(values), length, VEC_DIM)
        mask = torch.zeros(len(values), length, dtype=torch.bool)
        for i, v in enumerate(values):
            if v is not None:
                x[i, :len(v)], mask[i, :len(v)] = v, True
        return {"x": x, "mask": mask}


class VecModel(nn.Module):
    """Tokens are the vectors themselves; the embedding is their normalised mean; texts come from a table."""

    def __init__(self, text_table: Tensor | None = None):
        super().__init__()
        self.embed_dim, self.text_table = VEC_DIM, text_table

    def encode_fields(self, modality: str, fields: dict[str, Tensor]) -> Any:
        from mmpt.contracts import EncoderOutput

        if "row" in fields:
            return SimpleNamespace(embedding=self.text_table[fields["row"]])
        x, mask = fields["x"], fields["mask"]
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return EncoderOutput(tokens=x, mask=mask, pooled=pooled, embedding=F.normalize(pooled, dim=-1))


def vec_bytes(rows: np.ndarray) -> bytes:
    return np.asarray(rows, dtype=np.float32).tobytes()


def write_members(path: Path, samples: list[dict[str, Any]]) -> str:
    """samples: {key, <ext>: bytes | array | dict (json)} -> a tar."""
    from shardkit import write_tar

    def encode(ext: str, value: Any) -> bytes:
        return json.dumps(value).encode() if ext == "json" else value if isinstance(value, bytes) else vec_bytes(value)

    return write_tar(path, [(s["key"], {ext: encode(ext, v) for ext, v in s.items() if ext != "key"}) for s in samples])


def test_zero_shot_of_a_non_image_modality_against_text_prompts(tmp_path: Path) -> None:
    protos = torch.eye(VEC_DIM)[:3]
    classes = ["alpha", "beta", "gamma"]
    rng = np.random.default_rng(0)
    samples = []
    for i in range(24):
        c = i % 3
        length = int(rng.integers(1, 6))  # ragged: padding must not count
        rows = protos[c].numpy() + rng.normal(0, 0.05, (length, VEC_DIM))
        samples.append({"key": f"s{i:03d}", "json": {"c": classes[c]}} | ({} if i == 5 else {"vec": rows}))
    pattern = write_members(tmp_path / "zs.tar", samples)
    prompts = {f"a {c}": i for i, c in enumerate(classes)}
    specs = {"vec": VecData(), "text": TableText(prompts)}
    res = run_tasks(VecModel(protos), specs, [{"name": "zero_shot", "data": pattern, "label_key": "c",
                                                "classnames": classes, "templates": ["a {}"], "modality": "vec",
                                                "batch_size": 5}], device="cpu", progress=False)["zero_shot/c"]
    assert res["top1"] == 1.0 and res["n"] == 23 and res["skipped"] == 1  # the sample without a vec member


def test_retrieval_between_two_modalities_with_several_positives(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    groups = [i % 4 for i in range(20)]
    samples = [{"key": f"s{i:03d}", "vec": rng.normal(size=(int(rng.integers(1, 4)), VEC_DIM)),
                "other": rng.normal(size=(2, VEC_DIM)), "json": {"group": g}} for i, g in enumerate(groups)]
    del samples[3]["other"]  # only a query: a candidate less on the other side
    del samples[6]["json"]["group"]  # no match value: unanswerable, and nobody's positive
    pattern = write_members(tmp_path / "pair.tar", samples)
    specs = {"vec": VecData(), "other": VecData("other")}
    task = {"name": "retrieval", "data": pattern, "modality": "vec", "target": "other", "batch_size": 6,
            "ks": [1, 3, 5]}
    res = run_tasks(VecModel(), specs, [task | {"match_key": "group"}, task | {"id": "same"}], device="cpu",
                    progress=False)

    def emb(ext: str) -> dict[str, list[float]]:
        out = {}
        for s in samples:
            if ext in s:
                mean = np.asarray(s[ext], dtype=np.float32).mean(0)
                out[s["key"]] = (mean / np.linalg.norm(mean)).tolist()
        return out

    q, t = emb("vec"), emb("other")
    group = {s["key"]: s["json"].get("group") for s in samples}

    def dot(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b))

    for result, same in ((res["retrieval/vec-other"], lambda a, b: group[a] is not None and group[a] == group[b]),
                         (res["same"], lambda a, b: a == b)):
        fwd, fwd_chance = naive_recall([[dot(q[a], t[b]) for b in t] for a in q],
                                       [{j for j, b in enumerate(t) if same(a, b)} for a in q], (1, 3, 5))
        back, back_chance = naive_recall([[dot(t[b], q[a]) for a in q] for b in t],
                                         [{j for j, a in enumerate(q) if same(b, a)} for b in t], (1, 3, 5))
        for k in (1, 3, 5):
            assert result[f"vec2other_r{k}"] == pytest.approx(fwd[k]) and result[f"other2vec_r{k}"] == pytest.approx(back[k])
        assert result["vec2other_r1_chance"] == pytest.approx(fwd_chance)
        assert result["other2vec_r1_chance"] == pytest.approx(back_chance)
        assert (result["n_vec"], result["n_other"]) == (20, 19)
    assert res["retrieval/vec-other"]["n_vec_without_positive"] == 1  # sample 6
    assert res["same"]["n_vec_without_positive"] == 1  # sample 3 has no "other" member
    with pytest.raises(ConfigError, match="match_key: only used with a target"):
        build_tasks([{"name": "retrieval", "data": pattern, "match_key": "group"}])


def test_linear_probe_on_a_non_image_modality(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)

    def split(name: str, n: int) -> str:
        samples = [{"key": f"{name}{i:03d}", "vec": np.eye(VEC_DIM)[i % 2] + rng.normal(0, 0.1, (3, VEC_DIM)),
                    "json": {"c": ["left", "right"][i % 2]}} for i in range(n)]
        return write_members(tmp_path / f"{name}.tar", samples)

    res = run_tasks(VecModel(), {"vec": VecData()}, [{"name": "linear_probe", "data": split("test", 12),
                                                      "train_data": split("train", 20), "label_key": "c",
                                                      "modality": "vec"}], device="cpu", progress=False)
    assert res["linear_probe/c"]["top1"] == 1.0 and res["linear_probe/c"]["n_train"] == 20


def token_split(tmp_path: Path, name: str, n: int, seed: int) -> str:
    """Sequences whose token t (after one CLS-like token) is labelled by which axis it points along."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        length = int(rng.integers(2, 7))
        labels = rng.integers(0, 3, length)
        tokens = np.concatenate([rng.normal(0, 1, (1, VEC_DIM)), np.eye(VEC_DIM)[labels] + rng.normal(0, 0.1, (length, VEC_DIM))])
        names = [["helix", "strand", "coil"][k] for k in labels]
        if i == 0:
            names[0] = None  # an unlabelled position: not scored
        samples.append({"key": f"{name}{i:03d}", "vec": tokens, "json": {"ss": names + ["coil"] * (i == 1)}})
    return write_members(tmp_path / f"{name}.tar", samples)


def test_token_probe_scores_each_labelled_token(tmp_path: Path) -> None:
    train, test = token_split(tmp_path, "train", 30, 3), token_split(tmp_path, "test", 10, 4)
    task = {"name": "token_probe", "data": test, "train_data": train, "label_key": "ss", "modality": "vec",
            "batch_size": 4}
    res = run_tasks(VecModel(), {"vec": VecData()}, [task | {"token_offset": 1}, task | {"id": "misaligned"}],
                    device="cpu", progress=False)
    aligned = res["token_probe/ss"]
    with tarfile.open(test) as tar:
        labels = [json.loads(tar.extractfile(m).read())["ss"] for m in tar.getmembers() if m.name.endswith(".json")]
    scored = sum(v is not None for names in labels for v in names) - 1  # sample 1's extra label has no token
    assert aligned["top1"] == 1.0 and aligned["n"] == scored and aligned["n_sequences"] == 10
    assert aligned["n_labels_without_token"] == 2 and aligned["num_classes"] == 3  # one per split
    assert res["misaligned"]["top1"] < 0.8  # the offset decides which token a label belongs to
    with pytest.raises(ConfigError, match="token_offset: must be >= 0"):
        build_tasks([task | {"token_offset": -1}])


def test_caption_retrieval_names_metrics_by_the_modalities_compared(tmp_path: Path) -> None:
    """An audio-like tower against captions is not 'i2t': initials where they tell the model's towers
    apart, the modality names where they do not (point_cloud and protein both start with p)."""
    samples = [{"key": f"s{i:03d}", "vec": np.eye(VEC_DIM)[i][None], "txt": f"caption {i}".encode()}
               for i in range(VEC_DIM)]
    pattern = write_members(tmp_path / "cap.tar", samples)
    rows = {f"caption {i}": i for i in range(VEC_DIM)}
    task = [{"name": "retrieval", "data": pattern, "modality": "vec", "batch_size": 3}]
    res = run_tasks(VecModel(torch.eye(VEC_DIM)), {"vec": VecData(), "text": TableText(rows)}, task,
                    device="cpu", progress=False)["retrieval"]
    assert res["v2t_r1"] == 1.0 and res["t2v_r1"] == 1.0 and "v2t_r1_over_chance" in res
    assert not any(k.startswith(("i2t", "t2i")) for k in res)
    both = {"vec": VecData(), "velocity": VecData("velocity"), "text": TableText(rows)}
    res = run_tasks(VecModel(torch.eye(VEC_DIM)), both, task, device="cpu", progress=False)["retrieval"]
    assert res["vec2text_r1"] == 1.0 and res["text2vec_r1"] == 1.0 and "v2t_r1" not in res
    from mmpt.training.plot import headline  # the training summary and loss.png pick these curves

    assert [k for k in res if headline(k)] == ["vec2text_r1", "text2vec_r1"]
