"""Algorithm 1 over a ladder stored in LanceDB: in process (`bicascade search`) or as the Serve router whose levels
are Encoder deployments; expensive embeddings are written back to per-level cache tables by one writer each."""
from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import ray
from ray import serve
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from bicascade import costs, models
from bicascade.actors.encoder import encode_stored
from bicascade.cascade import Cascade, Level, SearchOutput
from bicascade.storage import cache, tables


@dataclass(frozen=True)
class LevelInfo:
    name: str
    fingerprint: str
    dim: int
    gflops: float
    text: int  # the first level with this level's text tower: whose text embedding this level uses


def ladder_levels(ladder: str) -> list[LevelInfo]:
    """Fingerprints and costs without loading weights: the table names and the cost model of every level."""
    names = models.get_ladder(ladder).levels
    out = []
    for name, text in zip(names, models.text_encoders(names)):
        spec = models.get_model(name)
        pp_cfg, dim = models.describe(spec)
        out.append(LevelInfo(name, models.fingerprint(spec, pp_cfg), dim, costs.image_gflops(name), text))
    return out


class InFlight:
    """Concurrent queries that miss the same image encode it once: later askers wait for the first one's result."""

    def __init__(self, store: cache.LevelCache) -> None:
        self.store = store
        self.lock = threading.Lock()
        self.pending: dict[str, Future] = {}

    def encode(self, ids: list[str], encode: Callable[[list[str]], np.ndarray]) -> np.ndarray:
        with self.lock:
            theirs = {i: self.pending[i] for i in ids if i in self.pending}
            mine = [i for i in ids if i not in theirs]
            for i in mine:
                self.pending[i] = Future()
        got: dict[str, np.ndarray] = {}
        try:
            if mine:
                got = dict(zip(mine, encode(mine)))
                self.store.remember(got)  # visible to cache look-ups before the futures go away
            for i in mine:
                self.pending[i].set_result(got[i])
        except BaseException as e:
            for i in mine:
                self.pending[i].set_exception(e)
            raise
        finally:
            with self.lock:
                for i in mine:
                    self.pending.pop(i, None)
        return np.stack([got[i] if i in got else theirs[i].result() for i in ids])


@ray.remote(num_cpus=0)
class CacheWriter:
    """The one writer of a level's cache table in the whole cluster (a named actor): batches by size and age."""

    def __init__(self, db: str, fingerprint: str, dim: int, flush_rows: int = 256, flush_s: float = 2.0) -> None:
        self.cache = cache.LevelCache(tables.Database(db), fingerprint, dim, flush_rows=flush_rows, flush_s=flush_s)
        self.stop = threading.Event()
        threading.Thread(target=self._tick, daemon=True).start()

    def put(self, ids: list[str], vectors: np.ndarray) -> None:
        self.cache.put(ids, vectors)

    def flush(self) -> int:
        return self.cache.flush()

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def _tick(self) -> None:
        while not self.stop.wait(self.cache.flush_s / 2):
            self.cache.maybe_flush()


