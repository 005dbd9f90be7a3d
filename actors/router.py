"""Algorithm 1 inside each ingress replica: its levels are Encoder deployments; query embeddings of every level are
requested at once (and cached by query text), level 0 is an in-memory matrix or the ANN index, expensive embeddings
are written back to per-level cache tables by one writer actor each for the whole cluster. A warm search never leaves
the replica that took the HTTP request: no handle hop between the ingress and the cascade."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from bicascade.actors import metrics
from bicascade.cascade import Cascade, Level, f_life
from bicascade.errors import NotIndexedError
from bicascade.levels import LevelInfo
from bicascade.protocol import SearchRequest, SearchResponse, answer
from bicascade.storage import cache, filters, keywords, tables

log = logging.getLogger("bicascade")
CAPTURE = ("taken", "taken_offset", "camera_make", "camera_model", "lens", "lat", "lon", "media_type")


@dataclass(frozen=True)
class RouterConfig:
    front_mb: int = 64  # per level: the LRU of cached embeddings in this replica's memory
    memory_mb: int = 256  # level 0 is searched in memory while its vectors fit this
    text_cache: int = 10_000  # query embeddings kept per text tower (popular queries repeat)
    uri_cache: int = 100_000
    refresh_s: float = 5.0  # how often the corpus is checked for rows an index job added (the live-update bound)
    cache_rows: int | None = None  # per cache table: past this, the least recently hit rows are evicted
    margin: float | None = None  # adaptive cutoffs (a `bicascade plan` choice)
    audit_fraction: float = 0.01  # queries also ranked deeper, off the request path, to estimate the recall kept
    audit_factor: int = 4  # the audit's top level ranks audit_factor x m_1 level-0 candidates


RECYCLE_MB = 64  # a cache writer's RSS growth (after WARM_COMMITS) before it hands over to a fresh process
WARM_COMMITS = 100  # a writer's first commits load Lance's runtime and caches: its baseline is taken after them


def rss_mb() -> float:
    """This process's resident memory (Linux; 0 elsewhere, which never recycles)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


@ray.remote(num_cpus=0)
class CacheWriter:
    """The one writer of a level's cache table in the whole cluster (a named actor): batches by size and age.

    Lance's native memory creeps up with every commit in a process that commits for hours (measured here: a writer
    +25 to +60 MiB over a 50,000-query stream, with no Python object growing), so a writer whose RSS grew by
    `recycle_mb` past its baseline (taken after `warm_commits` commits of its own: the first ones load Lance's runtime
    and caches) flushes and exits between two calls; Ray restarts it and retries the call that found it gone. A
    recycled writer's memory starts over, and it loses nothing: it held nothing unwritten."""

    def __init__(self, db: str, fingerprint: str, dim: int, flush_rows: int = 256, flush_s: float = 2.0,
                 max_rows: int | None = None, recycle_mb: float = RECYCLE_MB, warm_commits: int = WARM_COMMITS) -> None:
        self.cache = cache.LevelCache(tables.Database(db), fingerprint, dim, flush_rows=flush_rows, flush_s=flush_s,
                                      max_rows=max_rows)
        self.recycle_mb, self.warm_commits, self.base_mb = recycle_mb, warm_commits, 0.0
        self.stop = threading.Event()
        threading.Thread(target=self._tick, daemon=True).start()

    def put(self, ids: list[str], vectors: np.ndarray) -> None:
        self._maybe_recycle()
        self.cache.put(ids, vectors)

    def hit(self, counts: dict[str, int]) -> None:
        self._maybe_recycle()
        self.cache.hit(counts)

    def pid(self) -> int:
        return os.getpid()

    def _maybe_recycle(self) -> None:
        """Past the memory budget: flush, then exit at once. Calls run one at a time, so nothing arrives between the
        flush and the exit; this call fails with the process and is retried on its successor (max_task_retries)."""
        if self.cache.lifetime_commits < self.warm_commits:
            return
        now = rss_mb()
        self.base_mb = self.base_mb or now
        grown = now - self.base_mb
        if not now or grown < self.recycle_mb:
            return
        self.cache.flush()
        log.info("cache writer of %s recycled after %d commits (+%.0f MiB)", self.cache.name,
                 self.cache.lifetime_commits, grown)
        os._exit(1)  # an exit Ray counts as a failure, so it restarts the actor (max_restarts)

    def flush(self) -> int:
        return self.cache.flush()

    def recent(self, window_s: float) -> int:
        return self.cache.recent(window_s)

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def _tick(self) -> None:
        failing = False
        while not self.stop.wait(self.cache.flush_s / 2):
            try:
                self.cache.maybe_flush()
                if self.cache.hits and time.monotonic() - self.cache.last_flush >= self.cache.flush_s:
                    self.cache.apply_hits()
                if failing:
                    log.warning("cache writes to %s work again", self.cache.name)
                failing = False
            except Exception as e:  # a full or read-only disk: keep the batch, answer queries, retry later
                if not failing:
                    log.error("cache write to %s failed (%s: %s); %d embeddings kept in memory and retried",
                              self.cache.name, type(e).__name__, str(e).splitlines()[0][:200],
                              len(self.cache.pending))
                failing = True
                self.cache.last_flush = time.monotonic()


