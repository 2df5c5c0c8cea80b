"""What one bad sample costs over a good one, per modality (issue 18): wall time and peak RSS.

Each case runs in a fresh process: it decodes a good sample of the modality through the loader's path
(budget-checked decode, train transform, collate), then the bad one, and reports the extra seconds and the
extra peak RSS the bad one cost. The goal is < 1 s and < 256 MB for every case. The bad samples are those
the issue found: a valid 1-s WAV at 16001 Hz (a resampling kernel from the exact ratio cost ~26 s and
~4.2 GB), a WAV header claiming 1,000,000,007 Hz, a FLAC header claiming 2^36 frames, a 0.9 MB npz that
inflates to 0.96 GB, a PNG header of 100,000 x 100,000 pixels, a 10 MB caption (~8 s tokenised whole),
and a 100 MB protein sequence.

    .venv/bin/python bench/bad_samples.py        # table + bench/results/bad_samples.json
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GOAL_S, GOAL_MB = 1.0, 256.0


def _wav(rate: int, seconds: float = 1.0, fmt: str = "WAV") -> bytes:
    import soundfile as sf

    t = np.arange(int(rate * seconds)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def _png_header(w: int, h: int) -> bytes:
    """A PNG whose IHDR states w x h pixels, followed by one tiny IDAT: a decompression bomb's header."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def npz_bomb(rows: int) -> bytes:
    """An npz whose one member, zeros of shape (rows, 3) float32, deflates to ~1/1000 of its size; written in
    chunks, so the inflated array is never held."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (rows, 3)})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z, z.open("points.npy", "w", force_zip64=True) as f:
        f.write(header.getvalue())
        chunk = bytes(1 << 24)
        for _ in range(rows * 12 // len(chunk)):
            f.write(chunk)
        f.write(bytes(rows * 12 % len(chunk)))
    return buf.getvalue()


def _npy(points: int) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(0).normal(size=(points, 3)).astype(np.float32))
    return buf.getvalue()


def _flac_claiming_hours() -> bytes:
    flac = bytearray(_wav(16_000, 0.3, "FLAC"))
    info = int.from_bytes(flac[18:26], "big") | ((1 << 36) - 1)  # STREAMINFO total samples: all ones
    flac[18:26] = info.to_bytes(8, "big")
    return bytes(flac)


def cases() -> list[tuple[str, str, dict, tuple[str, bytes], tuple[str, bytes]]]:
    """(modality, case, data-side kwargs, good member, bad member)."""
    from PIL import Image

    img = io.BytesIO()
    Image.new("RGB", (256, 256), (200, 30, 30)).save(img, format="PNG")
    good_audio = ("wav", _wav(16_000))
    caption = " ".join(["a red square on the left"] * 400_000)[:10_000_000]
    return [
        ("audio", "1-s WAV at 16001 Hz", {"sample_rate": 16_000}, good_audio, ("wav", _wav(16_001))),
        ("audio", "header claims 1,000,000,007 Hz", {"sample_rate": 16_000}, good_audio,
         ("wav", _wav(16_000)[:24] + (1_000_000_007).to_bytes(4, "little") + _wav(16_000)[28:])),
        ("audio", "FLAC header claims 2^36 frames", {"sample_rate": 16_000, "max_audio_seconds": 1e9}, good_audio,
         ("flac", _flac_claiming_hours())),
        ("point_cloud", "0.9 MB npz inflating to 0.96 GB", {"num_points": 1024, "groups": 64},
         ("npy", _npy(8192)), ("npz", npz_bomb(80_000_000))),
        ("image", "PNG header of 100,000 x 100,000", {"image_size": 224}, ("png", img.getvalue()),
         ("png", _png_header(100_000, 100_000))),
        ("text", "10 MB caption", {"context_length": 77}, ("txt", b"a red square on the left"),
         ("txt", caption.encode())),
        ("protein", "100 MB sequence", {"context_length": 1024}, ("seq", b"MKTAYIAKQR" * 30),
         ("seq", b"MKTAYIAKQR" * 10_000_000)),
    ]


def _run_one(spec, ext: str, data: bytes) -> str:
    from mmpt.data.budget import decode_within_budget, skip_reason

    try:
        spec.collate([spec.transform(decode_within_budget(spec, data, ext), True)])
        return "used"
    except Exception as exc:  # what the loader does with it: skip and count
        return f"skipped ({skip_reason(exc, spec.modality)})"


def child(modality: str, kwargs: str, good: str, bad: str) -> None:
    """Good sample (warms imports and caches), then the bad one; prints the deltas as JSON."""
    from mmpt.registry import modalities

    spec = modalities.get(modality).from_encoder_config(**json.loads(kwargs))
    out = {}
    for name, path in (("good", good), ("bad", bad)):
        ext, data = Path(path).suffix[1:], Path(path).read_bytes()
        t0 = time.perf_counter()
        out[f"{name}_outcome"] = _run_one(spec, ext, data)
        out[f"{name}_s"] = time.perf_counter() - t0
        out[f"{name}_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "bad_samples.json"))
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(*a.child)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (modality, case, kwargs, (gext, gdata), (bext, bdata)) in enumerate(cases()):
            good, bad = Path(tmp, f"g{i}.{gext}"), Path(tmp, f"b{i}.{bext}")
            good.write_bytes(gdata)
            bad.write_bytes(bdata)
            res = subprocess.run([sys.executable, __file__, "--child", modality, json.dumps(kwargs), str(good),
                                  str(bad)], capture_output=True, text=True, check=True,
                                 env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
            r = json.loads(res.stdout.strip().splitlines()[-1])
            extra_s, extra_mb = r["bad_s"] - r["good_s"], r["bad_peak_mb"] - r["good_peak_mb"]
            rows.append({"modality": modality, "case": case, "member_bytes": len(bdata), "outcome": r["bad_outcome"],
                         "extra_s": round(extra_s, 4), "extra_peak_mb": round(extra_mb, 1),
                         "ok": extra_s < GOAL_S and extra_mb < GOAL_MB})
    print(f"{'modality':12s} {'bad sample':34s} {'outcome':36s} {'+s':>8s} {'+MB':>8s}")
    for r in rows:
        print(f"{r['modality']:12s} {r['case']:34s} {r['outcome']:36s} {r['extra_s']:8.3f} {r['extra_peak_mb']:8.1f}"
              f"{'' if r['ok'] else '  OVER GOAL'}")
    worst_s, worst_mb = max(r["extra_s"] for r in rows), max(r["extra_peak_mb"] for r in rows)
    print(f"worst: +{worst_s:.3f} s, +{worst_mb:.1f} MB over a good sample (goal < {GOAL_S:g} s, < {GOAL_MB:g} MB)")
    Path(a.out).write_text(json.dumps({"goal": {"seconds": GOAL_S, "mb": GOAL_MB}, "cases": rows}, indent=1) + "\n")
    if not all(r["ok"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
