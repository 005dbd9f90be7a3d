"""Algorithm 1 (bi-encoder cascade search) as pure code over small interfaces, its cost model (Eq. 1, Eq. 2) and
its response document: no Ray, no LanceDB, no torch."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from bicascade.errors import BadInputError

DEFAULT_CUTOFFS = (50, 14)  # the paper's m_1, m_2


def default_cutoffs(n_levels: int) -> tuple[int, ...]:
    """The paper's cutoffs for 2 and 3 levels; deeper ladders interpolate geometrically between m_1 = 50 and 14."""
    r = n_levels - 1
    if r <= len(DEFAULT_CUTOFFS):
        return DEFAULT_CUTOFFS[:r]
    first, last = DEFAULT_CUTOFFS[0], DEFAULT_CUTOFFS[-1]
    return tuple(int(round(first * (last / first) ** (j / (r - 1)))) for j in range(r))


def f_life(costs: Sequence[float], p: float, reference: float | None = None) -> float:
    """Eq. 1: lifetime cost of embedding the corpus with the top level (or `reference`, e.g. a ladder's top level
    for a cascade that stops below it) over that of the cascade."""
    if len(costs) < 2 and reference is None:
        raise BadInputError("Eq. 1 needs a cascade of at least 2 levels")
    if not 0 <= p <= 1:
        raise BadInputError(f"p must lie in [0, 1], got {p}")
    return (costs[-1] if reference is None else reference) / (costs[0] + p * sum(costs[1:]))


def f_latency(costs: Sequence[float], cutoffs: Sequence[int]) -> float | None:
    """Eq. 2: cold-cache encoding cost of [I_small, I_r] with cutoff m_1 over the deep cascade's (None below 3
    levels)."""
    if len(costs) < 3:
        return None
    levels = costs[1:]
    if len(cutoffs) < len(levels):
        raise BadInputError(f"a {len(costs)}-level cascade needs {len(levels)} cutoffs, got {list(cutoffs)}")
    return cutoffs[0] * costs[-1] / sum(c * m for c, m in zip(levels, cutoffs))


class CorpusIndex(Protocol):
    """Level 0: nearest neighbours of a unit query vector over the whole corpus, or over the images a filter allows
    (`allowed`: whatever the index's own filter representation is; None for all)."""

    def search(self, vector: np.ndarray, m: int, allowed: object | None = None) -> tuple[list[str], np.ndarray]: ...


class EmbeddingCache(Protocol):
    """A level's stored image embeddings, keyed by image id."""

    def get(self, ids: Sequence[str]) -> dict[str, np.ndarray]: ...

    def put(self, ids: Sequence[str], vectors: np.ndarray) -> None: ...


@dataclass
class Level:
    """One cascade level: a text encoder, a batched image encoder (ids -> unit vectors) and its cache."""

    name: str
    encode_text: Callable[[list[str]], np.ndarray]
    encode_images: Callable[[list[str]], np.ndarray]
    cache: EmbeddingCache | None = None  # level 0 needs none: its vectors live in the corpus index
    gflops: float = 0.0  # image-encoder cost per image


