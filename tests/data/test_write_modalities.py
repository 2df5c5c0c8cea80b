"""``mmpt data write`` for every modality and input kind users have (issue 20): each writes shards, checks the
members against what the test itself put in, then trains a few steps of a tiny model on the result."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from runkit import small
from shardkit import COLORS, jpeg

from mmpt.cli import main
from mmpt.data.shards import DataError
from mmpt.data.writer import write_shards
from mmpt.encoders.point_cloud import BadPointCloud, read_ply_xyz
from mmpt.registry import encoders


def read_samples(shards: list[Path]) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} over ``shards``, in order."""
    out: dict[str, dict[str, bytes]] = {}
    for path in shards:
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def tower(name: str, **kw) -> dict:
    """An encoder section from the encoder's own tiny config."""
    return {"name": name, **encoders.get(name).tiny_configs[0], **kw}


def train_on(shards: list[Path], out: Path, towers: dict[str, dict], pairs: list[list[str]]) -> None:
    """Two training steps of a tiny contrastive model of ``towers`` + text on ``shards``."""
    from mmpt.config import load_config
    from mmpt.training.loop import train

    raw = small([str(p) for p in shards], out, steps=2, checkpoint_every=2)
    raw["model"]["encoders"] = {**towers, "text": raw["model"]["encoders"]["text"]}
    raw["objectives"]["clip"]["pairs"] = pairs
    raw["data"].update(required=sorted({m for pair in pairs for m in pair}), workers=0, batch_size=4,
                       shuffle_buffer=0)
    summary = train(load_config(raw))
    assert summary.steps == 2 and np.isfinite(summary.final_loss)


def wav(freq: float, rate: int = 8000, seconds: float = 0.25, fmt: str = "WAV") -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    buf = io.BytesIO()
    sf.write(buf, 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32), rate, format=fmt)
    return buf.getvalue()


