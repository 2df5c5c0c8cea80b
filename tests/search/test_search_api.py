"""mmpt serve's HTTP API on a tiny five-modality model (FastAPI TestClient): every query modality, cross-modal
filters, clip-retrieval's /knn-service shape, media by offset, upload limits, path traversal, bad queries."""

from __future__ import annotations

import base64
import io
import tarfile
import zlib

import numpy as np
import pytest


def _sample(search_env, key: str = "eval_00000003") -> dict[str, bytes]:  # noqa: ANN001
    """The members of one demo sample, read with tarfile (the reference the server is checked against)."""
    for shard in sorted(search_env.shards.glob("*.tar")):
        with tarfile.open(shard) as tar:
            found = {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar if m.name.startswith(key + ".")}
            if found:
                return found
    raise KeyError(key)


def _search(client, **form):  # noqa: ANN001, ANN202
    files = form.pop("files", None)
    r = client.post("/api/search", data=form, files=files)
    assert r.status_code == 200, r.text
    return r.json()["hits"]


def test_info_lists_every_query_modality(client) -> None:  # noqa: ANN001
    info = client.get("/api/info").json()
    assert set(info["query"]) == {"image", "text", "audio", "point_cloud", "protein"}
    assert [m for m, q in info["query"].items() if q["text"]] == ["text", "protein"]
    assert "ply" in info["query"]["point_cloud"]["upload"] and "jpg" in info["query"]["image"]["upload"]
    assert info["index"]["kind"] == "flat"
    assert "/api/search" in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize("modality,ext", [("image", "jpg"), ("audio", "flac"), ("point_cloud", "npz")])
def test_upload_finds_its_own_sample(client, search_env, modality: str, ext: str) -> None:  # noqa: ANN001
    """An uploaded member of an indexed sample, decoded by the data side, lands on that sample (score ~1)."""
    key = "eval_00000003"
    data = _sample(search_env, key)[ext]
    hits = _search(client, modality=modality, target=modality, k="10", files={"file": (f"q.{ext}", data)})
    assert {h["modality"] for h in hits} == {modality}
    own = next(h for h in hits if h["key"] == key)  # an untrained tower embeds some samples alike: ties
    assert own["score"] == pytest.approx(1.0, abs=2e-3) and hits[0]["score"] == pytest.approx(1.0, abs=2e-3)


@pytest.mark.parametrize("modality,ext", [("text", "txt"), ("protein", "seq")])
def test_typed_query_finds_its_own_sample(client, search_env, modality: str, ext: str) -> None:  # noqa: ANN001
    text = _sample(search_env)[ext].decode()
    hits = _search(client, modality=modality, text=text, target=modality, k="5")
    assert hits[0]["score"] == pytest.approx(1.0, abs=2e-3)
    assert any(h["key"] == "eval_00000003" for h in hits if h["score"] > 0.998)  # ties: equal captions


def test_cross_modal_and_media(client, search_env) -> None:  # noqa: ANN001
    sample = _sample(search_env)
    for target in ("image", "audio", "point_cloud", "protein"):
        hits = _search(client, modality="text", text="a red circle", target=target, k="4")
        assert len(hits) == 4 and {h["modality"] for h in hits} == {target}
        assert hits == sorted(hits, key=lambda h: -h["score"])
    both = _search(client, modality="protein", text=sample["seq"].decode(), k="50")
    assert len({h["modality"] for h in both}) > 1  # no filter: every modality competes
    hits = _search(client, modality="image", target="image", files={"file": ("q.jpg", sample["jpg"])}, k="10")
    hit = next(h for h in hits if h["key"] == "eval_00000003")
    assert hit["media"]["type"] == "image" and hit["caption"] == sample["txt"].decode()
    r = client.get("/" + hit["media"]["url"])
    assert r.status_code == 200 and r.content == sample["jpg"] and r.headers["content-type"] == "image/jpeg"
    assert client.get(f"/api/media/{hit['id']}?ext=json").content == sample["json"]
    pc = _search(client, modality="text", text="a red circle", target="point_cloud", k="1")[0]
    assert pc["media"]["type"] == "preview"
    points = np.array(client.get("/" + pc["media"]["url"]).json()["points"])
    assert points.ndim == 2 and points.shape[1] == 6
    prot = _search(client, modality="text", text="x", target="protein", k="1")[0]
    assert prot["media"]["type"] == "text" and client.get("/" + prot["media"]["url"]).text.isalpha()
    page = client.get("/")
    assert page.status_code == 200 and "results" in page.text and "http" not in page.text.split("<body>")[1]
    assert client.get("/app.js").status_code == 200