def writer_name(db: str, fingerprint: str) -> str:
    """One writer per table: a level's cache table in one database (two databases on one cluster never share)."""
    return f"bicascade-cache-{hashlib.sha1(db.encode()).hexdigest()[:10]}-{fingerprint}"


def writer_for(db: str, level: LevelInfo, max_rows: int | None = None) -> ray.actor.ActorHandle:
    """The cluster's one writer of this level's cache table, on the head node (it outlives autoscaled-away
    workers there; it needs no CPU). Hard affinity: soft affinity placed actors elsewhere in about half the tries."""
    head = next((n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"]), None)
    strategy = NodeAffinitySchedulingStrategy(head, soft=False) if head else "DEFAULT"
    # restarted when it dies (losing only its unflushed batch), and calls made meanwhile are retried on the new one
    return CacheWriter.options(name=writer_name(db, level.fingerprint), namespace="bicascade", get_if_exists=True,
                               lifetime="detached", scheduling_strategy=strategy, max_restarts=-1,
                               max_task_retries=-1).remote(db, level.fingerprint, level.dim, max_rows=max_rows)


class HitBuffer:
    """Cache hits of one level, counted per id and sent to its writer about once a second (not one call per query,
    nor one id per hit: sending every hit, 64 ids a search, added 0.7 to 1.6 ms to a warm full-cascade p50 on 2
    cores, in three paired runs)."""

    def __init__(self, writer: ray.actor.ActorHandle, every_s: float = 1.0) -> None:
        self.writer, self.counts, self.lock = writer, Counter(), threading.Lock()
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(every_s):
                with self.lock:
                    counts, self.counts = self.counts, Counter()
                if counts:
                    self.writer.hit.remote(dict(counts))
        threading.Thread(target=loop, daemon=True, name="bicascade-hits").start()

    def add(self, counts: dict[str, int]) -> None:
        with self.lock:
            self.counts.update(counts)


class Audit:
    """Which live queries to rank deeper (a seeded sample); what the audits find is counted in the metrics hub, so
    the estimate covers every router replica."""

    def __init__(self, fraction: float, seed: int = 0) -> None:
        self.fraction, self.rng = fraction, np.random.default_rng(seed)

    def sample(self) -> bool:
        return self.fraction > 0 and self.rng.random() < self.fraction

    def summary(self, totals: dict[str, float]) -> dict:
        n = totals.get("bicascade_audit_queries_total", 0.0)
        return {"fraction": self.fraction, "queries": int(n),
                "recall_kept": totals.get("bicascade_audit_recall_kept_total", 0.0) / n if n else None,
                "images_encoded": int(totals.get("bicascade_audit_images_encoded_total", 0.0)),
                "gflops": totals.get("bicascade_audit_encoder_gflops_total", 0.0)}


class Lru:
    """A bounded mapping: the least recently used entry goes first."""

    def __init__(self, size: int) -> None:
        self.size, self.items = size, OrderedDict()
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        return None

    def put(self, key, value) -> None:
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)


class Router:
    """Algorithm 1 over Encoder handles: level 0 over the corpus, per-level caches, batched misses, write-back. One per
    ingress replica; its blocking methods (`image`, `metadata`, `flush`, `stats`) are for a worker thread."""

    def __init__(self, db: str, infos: list[LevelInfo], cutoffs: list[int], encoders: list,
                 config: RouterConfig = RouterConfig(), app: str = "bicascade") -> None:
        self.db = tables.Database(db)
        self.infos = infos  # computed by the driver: a replica on another node needs no model registry
        self.encoders, self.config = encoders, config
        self.corpus = cache.Corpus(self.db, infos[0].fingerprint, memory_bytes=config.memory_mb << 20)
        self.writers = [writer_for(db, info, config.cache_rows) for info in infos[1:]]
        self.hit_buffers = [HitBuffer(w) for w in self.writers]
        self.stores = [cache.LevelCache(self.db, info.fingerprint, info.dim, front_bytes=config.front_mb << 20,
                                        sink=lambda ids, v, w=w: w.put.remote(ids, v), hit_sink=b.add)
                       for info, w, b in zip(infos[1:], self.writers, self.hit_buffers)]
        self.inflight = [cache.InFlight(s) for s in self.stores]
        self.towers = list(dict.fromkeys(i.text for i in infos))  # one query embedding per distinct text tower
        self.texts = Lru(config.text_cache * len(self.towers))
        self.uris = Lru(config.uri_cache)
        self.filtered = Lru(64)  # filter -> allowed ids, per images-table version
        self._facets: tuple[int, dict] | None = None
        levels = [Level(infos[0].name, self._no_text, self._images(0), gflops=infos[0].gflops)]
        for j, (info, store) in enumerate(zip(infos[1:], self.stores), start=1):
            levels.append(Level(info.name, self._no_text, self._images(j), cache=store, gflops=info.gflops))
        # the full cascade and the shallower ones over the same levels and caches (`levels: 1` is level 0 alone)
        self.by_depth = {d: Cascade(self.corpus, levels[:d], cutoffs[:d - 1], config.margin)
                         for d in range(1, len(levels) + 1)}
        self.queries = 0
        self.audit = Audit(config.audit_fraction)
        self.audit_front = cache.LruVectors(32 << 20)
        self.metrics = metrics.Recorder()
        self.hub = metrics.hub(app)
        self.stop = metrics.start_flusher(self.metrics, self.hub)
        self.last_refresh = time.monotonic()

    @staticmethod
    def _no_text(texts: list[str]) -> np.ndarray:
        raise AssertionError("the router computes query embeddings itself")

    def _images(self, j: int) -> Callable[[list[str]], np.ndarray]:
        def call(ids: list[str]) -> np.ndarray:
            t0 = time.perf_counter()
            out = self.encoders[j].encode_images.remote((ids, self.infos[j].fingerprint)).result()
            self.metrics.observe("bicascade_level_encode_seconds", time.perf_counter() - t0, level=str(j),
                                 model=self.infos[j].name)
            return out
        return lambda ids: self.inflight[j - 1].encode(ids, call) if j else call(ids)

    async def _text_vectors(self, query: str, depth: int) -> list[np.ndarray]:
        """Every level's query embedding: from the cache, else all distinct text towers asked at once."""
        towers = [i.text for i in self.infos[:depth]]
        got = {t: self.texts.get((t, query)) for t in dict.fromkeys(towers)}
        missing = [t for t, v in got.items() if v is None]
        if missing:
            fresh = await asyncio.gather(*[self.encoders[t].encode_texts.remote((query, self.infos[t].fingerprint))
                                           for t in missing])
            for t, v in zip(missing, fresh):
                self.texts.put((t, query), np.array(v))  # a copy: Ray's reply buffer is not pinned by the cache
                got[t] = v
        self.metrics.inc("bicascade_text_cache_hits_total", len(got) - len(missing))
        self.metrics.inc("bicascade_text_encodes_total", len(missing))
        return [got[t] for t in towers]

    async def _image_vectors(self, depth: int, image_id: str | None, image: bytes | None) -> list[np.ndarray]:
        """Every level's embedding of the query image: an indexed image's stored (or cached) vectors, computed and
        written back where missing; an uploaded image's, each level with its own image tower."""
        if image is not None:
            return list(await asyncio.gather(*[self.encoders[j].encode_upload.remote((image, self.infos[j].fingerprint))
                                               for j in range(depth)]))
        try:
            first = self.corpus.vectors([image_id])[0]
        except KeyError:
            raise NotIndexedError(f"no indexed image {image_id!r}") from None
        out = [first]
        for j in range(1, depth):
            stored = self.stores[j - 1].get([image_id])
            out.append(stored[image_id] if image_id in stored else
                       (await asyncio.to_thread(self.inflight[j - 1].encode, [image_id], self._encode_one(j)))[0])
        return out

    def _encode_one(self, j: int) -> Callable[[list[str]], np.ndarray]:
        def call(ids: list[str]) -> np.ndarray:
            vectors = self.encoders[j].encode_images.remote((ids, self.infos[j].fingerprint)).result()
            self.stores[j - 1].put(ids, vectors)
            return vectors
        return call

    def _allowed(self, where: filters.Filter | None) -> tuple[set[str], object] | None:
        """The ids `where` holds for and the corpus index's form of them, computed once per filter and table versions
        (the cascade takes the second, the keyword search the first)."""
        if where is None:
            return None
        key = (where.key(), self.db.version(tables.IMAGES), self.corpus.version)
        found = self.filtered.get(key)
        if found is None:
            ids = filters.matching(self.db, where)
            found = (set(ids), self.corpus.allow(ids))
            self.filtered.put(key, found)
        return found

    def _maybe_refresh(self) -> None:
        """A live index job's new rows, within `refresh_s` (a version check; the reload runs off the request)."""
        now = time.monotonic()
        if now - self.last_refresh >= self.config.refresh_s:
            self.last_refresh = now
            threading.Thread(target=self.corpus.refresh, daemon=True).start()

    async def search(self, req: SearchRequest) -> SearchResponse:
        t0 = time.perf_counter()
        self._maybe_refresh()
        depth = req.depth_of(len(self.infos))
        if req.mode == "keyword":  # the keyword index alone: no embedding
            vectors = []
        elif req.query is not None:
            vectors = await self._text_vectors(req.query, depth)
        else:
            vectors = await self._image_vectors(depth, req.image_id, req.image)
        t_vectors = time.perf_counter()
        out = await asyncio.to_thread(self._rank, req, depth, vectors)
        if depth == len(self.infos) > 1 and req.mode == "semantic" and req.where is None and not req.offset and \
                self.audit.sample():
            asyncio.get_running_loop().create_task(self._audit(vectors, [h.id for h in out], req.k))
        self._count(out, depth, time.perf_counter() - t0)
        out.timing = {"router_ms": _ms(t0), "query_vectors_ms": round((t_vectors - t0) * 1000, 3),
                      "cascade_ms": round((time.perf_counter() - t_vectors) * 1000, 3)}
        return out

    def _rank(self, req: SearchRequest, depth: int, vectors: list[np.ndarray]) -> SearchResponse:
        """The cascade and the response (blocking: a worker thread)."""
        matches, allowed = self._allowed(req.where) or (None, None)
        return answer(self.by_depth[depth], req, vectors, allowed, [i.name for i in self.infos],
                      len({i.text for i in self.infos[:depth]}), self._uris, self.corpus.vectors,
                      lambda text, n: keywords.search(self.db, text, n, matches))

    async def _audit(self, vectors: list[np.ndarray], served: list[str], k: int) -> None:
        """Rank the query with the top level over audit_factor x m_1 level-0 candidates (the cascade's cutoffs
        removed) and count how much of that top k the served results kept. Its embeddings are not cached: the
        cache stays what the cascade itself needed."""
        try:
            top = len(self.infos) - 1
            m = self.config.audit_factor * self.by_depth[len(self.infos)].cutoffs[0]
            ids, _ = await asyncio.to_thread(self.corpus.search, vectors[0], m)
            found = self.audit_front.get(ids)
            rest = [i for i in ids if i not in found]
            found |= await asyncio.to_thread(self.stores[top - 1].remembered_or_stored, rest)
            missing = [i for i in ids if i not in found]
            if missing:
                fresh = dict(zip(missing, await self.encoders[top].encode_images.remote(
                    (missing, self.infos[top].fingerprint))))
                self.audit_front.put(fresh)  # popular topics are audited again: their extra embeddings are kept here
                found |= fresh
            scores = np.stack([found[i] for i in ids]) @ vectors[top]
            truth = [ids[n] for n in np.argsort(-scores, kind="stable")[:k]]
            self.metrics.inc("bicascade_audit_queries_total")
            self.metrics.inc("bicascade_audit_recall_kept_total",
                             len(set(truth) & set(served[:k])) / max(1, min(k, len(truth))))
            self.metrics.inc("bicascade_audit_images_encoded_total", len(missing))
            self.metrics.inc("bicascade_audit_encoder_gflops_total", len(missing) * self.infos[top].gflops)
        except Exception as e:  # the audit must never disturb serving
            log.warning("recall audit failed: %s", e)

    def _uris(self, ids: list[str]) -> dict[str, str]:
        got = {i: self.uris.get(i) for i in ids}
        missing = [i for i, u in got.items() if u is None]
        if missing:
            for i, u in self.db.uris(missing).items():
                self.uris.put(i, u)
                got[i] = u
        return got

    def _count(self, out: SearchResponse, depth: int, seconds: float) -> None:
        self.queries += 1
        self.metrics.observe("bicascade_query_seconds", seconds, depth=str(depth))
        for j, s in enumerate(out.levels):
            labels = {"level": str(j), "model": s.model}
            self.metrics.inc("bicascade_level_candidates_total", s.candidates, **labels)
            self.metrics.inc("bicascade_level_cache_hits_total", s.cache_hits, **labels)
            self.metrics.inc("bicascade_level_images_encoded_total", s.encoded, **labels)
            self.metrics.inc("bicascade_level_encoder_gflops_total", s.gflops, **labels)

    def image(self, id_: str) -> bytes | None:
        return self.db.image_bytes([id_]).get(id_)

    def metadata(self, ids: list[str]) -> list[dict]:
        return self.db.image_rows(ids, ["id", "uri", "caption", "width", "height", "meta", *CAPTURE])

    def facets(self) -> dict:
        """The capture filters' choices, computed once per version of the images table."""
        version = self.db.version(tables.IMAGES)
        if self._facets is None or self._facets[0] != version:
            self._facets = (version, self.db.facets())
        return self._facets[1]

    def flush(self) -> int:
        return sum(ray.get([w.flush.remote() for w in self.writers]))

    def remove(self, ids: list[str]) -> dict[str, int]:
        """Remove images everywhere (blocking): the writers flush first, so no pending vector of them lands later;
        this replica's corpus follows at once, the others at their next refresh."""
        self.flush()
        removed = self.db.remove_images(ids)
        self.corpus.refresh()
        return removed

    def stats(self) -> dict:
        self.corpus.refresh()
        rows = self.corpus.rows
        cached = [s.rows() for s in self.stores]
        spent = rows * self.infos[0].gflops + sum(c * i.gflops for c, i in zip(cached, self.infos[1:]))
        full = rows * self.infos[-1].gflops
        for j, (info, c) in enumerate(zip(self.infos, [rows, *cached])):
            self.metrics.set("bicascade_cache_rows", c, level=str(j), model=info.name)
            self.metrics.set("bicascade_live_coverage", c / rows if rows else 0.0, level=str(j))
        pushed = metrics.push(self.metrics, self.hub)  # in the hub before a /metrics render that follows this call
        if pushed is not None:
            ray.get(pushed)
        window = 3600.0
        recent = ray.get([w.recent.remote(window) for w in self.writers])
        live = [r / rows if rows else 0.0 for r in recent]
        gflops = [i.gflops for i in self.infos]
        return {"rows": rows, "queries": self.queries, "cutoffs": self.by_depth[len(self.infos)].cutoffs,
                "live_p": {"window_s": window, "levels": live,
                           "f_life_eq1": f_life(gflops, min(1.0, live[0])) if live else None},
                "audit": self.audit.summary(ray.get(self.hub.totals.remote())),
                "levels": [{"model": self.infos[0].name, "cached": rows, "coverage": 1.0,
                            "gflops": self.infos[0].gflops}]
                + [{"model": i.name, "cached": c, "coverage": c / rows if rows else 0.0, "gflops": i.gflops}
                   for i, c in zip(self.infos[1:], cached)],
                "encoder_gflops": spent, "uncascaded_gflops": full,
                "cost_ratio": full / spent if spent else None}


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)

