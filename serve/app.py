"""The HTTP API (README, Serving) as a Ray Serve app: a FastAPI ingress that runs the cascade itself (a Router per
replica) over one Encoder deployment per level.

Routes: the search page (GET /), POST /search (text, an indexed image, or an uploaded image; filters, paging,
dedup), images and thumbnails (and DELETE /images/ID), /stats, /metrics, /healthz, and clip-retrieval's /knn-service,
/indices-list and /metadata. With API keys on, every route but /healthz needs `Authorization: Bearer KEY` (admin
routes an admin key; `access.py`); each client is rate-limited. The request and response documents, and the bounds
the OpenAPI schema states, are `schema.py`'s.
"""
# no `from __future__ import annotations`: FastAPI must see the request model classes, not strings

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from bicascade import images
from bicascade.actors import metrics
from bicascade.actors.quota import Limiter, RateLimit
from bicascade.actors.router import Router, RouterConfig
from bicascade.errors import BadInputError, NotIndexedError, StaleEncoder
from bicascade.levels import LevelInfo
from bicascade.protocol import Plan, SearchRequest, SearchResponse
from bicascade.serve.access import Keys, client_of, presented_key
from bicascade.serve.schema import (
    COMMON,
    ERR,
    ID,
    MAX_BODY_BYTES,
    MAX_K,
    MAX_UPLOAD_B64,
    SERVICE,
    THUMB_SIDES,
    FacetsDoc,
    ImageIdSearch,
    KnnHit,
    KnnRequest,
    LadderInfo,
    MetadataItem,
    MetadataRequest,
    SearchBody,
    SearchDoc,
    TextSearch,
    as_enforced,
    decode_upload,
    error,
    filter_doc,
    invalid_response,
)
from bicascade.storage import tables

# a replica died mid-request (Serve replaces it) or a downstream queue is full: the client should retry
RETRYABLE = (RayActorError, BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError)
PAGE = Path(__file__).with_name("page")


@dataclass
class AppConfig:
    db: str
    ladder: str | None = None  # default: the ladder the database was indexed with
    cutoffs: list[int] | None = None  # default: the paper's (50, 14) for three levels
    encoder_threads: int = 1
    group_gflops: float = 1.0  # levels cheaper than this (GFLOPs per image) share one Encoder deployment; 0: never
    max_inflight: int = 64  # searches per ingress replica before it answers 503 + Retry-After
    api_keys: str | None = None  # a file of `KEY [read|admin]` lines; or $BICASCADE_API_KEYS
    rate: float = 200.0  # requests per second per client; 0 turns limits off
    burst: float = 400.0
    router: dict = field(default_factory=dict)  # RouterConfig fields
    replicas: dict[str, int] = field(default_factory=dict)  # fixed replica counts instead of autoscaling
    plan: Plan | None = None  # a `bicascade plan` choice (its JSON object in serve/config.yaml's args)

    def __post_init__(self) -> None:
        if isinstance(self.plan, dict):
            self.plan = Plan.of(self.plan)


def described(row: dict) -> dict:
    """An image's row as /metadata gives it: clip-retrieval's fields, then what the file said about its capture."""
    taken = row.get("taken")
    camera = " ".join(p for p in (row.get("camera_make"), row.get("camera_model")) if p) or None
    return {"uri": row["uri"], "caption": row["caption"], "width": row["width"], "height": row["height"],
            "meta": json.loads(row["meta"]) if row["meta"] else {}, "taken": taken.isoformat() if taken else None,
            "taken_offset": row.get("taken_offset"), "camera": camera, "lens": row.get("lens"), "lat": row.get("lat"),
            "lon": row.get("lon"), "media_type": row.get("media_type")}


api = FastAPI(title="bicascade", description="Text-to-image search with a bi-encoder cascade", version="0.2.0",
              docs_url=None, redoc_url=None, openapi_url=None)  # the schema is served behind the key check


def route_label(request: Request) -> str:
    """The route a request matched, as metrics label it ("/images", not "/images/<id>"); "other" before routing."""
    route = request.scope.get("route")
    return route.path.split("/{", 1)[0] or "/" if route is not None else "other"


