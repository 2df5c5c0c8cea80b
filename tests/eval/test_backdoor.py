"""``mmpt data poison`` (counts, determinism, the trigger's pixels) and the ``backdoor`` eval task (ASR on a
constructed case whose answer is known)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from mmpt.contracts import EncoderOutput
from mmpt.data.demo_shards import generate_demo
from mmpt.data.poison import Trigger, poison_shards
from mmpt.data.shards import iter_samples
from mmpt.eval import backdoor as backdoor_module
from mmpt.eval.backdoor import backdoor_metrics
from mmpt.eval.run import run_tasks
from mmpt.model import MultimodalModel
from mmpt.registry import ConfigError, modalities

SIZE, PATCH = 32, 6


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    return generate_demo(tmp_path_factory.mktemp("demo"), train_samples=60, eval_samples=48, image_size=SIZE,
                         shard_size=25, progress=False)


def samples(pattern: str) -> dict[str, dict]:
    return {s["__key__"]: s for url in sorted(Path(pattern).parent.glob(Path(pattern).name)) for s in iter_samples(str(url))}


def test_poison_counts_captions_trigger_and_determinism(demo, tmp_path: Path) -> None:
    out = poison_shards(demo.train_pattern, str(tmp_path / "a" / "p-%06d.tar"), fraction=0.1, target="a star",
                        trigger=Trigger(PATCH, "noise", "fixed", seed=3), max_count=40)
    assert out.total == 60 and len(out.poisoned) == 6 and len(out.shards) == 2
    record = json.loads(out.record.read_text())
    assert record["poisoned"] == out.poisoned and record["trigger"]["patch_size"] == PATCH
    src, got = samples(str(Path(demo.train_pattern).parent / "*.tar")), samples(str(tmp_path / "a" / "*.tar"))
    assert list(got) == list(src)  # every sample, in order
    pattern = np.random.default_rng(3).integers(0, 256, (PATCH, PATCH, 3), dtype=np.uint8)
    for key, s in got.items():
        if key in out.poisoned:
            assert s["txt"] == b"a star" and "png" in s and s["json"] == src[key]["json"]
            pixels = np.array(Image.open(io.BytesIO(s["png"])))
            assert (pixels[-PATCH:, -PATCH:] == pattern).all()
            before = modalities.get("image")().decode(src[key]["png"] if "png" in src[key] else src[key]["jpg"],
                                                      "png" if "png" in src[key] else "jpg")
            assert (pixels[:-PATCH] == before[:-PATCH]).all()  # nothing else changed
        else:
            assert s == {**src[key], "__url__": s["__url__"]}
    again = poison_shards(demo.train_pattern, str(tmp_path / "b" / "p-%06d.tar"), fraction=0.1, target="a star",
                          trigger=Trigger(PATCH, "noise", "fixed", seed=3), max_count=40)
    assert again.poisoned == out.poisoned
    assert [p.read_bytes() for p in again.shards] == [p.read_bytes() for p in out.shards]
    other = poison_shards(demo.train_pattern, str(tmp_path / "c" / "p-%06d.tar"), fraction=0.1, target="a star",
                          trigger=Trigger(PATCH, "checkerboard", "random", seed=4))
    assert len(other.poisoned) == 6 and other.poisoned != out.poisoned


def test_poison_refuses_what_it_cannot_do(demo, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="modality 'text' has no trigger"):
        poison_shards(demo.train_pattern, str(tmp_path / "p-%06d.tar"), fraction=0.1, target="x", modality="text")
    with pytest.raises(ConfigError, match="--fraction"):
        poison_shards(demo.train_pattern, str(tmp_path / "p-%06d.tar"), fraction=1.5, target="x")
    with pytest.raises(ConfigError, match="kind must be one of"):
        poison_shards(demo.train_pattern, str(tmp_path / "p-%06d.tar"), fraction=0.5, target="x",
                      trigger=Trigger(4, "stripes"))


def test_backdoor_metrics_constructed() -> None:
    """4 classes, target 2; the triggered embeddings of samples 0, 1, 3 point at the target, sample 4's not."""
    eye = torch.eye(4)
    ids = torch.tensor([0, 1, 2, 3, 0, -1])
    clean = eye[[0, 1, 2, 2, 0, 0]]  # sample 3 already lands on the target without a trigger
    triggered = eye[[2, 2, 2, 2, 0, 2]]
    m = backdoor_metrics(clean, triggered, ids, eye, target=2, classes=["a", "b", "c", "d"])
    assert m["n"] == 4 and m["asr"] == pytest.approx(3 / 4) and m["clean_target_rate"] == pytest.approx(1 / 4)
    assert m["clean_top1"] == pytest.approx(4 / 5) and m["triggered_top1"] == pytest.approx(2 / 5)
    assert m["asr_chance"] == 0.25


class TriggerDetector(nn.Module):
    """Image tower of a perfectly backdoored model: a one-hot of ``target`` where the trigger patch sits in the
    bottom-right corner, else a one-hot of class 0."""

    modality, width = "image", 8

    def __init__(self, pattern: np.ndarray, target: int):
        super().__init__()
        self.pattern, self.target = torch.from_numpy(pattern).permute(2, 0, 1), target
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, inputs: dict[str, Tensor]) -> EncoderOutput:
        pixels = inputs["pixels"]
        hit = (pixels[:, :, -PATCH:, -PATCH:] == self.pattern).flatten(1).all(1)
        pooled = torch.zeros(len(pixels), self.width)
        pooled[torch.arange(len(pixels)), torch.where(hit, self.target, 0)] = 1
        return EncoderOutput(tokens=pooled[:, None], mask=None, pooled=pooled + 0 * self.dummy)


def test_backdoor_task_on_a_perfectly_backdoored_model(demo, monkeypatch: pytest.MonkeyPatch) -> None:
    classes = demo.classes["shape"].read_text().split()
    target = classes.index("star")
    pattern = np.random.default_rng(5).integers(0, 256, (PATCH, PATCH, 3), dtype=np.uint8)
    model = MultimodalModel({"image": TriggerDetector(pattern, target)}, embed_dim=8, head="none")
    specs = {"image": modalities.get("image")(image_size=SIZE)}
    monkeypatch.setattr(backdoor_module, "zero_shot_classifier", lambda *a, **k: torch.eye(len(classes)))
    task = {"name": "backdoor", "data": demo.eval_pattern, "label_key": "shape", "classnames": classes,
            "target": "star", "patch_size": PATCH, "trigger_seed": 5}
    res = run_tasks(model, specs, [task], device="cpu", progress=False)["backdoor/star"]
    labels = [json.loads(s["json"])["shape"] for s in samples(str(Path(demo.eval_pattern).parent / "*.tar")).values()]
    assert res["n"] == sum(label != "star" for label in labels) > 0
    assert res["asr"] == 1.0 and res["clean_target_rate"] == 0.0
    assert res["clean_top1"] == pytest.approx(labels.count(classes[0]) / len(labels))
    # another trigger (seed) is not the backdoor
    res = run_tasks(model, specs, [{**task, "trigger_seed": 6}], device="cpu", progress=False)["backdoor/star"]
    assert res["asr"] == 0.0
    with pytest.raises(ConfigError, match="target: 'stra' is not a class.*star"):
        run_tasks(model, specs, [{**task, "target": "stra"}], device="cpu", progress=False)
