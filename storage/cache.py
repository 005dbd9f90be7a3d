"""Per-level embedding caches in LanceDB (`emb_<fingerprint>`): an in-memory front, read-through on misses and
batched write-back (by size and age) through one writer per table; a crash loses only the unflushed batch."""
from __future__ import annotations

import threading
import time
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa

from bicascade.storage import tables


class LevelCache:
    """EmbeddingCache (bicascade.cascade) of one level: memory first, then the table, new vectors written back.

    One LevelCache per table writes; the others hand new vectors to it through `sink` (on a cluster, a named
    actor). `flush_rows`/`flush_s` bound what a crash loses, which is recomputation, never a wrong result (ids
    are content hashes and the table is keyed by the model's fingerprint)."""

    def __init__(self, db: tables.Database, fingerprint: str, dim: int, flush_rows: int = 256,
                 flush_s: float = 5.0, max_memory_rows: int = 1_000_000,
                 sink: Callable[[list[str], np.ndarray], None] | None = None) -> None:
        self.db, self.fingerprint, self.dim, self.sink = db, fingerprint, dim, sink
        self.name, self.schema = tables.emb_table(fingerprint), tables.emb_schema(dim)
        self.flush_rows, self.flush_s, self.max_memory_rows = flush_rows, flush_s, max_memory_rows
        self.memory: dict[str, np.ndarray] = {}
        self.pending: dict[str, np.ndarray] = {}
        self.last_flush = time.monotonic()
        self.lock = threading.Lock()
        self.writes = 0

    def get(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        with self.lock:
            found = {i: self.memory[i] for i in ids if i in self.memory}
        rest = [i for i in ids if i not in found]
        if rest and self.db.has(self.name):
            stored = self.db.lookup(self.name, rest)
            found.update(stored)
            self.remember(stored)
        return found

    def put(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        fresh = {i: np.asarray(v, np.float32) for i, v in zip(ids, vectors)}
        if self.sink is not None:
            self.remember(fresh)
            self.sink(list(fresh), np.stack(list(fresh.values())))
            return
        with self.lock:
            for i, v in fresh.items():
                if i not in self.memory:
                    self.pending[i] = v
        self.remember(fresh)
        self.maybe_flush()

    def maybe_flush(self) -> None:
        if len(self.pending) >= self.flush_rows or (self.pending and time.monotonic() - self.last_flush >= self.flush_s):
            self.flush()

    def flush(self) -> int:
        """Write pending vectors (merge_insert on id: an id already stored is never written again)."""
        with self.lock:
            batch, self.pending = self.pending, {}
            self.last_flush = time.monotonic()
        if batch:
            ids = pa.array(list(batch), pa.string())
            vec = pa.FixedSizeListArray.from_arrays(pa.array(np.stack(list(batch.values())).ravel(), pa.float32()),
                                                    self.dim)
            self.db.insert_new(self.name, self.schema, pa.Table.from_arrays([ids, vec], schema=self.schema))
            self.writes += 1
            if self.writes % 20 == 0:  # many small commits fragment the table
                self.db.finish([self.name])
        return len(batch)

    def rows(self) -> int:
        return self.db.count(self.name)

    def remember(self, vectors: dict[str, np.ndarray]) -> None:
        with self.lock:
            if len(self.memory) + len(vectors) > self.max_memory_rows:
                self.memory.clear()  # the table still holds everything flushed; pending rows are kept apart
            self.memory.update(vectors)
            self.memory.update(self.pending)


class CorpusTable:
    """CorpusIndex (bicascade.cascade) over level 0's table: its ANN index when one was built, exact otherwise."""

    def __init__(self, db: tables.Database, fingerprint: str) -> None:
        self.db, self.fingerprint = db, fingerprint
        name = tables.emb_table(fingerprint)
        if not db.has(name):
            raise ValueError(f"{db.uri} has no level-0 table {name}: run `bicascade index SOURCE --db {db.uri}` first")
        self.rows = db.count(name)
        self.plan = tables.plan_index(self.rows, min_rows=0) if db.has_vector_index(name) else None

    def search(self, vector: np.ndarray, m: int) -> tuple[list[str], np.ndarray]:
        return self.db.search(self.fingerprint, vector, m, self.plan)
