"""The HTTP API's request and response documents (README, Serving) as pydantic models, and the bounds they state:
what FastAPI validates, what the OpenAPI schema says (as_enforced), and how a refused request is explained in one
line (invalid_response). No Ray, no torch: the shapes alone."""
# no `from __future__ import annotations`: FastAPI must see the request model classes, not strings

import base64
import binascii
import math
from typing import Annotated, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from bicascade import images
from bicascade.errors import BadInputError

MAX_QUERY_CHARS = 1000
MAX_BODY_BYTES = 16 * 1024  # JSON bodies; a search with an uploaded image may carry MAX_UPLOAD_B64 more
MAX_UPLOAD_B64 = 4 * math.ceil(images.MAX_UPLOAD_BYTES / 3)
MAX_K = 1000  # the schema's static bound; the app narrows it to its own first cutoff
ID = r"^[A-Za-z0-9_-]{1,128}$"  # ids are opaque keys: nothing path-like gets near storage
THUMB_SIDES = (64, 1024)


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


# a real calendar date (Feb 29 of a year that has none is the only date it admits that a search refuses), with an
# optional time of day and no offset: capture times are the camera's clock
When = Annotated[str, Field(max_length=40, pattern=r"^[1-9]\d{3}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12]\d|3[01])|"
                                                   r"(?:0[469]|11)-(?:0[1-9]|[12]\d|30)|02-(?:0[1-9]|1\d|2[0-9]))"
                                                   r"(?:[T ](?:[01]\d|2[0-3]):[0-5]\d(?::[0-5]\d(?:\.\d{1,6})?)?)?$")]
Name = Annotated[str, Field(min_length=1, max_length=500, pattern=SAFE_TEXT)]
Names = Name | Annotated[list[Name], Field(min_length=1, max_length=100)]


class Near(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lat: Num = Field(ge=-90, le=90)
    lon: Num = Field(ge=-180, le=180)
    km: Num = Field(gt=0, le=20_040)


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
    taken_after: When | None = Field(None, description="captured at or after this (the camera's clock): a date, or "
                                                        "a date and time without offset")
    taken_before: When | None = Field(None, description="captured before this (exclusive)")
    camera: Names | None = Field(None, description="a case-insensitive part of the camera's make and model (any of a "
                                                   "list)")
    near: Near | None = Field(None, description="taken within km of a point (GPS)")
    media_type: Names | None = Field(None, description="image/jpeg, image/heic, ... or jpeg, heic, ... (any of a list)")


class Search(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: Int = Field(10, ge=1, le=MAX_K, description="results wanted; a cascade returns at most its last cutoff")
    depth: Int | None = Field(None, ge=1, le=64, validation_alias=AliasChoices("depth", "levels"),
                              description="cascade depth: 1 = level 0 alone; default all (`levels` is an alias)")
    offset: Int = Field(0, ge=0, le=MAX_K, description="results to skip (paging)")
    min_score: Num | None = Field(None, ge=-1, le=1, description="drop results scoring below this")
    dedup: Num | None = Field(None, ge=0, le=1, description="collapse results more similar than this")
    where: Where | None = None


def filter_doc(where: Where | None) -> dict | None:
    """A request's filter as the core parses it (bicascade.storage.filters.Filter.parse)."""
    return where.model_dump(exclude_none=True) if where else None


class TextSearch(Search):
    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS, pattern=r"\S")
    mode: Literal["semantic", "keyword", "hybrid"] = Field(
        "semantic", description="semantic: the cascade; keyword: the full-text index over captions, paths and "
                                "metadata (BM25); hybrid: both, fused by reciprocal rank (each result's keyword_rank "
                                "and cascade_rank are given)")


class ImageIdSearch(Search):
    image_id: str = Field(pattern=ID, description="an indexed image: more like this")


# what no JSON Schema type can say (these bytes are a picture) is declared, and so is the answer when they are not
UPLOAD = {"format": "image-base64", "contentEncoding": "base64", "contentMediaType": "image/*"}
UPLOAD_DOC = (f"base64 of an image file (JPEG, PNG, WebP, TIFF, HEIC...) up to {images.MAX_UPLOAD_BYTES} bytes and "
              f"{images.MAX_UPLOAD_PIXELS} pixels; a string that is not such a picture is answered 422")


class ImageSearch(Search):
    image: str = Field(min_length=4, max_length=MAX_UPLOAD_B64, json_schema_extra=UPLOAD, description=UPLOAD_DOC)


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
    keyword_rank: int | None = Field(None, description="keyword and hybrid modes: 1 = first of the keyword list")
    cascade_rank: int | None = Field(None, description="hybrid mode: 1 = first of the cascade's list")


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
    (this server fetches nothing from the network, and each level embeds queries with its own model). `where` is
    this server's filter, as in /search."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"anyOf": [
        {"required": ["text"], "properties": {"text": {"type": "string"}}},
        {"required": ["image"], "properties": {"image": {"type": "string"}}}]})
    text: str | None = Field(None, min_length=1, max_length=MAX_QUERY_CHARS, pattern=r"\S")
    image: str | None = Field(None, min_length=4, max_length=MAX_UPLOAD_B64, json_schema_extra=UPLOAD,
                              description=UPLOAD_DOC)
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
    where: Where | None = Field(None, description="bicascade's own field, not clip-retrieval's (its clients never "
                                                  "send it): the filter /search takes, applied before level 0 ranks")

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


class Facet(BaseModel):
    name: str
    count: int


class TakenRange(BaseModel):
    min: str | None
    max: str | None


class FacetsDoc(BaseModel):
    """What the capture filters can choose from (the search page's filter row)."""
    cameras: list[Facet]
    media_types: list[Facet]
    taken: TakenRange


class MetadataItem(BaseModel):
    id: str
    metadata: dict


ERR = {"model": Error}
RETRY = {**ERR, "headers": {"Retry-After": {"schema": {"type": "integer"}}}}
COMMON = {400: ERR, 401: ERR, 413: ERR, 422: ERR, 429: RETRY}
SERVICE = {503: RETRY}


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


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
