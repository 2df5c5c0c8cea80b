"""The search service: a FastAPI application over a :class:`~mmpt.search.query.Searcher`.

    GET  /                      the web page (static HTML + JS from this package; no CDN)
    GET  /api/info              the model's query modalities (typed text? upload suffixes), the index
    POST /api/search            multipart form: modality, text | file, k, target -> {"hits": [...]}
    GET  /api/media/{id}        a hit's member, read by its recorded offset (?ext= another member of it)
    GET  /api/preview/{id}      a hit's member decoded by its data side: {"text"} or {"points"} (a scatter)
    POST /knn-service           clip-retrieval's back-end query (text / image base64 / embedding_input)
    GET  /indices-list, POST /metadata   the rest of clip-retrieval's back end its front end calls
    GET  /docs, /openapi.json   FastAPI's

Every refusal is a 4xx JSON ``{"error": "<one line>"}``. Requests name ids and member extensions only,
never paths.
"""

import asyncio
import base64
import binascii
import math
import mimetypes
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException

from mmpt.search.query import Busy, Job, QueryError, Searcher, describe_sides, query_value

PREVIEW_POINTS = 2048
SAFE_MEDIA = ("image/", "audio/", "text/plain")


class _BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 before the app reads it all."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _too_large(send, self.limit)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _Oversize
            return message

        try:
            await self.app(scope, limited, send)
        except _Oversize:
            await _too_large(send, self.limit)


class _Oversize(Exception):
    pass