class DictCache:
    """In-memory EmbeddingCache (tests, in-process runs)."""

    def __init__(self) -> None:
        self.vectors: dict[str, np.ndarray] = {}

    def get(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        return {i: self.vectors[i] for i in ids if i in self.vectors}

    def put(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        for i, v in zip(ids, vectors):
            self.vectors.setdefault(i, v)


class ExactIndex:
    """Brute-force CorpusIndex over an in-memory matrix (tests, small corpora, ground truth)."""

    def __init__(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        self.ids = list(ids)
        self.vectors = np.asarray(vectors, np.float32)

    def search(self, vector: np.ndarray, m: int, allowed: np.ndarray | None = None) -> tuple[list[str], np.ndarray]:
        """`allowed`: a boolean mask over the rows."""
        return top_m(self.ids, self.vectors @ np.asarray(vector, np.float32), m, allowed)


def top_m(ids: Sequence[str], scores: np.ndarray, m: int, allowed: np.ndarray | None = None
          ) -> tuple[list[str], np.ndarray]:
    """The m best of `scores` (among the `allowed` rows), ranked by `rank`."""
    rows = np.flatnonzero(allowed) if allowed is not None else np.arange(len(scores))
    sub = scores[rows]
    if m < len(sub):  # rank only the top m, and whatever ties the m-th best within rank()'s rounding
        rows = rows[sub >= np.partition(sub, -m)[-m] - 1e-6]
    ranked_ids, ranked = rank([ids[i] for i in rows], scores[rows])
    return ranked_ids[:m], ranked[:m]


@dataclass
class LevelStats:
    model: str
    candidates: int
    cache_hits: int = 0
    encoded: int = 0
    gflops: float = 0.0
    ms: float = 0.0


@dataclass
class Result:
    id: str
    score: float
    scores: list[float] = field(default_factory=list)  # score at each level the result reached
    cached: list[bool] = field(default_factory=list)  # per level >= 1: embedding came from the cache


@dataclass
class SearchOutput:
    results: list[Result]
    levels: list[LevelStats]
    ms: float
    vectors: np.ndarray | None = None  # the last level's embeddings of `results`, in order (None at depth 1)

    @property
    def gflops(self) -> float:
        return sum(s.gflops for s in self.levels)


def rank(ids: Sequence[str], scores: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Sort by descending score; ties (equal to 1e-6, below float32 matmul noise) broken by id."""
    ranked, ranked_scores, _ = rank_with_order(ids, scores)
    return ranked, ranked_scores


def rank_with_order(ids: Sequence[str], scores: np.ndarray) -> tuple[list[str], np.ndarray, list[int]]:
    keys = np.round(np.asarray(scores, np.float64), 6)
    order = sorted(range(len(ids)), key=lambda i: (-keys[i], ids[i]))
    return [ids[i] for i in order], np.asarray(scores, np.float32)[order], order


def dedup(vectors: np.ndarray, threshold: float) -> list[int]:
    """Positions to keep of a ranked list so that no kept item has cosine > `threshold` with a better kept one."""
    keep: list[int] = []
    for i in range(len(vectors)):
        if not keep or float(np.max(vectors[keep] @ vectors[i])) <= threshold:
            keep.append(i)
    return keep


def validate(n_levels: int, cutoffs: Sequence[int], k: int = 1) -> None:
    """Cutoffs m_1 > ... > m_r >= k >= 1, one per level above level 0: the one place they are checked."""
    if n_levels < 1:
        raise BadInputError("a cascade needs at least one level")
    if len(cutoffs) != n_levels - 1:
        raise BadInputError(f"a {n_levels}-level cascade needs {n_levels - 1} cutoffs, got {list(cutoffs)}")
    if any(not isinstance(m, (int, np.integer)) or m < 1 for m in cutoffs):
        raise BadInputError(f"cutoffs must be positive integers, got {list(cutoffs)}")
    if any(a <= b for a, b in zip(cutoffs, cutoffs[1:])):
        raise BadInputError(f"cutoffs must be strictly decreasing, got {list(cutoffs)}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise BadInputError(f"k must be a positive integer, got {k!r}")
    if cutoffs and k > cutoffs[-1]:
        raise BadInputError(f"k={k} exceeds the last cutoff m={cutoffs[-1]}")


def max_k(cutoffs: Sequence[int], depth: int) -> int:
    """The largest k a cascade of `depth` levels over these cutoffs answers: its last cutoff (m_1 for level 0)."""
    return cutoffs[max(0, depth - 2)] if cutoffs else 1000


class Cascade:
    """Algorithm 1: rank the corpus with level 0, then re-rank shrinking top sets with ever larger levels."""

    def __init__(self, index: CorpusIndex, levels: Sequence[Level], cutoffs: Sequence[int],
                 margin: float | None = None) -> None:
        """`margin`: adaptive cutoffs (beyond the paper): a level passes on only the candidates within `margin` of
        its k-th best score, between k and the cutoff."""
        validate(len(levels), cutoffs, 1)
        self.index, self.levels, self.cutoffs = index, list(levels), [int(m) for m in cutoffs]
        self.margin = margin

    @property
    def text_encodes(self) -> int:
        """Text embeddings a query needs: one per distinct text encoder (levels sharing a text tower share one)."""
        return len({id(lv.encode_text) for lv in self.levels})

    def text_vectors(self, query: str) -> list[np.ndarray]:
        """Every level's text embedding (a shared text tower is computed once: same callable, one call)."""
        memo: dict[int, np.ndarray] = {}
        for lv in self.levels:
            if id(lv.encode_text) not in memo:
                memo[id(lv.encode_text)] = lv.encode_text([query])[0]
        return [memo[id(lv.encode_text)] for lv in self.levels]

    def search(self, query: str = "", k: int = 10, vectors: Sequence[np.ndarray] | None = None,
               allowed: object | None = None) -> SearchOutput:
        """The top k for a text query, or for per-level query vectors (text or image embeddings) when given; only
        among the images `allowed` (the index's filter) when given."""
        validate(len(self.levels), self.cutoffs, k)
        t_start = time.perf_counter()
        queries = list(vectors) if vectors is not None else self.text_vectors(query)
        m0 = self.cutoffs[0] if self.cutoffs else k
        ids, scores = self.index.search(queries[0], m0, allowed)
        ids, scores = rank(list(ids), np.asarray(scores))
        stats = [LevelStats(self.levels[0].name, candidates=len(ids), ms=_ms(t_start))]
        trail = {i: [float(s)] for i, s in zip(ids, scores)}
        cached: dict[str, list[bool]] = {i: [] for i in ids}
        embedded = None
        for level, m, q in zip(self.levels[1:], self.cutoffs, queries[1:]):
            t0 = time.perf_counter()
            if self.margin is not None and len(ids) > k:
                m = min(m, max(k, int(np.sum(np.asarray(scores) >= scores[k - 1] - self.margin))))
            ids = ids[:m]
            embedded, hits = self.embeddings(level, ids)
            ids, scores, order = rank_with_order(ids, embedded @ q if len(ids) else np.zeros(0))
            embedded = embedded[order] if len(ids) else embedded
            for i, s in zip(ids, scores):
                trail[i].append(float(s))
                cached[i].append(i in hits)
            misses = len(ids) - len(hits)
            stats.append(LevelStats(level.name, candidates=len(ids), cache_hits=len(hits), encoded=misses,
                                    gflops=misses * level.gflops, ms=_ms(t0)))
        results = [Result(i, float(s), trail[i], cached[i]) for i, s in zip(ids[:k], scores[:k])]
        return SearchOutput(results=results, levels=stats, ms=_ms(t_start),
                            vectors=None if embedded is None else embedded[:k])

    @staticmethod
    def embeddings(level: Level, ids: list[str]) -> tuple[np.ndarray, set[str]]:
        """Cached vectors of `ids`, encoding all misses in one batched call and writing them back."""
        found = level.cache.get(ids) if level.cache is not None else {}
        misses = [i for i in ids if i not in found]
        if misses:
            fresh = np.asarray(level.encode_images(misses), np.float32)
            assert fresh.shape[0] == len(misses), "encoder returned the wrong number of vectors"
            if level.cache is not None:
                level.cache.put(misses, fresh)
            found = {**found, **dict(zip(misses, fresh))}
        if not ids:
            return np.zeros((0, 0), np.float32), set()
        return np.stack([found[i] for i in ids]), set(ids) - set(misses)


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)
