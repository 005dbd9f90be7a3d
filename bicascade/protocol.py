"""What a search asks, the cascade it runs and what it answers: one request type, one plan type and one response type
that the Python API, the CLI, the HTTP ingress and its router share (no dict crosses a module boundary on the query
path), and `answer`, the one place a cascade's output becomes a response (dedup, min_score, paging). No torch, no
Ray: the ingress imports it."""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bicascade.cascade import Cascade, LevelStats, dedup
from bicascade.errors import BadInputError
from bicascade.storage.filters import Filter

MODES = ("semantic", "keyword", "hybrid")
RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al., 2009; LanceDB's RRFReranker uses it too)
Keywords = Callable[[str, int], list[tuple[str, float]]]  # text, n -> the best n (id, BM25 score) under the filter


@dataclass(frozen=True)
class SearchRequest:
    """Exactly one of `query` (text), `image` (an image file's bytes) or `image_id` (an indexed image: more like
    this). `depth` levels of the cascade run (None: all; 1: level 0 alone); `where` filters before level 0 ranks.
    `mode`: "semantic" (the cascade), "keyword" (the full-text index over captions, paths and metadata) or "hybrid"
    (both lists fused by reciprocal rank); the last two search a text query, and their min_score applies to their own
    score (BM25, or the fused one) and dedup to level 0's vectors."""

    query: str | None = None
    image: bytes | None = None
    image_id: str | None = None
    k: int = 10
    depth: int | None = None
    offset: int = 0
    min_score: float | None = None
    dedup: float | None = None
    where: Filter | None = None
    mode: str = "semantic"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise BadInputError(f"mode: must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode != "semantic" and self.query is None:
            raise BadInputError(f"mode {self.mode}: searches a text query (give query)")
        given = [name for name in ("query", "image", "image_id") if getattr(self, name) is not None]
        if len(given) != 1:
            raise BadInputError(f"give exactly one of query, image or image_id (got {', '.join(given) or 'none'})")
        if self.query is not None and not self.query.strip():
            raise BadInputError("query: must not be blank")
        for name, low in (("k", 1), ("offset", 0)):
            value = getattr(self, name)
            if type(value) is not int or value < low:
                raise BadInputError(f"{name}: must be an integer of at least {low}, got {value!r}")
        if self.depth is not None and (type(self.depth) is not int or self.depth < 1):
            raise BadInputError(f"depth: must be a positive integer, got {self.depth!r}")
        for name in ("min_score", "dedup"):
            value = getattr(self, name)
            if value is not None and not -1 <= value <= 1:
                raise BadInputError(f"{name}: must be between -1 and 1, got {value!r}")

    @classmethod
    def of(cls, query: str | None = None, *, where: Filter | dict[str, Any] | None = None, **fields: Any
           ) -> SearchRequest:
        """A request whose `where` may be given as the HTTP API's object (checked field by field)."""
        return cls(query, where=where if isinstance(where, Filter) or where is None else Filter.parse(where),
                   **fields)

    def depth_of(self, levels: int) -> int:
        """The cascade depth this request runs on a ladder of `levels` levels."""
        if self.depth is not None and self.depth > levels:
            raise BadInputError(f"depth: must be between 1 and {levels}, got {self.depth}")
        return self.depth or levels


@dataclass(frozen=True)
class Plan:
    """A cascade `bicascade plan` chose: levels of the database's ladder by name (its level 0 first, in ladder order),
    their cutoffs, and the adaptive margin when the cutoffs adapt per query."""

    cascade: tuple[str, ...]
    cutoffs: tuple[int, ...]
    adaptive_margin: float | None = None

    @classmethod
    def read(cls, path: str | Path) -> Plan:
        """The chosen cascade of a `bicascade plan --json` document."""
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise BadInputError(f"cannot read plan {path}: {e}") from None
        chosen = doc.get("chosen") if isinstance(doc, dict) else None
        if not isinstance(chosen, dict) or not chosen.get("cascade"):
            raise BadInputError(f"{path} holds no chosen cascade (`bicascade plan --json > FILE` writes one)")
        return cls.of(chosen)

    @classmethod
    def of(cls, doc: dict[str, Any]) -> Plan:
        """From its JSON object {"cascade", "cutoffs", "adaptive_margin"} (a plan document's "chosen", serve's args)."""
        try:
            margin = doc.get("adaptive_margin")
            return cls(tuple(str(n) for n in doc["cascade"]), tuple(int(m) for m in doc["cutoffs"]),
                       None if margin is None else float(margin))
        except (KeyError, TypeError, ValueError) as e:
            raise BadInputError(f"a plan needs cascade (level names) and cutoffs (integers): {e!r}") from None

    def levels(self, names: Sequence[str]) -> list[int]:
        """The plan's levels as indices into a ladder of `names`; a BadInputError unless they are a subsequence of it
        that starts with its level 0."""
        idx = [names.index(n) if n in names else -1 for n in self.cascade]
        if not idx or idx[0] != 0 or -1 in idx or idx != sorted(set(idx)):
            raise BadInputError(f"the plan's cascade {list(self.cascade)} is not levels of the ladder {list(names)} "
                                "starting with its level 0")
        return idx


@dataclass(frozen=True)
class LevelScore:
    model: str
    score: float
    cached: bool  # level >= 1: its embedding came from the cache


@dataclass(frozen=True)
class Hit:
    id: str
    score: float  # at the deepest level the request ran
    uri: str | None
    levels: tuple[LevelScore, ...]  # empty for an image only the keyword search found
    keyword_rank: int | None = None  # keyword and hybrid modes: its place in each list (1 = first), None if absent
    cascade_rank: int | None = None


@dataclass
class SearchResponse:
    """The hits, best first, and what they cost. Iterating a response iterates its hits."""

    hits: list[Hit]
    levels: list[LevelStats]
    ms: float
    text_encodes: int  # query text embeddings computed: one per distinct text tower
    timing: dict[str, float] = field(default_factory=dict)
    mode: str = "semantic"

    def __iter__(self) -> Iterator[Hit]:
        return iter(self.hits)

    def __len__(self) -> int:
        return len(self.hits)

    def __getitem__(self, n: int) -> Hit:
        return self.hits[n]

    @property
    def gflops(self) -> float:
        return sum(s.gflops for s in self.levels)

    @property
    def uncascaded_gflops(self) -> float:
        """What the image encoding would cost without the cascade: the top level over every candidate level 0
        ranked (a floor: uncascaded, it would have embedded the whole corpus once)."""
        top = self.levels[-1] if self.levels else None
        return top.gflops / top.encoded * self.levels[0].candidates if top and top.encoded else 0.0

    def to_json(self) -> dict:
        """The HTTP API's response document (README, Serving)."""
        return {"results": [{"id": h.id, "score": h.score, "uri": h.uri, "levels": [asdict(s) for s in h.levels],
                             **({"keyword_rank": h.keyword_rank, "cascade_rank": h.cascade_rank}
                                if self.mode != "semantic" else {})} for h in self.hits],
                "stats": {"levels": [asdict(s) for s in self.levels], "ms": self.ms, "gflops": self.gflops,
                          "text_encodes": self.text_encodes, "uncascaded_gflops": self.uncascaded_gflops,
                          "timing": self.timing}}

    def format(self) -> str:
        ranks = (lambda h: f"  [keyword #{h.keyword_rank or '-'}, cascade #{h.cascade_rank or '-'}]") \
            if self.mode != "semantic" else (lambda h: "")
        lines = [f"{n + 1:>3}. {h.score:.4f}  {h.id}  {h.uri}{ranks(h)}" for n, h in enumerate(self.hits)]
        lines += [f"{s.model}: {s.candidates} candidates, {s.cache_hits} cached, {s.encoded} encoded, {s.ms:.1f} ms"
                  for s in self.levels]
        return "\n".join(lines + [f"{self.ms:.1f} ms, {self.gflops:.3f} GFLOPs of image encoding, "
                                  f"{self.text_encodes} text embedding(s)"])


def answer(cascade: Cascade, req: SearchRequest, vectors: Sequence[np.ndarray], allowed: object | None,
           names: Sequence[str], text_encodes: int, uris: Callable[[list[str]], dict[str, str]],
           stored: Callable[[list[str]], np.ndarray], keywords: Keywords | None = None) -> SearchResponse:
    """Run `cascade` (the request's depth) on the query's per-level vectors, then dedup, min_score and paging.
    `uris` gives the hits' uris; `stored` level 0's vectors (dedup at depth 1); `keywords` the keyword search
    (keyword and hybrid modes)."""
    # dedup needs spare candidates: rank as many as the last level keeps, then collapse and page
    cap = cascade.cutoffs[-1] if cascade.cutoffs else req.offset + req.k
    if req.mode != "semantic":
        return _fused(cascade, req, vectors, allowed, names, text_encodes, uris, stored, keywords, cap)
    out = cascade.search("", cap if req.dedup is not None else min(req.offset + req.k, cap), vectors, allowed)
    keep = list(range(len(out.results)))
    if req.dedup is not None and out.results:
        final = out.vectors if out.vectors is not None else stored([r.id for r in out.results])
        keep = dedup(np.asarray(final), req.dedup)
    if req.min_score is not None:
        keep = [n for n in keep if out.results[n].score >= req.min_score]
    results = [out.results[n] for n in keep[req.offset:req.offset + req.k]]
    where = uris([r.id for r in results])
    hits = [Hit(r.id, r.score, where.get(r.id), tuple(LevelScore(names[j], s, j > 0 and r.cached[j - 1])
                                                      for j, s in enumerate(r.scores))) for r in results]
    return SearchResponse(hits, out.levels, out.ms, text_encodes)


def _fused(cascade: Cascade, req: SearchRequest, vectors: Sequence[np.ndarray], allowed: object | None,
           names: Sequence[str], text_encodes: int, uris: Callable[[list[str]], dict[str, str]],
           stored: Callable[[list[str]], np.ndarray], keywords: Keywords | None, n: int) -> SearchResponse:
    """Keyword mode: the keyword list alone. Hybrid: the keyword list and the cascade's, `n` each, fused by
    reciprocal rank (score = sum of 1 / (RRF_K + rank) over the lists an image is in); then dedup, min_score and
    paging, as in semantic mode."""
    if keywords is None:
        raise BadInputError(f"mode {req.mode}: this search has no keyword index")
    t0 = time.perf_counter()
    spare = req.dedup is not None or req.min_score is not None
    words = keywords(req.query, n if req.mode == "hybrid" or spare else req.offset + req.k)
    out = cascade.search("", n, vectors, allowed) if req.mode == "hybrid" else None
    semantic = {r.id: (rank, r) for rank, r in enumerate(out.results, 1)} if out else {}
    lexical = {id_: (rank, score) for rank, (id_, score) in enumerate(words, 1)}
    if out is None:
        ranked = [(score, id_) for id_, (_, score) in lexical.items()]
    else:
        fused = {i: sum(1 / (RRF_K + ranks[i][0]) for ranks in (semantic, lexical) if i in ranks)
                 for i in [*semantic, *lexical]}
        ranked = sorted(((score, i) for i, score in fused.items()), key=lambda x: -x[0])
    if req.dedup is not None and ranked:
        ranked = [ranked[i] for i in dedup(np.asarray(stored([i for _, i in ranked])), req.dedup)]
    if req.min_score is not None:
        ranked = [(score, i) for score, i in ranked if score >= req.min_score]
    page = ranked[req.offset:req.offset + req.k]
    where = uris([i for _, i in page])
    hits = []
    for score, i in page:
        r = semantic.get(i, (None, None))[1]
        levels = tuple(LevelScore(names[j], s, j > 0 and r.cached[j - 1]) for j, s in enumerate(r.scores)) if r else ()
        hits.append(Hit(i, float(score), where.get(i), levels, lexical.get(i, (None,))[0], semantic.get(i, (None,))[0]))
    ms = (time.perf_counter() - t0) * 1000  # both searches and the fusion
    return SearchResponse(hits, out.levels if out else [], ms, text_encodes if out else 0, mode=req.mode)