def png(color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(buf, "PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ audio

def test_audio_folder_with_sidecar_captions(tmp_path: Path) -> None:
    folder = tmp_path / "sounds"
    folder.mkdir()
    for i in range(7):
        ext, fmt = ("flac", "FLAC") if i == 3 else ("wav", "WAV")
        (folder / f"tone{i}.{ext}").write_bytes(wav(300 + 100 * i, fmt=fmt))
        (folder / f"tone{i}.txt").write_text(f"a tone of {300 + 100 * i} hertz\n")
    (folder / "tone7.wav").write_bytes(b"RIFF" + b"\0" * 40)  # a broken header: the loader's decode refuses it
    (folder / "tone7.txt").write_text("broken")
    (folder / "tone8.wav").write_bytes(wav(900))  # no caption
    summary = write_shards(folder, str(tmp_path / "out" / "a-%03d.tar"), key_prefix="", progress=False)
    assert summary.written == 7
    assert summary.skipped == {"decode_error_audio": 1, "missing caption file": 1}
    assert summary.first_keys == {"decode_error_audio": ["000000007"], "missing caption file": ["000000008"]}
    samples = read_samples(summary.shards)
    assert samples["000000000"] == {"wav": (folder / "tone0.wav").read_bytes(), "txt": b"a tone of 300 hertz"}
    assert set(samples["000000003"]) == {"flac", "txt"}
    train_on(summary.shards, tmp_path / "run", {"audio": tower("audio/ast")}, [["audio", "text"]])


# ------------------------------------------------------------------------------------------ point cloud

def ply_bytes(xyz: np.ndarray, fmt: str, dtype: str = "float", normals: bool = True) -> bytes:
    """A PLY file of ``xyz`` (with normals and a face element after the vertices), written by hand."""
    n = len(xyz)
    props = ["x", "y", "z"] + (["nx", "ny", "nz"] if normals else [])
    values = np.concatenate([xyz, np.ones_like(xyz)], 1) if normals else xyz
    header = ["ply", f"format {fmt} 1.0", "comment made by a test", f"element vertex {n}"]
    header += [f"property {dtype} {p}" for p in props]
    header += ["element face 1", "property list uchar int vertex_indices", "end_header"]
    head = ("\n".join(header) + "\n").encode()
    if fmt == "ascii":
        body = "".join(" ".join(f"{v:.9g}" for v in row) + "\n" for row in values) + "3 0 1 2\n"
        return head + body.encode()
    np_type = {"float": "f4", "double": "f8"}[dtype]
    order = "<" if fmt == "binary_little_endian" else ">"
    face = np.array([3], "u1").tobytes() + np.array([0, 1, 2], order + "i4").tobytes()
    return head + values.astype(order + np_type).tobytes() + face


@pytest.mark.parametrize("fmt,dtype", [("ascii", "float"), ("binary_little_endian", "float"),
                                       ("binary_little_endian", "double"), ("binary_big_endian", "float")])
def test_ply_reader_gives_the_vertices(fmt: str, dtype: str) -> None:
    xyz = np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32)
    np.testing.assert_allclose(read_ply_xyz(ply_bytes(xyz, fmt, dtype)), xyz, rtol=1e-6)


def test_ply_reader_refuses_bad_files() -> None:
    xyz = np.zeros((100, 3), np.float32)
    good = ply_bytes(xyz, "binary_little_endian", normals=False)
    with pytest.raises(BadPointCloud, match="too short"):
        read_ply_xyz(good[:-200])
    with pytest.raises(BadPointCloud, match="vertex properties"):
        read_ply_xyz(good.replace(b"property float z", b"property float w"))
    with pytest.raises(BadPointCloud, match="format"):
        read_ply_xyz(good.replace(b"binary_little_endian", b"binary_middle_endian"))
    with pytest.raises(Exception, match="max_sample_bytes"):
        read_ply_xyz(good, max_bytes=1000)


def test_point_cloud_folder_of_npy_npz_and_ply(tmp_path: Path) -> None:
    folder = tmp_path / "clouds"
    folder.mkdir()
    rng = np.random.default_rng(1)
    clouds = [rng.normal(size=(128, 3)).astype(np.float32) for _ in range(8)]
    for i, cloud in enumerate(clouds):
        if i < 3:
            buf = io.BytesIO()
            np.save(buf, cloud)
            (folder / f"c{i}.npy").write_bytes(buf.getvalue())
        elif i == 3:
            buf = io.BytesIO()
            np.savez(buf, points=cloud)
            (folder / f"c{i}.npz").write_bytes(buf.getvalue())
        else:
            (folder / f"c{i}.ply").write_bytes(ply_bytes(cloud, ["ascii", "binary_little_endian"][i % 2]))
        (folder / f"c{i}.txt").write_text(f"cloud {i}")
    (folder / "c8.ply").write_bytes(ply_bytes(clouds[0][:10], "ascii"))  # 10 points: fewer than the groups
    (folder / "c8.txt").write_text("too small")
    summary = write_shards(folder, str(tmp_path / "out" / "p-%03d.tar"), key_prefix="", progress=False)
    assert summary.written == 8 and summary.skipped == {"decode_error_point_cloud": 1}
    samples = read_samples(summary.shards)
    assert set(samples["000000003"]) == {"npz", "txt"} and set(samples["000000005"]) == {"npy", "txt"}
    for i in (0, 4, 5):  # npy as it was; PLY as the (N, 3) float32 array it holds, no pickle
        arr = np.load(io.BytesIO(samples[f"{i:09d}"]["npy"]), allow_pickle=False)
        np.testing.assert_allclose(arr, clouds[i], rtol=1e-6)
        assert arr.dtype == np.float32
    train_on(summary.shards, tmp_path / "run", {"point_cloud": tower("point_cloud/point_transformer")},
             [["point_cloud", "text"]])


# ---------------------------------------------------------------------------------------------- protein

FASTA = """>sp|P1|ONE first protein of the set
MKTAYIAKQR
QISFVKSHFS
; a comment line
>sp|P2|TWO second protein
MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYF*
>sp|P3|BAD not a protein
MKT!!AB
>P4
GAVLIPFMW
"""


def test_fasta_file_is_one_sample_a_record(tmp_path: Path) -> None:
    fasta = tmp_path / "proteins.fasta"
    fasta.write_text(FASTA)
    summary = write_shards(fasta, str(tmp_path / "out" / "f-%03d.tar"), key_prefix="", progress=False)
    assert summary.written == 3 and summary.skipped == {"decode_error_protein": 1}
    assert summary.first_keys["decode_error_protein"] == ["000000002"]
    samples = read_samples(summary.shards)
    first = samples["000000000"]
    assert first["seq"] == b"MKTAYIAKQRQISFVKSHFS" and first["txt"] == b"first protein of the set"
    assert json.loads(first["json"]) == {"id": "sp|P1|ONE", "description": "first protein of the set"}
    assert set(samples["000000003"]) == {"seq", "json"}  # no description: no caption, the id in json
    # a bigger set to train on: 8 records with descriptions
    many = tmp_path / "many.fa"
    many.write_text("".join(f">p{i} protein number {i}\n{'MKTAYIAKQR' * (i + 1)}\n" for i in range(8)))
    summary = write_shards(many, str(tmp_path / "out2" / "f-%03d.tar"), progress=False)
    assert summary.written == 8
    train_on(summary.shards, tmp_path / "run", {"protein": tower("protein/transformer")}, [["protein", "text"]])


def test_folder_of_fasta_files_and_inline_sequences_in_a_table(tmp_path: Path) -> None:
    folder = tmp_path / "seqs"
    folder.mkdir()
    (folder / "a.fasta").write_text(">x1 alpha\nMKT\n>x2 beta\nGAV\n")
    (folder / "b.faa").write_text(">y1 gamma\nLLL\n")
    summary = write_shards(folder, str(tmp_path / "out" / "s-%03d.tar"), key_prefix="", progress=False)
    samples = read_samples(summary.shards)
    assert {k: v["txt"] for k, v in samples.items()} == {"000000000_000000": b"alpha", "000000000_000001": b"beta",
                                                        "000000001": b"gamma"}
    table = tmp_path / "t.jsonl"
    table.write_text(json.dumps({"protein": "MKTAYIAKQR", "caption": "inline"}) + "\n"
                     + json.dumps({"protein": "seqs/a.fasta", "caption": "two records"}) + "\n")
    summary = write_shards(table, str(tmp_path / "out2" / "s-%03d.tar"), key_prefix="", progress=False)
    samples = read_samples(summary.shards)
    assert samples["000000000"] == {"seq": b"MKTAYIAKQR", "txt": b"inline"}
    # a cell naming a FASTA file of two records: two samples, the row's caption on each, the ids in json
    assert [(k, v["seq"], v["txt"], json.loads(v["json"])["id"]) for k, v in samples.items() if k != "000000000"] == [
        ("000000001_000000", b"MKT", b"two records", "x1"), ("000000001_000001", b"GAV", b"two records", "x2")]


# ----------------------------------------------------------------------------------------------- tables

def test_table_row_with_image_audio_and_text(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "media").mkdir()
    rows = []
    for i, name in enumerate(list(COLORS) * 2):
        (tmp_path / "media" / f"{i}.jpg").write_bytes(jpeg(COLORS[name]))
        (tmp_path / "media" / f"{i}.wav").write_bytes(wav(200 + 50 * i))
        rows.append(f"media/{i}.jpg,media/{i}.wav,a {name} thing,{i}")
    (tmp_path / "pairs.csv").write_text("img,sound,label,n\n" + "\n".join(rows) + "\n")
    out = str(tmp_path / "out" / "m-%03d.tar")
    assert main(["data", "write", str(tmp_path / "pairs.csv"), "--out", out, "--column", "image=img",
                 "--column", "audio=sound", "--column", "text=label", "--key-prefix", ""]) == 0
    assert "wrote 8 samples" in capsys.readouterr().out
    shards = sorted((tmp_path / "out").glob("m-*.tar"))
    sample = read_samples(shards)["000000002"]
    assert sample == {"jpg": (tmp_path / "media" / "2.jpg").read_bytes(), "wav": (tmp_path / "media" / "2.wav").read_bytes(),
                      "txt": b"a blue thing", "json": b'{"n": 2}'}
    # the same table found by names and extensions alone
    (tmp_path / "auto.csv").write_text("image,audio_path,caption,n\n" + "\n".join(rows) + "\n")
    summary = write_shards(tmp_path / "auto.csv", str(tmp_path / "auto" / "m-%03d.tar"), key_prefix="",
                           progress=False)
    assert read_samples(summary.shards) == read_samples(shards)
    train_on(shards, tmp_path / "run", {"image": small([], tmp_path)["model"]["encoders"]["image"],
                                        "audio": tower("audio/ast")}, [["image", "text"], ["audio", "text"]])


def test_column_flag_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "t.csv").write_text("img,label\na.jpg,x\n")
    for flag, named in (("imagery=img", "unknown modality 'imagery'"), ("image", "MODALITY=COLUMN"),
                        ("image=nope", "'nope'")):
        assert main(["data", "write", str(tmp_path / "t.csv"), "--out", str(tmp_path / "s-%03d.tar"),
                     "--column", flag]) == 2
        err = capsys.readouterr().err
        assert named in err and err.count("mmpt: error:") == 1 and "Traceback" not in err