def test_knn_service_shape(client, search_env) -> None:  # noqa: ANN001
    sample = _sample(search_env)
    out = client.post("/knn-service", json={"text": "a red circle", "modality": "image", "num_images": 5,
                                            "indice_name": "index", "deduplicate": True}).json()
    assert isinstance(out, list) and len(out) == 5
    for hit in out:
        assert {"id", "similarity", "url", "caption"} <= set(hit) and hit["modality"] == "image"
        assert hit["url"].startswith("http://testserver/api/media/")
    img = base64.b64encode(sample["jpg"]).decode()
    out = client.post("/knn-service", json={"image": img, "modality": "image", "num_images": 10}).json()
    own = next(h for h in out if h["key"] == "eval_00000003")
    assert own["similarity"] == pytest.approx(1.0, abs=2e-3)
    audio = base64.b64encode(sample["flac"]).decode()  # any tower through our query_modality field
    out = client.post("/knn-service", json={"image": audio, "query_modality": "audio", "file_suffix": "flac",
                                            "modality": "audio", "num_images": 10}).json()
    own = next(h for h in out if h["key"] == "eval_00000003")
    vec = [0.0] * client.get("/api/info").json()["dim"]
    vec[0] = 1.0
    assert len(client.post("/knn-service", json={"embedding_input": vec, "num_images": 2}).json()) == 2
    assert client.get("/indices-list").json() == ["index"]
    meta = client.post("/metadata", json={"ids": [own["id"]], "indice_name": "index"}).json()
    assert meta[0]["metadata"]["key"] == "eval_00000003"
    for body, status, words in [({"image_url": "http://example.com/a.jpg", "modality": "image", "num_images": 2}, 400,
                                 "no network"),
                                ({"text": "a", "image": img, "num_images": 2}, 400, "exactly one"),
                                ({"embedding_input": [1.0, 2.0], "num_images": 2}, 400, "expected"),
                                ({"text": "a", "modality": "smell", "num_images": 2}, 422, "no 'smell' vectors"),
                                ({"image": "not base64!", "num_images": 2}, 400, "not base64")]:
        r = client.post("/knn-service", json=body)
        assert r.status_code == status and words in r.json()["error"], (body, r.text)


def test_upload_limits(client) -> None:  # noqa: ANN001
    big = b"\xff\xd8\xff" + bytes(300 << 10)  # over the 256 KiB test limit
    r = client.post("/api/search", data={"modality": "image"}, files={"file": ("q.jpg", big)})
    assert r.status_code == 413 and "limit" in r.json()["error"]
    r = client.post("/api/search", data={"modality": "image"}, files={"file": ("q.jpg", bytes(2 << 20))})
    assert r.status_code == 413  # refused by the body limit before the form is parsed
    # a small PNG whose header claims 60000 x 60000 pixels: the data side's budget refuses it before decoding
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG")
    png = bytearray(buf.getvalue())
    png[16:24] = (60000).to_bytes(4, "big") * 2  # IHDR width, height, and the chunk's CRC to match
    png[29:33] = zlib.crc32(bytes(png[12:29])).to_bytes(4, "big")
    r = client.post("/api/search", data={"modality": "image"}, files={"file": ("q.png", bytes(png))})
    assert r.status_code == 413 and "exceeds" in r.json()["error"], r.text


@pytest.mark.parametrize("path", ["/api/media/..%2F..%2F..%2Fetc%2Fpasswd", "/api/media/0?ext=../../../etc/passwd",
                                  "/api/media/0?ext=%2Fetc%2Fpasswd", "/..%2F..%2Fetc%2Fpasswd", "/app.js/../../etc/passwd",
                                  "/static/../../pyproject.toml", "/api/preview/-1", "/api/media/999999",
                                  "/%2e%2e/%2e%2e/etc/passwd"])
def test_path_traversal_refused(client, path: str) -> None:  # noqa: ANN001
    r = client.get(path)
    assert 400 <= r.status_code < 500 and "root:" not in r.text and "[project]" not in r.text, (path, r.text)


@pytest.mark.parametrize("form,files,status,words", [
    ({"modality": "image", "text": "a cat"}, None, 422, "not typed text"),
    ({"modality": "smell", "text": "a"}, None, 422, "no 'smell' tower"),
    ({"modality": "text", "text": "a", "k": "0"}, None, 422, "outside"),
    ({"modality": "text", "text": "a", "target": "smell"}, None, 422, "no 'smell' vectors"),
    ({"modality": "text"}, None, 422, "exactly one"),
    ({"modality": "audio"}, {"file": ("q.wav", b"RIFF not audio")}, 422, "cannot decode"),
    ({"modality": "image"}, {"file": ("q.jpg", b"GIF89a not taken")}, 415, "not a jpg"),
    ({"modality": "point_cloud"}, {"file": ("q.exe", b"MZ")}, 415, "not taken"),
    ({"modality": "protein", "text": "MKV123"}, None, 422, "outside the ESM alphabet"),
    ({"text": "a"}, None, 422, "modality"),
])
def test_bad_queries_get_one_clear_4xx(client, form, files, status: int, words: str) -> None:  # noqa: ANN001
    r = client.post("/api/search", data=form, files=files)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and words in body["error"] and "\n" not in body["error"], body
