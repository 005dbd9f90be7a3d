"""Per-level embedding caches in LanceDB (`emb_<fingerprint>`): a memory front (an LRU bounded in bytes),
read-through on misses and batched write-back (by size and age) through one writer per table; a crash loses only
the unflushed batch. And level 0's table as the corpus index."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lancedb.expr import col

from bicascade.cascade import top_m
from bicascade.errors import NotIndexedError
from bicascade.storage import tables

DEFAULT_FRONT_BYTES = 64 << 20  # per level and process: 32k vectors of 512 floats
COMPACT_EVERY = 20  # commits to a cache table between compactions


class LruVectors:
    """Vectors by id, the least recently used dropped once their bytes exceed `max_bytes`."""

    def __init__(self, max_bytes: int = DEFAULT_FRONT_BYTES) -> None:
        self.max_bytes = max_bytes
        self.items: OrderedDict[str, np.ndarray] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.items)

    def get(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        found = {}
        for i in ids:
            v = self.items.get(i)
            if v is not None:
                self.items.move_to_end(i)
                found[i] = v
        return found

    def put(self, vectors: dict[str, np.ndarray]) -> None:
        for i, v in vectors.items():
            v = np.array(v)  # a copy: a row view would keep its whole batch (a Ray reply, an Arrow column) alive
            old = self.items.pop(i, None)
            self.bytes += v.nbytes - (old.nbytes if old is not None else 0)
            self.items[i] = v
        while self.bytes > self.max_bytes and self.items:
            _, v = self.items.popitem(last=False)
            self.bytes -= v.nbytes


class LevelCache:
    """EmbeddingCache (bicascade.cascade) of one level: memory first, then the table, new vectors written back.

    One LevelCache per table writes; the others hand new vectors to it through `sink` (on a cluster, a named
    actor). `flush_rows`/`flush_s` bound what a crash loses, which is recomputation, never a wrong result (ids
    are content hashes and the table is keyed by the model's fingerprint). Pending rows stay readable until they
    are written, whatever the front evicts."""

    def __init__(self, db: tables.Database, fingerprint: str, dim: int, flush_rows: int = 256,
                 flush_s: float = 5.0, front_bytes: int = DEFAULT_FRONT_BYTES,
                 sink: Callable[[list[str], np.ndarray], None] | None = None, max_rows: int | None = None,
                 hit_sink: Callable[[dict[str, int]], None] | None = None) -> None:
        self.db, self.fingerprint, self.dim, self.sink = db, fingerprint, dim, sink
        self.name, self.schema = tables.emb_table(fingerprint), tables.cache_schema(dim)
        self.max_rows, self.hit_sink = max_rows, hit_sink
        self.hits: dict[str, tuple[int, float]] = {}  # id -> (hits, last hit) not yet written
        self.flush_rows, self.flush_s = flush_rows, flush_s
        self.memory = LruVectors(front_bytes)
        self.pending: dict[str, np.ndarray] = {}
        self.last_flush = time.monotonic()
        self.lock = threading.Lock()
        # one commit at a time: concurrent merge_inserts of one id duplicate it (re-entered: a flush applies hits)
        self.flushing = threading.RLock()
        self.commits = 0  # since the last compaction
        self.lifetime_commits = 0  # of this process

    def get(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        with self.lock:
            found = self.memory.get(ids)
            found |= {i: self.pending[i] for i in ids if i not in found and i in self.pending}
        rest = [i for i in ids if i not in found]
        if rest and self.db.has(self.name):
            stored = self.db.lookup(self.name, rest)
            found.update(stored)
            self.remember(stored)
        if found:
            (self.hit_sink or self.hit)(dict.fromkeys(found, 1))
        return found

    def put(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        fresh = {i: np.asarray(v, np.float32) for i, v in zip(ids, vectors)}
        if self.sink is not None:
            self.remember(fresh)
            self.sink(list(fresh), np.stack(list(fresh.values())))
            return
        with self.lock:
            for i, v in fresh.items():
                self.pending.setdefault(i, v)
        self.remember(fresh)
        self.maybe_flush()

    def maybe_flush(self) -> None:
        stale = self.pending and time.monotonic() - self.last_flush >= self.flush_s
        if len(self.pending) >= self.flush_rows or stale:
            self.flush()

    def flush(self) -> int:
        """Write pending vectors (merge_insert on id: an id already stored is never written again)."""
        with self.flushing:
            return self._flush()

    def _flush(self) -> int:
        with self.lock:
            batch = dict(self.pending)
            self.last_flush = time.monotonic()
        if batch:
            self._upgrade()
            now = time.time()
            ids = pa.array(list(batch), pa.string())
            vec = pa.FixedSizeListArray.from_arrays(pa.array(np.stack(list(batch.values())).ravel(), pa.float32()),
                                                    self.dim)
            rows = pa.Table.from_arrays([ids, vec, pa.array([now] * len(batch), pa.float64()),
                                         pa.array([0] * len(batch), pa.int64())], schema=self.schema)
            self.db.insert_new(self.name, self.schema, rows)
            with self.lock:  # only now may the rows leave `pending`: a reader never misses them
                for i in batch:
                    self.pending.pop(i, None)
            self._committed()
        self.apply_hits()
        self.evict()
        return len(batch)

    def _upgrade(self) -> None:
        """Cache tables written before hits were counted get the two columns (null until hit)."""
        if self.db.has(self.name) and "hits" not in self.db.table(self.name).schema.names:
            self.db.table(self.name).add_columns([pa.field("last_hit", pa.float64()), pa.field("hits", pa.int64())])
            self.db.forget(self.name)

    def hit(self, counts: Mapping[str, int]) -> None:
        """Count cache hits, id -> hits (written with the next flush): eviction keeps what is hit, and the hits
        measure p."""
        now = time.time()
        with self.lock:
            for i, c in counts.items():
                n, _ = self.hits.get(i, (0, now))
                self.hits[i] = (n + c, now)

    def apply_hits(self) -> int:
        """Add the counted hits to the table in one commit: each id's new total, read first (this is the table's one
        writer, so nothing changes them in between) and merged on id into the two hit columns only."""
        with self.flushing:
            with self.lock:
                hits, self.hits = self.hits, {}
            if not hits or not self.db.has(self.name):
                return 0
            self._upgrade()
            got = self.db.take(self.name, list(hits), ["id", "hits"])
            ids = got.column("id").to_pylist()
            before = got.column("hits").fill_null(0).to_pylist()
            if ids:
                now = max(t for _, t in hits.values())
                rows = pa.table({"id": pa.array(ids, pa.string()), "last_hit": pa.array([now] * len(ids), pa.float64()),
                                 "hits": pa.array([b + hits[i][0] for i, b in zip(ids, before)], pa.int64())})
                self.db.table(self.name).merge_insert("id").when_matched_update_all().execute(rows)
                self._committed()
            return len(hits)

    def _committed(self) -> None:
        """Commits leave fragments (an insert adds one; an update rewrites its rows into a new one and marks them
        deleted in the old), which every reader's manifest lists: fold them together every COMPACT_EVERY commits of
        any kind, since a warm stream commits nothing but hit counts."""
        self.commits += 1
        self.lifetime_commits += 1
        if self.commits >= COMPACT_EVERY:
            self.db.finish([self.name])
            self.commits = 0

    def evict(self) -> int:
        """Past `max_rows`, drop the least recently hit rows down to 90% of it (they are recomputed if asked again)."""
        if not self.max_rows or not self.db.has(self.name):
            return 0
        rows = self.db.count(self.name)
        if rows <= self.max_rows:
            return 0
        data = self.db.dataset(self.name).to_table(columns=["id", "last_hit"])
        last = np.nan_to_num(data.column("last_hit").to_numpy(zero_copy_only=False).astype(np.float64), nan=0.0)
        drop = int(rows - 0.9 * self.max_rows)
        ids = data.column("id").to_numpy(zero_copy_only=False)[np.argsort(last, kind="stable")[:drop]].tolist()
        table = self.db.table(self.name)
        for start in range(0, len(ids), 1000):
            table.delete(col("id").isin(ids[start:start + 1000]))
            self._committed()
        with self.lock:
            self.memory = LruVectors(self.memory.max_bytes)
        return len(ids)

    def recent(self, window_s: float) -> int:
        """Rows hit or added within the last `window_s`: the part of the corpus the live stream touches."""
        if not self.db.has(self.name) or "last_hit" not in self.db.table(self.name).schema.names:
            return 0
        since = time.time() - window_s
        return self.db.dataset(self.name).count_rows(filter=pc.field("last_hit") >= since)

    def rows(self) -> int:
        return self.db.count(self.name)

    def remember(self, vectors: dict[str, np.ndarray]) -> None:
        with self.lock:
            self.memory.put(vectors)

    def remembered_or_stored(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Like `get`, but counts no hit and remembers nothing: for a look that is not a query's (the audit)."""
        found = self.remembered(ids)
        rest = [i for i in ids if i not in found]
        if rest and self.db.has(self.name):
            found |= self.db.lookup(self.name, rest)
        return found

    def remembered(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """What the front or the pending batch holds of `ids` (no table read)."""
        with self.lock:
            found = self.memory.get(ids)
            return found | {i: self.pending[i] for i in ids if i not in found and i in self.pending}


class InFlight:
    """Concurrent queries that miss the same image encode it once: later askers wait for the first one's result,
    or find it in the cache front if the first one has already finished."""

    def __init__(self, store: LevelCache) -> None:
        self.store = store
        self.lock = threading.Lock()
        self.pending: dict[str, Future] = {}

    def encode(self, ids: list[str], encode: Callable[[list[str]], np.ndarray]) -> np.ndarray:
        with self.lock:
            theirs = {i: self.pending[i] for i in ids if i in self.pending}
            # finished between the caller's cache look-up and now: remembered before its future went away
            done = self.store.remembered([i for i in ids if i not in theirs])
            mine = [i for i in ids if i not in theirs and i not in done]
            for i in mine:
                self.pending[i] = Future()
        got: dict[str, np.ndarray] = dict(done)
        try:
            if mine:
                fresh = dict(zip(mine, encode(mine)))
                self.store.remember(fresh)  # visible to cache look-ups before the futures go away
                got |= fresh
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


class Corpus:
    """CorpusIndex (bicascade.cascade) over level 0's table. While the vectors fit `memory_bytes` they are searched
    exactly in memory (a 5,000 x 128 matrix costs ~0.1 ms a query, a LanceDB scan ~8 ms); beyond that the table's
    ANN index (or an exact scan, below the ANN's size) answers. New rows written by an index job are picked up by
    `refresh` (a version check), so a served database sees them without a restart."""

    def __init__(self, db: tables.Database, fingerprint: str, memory_bytes: int = 256 << 20,
                 exact_max_allowed: int = 20_000) -> None:
        self.db, self.fingerprint, self.memory_bytes = db, fingerprint, memory_bytes
        self.exact_max_allowed = exact_max_allowed
        self.name = tables.emb_table(fingerprint)
        if not db.has(self.name):
            raise NotIndexedError(f"{db.uri} has no level-0 table {self.name}: run `bicascade index SOURCE --db "
                                  f"{db.uri}` first")
        self.lock = threading.Lock()
        self.version = -1
        self.ids: list[str] = []
        self.pos: dict[str, int] = {}
        self.matrix: np.ndarray | None = None
        self.params: tables.AnnParams | None = None
        self.rows = 0
        self.refresh()

    def refresh(self) -> bool:
        """Reload if the table changed since the last look; True when it did."""
        version = self.db.version(self.name)
        if version == self.version:
            return False
        rows = self.db.count(self.name)
        params = tables.ann_params(rows, min_rows=0) if self.db.has_vector_index(self.name) else None
        ids, matrix = [], None
        dim = self.db.table(self.name).schema.field("vector").type.list_size
        if rows * dim * 4 <= self.memory_bytes:
            got = self.db.dataset(self.name).to_table(columns=["id", "vector"])
            ids = got.column("id").to_pylist()
            matrix = got.column("vector").combine_chunks().flatten().to_numpy().reshape(len(ids), dim)
        pos = {i: n for n, i in enumerate(ids)}
        with self.lock:  # queries keep the old snapshot until the new one is complete
            self.ids, self.pos, self.matrix, self.params = ids, pos, matrix, params
            self.rows, self.version = rows, version
        return True

    @property
    def in_memory(self) -> bool:
        return self.matrix is not None

    def allow(self, ids: Sequence[str]) -> np.ndarray | list[str]:
        """The filter form `search` takes for these allowed ids: a row mask in memory, the ids themselves otherwise."""
        with self.lock:
            if self.matrix is not None:
                mask = np.zeros(len(self.ids), bool)
                mask[[self.pos[i] for i in ids if i in self.pos]] = True
                return mask
        return list(ids)

    def search(self, vector: np.ndarray, m: int, allowed: np.ndarray | list[str] | None = None
               ) -> tuple[list[str], np.ndarray]:
        with self.lock:
            ids, matrix, params = self.ids, self.matrix, self.params
        if matrix is not None:
            if allowed is not None and len(allowed) != len(ids):  # the table grew since the mask was made
                allowed = None if not isinstance(allowed, np.ndarray) else np.pad(allowed, (0, len(ids) - len(allowed)))
            return top_m(ids, matrix @ np.asarray(vector, np.float32), m, allowed)
        if allowed is None:
            return self.db.search(self.fingerprint, vector, m, params)
        if len(allowed) <= self.exact_max_allowed:  # few allowed: exact over their vectors
            found = self.db.lookup(self.name, allowed)
            keys = list(found)
            return top_m(keys, np.stack([found[i] for i in keys]) @ np.asarray(vector, np.float32), m) if keys \
                else ([], np.zeros(0, np.float32))
        allow = set(allowed)  # many allowed: over-fetch from the ANN and filter, wider until m are found
        limit = 4 * m
        while True:
            got, scores = self.db.search(self.fingerprint, vector, limit, params)
            keep = [n for n, i in enumerate(got) if i in allow]
            if len(keep) >= m or len(got) < limit or limit >= self.rows:
                return [got[n] for n in keep[:m]], np.asarray(scores)[keep[:m]]
            limit *= 4

    def vectors(self, ids: Sequence[str]) -> np.ndarray:
        with self.lock:
            if self.matrix is not None and all(i in self.pos for i in ids):
                return self.matrix[[self.pos[i] for i in ids]]
        found = self.db.lookup(self.name, ids)
        return np.stack([found[i] for i in ids])
