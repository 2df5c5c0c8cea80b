"""The shard loader: splitting, determinism, resume position, and bad input counted by reason."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shardkit import bad_samples, color_sample, cut_tar, jpeg, member_spans, write_color_shards, write_tar

from mmpt.data.loader import Loader, StreamSpec, eval_loader
from mmpt.data.shards import DataError, ShardEvent, assign, expand_urls, iter_samples
from mmpt.registry import modalities


def specs(max_image_pixels: int = 64_000_000) -> dict:
    return {"image": modalities.get("image")(image_size=32, max_image_pixels=max_image_pixels),
            "text": modalities.get("text")(context_length=16)}


def stream(urls: list[str], **kw) -> StreamSpec:
    base = dict(sources=[(urls, 1.0)], modalities=specs(), batch_size=8, train=True, seed=1, workers=2,
                shuffle_buffer=20, required=("image", "text"))
    base.update(kw)
    return StreamSpec(**base)


def take_keys(loader: Loader, n: int) -> list[list[str]]:
    return [b.keys for b in itertools.islice(iter(loader), n)]


def test_expand_patterns(color_shards: list[str], tmp_path: Path) -> None:
    root = str(Path(color_shards[0]).parent)
    assert expand_urls(f"{root}/s-{{000..002}}.tar") == color_shards
    assert expand_urls(f"{root}/s-*.tar") == color_shards
    assert expand_urls(root) == color_shards
    assert expand_urls("::".join(color_shards)) == color_shards
    with pytest.raises(DataError, match="no shards match"):
        expand_urls(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(DataError, match="missing.tar"):
        expand_urls(str(tmp_path / "missing.tar"))


def test_pipe_url_reads_like_a_file(color_shards: list[str]) -> None:
    loader = eval_loader(f"pipe:cat {color_shards[0]}", specs(), 16, workers=0)
    assert sum(len(b) for b in loader) == 40


def test_assign_covers_every_shard_once() -> None:
    urls = [f"u{i}" for i in range(7)]
    got = sorted(u for w in range(3) for u in assign(urls, w, 3)[0])
    assert got == urls
    few, stride, offset = assign(urls[:2], 2, 4)
    assert few == urls[:2] and stride == 4 and offset == 2


def test_eval_loader_reads_every_sample_once(color_shards: list[str]) -> None:
    keys = [k for b in eval_loader(color_shards, specs(), 16, workers=2) for k in b.keys]
    assert len(keys) == 150 and len(set(keys)) == 150
    b = next(iter(eval_loader(color_shards, specs(), 16, workers=0, keep=("json",))))
    assert b["image"]["pixels"].dtype.is_floating_point is False and b["image"]["pixels"].shape == (16, 3, 32, 32)
    assert b["text"]["ids"].shape == (16, 16) and b.present["text"].all()
    assert b.meta["json"][0]["color"] in b.meta["json"][0]["captions"][0]


def test_ranks_get_equal_steps_and_disjoint_first_pass(color_shards: list[str]) -> None:
    # 3 uneven shards over 2 ranks x 2 workers: streams repeat, so both ranks can take as many
    # batches as asked; within the first pass no sample is read by two logical workers.
    per_rank = [take_keys(Loader(stream(color_shards, rank=r, world=2, shuffle_buffer=0)), 6) for r in range(2)]
    assert all(len(k) == 6 and all(len(b) == 8 for b in k) for k in per_rank)
    first = [k for batches in per_rank for b in batches[:2] for k in b]
    assert len(first) == len(set(first))


def test_stream_is_deterministic_and_seeded(color_shards: list[str]) -> None:
    a = take_keys(Loader(stream(color_shards)), 5)
    assert a == take_keys(Loader(stream(color_shards)), 5)
    assert a != take_keys(Loader(stream(color_shards, seed=2)), 5)


@pytest.mark.parametrize("workers", [1, 2])
def test_resume_continues_the_same_sequence(color_shards: list[str], workers: int) -> None:
    full = Loader(stream(color_shards, workers=workers))
    it = iter(full)
    batches = [next(it) for _ in range(12)]
    probe = Loader(stream(color_shards, workers=workers))
    pit = iter(probe)
    for _ in range(5):
        next(pit)
    state = Loader.state_from_dict(probe.state_dict())
    resumed = Loader(stream(color_shards, workers=workers), state)
    rest = [b for b in itertools.islice(iter(resumed), 7)]
    assert [b.keys for b in rest] == [b.keys for b in batches[5:]]
    # augmentations are reseeded per sample, so pixels match too
    assert all((x["image"]["pixels"] == y["image"]["pixels"]).all() for x, y in zip(rest, batches[5:], strict=True))


def _png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (9, 9, 9)).save(buf, "PNG")
    return buf.getvalue()


def test_bad_input_is_skipped_and_counted(tmp_path: Path) -> None:
    good = [color_sample(f"g{i:03d}", "red") for i in range(10)]
    bad = [
        ("corrupt", {"jpg": b"\xff\xd8 not a jpeg", "txt": b"a red square"}),
        ("notext", {"jpg": jpeg((200, 0, 0))}),
        ("zerobyte", {"jpg": b"", "txt": b"a red square"}),
        ("bomb", {"png": _png(1200), "txt": b"a huge image"}),
        ("emptycap", {"jpg": jpeg((200, 0, 0)), "txt": b"   "}),
    ]
    shard = write_tar(tmp_path / "bad.tar", good[:5] + bad + good[5:])
    full = Path(write_tar(tmp_path / "full.tar", [color_sample(f"t{i:03d}", "blue") for i in range(20)]))
    cut = tmp_path / "truncated.tar"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2 + 100])  # mid-member, like most cuts
    sp = specs(max_image_pixels=1_000_000)
    loader = eval_loader([shard, str(cut)], sp, 4, workers=0)
    loader.spec.required = ("image", "text")
    keys = [k for b in loader for k in b.keys]
    skips = loader.state.total_skips()
    assert skips == {"decode_error_image": 1, "missing_text": 1, "empty_jpg": 1, "too_large_image": 1,
                     "decode_error_text": 1, "cut_by_truncation": 1}
    assert loader.state.shard_events() == {"truncated_shard": [str(cut)]}
    assert sorted(k for k in keys if k.startswith("g")) == [f"g{i:03d}" for i in range(10)]
    assert 0 < sum(k.startswith("t") for k in keys) < 20  # samples before the cut survive


def test_optional_modality_is_masked_not_dropped(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "mixed.tar", [color_sample("a", "red"), ("b", {"jpg": jpeg((0, 0, 200))})])
    loader = eval_loader([shard], specs(), 4, workers=0)
    b = next(iter(loader))
    assert b.keys == ["a", "b"] and b.present["text"].tolist() == [True, False]
    assert b.present["image"].all()


def test_weighted_sources_mix(tmp_path: Path) -> None:
    a = write_color_shards(tmp_path, counts=(50,), prefix="a")
    b = write_color_shards(tmp_path, counts=(50,), prefix="b")
    spec = stream(a, sources=[(a, 3.0), (b, 1.0)], workers=0, shuffle_buffer=0)
    keys = [k for ks in take_keys(Loader(spec), 25) for k in ks]
    share = np.mean([k.startswith("a") for k in keys])
    assert 0.65 < share < 0.85


def test_resampled_mode_draws_with_replacement(color_shards: list[str]) -> None:
    keys = [k for ks in take_keys(Loader(stream(color_shards, resampled=True, workers=0)), 40) for k in ks]
    assert len(keys) == 320 and len(set(keys)) < 320


def test_by_shard_batches_never_span_shards(color_shards: list[str]) -> None:
    done, urls = [], set()
    for b in eval_loader(color_shards, specs(), 16, workers=2, by_shard=True):
        assert len(set(b.meta["url"])) <= 1
        urls.update(b.meta["url"])
        done += b.meta["_loader"]["shards_done"]
    assert sorted(done) == sorted(color_shards) == sorted(urls)


# A shard that yields nothing usable must stop the run with one clear error (issue 7.5) ----------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
def test_all_bad_shard_stops_with_one_clear_error(tmp_path: Path, workers: int) -> None:
    # Today this spins forever at step 0: the stream repeats and every sample is skipped.
    shard = write_tar(tmp_path / "allbad.tar", bad_samples(12))
    loader = Loader(stream([shard], workers=workers, shuffle_buffer=5))
    with pytest.raises(DataError) as err:
        next(iter(loader))
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg  # the worker's error, not its traceback
    assert "allbad.tar" in msg and "decode_error_image=" in msg and "data.max_consecutive_skips" in msg


@pytest.mark.timeout(60)
def test_consecutive_skip_limit_names_shard_and_reasons(tmp_path: Path) -> None:
    good = write_color_shards(tmp_path, counts=(40,), prefix="g")
    mixed = write_tar(tmp_path / "mixed.tar", bad_samples(6) + [color_sample(f"m{i}", "red") for i in range(30)])
    spec = stream([mixed] + good, workers=0, shuffle_buffer=0, max_consecutive_skips=5)
    with pytest.raises(DataError, match=r"5 samples in a row.*mixed\.tar.*decode_error_image=5"):
        take_keys(Loader(spec), 20)
    # the default limit lets the same run through: a few bad samples among good ones are skipped
    spec = stream([mixed] + good, workers=0, shuffle_buffer=0)
    assert len(take_keys(Loader(spec), 20)) == 20


@pytest.mark.timeout(60)
def test_one_bad_shard_among_good_ones_is_skipped_not_fatal(tmp_path: Path) -> None:
    good = write_color_shards(tmp_path, counts=(40, 40), prefix="g")
    bad = write_tar(tmp_path / "allbad.tar", bad_samples(20))
    loader = Loader(stream(good + [bad], workers=0, shuffle_buffer=10))
    assert len(take_keys(loader, 30)) == 30
    assert loader.state.total_skips()["decode_error_image"] >= 20


# A truncated shard yields every complete sample before the cut (issue 7.6) -------------------------------


def _truncated_at(tmp_path: Path, member: str, where: str) -> tuple[list, str]:
    full = tmp_path / "full.tar"
    write_tar(full, [color_sample(f"k{i}", "blue") for i in range(6)])
    start, end = member_spans(full)[member]
    size = {"header": start + 100, "data": (start + 512 + end) // 2, "boundary": start}[where]
    return list(iter_samples(cut_tar(full, tmp_path / "cut.tar", size))), str(tmp_path / "cut.tar")


@pytest.mark.parametrize("where", ["header", "data"])
def test_truncation_inside_next_sample_keeps_the_previous_one(tmp_path: Path, where: str) -> None:
    got, url = _truncated_at(tmp_path, "k3.jpg", where)
    samples = [s for s in got if isinstance(s, dict) and not s.get("__cut__")]
    assert [s["__key__"] for s in samples] == ["k0", "k1", "k2"]  # k2 was dropped before the fix
    assert set(samples[-1]) >= {"jpg", "txt", "json"}
    events = [s for s in got if isinstance(s, ShardEvent)]
    assert [(e.reason, e.url) for e in events] == [("truncated_shard", url)]


def test_sample_split_by_the_cut_is_counted_not_yielded(tmp_path: Path) -> None:
    # k3.jpg is whole but k3.txt is cut: k3 is incomplete (its json and txt are lost) and is counted
    got, url = _truncated_at(tmp_path, "k3.txt", "data")
    keys = [s["__key__"] for s in got if isinstance(s, dict) and not s.get("__cut__")]
    cut = [s["__key__"] for s in got if isinstance(s, dict) and s.get("__cut__")]
    assert keys == ["k0", "k1", "k2"] and cut == ["k3"]
    loader = eval_loader([url], specs(), 4, workers=0)
    assert sum(len(b) for b in loader) == 3
    assert loader.state.total_skips() == {"cut_by_truncation": 1}
    assert loader.state.shard_events() == {"truncated_shard": [url]}


def test_cut_between_samples_counts_the_open_one_as_cut(tmp_path: Path) -> None:
    # Cut exactly where k3's header would start: k2's members read so far are whole, but more of them
    # could have followed, so k2 is counted as cut rather than trained on with members possibly missing.
    got, _ = _truncated_at(tmp_path, "k3.jpg", "boundary")
    assert [s["__key__"] for s in got if isinstance(s, dict) and not s.get("__cut__")] == ["k0", "k1"]
    assert [s["__key__"] for s in got if isinstance(s, dict) and s.get("__cut__")] == ["k2"]


def test_compressed_shard_is_complete_not_truncated(tmp_path: Path) -> None:
    # The end-of-archive check compared compressed bytes with tar offsets: every .tar.gz looked
    # truncated and lost its last sample.
    import gzip

    plain = Path(write_tar(tmp_path / "plain.tar", [color_sample(f"k{i}", "red") for i in range(5)]))
    (tmp_path / "z.tar.gz").write_bytes(gzip.compress(plain.read_bytes()))
    got = list(iter_samples(str(tmp_path / "z.tar.gz")))
    assert [s["__key__"] for s in got] == [f"k{i}" for i in range(5)]


def test_cut_inside_end_of_archive_loses_no_sample(tmp_path: Path) -> None:
    full = tmp_path / "full.tar"
    write_tar(full, [color_sample(f"k{i}", "blue") for i in range(4)])
    end = max(e for _, e in member_spans(full).values())
    end = -(-end // 512) * 512
    got = list(iter_samples(cut_tar(full, tmp_path / "cut.tar", end + 300)))
    assert [s["__key__"] for s in got if isinstance(s, dict)] == ["k0", "k1", "k2", "k3"]
    assert [e.reason for e in got if isinstance(e, ShardEvent)] == ["truncated_shard"]


# Shard events are counted once per shard, apart from sample skips, when consumed (issue 7.7) ----------------


def test_shard_events_counted_once_and_apart_from_sample_skips(tmp_path: Path) -> None:
    full = Path(write_tar(tmp_path / "full.tar", [color_sample(f"t{i:03d}", "blue") for i in range(12)]))
    cut = cut_tar(full, tmp_path / "truncated.tar", member_spans(full)["t008.txt"][1] - 10)
    good = write_color_shards(tmp_path, counts=(20,), prefix="g")
    loader = Loader(stream([cut] + good, workers=2, shuffle_buffer=64))
    take_keys(loader, 5)
    # 5 steps of 8 read the short truncated shard many times over while the buffer fills
    assert loader.state.shard_events() == {"truncated_shard": [cut]}
    skips = loader.state.total_skips()
    assert "truncated_shard" not in skips and set(skips) <= {"cut_by_truncation"}
    # sample skips are those consumed: a resumed loader carries exactly the same counts forward
    state = Loader.state_from_dict(json.loads(json.dumps(loader.state_dict())))
    assert state.shard_events() == loader.state.shard_events() and state.total_skips() == skips


def test_sample_skips_follow_consumption(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "s.tar", [color_sample(f"a{i:02d}", "red") for i in range(8)] + bad_samples(4)
                      + [color_sample(f"b{i:02d}", "red") for i in range(20)])
    loader = Loader(stream([shard], workers=0, shuffle_buffer=0, batch_size=4))
    it = iter(loader)
    next(it), next(it)  # the 8 samples before the bad ones: nothing skipped yet
    assert loader.state.total_skips() == {}
    next(it)
    assert loader.state.total_skips() == {"decode_error_image": 4}


# An unreadable source (issue 7, config gaps) ----------------------------------------------------------------


def _text_file_tar(tmp_path: Path) -> str:
    path = tmp_path / "notes.tar"
    path.write_text("this is a text file, not a tar archive\n" * 20)
    return str(path)


def test_unreadable_source_is_named_not_an_empty_epoch(tmp_path: Path) -> None:
    from shardkit import tiny_config

    from mmpt.config import load_config
    from mmpt.data.loader import train_loader
    from mmpt.pretrainer import build_data_specs

    cfg = load_config(tiny_config([_text_file_tar(tmp_path)], tmp_path / "run"))
    with pytest.raises(DataError, match=r"unreadable.*notes\.tar") as err:
        train_loader(cfg, build_data_specs(cfg), 0, 1)
    assert "only 0 samples" not in str(err.value)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_source_with_samples_per_epoch_is_a_clear_error(tmp_path: Path, workers: int) -> None:
    url = _text_file_tar(tmp_path)
    with pytest.raises(DataError, match=r"notes\.tar.*unreadable_shard") as err:
        next(iter(Loader(stream([url], workers=workers))))
    assert "\n" not in str(err.value)
