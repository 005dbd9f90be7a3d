"""The HTTP API (README, Serving) as a Ray Serve app: a FastAPI ingress that runs the cascade itself (a Router per
replica) over one Encoder deployment per level.

Routes: the search page (GET /), POST /search (text, an indexed image, or an uploaded image; filters, paging,
dedup), images and thumbnails, /stats, /metrics, /healthz, and clip-retrieval's /knn-service, /indices-list and
/metadata. With API keys on, every route but /healthz needs `Authorization: Bearer KEY` (admin routes an admin key);
each client is rate-limited. The OpenAPI schema states every bound the server enforces.
"""
# no `from __future__ import annotations`: FastAPI must see the request model classes, not strings

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, model_validator
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
from bicascade.protocol import SearchRequest, SearchResponse

MAX_QUERY_CHARS = 1000
MAX_BODY_BYTES = 16 * 1024  # JSON bodies; a search with an uploaded image may carry MAX_UPLOAD_B64 more
MAX_UPLOAD_B64 = 4 * math.ceil(images.MAX_UPLOAD_BYTES / 3)
MAX_K = 1000  # the schema's static bound; the app narrows it to its own first cutoff
ID = r"^[A-Za-z0-9_-]{1,128}$"  # ids are opaque keys: nothing path-like gets near storage
THUMB_SIDES = (64, 1024)
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
    plan: dict | None = None  # a `bicascade plan` choice: {"cascade", "cutoffs", "adaptive_margin"}


# --- request and response shapes ------------------------------------------------------------------------------

def _integral(v: object) -> object:
    """JSON integers (2.0 included, as JSON Schema has it), nothing else: no strings, no booleans."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise ValueError("must be an integer")
    return int(v)


def _number(v: object) -> object:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError("must be a number")
    return float(v)


def _boolean(v: object) -> object:
    if not isinstance(v, bool):
        raise ValueError("must be true or false")
    return v


Int = Annotated[int, BeforeValidator(_integral)]
Num = Annotated[float, BeforeValidator(_number)]
Bool = Annotated[bool, BeforeValidator(_boolean)]

class Error(BaseModel):
    error: str


# filter values are compared with columns, never spliced into a query; quotes, backslashes, semicolons and control
# characters have no place in them and are refused (so is anything in an id but letters, digits, '-' and '_')
SAFE_TEXT = r"^[^'\"`;\\\x00-\x1f]+$"
FieldName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,100}$")]
MetaValue = Annotated[str, Field(max_length=500, pattern=SAFE_TEXT)] | Num | Bool


class Where(BaseModel):
    """Conditions on the images table, all of which must hold; applied before level 0 ranks."""

    model_config = ConfigDict(extra="forbid")
    uri_prefix: str | None = Field(None, min_length=1, max_length=500, pattern=SAFE_TEXT)
    caption: str | None = Field(None, min_length=1, max_length=500, pattern=SAFE_TEXT,
                                description="case-insensitive substring")
    min_width: Int | None = Field(None, ge=0, le=1_000_000)
    min_height: Int | None = Field(None, ge=0, le=1_000_000)
    meta: dict[FieldName, MetaValue | Annotated[list[MetaValue], Field(min_length=1, max_length=100)]] | None = Field(
        None, max_length=16, description="equality on fields of the source's metadata (any of a list)")


class Search(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: Int = Field(10, ge=1, le=MAX_K, description="results wanted; a cascade returns at most its last cutoff")
    depth: Int | None = Field(None, ge=1, le=64, validation_alias=AliasChoices("depth", "levels"),
                              description="cascade depth: 1 = level 0 alone; default all (`levels` is an alias)")
    offset: Int = Field(0, ge=0, le=MAX_K, description="results to skip (paging)")
    min_score: Num | None = Field(None, ge=-1, le=1, description="drop results scoring below this")
    dedup: Num | None = Field(None, ge=0, le=1, description="collapse results more similar than this")
    where: Where | None = None


class TextSearch(Search):
    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS, pattern=r"\S")


class ImageIdSearch(Search):
    image_id: str = Field(pattern=ID, description="an indexed image: more like this")


class ImageSearch(Search):
    image: str = Field(min_length=4, max_length=MAX_UPLOAD_B64, json_schema_extra={"format": "image-base64"},
                       description=f"base64 of an image file up to {images.MAX_UPLOAD_BYTES} bytes and "
                                   f"{images.MAX_UPLOAD_PIXELS} pixels")


SearchBody = Annotated[TextSearch | ImageIdSearch | ImageSearch, Field(union_mode="left_to_right")]


class LevelScoreDoc(BaseModel):
    model: str
    score: float
    cached: bool


class HitDoc(BaseModel):
    id: str
    score: float
    uri: str | None
    levels: list[LevelScoreDoc]


class LevelStatsDoc(BaseModel):
    model: str
    candidates: int
    cache_hits: int
    encoded: int
    ms: float
    gflops: float


class SearchStatsDoc(BaseModel):
    levels: list[LevelStatsDoc]
    ms: float
    gflops: float
    text_encodes: int
    uncascaded_gflops: float
    timing: dict[str, float]


class SearchDoc(BaseModel):
    results: list[HitDoc]
    stats: SearchStatsDoc


class KnnRequest(BaseModel):
    """clip-retrieval's knn-service request (clip_retrieval/clip_back.py), text or image. Its safety and aesthetic
    options have no counterpart here and are accepted and ignored; `image_url` and `embedding_input` must be null
    (this server fetches nothing from the network, and each level embeds queries with its own model)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"anyOf": [
        {"required": ["text"], "properties": {"text": {"type": "string"}}},
        {"required": ["image"], "properties": {"image": {"type": "string"}}}]})
    text: str | None = Field(None, min_length=1, max_length=MAX_QUERY_CHARS, pattern=r"\S")
    image: str | None = Field(None, min_length=4, max_length=MAX_UPLOAD_B64,
                              json_schema_extra={"format": "image-base64"})
    image_url: None = Field(None, description="not supported: send the image's bytes in `image`")
    embedding_input: None = Field(None, description="not supported: send text or image")
    modality: Literal["image"] = "image"
    num_images: Int = Field(40, ge=1, le=MAX_K)
    num_result_ids: Int | None = Field(None, ge=1, le=MAX_K)
    indice_name: str | None = Field(None, max_length=200)
    use_mclip: Bool = False
    deduplicate: Bool = False
    use_safety_model: Bool = False
    use_violence_detector: Bool = False
    aesthetic_score: Int | Annotated[str, Field(max_length=20)] | None = None
    aesthetic_weight: Num | Annotated[str, Field(max_length=20)] | None = None

    @model_validator(mode="after")
    def _text_or_image(self) -> "KnnRequest":
        if self.text is None and self.image is None:  # both: text wins, as in clip-retrieval's own server
            raise ValueError("give text or image")
        return self