async def _too_large(send: Any, limit: int) -> None:
    import json

    body = json.dumps({"error": f"request body over the upload limit of {limit} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _static(name: str) -> str:
    return resources.files("mmpt.search").joinpath("static", name).read_text(encoding="utf-8")


def create_app(searcher: Searcher, *, max_upload_bytes: int = 20 << 20, k_max: int = 100,
               name: str = "index") -> Any:
    """The FastAPI application serving ``searcher``'s model and index."""
    from mmpt.search.store import MemberGone

    store, sides = searcher.store, searcher.transforms
    info = {"name": name, "model": store.manifest["model"], "dim": store.dim, "count": store.manifest["count"],
            "index": {k: store.manifest["index"].get(k) for k in ("kind", "factory", "nprobe", "recall")},
            "modalities": store.modalities, "query": describe_sides(sides), "k_max": k_max,
            "max_upload_bytes": max_upload_bytes}

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        searcher.close()

    app = FastAPI(title="mmpt search", version="1", description="Any-modality retrieval over an `mmpt index`.",
                  lifespan=lifespan)

    @app.exception_handler(QueryError)
    async def _query_error(request: Request, exc: QueryError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path"))
        return JSONResponse({"error": f"{where or 'request'}: {first.get('msg', 'invalid')}"}, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    def check_k(k: int) -> int:
        if not 1 <= k <= k_max:
            raise QueryError(f"k: {k} is outside 1..{k_max}")
        return k

    def check_target(target: str | None) -> str | None:
        if target in (None, "", "all"):
            return None
        if target not in store.modalities:
            raise QueryError(f"target: no {target!r} vectors in this index; it holds {', '.join(store.modalities)}")
        return target

    def side_of(modality: str) -> Any:
        if modality not in sides:
            raise QueryError(f"modality: the model has no {modality!r} tower; it has {', '.join(sides)}")
        return sides[modality]

    async def run(job: Job) -> tuple[np.ndarray, np.ndarray]:
        try:
            fut = searcher.batcher.submit(job)
        except Busy as exc:
            raise QueryError(str(exc), 503) from None
        return await asyncio.wrap_future(fut)

    def media_of(row: dict[str, Any]) -> dict[str, Any] | None:
        side = sides.get(row["modality"])
        ext = next((e for e in getattr(side, "extensions", ()) if e in row["members"]), None)
        if ext is None:
            return None
        mime = mimetypes.guess_type(f"x.{ext}")[0] or ""
        kind = mime.split("/")[0] if mime.startswith(("image/", "audio/", "text/")) else None
        if kind is None:
            kind = "text" if side.inline_ext is not None else "preview"
        url = f"api/preview/{row['id']}" if kind == "preview" else f"api/media/{row['id']}"
        return {"type": kind, "ext": ext, "url": url}

    def hits(scores: np.ndarray, ids: np.ndarray) -> list[dict[str, Any]]:
        out = []
        for s, i in zip(scores.tolist(), ids.tolist(), strict=True):
            if i < 0:
                continue
            row = store.row(int(i))
            hit = {"id": int(i), "score": float(s) if math.isfinite(s) else None, "key": row["key"],
                   "modality": row["modality"], "shard": row["shard"], "row": row["row"],
                   "caption": row.get("caption"), "json": row.get("json"),
                   "members": sorted(row["members"]), "media": media_of(row)}
            out.append(hit)
        return out

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(_static("index.html"))

    @app.get("/app.js", include_in_schema=False)
    async def script() -> Response:
        return Response(_static("app.js"), media_type="text/javascript")

    @app.get("/api/info")
    async def api_info() -> dict[str, Any]:
        """The model's query modalities and the index."""
        return info

    @app.get("/api/stats")
    async def api_stats() -> dict[str, int]:
        """Queries answered and model batches run since start (micro-batching at work under load)."""
        return {"queries": searcher.batcher.done, "batches": searcher.batcher.batches}

    @app.post("/api/search")
    async def api_search(modality: Annotated[str, Form(description="query modality (a tower of the model)")],
                         text: Annotated[str | None, Form(description="typed query (modalities with text input)")] = None,
                         file: Annotated[UploadFile | None, File(description="uploaded query file")] = None,
                         k: Annotated[int, Form()] = 10,
                         target: Annotated[str | None, Form(description="only hits of this modality")] = None,
                         ) -> dict[str, Any]:
        """Embed one query of any modality the model has and return the top-k hits."""
        side = side_of(modality)
        target = check_target(target)
        check_k(k)
        if (text is None or text == "") == (file is None):
            raise QueryError("give exactly one of 'text' and 'file'")
        if file is not None:
            data = await file.read(max_upload_bytes + 1)
            if len(data) > max_upload_bytes:
                raise QueryError(f"file: upload over the limit of {max_upload_bytes} bytes", 413)
            suffix = (file.filename or "").rsplit(".", 1)[-1] if "." in (file.filename or "") else None
            value = await run_in_threadpool(lambda: query_value(side, data=data, suffix=suffix))
        else:
            value = await run_in_threadpool(lambda: query_value(side, text=text))
        scores, ids = await run(Job(modality, value, k, target))
        return {"query": {"modality": modality, "target": target, "k": k},
                "hits": await run_in_threadpool(hits, scores, ids)}

    def member_id(id_: int) -> dict[str, Any]:
        try:
            return store.row(id_)
        except KeyError:
            raise QueryError(f"id {id_}: no such hit (the index holds ids 0..{store.manifest['count'] - 1})",
                             404) from None

    @app.get("/api/media/{id_}")
    async def api_media(id_: int, ext: str | None = None) -> Response:
        """A hit's member bytes (its own modality's member, or ``ext``), read from its shard by offset."""
        row = await run_in_threadpool(member_id, id_)
        media = media_of(row)
        ext = ext or (media or {}).get("ext")
        if ext is None or ext not in row["members"]:
            raise QueryError(f"id {id_}: no member {ext!r}; it has {', '.join(sorted(row['members'])) or 'none'}", 404)
        try:
            data = await run_in_threadpool(store.member, id_, ext)
        except MemberGone as exc:
            raise QueryError(f"id {id_}: {exc}", 410) from None
        mime = mimetypes.guess_type(f"x.{ext}")[0] or ""
        side = sides.get(row["modality"])
        if not mime and side is not None and ext == side.inline_ext:
            mime = "text/plain"
        if not mime.startswith(SAFE_MEDIA) or mime == "image/svg+xml":  # nothing the browser would run
            mime = "application/octet-stream"
        if mime == "text/plain":
            mime += "; charset=utf-8"
        return Response(data, media_type=mime, headers={"X-Content-Type-Options": "nosniff",
                                                        "Content-Security-Policy": "default-src 'none'; sandbox"})

    @app.get("/api/preview/{id_}")
    async def api_preview(id_: int) -> dict[str, Any]:
        """A hit's own member decoded by its data side: {"text": ...} or {"points": [[x, y, z, ...]]}."""
        from mmpt.data.budget import decode_within_budget

        row = await run_in_threadpool(member_id, id_)
        media = media_of(row)
        if media is None:
            raise QueryError(f"id {id_}: no member to preview", 404)
        try:
            data = await run_in_threadpool(store.member, id_, media["ext"])
        except MemberGone as exc:
            raise QueryError(f"id {id_}: {exc}", 410) from None
        value = await run_in_threadpool(decode_within_budget, sides[row["modality"]], data, media["ext"])
        if isinstance(value, str):
            return {"text": value}
        arr = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
        if arr.ndim == 2 and arr.shape[1] >= 3 and arr.dtype.kind == "f":
            step = max(1, -(-arr.shape[0] // PREVIEW_POINTS))
            return {"points": np.round(arr[::step, :6].astype(np.float64), 4).tolist(), "channels": int(arr.shape[1])}
        raise QueryError(f"id {id_}: no preview for a decoded {row['modality']} value of shape {arr.shape}", 415)

    class KnnQuery(BaseModel):
        """clip-retrieval's ``/knn-service`` body; its filtering flags are accepted and have no effect."""

        model_config = ConfigDict(extra="allow")
        text: str | None = None
        image: str | None = None
        image_url: str | None = None
        embedding_input: list[float] | None = None
        modality: str | None = None
        num_images: int = 40
        num_result_ids: int | None = None
        indice_name: str | None = None
        query_modality: str | None = None
        file_suffix: str | None = None

    def knn_side(body: KnnQuery, pick: Any) -> str:
        if body.query_modality:
            side_of(body.query_modality)
            return body.query_modality
        found = next((m for m, s in sides.items() if pick(s)), None)
        if found is None:
            raise QueryError("query_modality: none given and the model has no side this field defaults to")
        return found

    @app.post("/knn-service")
    async def knn_service(body: KnnQuery, request: Request) -> list[dict[str, Any]]:
        """clip-retrieval's query: ``text``, ``image`` (base64) or ``embedding_input``; ``modality`` picks
        the hits' modality (clip-retrieval's image or text index); ``query_modality`` (ours) any tower."""
        if body.image_url:
            raise QueryError("image_url: this server reaches no network; send the bytes base64-encoded in 'image'", 400)
        given = [f for f in ("text", "image", "embedding_input") if getattr(body, f) not in (None, "", [])]
        if len(given) != 1:
            raise QueryError("give exactly one of text, image and embedding_input", 400)
        target = check_target(body.modality)
        k = check_k(body.num_images)
        if body.text:
            m = knn_side(body, lambda s: s.natural_language)
            value = await run_in_threadpool(lambda: query_value(sides[m], text=body.text))
            job = Job(m, value, k, target)
        elif body.image:
            try:
                data = base64.b64decode(body.image, validate=True)
            except (binascii.Error, ValueError):
                raise QueryError("image: not base64", 400) from None
            if len(data) > max_upload_bytes:
                raise QueryError(f"image: over the upload limit of {max_upload_bytes} bytes", 413)
            m = knn_side(body, lambda s: s.file_prefix == "img")  # clip-retrieval's name for its image side
            value = await run_in_threadpool(lambda: query_value(sides[m], data=data, suffix=body.file_suffix))
            job = Job(m, value, k, target)
        else:
            vec = np.asarray(body.embedding_input, dtype=np.float32)
            if vec.shape != (store.dim,) or not np.isfinite(vec).all():
                raise QueryError(f"embedding_input: {vec.shape[0]} numbers, expected {store.dim} finite ones", 400)
            job = Job(None, None, k, target, vector=vec)
        scores, ids = await run(job)
        base = str(request.base_url)
        out = []
        for h in await run_in_threadpool(hits, scores, ids):
            media = h.pop("media")
            out.append({"id": h["id"], "similarity": h["score"], "url": base + media["url"] if media else None,
                        "caption": h["caption"], **{k: v for k, v in h.items() if k not in ("id", "score", "caption")}})
        return out

    @app.get("/indices-list")
    async def indices_list() -> list[str]:
        """clip-retrieval's index list: this server's one index."""
        return [name]

    class MetadataQuery(BaseModel):
        ids: list[int]
        indice_name: str | None = None

    @app.post("/metadata")
    async def metadata(body: MetadataQuery) -> list[dict[str, Any]]:
        """clip-retrieval's metadata lookup by ids."""
        if len(body.ids) > 10 * k_max:
            raise QueryError(f"ids: at most {10 * k_max} at once", 400)
        rows = [await run_in_threadpool(member_id, i) for i in body.ids]
        return [{"id": i, "metadata": {"caption": r.get("caption"), "key": r["key"], "modality": r["modality"]}}
                for i, r in zip(body.ids, rows, strict=True)]

    app.add_middleware(_BodyLimit, limit=max_upload_bytes + (1 << 20))  # the form's other fields fit the margin
    return app


def open_service(model_path: str, index_dir: str, *, device: str = "cpu", max_upload_bytes: int = 20 << 20,
                 k_max: int = 100, max_batch: int = 32, allow_nonfinite: bool = False) -> Any:
    """Load the model once, open the index, refuse a model other than the one that embedded it, and return
    the application."""
    from pathlib import Path

    from mmpt.commands.embed import weights_digest
    from mmpt.commands.export import load
    from mmpt.registry import ConfigError
    from mmpt.search.store import IndexStore

    store = IndexStore(index_dir)  # cheap checks first: a wrong folder fails before the model loads
    model, transforms, _ = load(model_path, device, allow_nonfinite=allow_nonfinite)
    digest = weights_digest(model)
    if digest != store.manifest["model"]:
        raise ConfigError(f"{model_path}: not the model that embedded {index_dir} (weights digest {digest[:12]}…, "
                          f"the index's {store.manifest['model'][:12]}…): its queries would land in another space; "
                          "serve the index with that model or re-embed and re-index with this one")
    settings = store.manifest.get("settings") or {}
    searcher = Searcher(model, transforms, store, normalize=bool(settings.get("normalize", True)),
                        precision=settings.get("precision", "fp32"), max_batch=max_batch)
    return create_app(searcher, max_upload_bytes=max_upload_bytes, k_max=k_max, name=Path(index_dir).resolve().name)