def refused(request: Request, response: JSONResponse) -> JSONResponse:
    """Count a response the framework gave before `Api.answer` ran (a body that fails validation, one too big)."""
    recorder = getattr(request.app.state, "recorder", None)
    if recorder is not None:
        count_response(recorder, route_label(request), response.status_code)
    return response


def count_response(recorder: metrics.Recorder, route: str, status: int) -> None:
    recorder.inc("bicascade_responses_total", route=route, status=f"{status // 100}xx")


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    return refused(request, invalid_response(exc))


@api.exception_handler(HTTPException)
async def _http(request: Request, exc: HTTPException) -> JSONResponse:
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405:  # Allow names the first matching route's methods: a path may have several routes
        path = request.url.path
        methods = {m for r in api.routes if getattr(r, "path_regex", None) and r.path_regex.match(path)
                   for m in getattr(r, "methods", None) or ()}
        headers = {**(headers or {}), "Allow": ", ".join(sorted(methods))}
    return error(exc.status_code, str(exc.detail), headers)


CLIP_ROUTES = ("/knn-service", "/metadata")


@api.middleware("http")
async def _limit_body(request: Request, call_next):
    size = request.headers.get("content-length")
    cap = MAX_BODY_BYTES + (MAX_UPLOAD_B64 if request.url.path in ("/search", "/knn-service") else 0)
    if size is not None and (not size.isdigit() or int(size) > cap):
        return refused(request, error(413, f"request body over {cap} bytes"))
    if request.url.path in CLIP_ROUTES and "content-type" not in request.headers:
        # clip-retrieval's ClipClient posts json.dumps(...) with no Content-Type: read such a body as JSON
        request.scope["headers"] = [*request.scope["headers"], (b"content-type", b"application/json")]
    return await call_next(request)


def replica_counts() -> dict[str, int]:
    """Running replicas per deployment of this app: what autoscaling decided (blocking; call off the event loop)."""
    app = serve.get_replica_context().app_name
    deployments = serve.status().applications[app].deployments
    return {name: d.replica_states.get("RUNNING", 0) for name, d in deployments.items()}


def narrow_schema(depth: int, cutoffs: list[int]) -> dict:
    """The OpenAPI document states this app's own bounds: k and offset up to m_1 (a deeper cascade returns at most
    its last cutoff), `depth` up to the ladder's."""
    top = cutoffs[0] if cutoffs else MAX_K
    schema = as_enforced(api.openapi())  # a new document: FastAPI's own stays as it is
    props = schema["components"]["schemas"]
    for name in ("TextSearch", "ImageIdSearch", "ImageSearch"):
        p = props[name]["properties"]
        p["k"]["maximum"] = p["offset"]["maximum"] = top
        for option in p["depth"].get("anyOf", [p["depth"]]):
            if option.get("type") == "integer":
                option["maximum"] = depth
    return schema


async def retried(call, attempts: int = 12, wait_s: float = 0.5):
    """A search retried while an Encoder replica is being replaced (a killed one, or a migration's rolling update): it
    is idempotent, and the client would only retry it itself."""
    for attempt in range(attempts):
        try:
            return await call()
        except (*RETRYABLE, RayTaskError) as e:
            cause = e.as_instanceof_cause() if isinstance(e, RayTaskError) else e
            if not isinstance(cause, (*RETRYABLE, StaleEncoder)) or attempt == attempts - 1:
                raise
            await asyncio.sleep(wait_s)


class Overloaded(Exception):
    """This ingress replica has max_inflight searches running: shed the next one (503 + Retry-After)."""


