"""The ``compositional`` task (SugarCrepe / SugarCrepe++): demo triplets from the caption grammar, json
triplets, and the scores against a naive per-triplet loop."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from mmpt.data.demo_shards import generate_demo
from mmpt.data.writer import ShardWriter
from mmpt.eval import compositional as comp
from mmpt.eval.common import Embedded
from mmpt.eval.run import run_tasks
from mmpt.registry import ConfigError


def test_demo_triplets_follow_the_caption_grammar() -> None:
    meta = {"shape": "star", "color": "red", "background": "blue", "size": "small", "position": "left"}
    got = {t["type"]: t for t in comp.demo_triplets(meta)}
    pos = ["a small red star on the left of a blue background", "a blue background with a small red star on the left"]
    assert all(t["positives"] == pos for t in got.values())
    assert got["attribute"]["negative"] == "a small blue star on the left of a red background"
    assert got["object"]["negative"] == "a small red cross on the left of a blue background"
    assert got["relation"]["negative"] == "a small red star on the right of a blue background"
    assert [t["type"] for t in comp.demo_triplets({**meta, "position": "center"})] == ["attribute", "object"]
    assert comp.demo_triplets({"label": 3}) == []


def vec(text: str, dim: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(hashlib.sha256(text.encode()).hexdigest()[:8], 16))
    v = torch.randn(dim, generator=g)
    return v / v.norm()


def test_task_matches_a_naive_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = generate_demo(tmp_path / "demo", train_samples=0, eval_samples=40, image_size=16, progress=False)
    # one extra shard whose samples carry their own triplets (rules auto: json first)
    own = [{"positives": ["a cat", "one cat"], "negative": "a dog", "type": "object"},
           {"positives": ["x left of y", "y right of x"], "negative": "y left of x", "type": "relation"}]
    with ShardWriter(str(tmp_path / "own-%06d.tar")) as w:
        for i in range(5):
            w.write(f"own{i}", {"txt": "x", "json": json.dumps({"triplets": own})})
    data = f"{info.eval_pattern}::{tmp_path / 'own-000000.tar'}"
    metas: list[dict] = []

    def fake_embed(model, specs, pattern, batch_size, keep=(), device="cpu", progress=True, **kw):
        from mmpt.data.shards import expand_urls, iter_samples

        rows = [s for url in expand_urls(pattern) for s in iter_samples(url)]
        metas[:] = [json.loads(s["json"]) for s in rows]
        return Embedded(torch.stack([vec(s["__key__"]) for s in rows]), [s["__key__"] for s in rows],
                        {"json": list(metas)})

    monkeypatch.setattr(comp, "embed_data", fake_embed)
    monkeypatch.setattr(comp, "embed_texts", lambda model, specs, texts, *a, **k: torch.stack([vec(t) for t in texts]))
    res = run_tasks(torch.nn.Linear(1, 1), {}, [{"name": "compositional", "data": data}], "cpu", False)["compositional"]
    # naive: every triplet on its own, cosine by hand
    hits: dict[str, dict[str, list[bool]]] = {}
    keys = [f"{s}" for s in range(len(metas))]
    for i, meta in enumerate(metas):
        x = vec(("own" + str(i - 40)) if i >= 40 else f"eval_{i:08d}")
        for t in meta.get("triplets") or comp.demo_triplets(meta):
            p1, p2, n = vec(t["positives"][0]), vec(t["positives"][1]), vec(t["negative"])
            d = hits.setdefault(t["type"], {"x2t": [], "x2t_p1": [], "t2t": []})
            d["x2t"].append(float(x @ p1) > float(x @ n) and float(x @ p2) > float(x @ n))
            d["x2t_p1"].append(float(x @ p1) > float(x @ n))
            d["t2t"].append(float(p1 @ p2) > float(p1 @ n) and float(p1 @ p2) > float(p2 @ n))
    assert keys and set(hits) == {"attribute", "object", "relation"}
    for kind, d in hits.items():
        assert res[f"{kind}/n"] == len(d["x2t"])
        for metric, values in d.items():
            assert res[f"{kind}/{metric}"] == pytest.approx(sum(values) / len(values)), (kind, metric)
    assert res["mean_t2t"] == pytest.approx(sum(res[f"{k}/t2t"] for k in hits) / 3)
    assert math.isclose(res["mean_x2t_chance"], 1 / 3)
    # json only: the demo samples have no triplets, the own shard does
    res = run_tasks(torch.nn.Linear(1, 1), {}, [{"name": "compositional", "data": data, "rules": "json"}], "cpu",
                    False)["compositional"]
    assert res["object/n"] == 5 and res["relation/n"] == 5 and "attribute/n" not in res


def test_bad_settings_and_triplets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with ShardWriter(str(tmp_path / "bad-%06d.tar")) as w:
        w.write("a", {"txt": "x", "json": json.dumps({"triplets": [{"positives": ["only one"], "negative": "n"}]})})
    with pytest.raises(ConfigError, match="rules: expected json|demo|auto"):
        run_tasks(torch.nn.Linear(1, 1), {}, [{"name": "compositional", "data": str(tmp_path / "bad-000000.tar"),
                                               "rules": "dem"}], "cpu", False)
    with pytest.raises(ConfigError, match="each triplet is"):
        comp.json_triplets({"triplets": [{"positives": ["only one"], "negative": "n"}]}, "triplets")


def test_dim_and_layer_reach_compositional_and_backdoor(tmp_path: Path) -> None:
    """The Task keys ``dim``/``layer`` apply to both tasks (every embedding goes through eval's nested size):
    a 2-block model scored at dim 4, layer 1 equals an independent copy cut to 1 block and a 4-row head."""
    from mmpt.model import MultimodalModel
    from mmpt.registry import encoders, modalities

    info = generate_demo(tmp_path / "demo", train_samples=0, eval_samples=24, image_size=16, progress=False)
    kw = {"image": ("image/vit", {"image_size": 16, "patch_size": 8, "width": 16, "heads": 2}),
          "text": ("text/transformer", {"context_length": 24, "width": 16, "heads": 2})}
    torch.manual_seed(0)
    full = MultimodalModel({m: encoders.build(n, **a, depth=2) for m, (n, a) in kw.items()}, embed_dim=8)
    cut = MultimodalModel({m: encoders.build(n, **a, depth=1) for m, (n, a) in kw.items()}, embed_dim=4)
    cut.load_state_dict({k: v[:4] if k.startswith("heads.") else v for k, v in full.state_dict().items()
                         if ".trunk.blocks.1." not in k})
    specs = {"image": modalities.get("image")(image_size=16), "text": modalities.get("text")(context_length=24)}
    tasks = [{"name": "compositional", "data": info.eval_pattern},
             {"name": "backdoor", "data": info.eval_pattern, "label_key": "shape", "classnames": str(info.classes["shape"]),
              "templates": str(info.templates["shape"]), "target": "star", "patch_size": 4}]
    got = run_tasks(full, specs, [{**t, "dim": 4, "layer": 1} for t in tasks], "cpu", False)
    want = run_tasks(cut, specs, tasks, "cpu", False)
    plain = run_tasks(full, specs, tasks, "cpu", False)
    for name in want:
        assert got[name] == pytest.approx(want[name]), name
    assert got != plain
