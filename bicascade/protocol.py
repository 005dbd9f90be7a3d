"""What a search asks, the cascade it runs and what it answers: one request type, one plan type and one response type
that the Python API, the CLI, the HTTP ingress and its router share (no dict crosses a module boundary on the query
path), and `answer`, the one place a cascade's output becomes a response (dedup, min_score, paging). No torch, no
Ray: the ingress imports it."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bicascade.cascade import Cascade, LevelStats, dedup
from bicascade.errors import BadInputError
from bicascade.storage.filters import Filter


@dataclass(frozen=True)
class SearchRequest:
    """Exactly one of `query` (text), `image` (an image file's bytes) or `image_id` (an indexed image: more like
    this). `depth` levels of the cascade run (None: all; 1: level 0 alone); `where` filters before level 0 ranks."""

    query: str | None = None
    image: bytes | None = None
    image_id: str | None = None
    k: int = 10
    depth: int | None = None
    offset: int = 0
    min_score: float | None = None
    dedup: float | None = None
    where: Filter | None = None

    def __post_init__(self) -> None:
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
    levels: tuple[LevelScore, ...]


@dataclass
class SearchResponse:
    """The hits, best first, and what they cost. Iterating a response iterates its hits."""

    hits: list[Hit]
    levels: list[LevelStats]
    ms: float
    text_encodes: int  # query text embeddings computed: one per distinct text tower
    timing: dict[str, float] = field(default_factory=dict)

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
        top = self.levels[-1]
        return top.gflops / top.encoded * self.levels[0].candidates if top.encoded else 0.0

    def to_json(self) -> dict:
        """The HTTP API's response document (README, Serving)."""
        return {"results": [{"id": h.id, "score": h.score, "uri": h.uri, "levels": [asdict(s) for s in h.levels]}
                            for h in self.hits],
                "stats": {"levels": [asdict(s) for s in self.levels], "ms": self.ms, "gflops": self.gflops,
                          "text_encodes": self.text_encodes, "uncascaded_gflops": self.uncascaded_gflops,
                          "timing": self.timing}}

    def format(self) -> str:
        lines = [f"{n + 1:>3}. {h.score:.4f}  {h.id}  {h.uri}" for n, h in enumerate(self.hits)]
        lines += [f"{s.model}: {s.candidates} candidates, {s.cache_hits} cached, {s.encoded} encoded, {s.ms:.1f} ms"
                  for s in self.levels]
        return "\n".join(lines + [f"{self.ms:.1f} ms, {self.gflops:.3f} GFLOPs of image encoding, "
                                  f"{self.text_encodes} text embedding(s)"])


def answer(cascade: Cascade, req: SearchRequest, vectors: Sequence[np.ndarray], allowed: object | None,
           names: Sequence[str], text_encodes: int, uris: Callable[[list[str]], dict[str, str]],
           stored: Callable[[list[str]], np.ndarray]) -> SearchResponse:
    """Run `cascade` (the request's depth) on the query's per-level vectors, then dedup, min_score and paging.
    `uris` gives the hits' uris; `stored` level 0's vectors (dedup at depth 1)."""
    # dedup needs spare candidates: rank as many as the last level keeps, then collapse and page
    cap = cascade.cutoffs[-1] if cascade.cutoffs else req.offset + req.k
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