# helpers above this line: Serve pickles the class with the module globals that exist at its definition
@serve.deployment  # options (autoscaling, queues, resources): serve/config.yaml
@serve.ingress(api)
class Api:
    def __init__(self, encoders: list[DeploymentHandle], infos: list[LevelInfo], cutoffs: list[int], ladder: str,
                 config: AppConfig, router: RouterConfig, keys: "Keys | None") -> None:
        app = serve.get_replica_context().app_name
        self.router = Router(config.db, infos, cutoffs, encoders, router, app=app)
        self.cutoffs, self.max_inflight, self.ladder = cutoffs, config.max_inflight, ladder
        self.levels = [{"model": info.name, "gflops": info.gflops} for info in infos]
        self.depth = len(cutoffs) + 1
        self.inflight = 0
        self.keys = keys  # read by the driver: a replica on another node has neither the key file nor its env
        self.limiter = Limiter(RateLimit(config.rate, config.burst), app)
        self.thumbs: dict[tuple[str, int], bytes] = {}
        self.metrics = self.router.metrics  # one recorder per replica, flushed to the hub every second
        api.state.recorder = self.metrics  # for the responses FastAPI gives before a route runs
        self.page = (PAGE / "index.html").read_text()
        self.schema = narrow_schema(self.depth, cutoffs)

    # -- auth, limits, accounting ------------------------------------------------------------------------------

    async def gate(self, request: Request, admin: bool = False) -> Response | None:
        """401/403/429 before any work: keys (when on), then the client's rate."""
        key = presented_key(request)
        if self.keys is not None:
            role = self.keys.role(key) if key else None
            if role is None:
                return error(401, "missing or unknown API key: send Authorization: Bearer KEY",
                             {"WWW-Authenticate": 'Bearer realm="bicascade"'})
            if admin and role != "admin":
                return error(403, "this route needs an admin key")
        wait = await self.limiter.admit(client_of(request, key if self.keys else None))
        if wait is not None:
            return error(429, "rate limit exceeded", {"Retry-After": str(max(1, math.ceil(wait)))})
        return None

    def count(self, route: str, status: int) -> None:
        count_response(self.metrics, route, status)

    async def answer(self, route: str, request: Request, work, admin: bool = False) -> Response:
        """Gate, run `work()`, map errors to statuses, count the response."""
        t0 = time.perf_counter()
        denied = await self.gate(request, admin)
        if denied is not None:
            self.count(route, denied.status_code)
            return denied
        try:
            resp = await work()
        except BadInputError as e:
            resp = error(422, str(e))
        except NotIndexedError as e:
            resp = error(404, str(e))
        except Overloaded:
            resp = error(503, f"overloaded: {self.inflight} searches in flight", {"Retry-After": "1"})
        except RETRYABLE as e:
            resp = error(503, f"unavailable, retry: {type(e).__name__}", {"Retry-After": "1"})
        except RayTaskError as e:  # a user's mistake found by an Encoder (an upload it cannot decode) travels wrapped
            cause = e.as_instanceof_cause()
            if isinstance(cause, BadInputError):
                resp = error(422, str(cause))
            elif isinstance(cause, NotIndexedError):
                resp = error(404, str(cause))
            elif isinstance(cause, (*RETRYABLE, StaleEncoder)):
                resp = error(503, f"unavailable, retry: {type(cause).__name__}", {"Retry-After": "1"})
            else:
                raise
        if isinstance(resp, Response) and resp.status_code == 200 and route == "/search":
            resp.headers["X-Ingress-Ms"] = f"{(time.perf_counter() - t0) * 1000:.3f}"
        self.count(route, resp.status_code if isinstance(resp, Response) else 200)
        return resp

    def request_for(self, req: BaseModel) -> SearchRequest:
        """The router's request; the bounds the schema states for this app (narrow_schema) are checked here."""
        top = self.cutoffs[0] if self.cutoffs else MAX_K
        if req.depth is not None and req.depth > self.depth:
            raise BadInputError(f"depth: must be between 1 and {self.depth}, got {req.depth}")
        for name in ("k", "offset"):
            if getattr(req, name) > top:
                raise BadInputError(f"{name}: must be at most the first cutoff {top}, got {getattr(req, name)}")
        common = {"k": req.k, "depth": req.depth, "offset": req.offset, "min_score": req.min_score,
                  "dedup": req.dedup, "where": filter_doc(req.where)}
        if isinstance(req, TextSearch):
            return SearchRequest.of(req.query, mode=req.mode, **common)
        if isinstance(req, ImageIdSearch):
            return SearchRequest.of(image_id=req.image_id, **common)
        return SearchRequest.of(image=decode_upload(req.image), **common)

    async def run_search(self, body: SearchRequest) -> SearchResponse:
        if self.inflight >= self.max_inflight:  # shed load early: a bounded wait beats an unbounded queue
            raise Overloaded()
        self.inflight += 1
        try:
            return await retried(lambda: self.router.search(body))
        finally:
            self.inflight -= 1

    # -- routes ------------------------------------------------------------------------------------------------

    @api.get("/", response_class=HTMLResponse, responses={401: ERR, 429: ERR},
             description="The search page; `/?q=TEXT` runs that search when it loads.")
    async def index(self, request: Request, q: str | None = Query(None, description="a search to run on load"),
                    key: str | None = Query(None, max_length=200)) -> Response:
        async def work():
            return HTMLResponse(self.page, headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})
        return await self.answer("/", request, work)

    @api.get("/static/{name}", responses={401: ERR, 404: ERR, 429: ERR})
    async def static(self, request: Request, name: str = PathParam(pattern=r"^[a-z]+\.(js|css)$")) -> Response:
        async def work():
            path = PAGE / name
            if not path.is_file():
                return error(404, f"no static file {name!r}")
            kind = "text/javascript" if name.endswith(".js") else "text/css"
            return Response(path.read_bytes(), media_type=kind, headers={"Cache-Control": "public, max-age=300"})
        return await self.answer("/static", request, work)

    @api.post("/search", response_model=SearchDoc, responses={**COMMON, 404: ERR, **SERVICE})
    async def search(self, request: Request, req: SearchBody) -> Response:
        async def work():
            return JSONResponse((await self.run_search(self.request_for(req))).to_json())
        return await self.answer("/search", request, work)

    @api.get("/images/{image_id}", responses={200: {"content": {"image/*": {}}}, 401: ERR, 404: ERR, 422: ERR,
                                               429: ERR, **SERVICE})
    async def image(self, request: Request, image_id: str = PathParam(pattern=ID),
                    size: int | None = Query(None, ge=THUMB_SIDES[0], le=THUMB_SIDES[1],
                                             description="a JPEG thumbnail of at most this side")) -> Response:
        async def work():
            data = await asyncio.to_thread(self.router.image, image_id)
            if data is None:
                return error(404, f"no image with id {image_id!r}")
            cache = {"Cache-Control": "public, max-age=86400, immutable", "ETag": f'"{image_id}-{size or 0}"'}
            if size is None:
                return Response(data, media_type=images.media_type(data), headers=cache)
            thumb = self.thumbs.get((image_id, size))
            if thumb is None:
                thumb = await asyncio.to_thread(lambda: images.jpeg(images.decode(data, size).rgb, size))
                if len(self.thumbs) > 2000:
                    self.thumbs.clear()
                self.thumbs[(image_id, size)] = thumb
            return Response(thumb, media_type="image/jpeg", headers=cache)
        return await self.answer("/images", request, work)

    @api.delete("/images/{image_id}", responses={401: ERR, 403: ERR, 404: ERR, 422: ERR, 429: ERR, **SERVICE},
                description="Remove an image from every table (images, level 0 and its ANN index's results, every "
                            "cache); an admin route when keys are on. Other replicas stop returning it within "
                            "the corpus refresh (5 s).")
    async def remove(self, request: Request, image_id: str = PathParam(pattern=ID)) -> Response:
        async def work():
            removed = await asyncio.to_thread(self.router.remove, [image_id])
            if not removed.get(tables.IMAGES, 0):
                return error(404, f"no image with id {image_id!r}")
            self.thumbs = {k: v for k, v in self.thumbs.items() if k[0] != image_id}
            return JSONResponse({"removed": removed})
        return await self.answer("/images", request, work, admin=self.keys is not None)

    async def flush(self) -> int:
        """Not an HTTP route: `bicascade serve` calls it on shutdown so no computed embedding is lost."""
        return await asyncio.to_thread(self.router.flush)

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> Response:
        async def work():
            return JSONResponse(self.schema)
        return await self.answer("/openapi.json", request, work)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"ok": True}

    @api.get("/stats", responses={401: ERR, 403: ERR, 429: ERR, **SERVICE})
    async def stats(self, request: Request) -> Response:
        async def work():
            doc = await asyncio.to_thread(self.router.stats)
            return JSONResponse({**doc, "ladder": self.ladder, "replicas": await asyncio.to_thread(replica_counts)})
        return await self.answer("/stats", request, work, admin=self.keys is not None)

    @api.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}, 401: ERR, 403: ERR,
                                                             429: ERR, **SERVICE})
    async def metrics_route(self, request: Request) -> Response:
        async def work():
            await asyncio.to_thread(self.router.stats)  # refreshes the cache-row gauges and hands this replica's counts
            text = await self.router.hub.render.remote()
            return Response(text, media_type="text/plain; version=0.0.4")
        return await self.answer("/metrics", request, work, admin=self.keys is not None)

    # -- clip-retrieval's protocol ------------------------------------------------------------------------------

    @api.get("/ladder", response_model=LadderInfo, responses={401: ERR, 429: ERR})
    async def ladder_info(self, request: Request) -> Response:
        async def work():
            return JSONResponse({"name": self.ladder, "levels": self.levels, "cutoffs": self.cutoffs})
        return await self.answer("/ladder", request, work)

    @api.get("/indices-list", response_model=list[str], responses={401: ERR, 429: ERR})
    async def indices(self, request: Request) -> Response:
        async def work():
            return JSONResponse([self.ladder])
        return await self.answer("/indices-list", request, work)

    @api.post("/knn-service", response_model=list[KnnHit], responses={**COMMON, 404: ERR, **SERVICE})
    async def knn(self, request: Request, req: KnnRequest) -> Response:
        async def work():
            if req.indice_name not in (None, self.ladder):
                return error(404, f"no index {req.indice_name!r}; GET /indices-list")
            n = req.num_result_ids or req.num_images
            # the deepest cascade that still ranks n results
            depth = max([1] + [d for d in range(2, self.depth + 1) if self.cutoffs[d - 2] >= n])
            asked = {"query": req.text} if req.text is not None else {"image": decode_upload(req.image)}
            found = await self.run_search(SearchRequest.of(
                **asked, k=min(n, self.cutoffs[0] if self.cutoffs else n), depth=depth,
                dedup=0.94 if req.deduplicate else None, where=filter_doc(req.where)))
            base = str(request.base_url).rstrip("/")
            captions = {m["id"]: m.get("caption") for m in
                        await asyncio.to_thread(self.router.metadata, [h.id for h in found])}
            return JSONResponse([{"id": h.id, "similarity": h.score, "url": f"{base}/images/{h.id}",
                                  "caption": captions.get(h.id)} for h in found.hits[:req.num_images]])
        return await self.answer("/knn-service", request, work)

    @api.post("/metadata", response_model=list[MetadataItem], responses={**COMMON, 404: ERR, **SERVICE})
    async def metadata(self, request: Request, req: MetadataRequest) -> Response:
        async def work():
            if req.indice_name not in (None, self.ladder):
                return error(404, f"no index {req.indice_name!r}; GET /indices-list")
            rows = {r["id"]: r for r in await asyncio.to_thread(self.router.metadata, req.ids)}
            base = str(request.base_url).rstrip("/")
            return JSONResponse([{"id": i, "metadata": {"url": f"{base}/images/{i}", **described(rows[i])}
                                  if i in rows else {}} for i in req.ids])
        return await self.answer("/metadata", request, work)

    @api.get("/facets", response_model=FacetsDoc, responses={401: ERR, 429: ERR, **SERVICE})
    async def facets(self, request: Request) -> Response:
        async def work():
            return JSONResponse(await asyncio.to_thread(self.router.facets))
        return await self.answer("/facets", request, work)