def writer_for(db: str, level: LevelInfo) -> ray.actor.ActorHandle:
    """The cluster's one writer of this level's cache table, on the head node (it outlives autoscaled-away
    workers there; it needs no CPU). Hard affinity: soft affinity placed actors elsewhere in about half the tries."""
    head = next((n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"]), None)
    strategy = NodeAffinitySchedulingStrategy(head, soft=False) if head else "DEFAULT"
    # restarted when it dies (losing only its unflushed batch), and calls made meanwhile are retried on the new one
    return CacheWriter.options(name=f"bicascade-cache-{level.fingerprint}", namespace="bicascade", get_if_exists=True,
                               lifetime="detached", scheduling_strategy=strategy, max_restarts=-1,
                               max_task_retries=-1).remote(db, level.fingerprint, level.dim)


def local_cascade(db_uri: str, ladder: str, cutoffs: Sequence[int],
                  device: str | None = None) -> tuple[Cascade, list[cache.LevelCache]]:
    """Everything in this process: models loaded here, caches written back directly (call `flush` at the end)."""
    db = tables.Database(db_uri)
    infos = ladder_levels(ladder)
    index = cache.CorpusTable(db, infos[0].fingerprint)
    stores, levels = [], []
    for j, info in enumerate(infos):
        model = models.load_model(info.name, device=device)
        store = cache.LevelCache(db, info.fingerprint, info.dim) if j else None
        # a shared text tower is one callable, which the cascade calls once per query
        text = levels[info.text].encode_text if info.text < j else model.encode_texts
        levels.append(Level(info.name, text, lambda ids, m=model: encode_stored(m, db, ids),
                            cache=store, gflops=info.gflops))
        stores += [store] if store else []
    return Cascade(index, levels, cutoffs), stores


def to_json(out: SearchOutput, uris: dict[str, str], level_names: Sequence[str], text_encodes: int) -> dict:
    """The HTTP API's response document (DESIGN.md §3), with per-result provenance and the query's text embeddings
    computed (one per distinct text tower)."""
    return {"results": [{"id": r.id, "score": r.score, "uri": uris.get(r.id),
                         "levels": [{"model": level_names[j], "score": s, "cached": j > 0 and r.cached[j - 1]}
                                    for j, s in enumerate(r.scores)]} for r in out.results],
            "stats": {"levels": [{k: v for k, v in asdict(s).items() if k != "gflops"} | {"gflops": s.gflops}
                                 for s in out.levels], "ms": out.ms, "gflops": out.gflops,
                      "text_encodes": text_encodes}}


@serve.deployment  # options (autoscaling, queues, resources): serve/config.yaml
class Router:
    """Algorithm 1 over Encoder handles: level-0 ANN in LanceDB, per-level caches, batched misses, write-back."""

    def __init__(self, db: str, infos: list[LevelInfo], cutoffs: list[int], encoders: list) -> None:
        self.db = tables.Database(db)
        self.infos = infos  # computed by the driver: a replica on another node needs no model registry
        self.encoders = encoders
        self.index = cache.CorpusTable(self.db, self.infos[0].fingerprint)
        self.writers = [writer_for(db, info) for info in self.infos[1:]]
        self.stores = [cache.LevelCache(self.db, info.fingerprint, info.dim,
                                        sink=lambda ids, v, w=w: w.put.remote(ids, v))
                       for info, w in zip(self.infos[1:], self.writers)]
        self.inflight = [InFlight(s) for s in self.stores]
        # one text callable per distinct text tower, as in local_cascade: the cascade embeds a query once per tower
        text = {t: self._text(t) for t in dict.fromkeys(i.text for i in self.infos)}
        levels = [Level(self.infos[0].name, text[self.infos[0].text], self._images(0), gflops=self.infos[0].gflops)]
        for j, (info, store) in enumerate(zip(self.infos[1:], self.stores), start=1):
            levels.append(Level(info.name, text[info.text], self._images(j), cache=store, gflops=info.gflops))
        # the full cascade and the shallower ones over the same levels and caches (`levels: 1` is level 0 alone)
        self.by_depth = {d: Cascade(self.index, levels[:d], cutoffs[:d - 1]) for d in range(1, len(levels) + 1)}
        self.queries = 0

    def _text(self, j: int) -> Callable[[list[str]], np.ndarray]:
        return lambda texts: np.stack([self.encoders[j].encode_texts.remote(t).result() for t in texts])

    def _images(self, j: int) -> Callable[[list[str]], np.ndarray]:
        call = lambda ids: self.encoders[j].encode_images.remote(ids).result()  # noqa: E731
        return lambda ids: self.inflight[j - 1].encode(ids, call) if j else call(ids)

    def search(self, query: str, k: int, depth: int | None = None) -> dict:
        cascade = self.by_depth[depth or len(self.infos)]
        # every distinct text tower's embedding at once: one round trip of latency, not one per level
        towers = [i.text for i in self.infos[:len(cascade.levels)]]
        pending = {t: self.encoders[t].encode_texts.remote(query) for t in dict.fromkeys(towers)}
        text = {t: p.result() for t, p in pending.items()}
        out = cascade.search(query, k, text=[text[t] for t in towers])
        self.queries += 1
        return to_json(out, self.db.uris([r.id for r in out.results]), [i.name for i in self.infos],
                       cascade.text_encodes)

    def image(self, id_: str) -> bytes | None:
        return self.db.image_bytes([id_]).get(id_)

    def flush(self) -> int:
        return sum(ray.get([w.flush.remote() for w in self.writers]))

    def stats(self) -> dict:
        rows = self.index.rows
        cached = [s.rows() for s in self.stores]
        spent = rows * self.infos[0].gflops + sum(c * i.gflops for c, i in zip(cached, self.infos[1:]))
        full = rows * self.infos[-1].gflops
        return {"rows": rows, "queries": self.queries, "cutoffs": self.by_depth[len(self.infos)].cutoffs,
                "levels": [{"model": self.infos[0].name, "cached": rows, "coverage": 1.0}]
                + [{"model": i.name, "cached": c, "coverage": c / rows if rows else 0.0}
                   for i, c in zip(self.infos[1:], cached)],
                "encoder_gflops": spent, "uncascaded_gflops": full,
                "cost_ratio": full / spent if spent else None}
