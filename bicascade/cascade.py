"""Algorithm 1 (bi-encoder cascade search) as pure code over small interfaces: no Ray, no LanceDB."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np


class CorpusIndex(Protocol):
    """Level 0: nearest neighbours of a unit query vector over the whole corpus."""

    def search(self, vector: np.ndarray, m: int) -> tuple[list[str], np.ndarray]: ...


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

    def search(self, vector: np.ndarray, m: int) -> tuple[list[str], np.ndarray]:
        scores = self.vectors @ np.asarray(vector, np.float32)
        keep = np.arange(len(scores))
        if m < len(scores):  # rank only the top m, and whatever ties the m-th best within rank()'s rounding
            keep = np.flatnonzero(scores >= np.partition(scores, -m)[-m] - 1e-6)
        ids, ranked = rank([self.ids[i] for i in keep], scores[keep])
        return ids[:m], ranked[:m]


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

    @property
    def gflops(self) -> float:
        return sum(s.gflops for s in self.levels)


def rank(ids: Sequence[str], scores: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Sort by descending score; ties (equal to 1e-6, below float32 matmul noise) broken by id."""
    keys = np.round(np.asarray(scores, np.float64), 6)
    order = sorted(range(len(ids)), key=lambda i: (-keys[i], ids[i]))
    return [ids[i] for i in order], np.asarray(scores, np.float32)[order]


def validate(n_levels: int, cutoffs: Sequence[int], k: int) -> None:
    """Cutoffs m_1 > ... > m_r >= k >= 1, one per level above level 0."""
    if n_levels < 1:
        raise ValueError("a cascade needs at least one level")
    if len(cutoffs) != n_levels - 1:
        raise ValueError(f"a {n_levels}-level cascade needs {n_levels - 1} cutoffs, got {list(cutoffs)}")
    if any(not isinstance(m, (int, np.integer)) or m < 1 for m in cutoffs):
        raise ValueError(f"cutoffs must be positive integers, got {list(cutoffs)}")
    if any(a <= b for a, b in zip(cutoffs, cutoffs[1:])):
        raise ValueError(f"cutoffs must be strictly decreasing, got {list(cutoffs)}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if cutoffs and k > cutoffs[-1]:
        raise ValueError(f"k={k} exceeds the last cutoff m={cutoffs[-1]}")


class Cascade:
    """Algorithm 1: rank the corpus with level 0, then re-rank shrinking top sets with ever larger levels."""

    def __init__(self, index: CorpusIndex, levels: Sequence[Level], cutoffs: Sequence[int]) -> None:
        validate(len(levels), cutoffs, 1)
        self.index, self.levels, self.cutoffs = index, list(levels), [int(m) for m in cutoffs]

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

    def search(self, query: str, k: int = 10, text: Sequence[np.ndarray] | None = None) -> SearchOutput:
        validate(len(self.levels), self.cutoffs, k)
        t_start = time.perf_counter()
        text = list(text) if text is not None else self.text_vectors(query)
        m0 = self.cutoffs[0] if self.cutoffs else k
        ids, scores = self.index.search(text[0], m0)
        ids, scores = rank(list(ids), np.asarray(scores))
        stats = [LevelStats(self.levels[0].name, candidates=len(ids), ms=_ms(t_start))]
        trail = {i: [float(s)] for i, s in zip(ids, scores)}
        cached: dict[str, list[bool]] = {i: [] for i in ids}
        for level, m, q in zip(self.levels[1:], self.cutoffs, text[1:]):
            t0 = time.perf_counter()
            ids = ids[:m]
            vectors, hits = self._embeddings(level, ids)
            ids, scores = rank(ids, vectors @ q if len(ids) else np.zeros(0))
            for i, s in zip(ids, scores):
                trail[i].append(float(s))
                cached[i].append(i in hits)
            misses = len(ids) - len(hits)
            stats.append(LevelStats(level.name, candidates=len(ids), cache_hits=len(hits), encoded=misses,
                                    gflops=misses * level.gflops, ms=_ms(t0)))
        results = [Result(i, float(s), trail[i], cached[i]) for i, s in zip(ids[:k], scores[:k])]
        return SearchOutput(results=results, levels=stats, ms=_ms(t_start))

    @staticmethod
    def _embeddings(level: Level, ids: list[str]) -> tuple[np.ndarray, set[str]]:
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