class KnnHit(BaseModel):
    id: str
    similarity: float
    url: str
    caption: str | None


class MetadataRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[Annotated[str, Field(pattern=ID)]] = Field(max_length=1000)
    indice_name: str | None = Field(None, max_length=200)


class LadderLevel(BaseModel):
    model: str
    gflops: float


class LadderInfo(BaseModel):
    name: str
    levels: list[LadderLevel]
    cutoffs: list[int]


class MetadataItem(BaseModel):
    id: str
    metadata: dict


ERR = {"model": Error}
RETRY = {**ERR, "headers": {"Retry-After": {"schema": {"type": "integer"}}}}
COMMON = {400: ERR, 401: ERR, 413: ERR, 422: ERR, 429: RETRY}
SERVICE = {503: RETRY}


# --- keys -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Keys:
    """API keys as SHA-256 digests with their roles (`read` searches; `admin` also reads /stats and /metrics)."""

    roles: dict[bytes, str]

    @classmethod
    def load(cls, path: str | None) -> "Keys | None":
        text = Path(path).read_text() if path else os.environ.get("BICASCADE_API_KEYS", "").replace(",", "\n")
        roles = {}
        for n, line in enumerate(text.splitlines(), 1):
            parts = line.split("#", 1)[0].split()
            if not parts:
                continue
            if len(parts) > 2 or (len(parts) == 2 and parts[1] not in ("read", "admin")) or len(parts[0]) < 16:
                raise BadInputError(f"api keys line {n}: expected `KEY [read|admin]` with a key of 16+ characters")
            roles[hashlib.sha256(parts[0].encode()).digest()] = parts[1] if len(parts) == 2 else "read"
        if path and not roles:
            raise BadInputError(f"no API keys in {path}")
        return cls(roles) if roles else None

    def role(self, key: str) -> str | None:
        """The key's role, compared in constant time against every key (no early exit)."""
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for known, role in self.roles.items():
            if hmac.compare_digest(known, digest):
                found = role
        return found


def presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value:
        return value.strip()
    if scheme.lower() == "basic" and value:  # a browser's login prompt: the password is the key
        try:
            return base64.b64decode(value).decode().partition(":")[2] or None
        except (binascii.Error, UnicodeDecodeError):
            return None
    if request.url.path == "/" and request.query_params.get("key"):  # the page, opened from a link with its key
        return request.query_params["key"]
    return None


api = FastAPI(title="bicascade", description="Text-to-image search with a bi-encoder cascade", version="0.2.0",
              docs_url=None, redoc_url=None, openapi_url=None)  # the schema is served behind the key check


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


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


def invalid_response(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    modes = ("TextSearch", "ImageIdSearch", "ImageSearch")
    by_mode = [e for e in errors if len(e["loc"]) > 2 and e["loc"][1] in modes]
    if by_mode and all(e["loc"][-1] in ("query", "image_id", "image") and e["type"] in ("missing", "extra_forbidden")
                       for e in by_mode):
        return error(422, "give exactly one of query, image_id, image")
    hints = {"image_url": "image_url: this server fetches nothing from the network; send the image's bytes as base64 "
                          "in `image`",
             "embedding_input": "embedding_input: each level embeds queries with its own model; send text or image",
             "modality": "modality: only images are indexed (modality 'image')"}
    for e in errors:
        if e["loc"][-1] in hints:
            return error(422, hints[e["loc"][-1]])
    # a union's other branches add "query: Field required"-style noise beside the real error: report the real one
    real = [e for e in errors if not (e["loc"][-1] in ("query", "image_id", "image")
                                      and e["type"] in ("missing", "extra_forbidden"))]
    parts = []
    for e in (real or errors)[:5]:
        loc = [str(p) for p in e["loc"][1:] if p not in ("TextSearch", "ImageIdSearch", "ImageSearch")]
        parts.append(f"{'.'.join(loc) or 'body'}: {e['msg']}")
    return error(422, "; ".join(dict.fromkeys(parts)) or "invalid request")


@api.exception_handler(HTTPException)
async def _http(_: Request, exc: HTTPException) -> JSONResponse:
    return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))  # keeps Allow on a 405


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


def decode_upload(data: str) -> bytes:
    try:
        raw = base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError):
        raise BadInputError("image: not base64") from None
    if len(raw) > images.MAX_UPLOAD_BYTES:
        raise BadInputError(f"image: over {images.MAX_UPLOAD_BYTES} bytes")
    try:
        images.header(raw, images.MAX_UPLOAD_PIXELS)  # size and pixels checked before anything is decoded
    except BadInputError as e:
        raise BadInputError(f"image: {e}") from None
    return raw


def client_of(request: Request, key: str | None) -> str:
    if key:
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]  # never the key itself
    return "addr:" + (request.client.host if request.client else "unknown")


BOUNDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}


def as_enforced(node):
    """The schema pydantic writes, made to say what pydantic enforces, so clients and fuzzers see it: the bounds of
    an optional constrained type (`Int | None = Field(ge=1)`) come out as `ge`/`le`, which no JSON Schema reader
    knows, and a dict with constrained keys (`patternProperties`) does not say that other keys are refused."""
    if isinstance(node, dict):
        typed = node.get("type") in ("integer", "number")
        out = {(BOUNDS.get(k, k) if typed else k): as_enforced(v) for k, v in node.items()}
        if "patternProperties" in out:
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(node, list):
        return [as_enforced(v) for v in node]
    return node


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
                  "dedup": req.dedup, "where": req.where.model_dump(exclude_none=True) if req.where else None}
        if isinstance(req, TextSearch):
            return SearchRequest.of(req.query, **common)
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
                thumb = await asyncio.to_thread(lambda: images.jpeg(images.load(data, size).rgb, size))
                if len(self.thumbs) > 2000:
                    self.thumbs.clear()
                self.thumbs[(image_id, size)] = thumb
            return Response(thumb, media_type="image/jpeg", headers=cache)
        return await self.answer("/images", request, work)

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
            found = await self.run_search(SearchRequest(**asked, k=min(n, self.cutoffs[0] if self.cutoffs else n),
                                                      depth=depth, dedup=0.94 if req.deduplicate else None))
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
            return JSONResponse([{"id": i, "metadata": {"url": f"{base}/images/{i}", "uri": rows[i]["uri"],
                                                        "caption": rows[i]["caption"], "width": rows[i]["width"],
                                                        "height": rows[i]["height"],
                                                        "meta": json.loads(rows[i]["meta"]) if rows[i]["meta"] else {}}
                                  if i in rows else {}} for i in req.ids])
        return await self.answer("/metadata", request, work)
