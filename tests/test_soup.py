"""mmpt soup: the uniform soup equals a manual average, greedy picks by metric, refusals name the tensor,
and fine-tunes record the init they started from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from exportkit import config_of, metadata, rewrite, train_and_export, with_config
from safetensors.torch import load_file
from shardkit import tiny_config

from mmpt.commands.soup import greedy, soup
from mmpt.parts.init_from import INIT_META, weights_digest
from mmpt.registry import ConfigError


@pytest.fixture(scope="module")
def base(color_shards: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_and_export(color_shards, tmp_path_factory.mktemp("base"))


def _finetune(base: Path, out: Path, seed: int, scale: float = 0.01, init: str | None = "same") -> Path:
    """A copy of ``base`` with every floating tensor nudged (a stand-in for a short fine-tune)."""
    g = torch.Generator().manual_seed(seed)
    state = {k: v + scale * v.abs().mean() * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
             for k, v in load_file(str(base)).items()}
    meta = {INIT_META: weights_digest(load_file(str(base))) if init == "same" else init}
    return rewrite(base, out, meta, state)


def test_uniform_soup_is_the_average(base: Path, tmp_path: Path) -> None:
    parts = [_finetune(base, tmp_path / f"ft{i}.safetensors", i) for i in range(3)]
    res = soup(parts, tmp_path / "soup.safetensors")
    got = load_file(str(res.out))
    states = [load_file(str(p)) for p in parts]
    for key, value in got.items():
        if value.is_floating_point():
            manual = (states[0][key] + states[1][key] + states[2][key]) / 3
            torch.testing.assert_close(value, manual, rtol=0, atol=1e-6)
        else:
            assert torch.equal(value, states[0][key])
    meta = metadata(res.out)
    record = json.loads(meta["soup"])
    assert record["method"] == "uniform" and [i["file"] for i in record["ingredients"]] == [str(p) for p in parts]
    assert meta[INIT_META] == weights_digest(load_file(str(base)))  # the soup keeps the shared init
    import mmpt

    model, _, _ = mmpt.load(str(res.out))  # a normal export
    assert model is not None


def test_weights_digest_reads_every_tensor_kind() -> None:
    state = {"w": torch.ones(2, 3), "steps": torch.tensor(7), "half": torch.zeros(4, dtype=torch.bfloat16)}
    assert weights_digest(state) == weights_digest({k: v.clone() for k, v in reversed(state.items())})
    assert weights_digest(state) != weights_digest({**state, "steps": torch.tensor(8)})


def test_greedy_picks_by_metric() -> None:
    # scores: -|w - 1.4|; sorted 1 (-0.4), 2 (-0.6), 0 (-1.4), 10: {1, 2} -> 1.5 (-0.1) kept; + 0 -> 1.0 worse; + 10 worse
    states = [{"w": torch.tensor([w])} for w in (0.0, 1.0, 10.0, 2.0)]
    chosen, scores, best = greedy(states, lambda s: -abs(float(s["w"]) - 1.4))
    assert chosen == [1, 3]
    assert scores == pytest.approx([-1.4, -0.4, -8.6, -0.6]) and best == pytest.approx(-0.1)


def test_greedy_cli_with_eval_tasks(base: Path, color_shards: list[str], tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    from mmpt.cli import main

    parts = [_finetune(base, tmp_path / f"ft{i}.safetensors", i, scale=0.05) for i in range(3)]
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(json.dumps([{"name": "zero_shot", "data": color_shards[0], "label_key": "color",
                                  "classnames": ["red", "green", "blue", "yellow"], "templates": ["a {} square"]}]))
    out = tmp_path / "greedy.safetensors"
    assert main(["soup", *map(str, parts), "--out", str(out), "--greedy", "--tasks-file", str(tasks),
                 "--metric", "zero_shot/color.top1"]) == 0
    printed = capsys.readouterr().out
    assert "greedy soup of" in printed
    record = json.loads(metadata(out)["soup"])
    scores = [i["metric"] for i in record["ingredients"]]
    best = max(range(3), key=lambda i: scores[i])
    assert record["ingredients"][best]["in_soup"] and record["soup_metric"] >= max(scores)
    assert main(["soup", *map(str, parts), "--out", str(out), "--greedy"]) == 2
    assert "--tasks-file" in capsys.readouterr().err


def test_refuses_another_architecture(base: Path, tmp_path: Path) -> None:
    a = _finetune(base, tmp_path / "a.safetensors", 0)
    key = "model.heads.text.proj.weight" if "model.heads.text.proj.weight" in load_file(str(a)) else \
        next(k for k, v in load_file(str(a)).items() if v.ndim == 2)
    wide = rewrite(a, tmp_path / "wide.safetensors", tensors={key: torch.zeros(7, 3)})
    with pytest.raises(ConfigError, match=f"tensor {key} is \\[7, 3\\]"):
        soup([a, wide], tmp_path / "x.safetensors")
    cfg = config_of(a)
    cfg["model"]["encoders"]["text"]["causal"] = not cfg["model"]["encoders"]["text"].get("causal", False)
    other = with_config(a, tmp_path / "causal.safetensors", cfg)
    with pytest.raises(ConfigError, match="config model.encoders.text.causal"):
        soup([a, other], tmp_path / "x.safetensors")


def test_refuses_another_init(base: Path, tmp_path: Path) -> None:
    a = _finetune(base, tmp_path / "a.safetensors", 0)
    b = _finetune(base, tmp_path / "b.safetensors", 1, init="f" * 64)
    with pytest.raises(ConfigError, match=r"another initialisation .* tensor model\.\S+ differs most"):
        soup([a, b], tmp_path / "x.safetensors")
    # no record: the weight-space check passes fine-tunes of one init and refuses an independent init
    plain = [rewrite(p, tmp_path / f"plain{i}.safetensors", {INIT_META: None}) for i, p in enumerate([a, b])]
    assert soup(plain, tmp_path / "ok.safetensors").init_check.startswith("weight space")
    g = torch.Generator().manual_seed(5)
    fresh = {k: torch.randn(v.shape, generator=g) * v.std() if v.is_floating_point() and v.numel() > 1 else v
             for k, v in load_file(str(plain[0])).items()}
    stranger = rewrite(plain[0], tmp_path / "stranger.safetensors", tensors=fresh)
    with pytest.raises(ConfigError, match=r"stranger.safetensors: another initialisation .*median cosine.*tensor "):
        soup([plain[0], stranger], tmp_path / "x.safetensors")


def test_finetune_records_its_init(base: Path, color_shards: list[str], tmp_path: Path) -> None:
    from mmpt.commands.export import export
    from mmpt.config import load_config
    from mmpt.training.loop import train

    raw = tiny_config(color_shards, tmp_path / "run", steps=1, log_sample_keys=False)
    raw["model"]["init_from"] = str(base)
    train(load_config(raw))
    out = export(tmp_path / "run", tmp_path / "ft.safetensors")
    assert metadata(out)[INIT_META] == weights_digest(load_file(str(base)))
    assert INIT_META not in metadata(base)  # trained from scratch: nothing recorded
