"""The HTTP API (DESIGN.md §3) as a Ray Serve app: FastAPI ingress -> Router -> one Encoder deployment per level."""
# no `from __future__ import annotations`: FastAPI must see the request model class, not a string

import asyncio
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from bicascade.actors.encoder import Encoder
from bicascade.actors.router import Router, ladder_levels

MAX_QUERY_CHARS = 1000
MAX_BODY_BYTES = 16 * 1024
# a replica died mid-request (Serve replaces it) or a downstream queue is full: the client should retry
RETRYABLE = (RayActorError, BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError)
CONFIG_YAML = Path(__file__).with_name("config.yaml")
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")  # ids are opaque keys: nothing path-like gets near storage


@dataclass
class AppConfig:
    db: str
    ladder: str = "synthetic"
    cutoffs: list[int] = field(default_factory=lambda: [50, 14])
    encoder_threads: int = 1
    max_inflight: int = 64  # searches per ingress replica before it answers 503 + Retry-After (autoscaling adds replicas)


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: StrictStr = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    k: StrictInt = 10
    levels: StrictInt | None = None  # cascade depth: 1 = level 0 alone; default the whole ladder


api = FastAPI(title="bicascade", description="Text-to-image search with a bi-encoder cascade")


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@api.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    parts = [f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors()]
    return error(422, "; ".join(parts) or "invalid request")


@api.exception_handler(HTTPException)
async def _http(_: Request, exc: HTTPException) -> JSONResponse:
    return error(exc.status_code, str(exc.detail))


@api.middleware("http")
async def _limit_body(request: Request, call_next):
    size = request.headers.get("content-length")
    if size is not None and (not size.isdigit() or int(size) > MAX_BODY_BYTES):
        return error(413, f"request body over {MAX_BODY_BYTES} bytes")
    return await call_next(request)


def _media_type(data: bytes) -> str:
    for magic, kind in ((b"\xff\xd8", "image/jpeg"), (b"\x89PNG", "image/png"), (b"GIF8", "image/gif"),
                        (b"RIFF", "image/webp"), (b"BM", "image/bmp")):
        if data.startswith(magic):
            return kind
    return "application/octet-stream"


def replica_counts() -> dict[str, int]:
    """Running replicas per deployment of this app: what autoscaling decided (blocking; call off the event loop)."""
    app = serve.get_replica_context().app_name
    deployments = serve.status().applications[app].deployments
    return {name: d.replica_states.get("RUNNING", 0) for name, d in deployments.items()}


# helpers above this line: Serve pickles the class with the module globals that exist at its definition
@serve.deployment  # options (autoscaling, queues, resources): serve/config.yaml
@serve.ingress(api)
class Api:
    def __init__(self, router: DeploymentHandle, cutoffs: list[int], max_inflight: int) -> None:
        self.router, self.cutoffs, self.max_inflight = router, cutoffs, max_inflight
        self.inflight = 0

    @api.post("/search")
    async def search(self, req: SearchRequest) -> JSONResponse:
        if not req.query.strip():
            return error(422, "query: must not be blank")
        depth = len(self.cutoffs) + 1 if req.levels is None else req.levels
        if not 1 <= depth <= len(self.cutoffs) + 1:
            return error(422, f"levels: must be between 1 and {len(self.cutoffs) + 1}, got {depth}")
        max_k = self.cutoffs[max(0, depth - 2)]  # the last cutoff of that depth (m_1 for level 0 alone)
        if not 1 <= req.k <= max_k:
            return error(422, f"k: must be between 1 and the last cutoff {max_k}, got {req.k}")
        if self.inflight >= self.max_inflight:  # shed load early: a bounded wait beats an unbounded queue
            return error(503, f"overloaded: {self.inflight} searches in flight", {"Retry-After": "1"})
        self.inflight += 1
        try:
            return JSONResponse(await self.router.search.remote(req.query, req.k, depth))
        except RETRYABLE as e:
            return error(503, f"unavailable, retry: {type(e).__name__}", {"Retry-After": "1"})
        finally:
            self.inflight -= 1

    @api.get("/images/{image_id}")
    async def image(self, image_id: str) -> Response:
        if not ID_PATTERN.fullmatch(image_id):
            return error(400, "image ids are opaque keys of letters, digits, '-' and '_'")
        data = await self.router.image.remote(image_id)
        if data is None:
            return error(404, f"no image with id {image_id!r}")
        return Response(data, media_type=_media_type(data))

    async def flush(self) -> int:
        """Not an HTTP route: `bicascade serve` calls it on shutdown so no computed embedding is lost."""
        return await self.router.flush.remote()

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"ok": True}

    @api.get("/stats")
    async def stats(self) -> dict:
        doc = await self.router.stats.remote()
        return {**doc, "replicas": await asyncio.to_thread(replica_counts)}


def shipped_app() -> dict:
    """The application entry of serve/config.yaml: one source for `bicascade serve` and `serve deploy`."""
    return yaml.safe_load(CONFIG_YAML.read_text())["applications"][0]


def deployment_options() -> dict[str, dict]:
    """Per-deployment options (autoscaling, queue bounds, resources) from serve/config.yaml."""
    return {d.pop("name"): d for d in shipped_app()["deployments"]}


def runtime_env() -> dict:
    """The app's runtime_env from serve/config.yaml, which `bicascade serve` gives its Ray job."""
    return shipped_app().get("runtime_env", {})


def build(config: AppConfig) -> serve.Application:
    """The app graph: one Encoder per level, the Router over their handles, the HTTP ingress over the router."""
    from bicascade import models

    opts = deployment_options()
    levels = models.get_ladder(config.ladder).levels
    if len(config.cutoffs) != len(levels) - 1:
        raise ValueError(f"ladder {config.ladder!r} has {len(levels)} levels: give {len(levels) - 1} cutoffs, "
                         f"got {config.cutoffs}")
    # specs, not names: a replica on another node needs no registry, only the checkpoint path
    deepest = opts[max(n for n in opts if n.startswith("Encoder"))]  # for ladders deeper than the YAML's
    encoders = [Encoder.options(name=f"Encoder{j}", **opts.get(f"Encoder{j}", deepest))
                .bind(models.get_model(name), config.db, config.encoder_threads) for j, name in enumerate(levels)]
    infos = ladder_levels(config.ladder)
    router = Router.options(**opts["Router"]).bind(config.db, infos, list(config.cutoffs), encoders)
    return Api.options(**opts["Api"]).bind(router, list(config.cutoffs), config.max_inflight)


def app_builder(args: dict) -> serve.Application:
    """`serve run bicascade.serve.app:app_builder db=...` and serve/config.yaml enter here."""
    if "cutoffs" in args and isinstance(args["cutoffs"], str):
        args = {**args, "cutoffs": json.loads(f"[{args['cutoffs']}]")}
    return build(AppConfig(**args))