# ---------------------------------------------------------------------------------------- class folders

def test_class_folders_with_a_caption_template(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "classes"
    for name in COLORS:
        (root / f"{name}_square").mkdir(parents=True)
        for i in range(2):
            (root / f"{name}_square" / f"{i}.jpg").write_bytes(jpeg(COLORS[name]))
    out = str(tmp_path / "out" / "c-%03d.tar")
    assert main(["data", "write", str(root), "--out", out]) == 2  # today's behaviour named: no captions, a hint
    err = capsys.readouterr().err
    assert "missing caption file: 8" in err and "--caption-template" in err
    assert main(["data", "write", str(root), "--out", out, "--caption-template", "a photo of a {}"]) == 0
    samples = list(read_samples(sorted((tmp_path / "out").glob("c-*.tar"))).values())
    assert len(samples) == 8
    assert samples[0]["txt"] == b"a photo of a blue square"  # class folders in sorted order, _ as a space
    assert json.loads(samples[0]["json"]) == {"label": "blue_square"}
    train_on(sorted((tmp_path / "out").glob("c-*.tar")), tmp_path / "run",
             {"image": small([], tmp_path)["model"]["encoders"]["image"]}, [["image", "text"]])


# ---------------------------------------------------------------------------------------------- validation

def test_truncated_png_is_rejected_at_write_time(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "img").mkdir()
    whole = png((200, 30, 30))
    cut = whole[: len(whole) // 2]
    with pytest.raises(OSError):  # the independent check: Pillow cannot load it either
        Image.open(io.BytesIO(cut)).load()
    for name, data in (("good", whole), ("cut", cut)):
        (tmp_path / "img" / f"{name}.png").write_bytes(data)
        (tmp_path / "img" / f"{name}.txt").write_text(name)
    summary = write_shards(tmp_path / "img", str(tmp_path / "out" / "s-%03d.tar"), key_prefix="k", progress=False)
    assert summary.written == 1 and summary.skipped == {"decode_error_image": 1}
    assert summary.first_keys == {"decode_error_image": ["k000000000"]}  # cut.png sorts first
    assert "skipped decode_error_image: 1 (first: k000000000)" in str(summary)


def test_over_budget_sample_is_rejected_at_write_time(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    header = b"ply\nformat binary_little_endian 1.0\nelement vertex 100000000\nproperty float x\nproperty float y\n" \
             b"property float z\nend_header\n"
    (tmp_path / "p" / "huge.ply").write_bytes(header + b"\0" * 1200)  # claims 1.2 GB of vertices
    (tmp_path / "p" / "huge.txt").write_text("a claim")
    with pytest.raises(DataError, match="too_large_point_cloud: 1"):
        write_shards(tmp_path / "p", str(tmp_path / "out" / "s-%03d.tar"), progress=False)
