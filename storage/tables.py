"""Every LanceDB table of a bicascade database: schemas, idempotent batched writes, indexes, compaction."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lancedb.index import BTree, IvfFlat, IvfHnswSq, IvfSq

log = logging.getLogger("bicascade")

IMAGES = "images"
SOURCES = "sources"  # every ingested uri -> its image id (duplicates included): the resume ledger
ERRORS = "ingest_errors"
RUNS = "runs"

IMAGES_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("uri", pa.string()),
    pa.field("bytes", pa.large_binary()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("caption", pa.string()),
    pa.field("meta", pa.string()),  # JSON of the source's other columns
])
SOURCES_SCHEMA = pa.schema([pa.field("uri", pa.string()), pa.field("id", pa.string())])
ERRORS_SCHEMA = pa.schema([pa.field("uri", pa.string()), pa.field("stage", pa.string()),
                           pa.field("error", pa.string()), pa.field("run", pa.string())])
RUNS_SCHEMA = pa.schema([pa.field("run", pa.string()), pa.field("source", pa.string()),
                         pa.field("model", pa.string()), pa.field("fingerprint", pa.string()),
                         pa.field("status", pa.string()), pa.field("rows", pa.int64()),
                         pa.field("new_rows", pa.int64()), pa.field("errors", pa.int64()),
                         pa.field("started", pa.float64()), pa.field("finished", pa.float64())])


def emb_table(fingerprint: str) -> str:
    return f"emb_{fingerprint}"


def emb_schema(dim: int) -> pa.Schema:
    return pa.schema([pa.field("id", pa.string(), nullable=False),
                      pa.field("vector", pa.list_(pa.float32(), dim))])


ANN_CONFIGS = {"IVF_FLAT": IvfFlat, "IVF_SQ": IvfSq, "IVF_HNSW_SQ": IvfHnswSq}


@dataclass(frozen=True)
class IndexPlan:
    """ANN parameters chosen from the row count (None: exact search is fast enough below `min_rows`).

    Level 0 must keep recall@m_1 high: no later level can recover a candidate it never returned. Defaults were
    chosen by bench/ann.py on 1M x 512 clustered unit vectors (see the README for the measured trade-off)."""

    index_type: str
    num_partitions: int
    nprobes: int
    ef: int | None = None  # HNSW only
    refine_factor: int | None = None  # re-score refine_factor * k candidates on the full vectors


def plan_index(rows: int, min_rows: int = 100_000, index_type: str = "IVF_SQ") -> IndexPlan | None:
    if rows < min_rows:
        return None
    partitions = max(16, int(math.sqrt(rows)))
    nprobes = max(8, partitions // 32)
    if index_type == "IVF_FLAT":
        return IndexPlan(index_type, partitions, nprobes)
    if index_type == "IVF_SQ":
        return IndexPlan(index_type, partitions, nprobes, refine_factor=4)
    return IndexPlan(index_type, partitions, nprobes, ef=200, refine_factor=2)


class Database:
    """A LanceDB database as bicascade uses it; the only writer of its tables in a job."""

    def __init__(self, uri: str, storage_options: dict | None = None) -> None:
        self.uri = uri
        self.db = lancedb.connect(uri, storage_options=storage_options)

    def table(self, name: str, schema: pa.Schema) -> lancedb.table.Table:
        return self.db.create_table(name, schema=schema, exist_ok=True)

    def has(self, name: str) -> bool:
        token = None
        while True:  # list_tables is paginated
            page = self.db.list_tables(page_token=token)
            if name in page.tables:
                return True
            token = page.page_token
            if not token:
                return False

    def column(self, name: str, column: str) -> list:
        if not self.has(name):
            return []
        return self.db.open_table(name).to_lance().to_table(columns=[column]).column(column).to_pylist()

    def done_uris(self, embedded: set[str]) -> set[str]:
        """Uris a previous run settled for the model whose embedded ids are `embedded`: ingested (possibly as a
        duplicate) with an embedding in that model's table, or recorded as bad."""
        if not self.has(SOURCES):
            return set(self.column(ERRORS, "uri"))
        ledger = self.db.open_table(SOURCES).to_arrow()
        done = {u for u, i in zip(ledger.column("uri").to_pylist(), ledger.column("id").to_pylist()) if i in embedded}
        return done | set(self.column(ERRORS, "uri"))

    def take(self, name: str, ids: Sequence[str], columns: list[str]) -> pa.Table:
        """Rows of `ids` (those that exist), opened afresh so other writers' commits are seen; BTREE on id."""
        if not ids or not self.has(name):
            return pa.table({c: [] for c in columns})
        return self.db.open_table(name).to_lance().to_table(columns=columns, filter=pc.field("id").isin(list(ids)))

    def lookup(self, name: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Stored vectors of those `ids` that `name` holds."""
        got = self.take(name, ids, ["id", "vector"])
        if not got.num_rows:
            return {}
        flat = got.column("vector").combine_chunks().flatten().to_numpy().reshape(got.num_rows, -1)
        return dict(zip(got.column("id").to_pylist(), flat))

    def vectors(self, fingerprint: str, ids: Sequence[str]) -> np.ndarray:
        """The stored embeddings of `ids`, in that order; KeyError names how many are missing."""
        name = emb_table(fingerprint)
        found = self.lookup(name, ids)
        missing = [i for i in ids if i not in found]
        if missing:
            raise KeyError(f"{len(missing)} of {len(ids)} images are not in {self.uri}/{name}")
        return np.stack([found[i] for i in ids])

    def has_vector_index(self, name: str) -> bool:
        return any("vector" in ix.columns for ix in self.db.open_table(name).list_indices())

    def count(self, name: str) -> int:
        return self.db.open_table(name).count_rows() if self.has(name) else 0

    def image_bytes(self, ids: Sequence[str]) -> dict[str, bytes]:
        got = self.take(IMAGES, ids, ["id", "bytes"])
        return dict(zip(got.column("id").to_pylist(), got.column("bytes").to_pylist()))

    def uris(self, ids: Sequence[str]) -> dict[str, str]:
        got = self.take(IMAGES, ids, ["id", "uri"])
        return dict(zip(got.column("id").to_pylist(), got.column("uri").to_pylist()))

    def ids(self, name: str) -> set[str]:
        return set(self.column(name, "id"))

    def insert_new(self, name: str, schema: pa.Schema, rows: pa.Table) -> None:
        """Insert rows whose id is not stored yet (merge_insert on id: a row is never written twice)."""
        if rows.num_rows:
            table = self.table(name, schema)
            table.merge_insert("id").when_not_matched_insert_all().execute(rows.select(schema.names).cast(schema))

    def append(self, name: str, schema: pa.Schema, rows: Sequence[dict]) -> None:
        if rows:
            self.table(name, schema).add(pa.Table.from_pylist(list(rows), schema=schema))

    def finish(self, names: Iterable[str]) -> None:
        """Compact the fragments many batched commits leave, and index ids for take-by-id."""
        for name in names:
            if self.has(name):
                table = self.db.open_table(name)
                table.optimize()
                if table.count_rows() and "id" in table.schema.names:
                    table.create_index("id", config=BTree(), replace=True)

    def build_ann(self, fingerprint: str, min_rows: int = 100_000, index_type: str = "IVF_SQ") -> IndexPlan | None:
        table = self.db.open_table(emb_table(fingerprint))
        plan = plan_index(table.count_rows(), min_rows, index_type)
        if plan:
            t0 = time.perf_counter()
            config = ANN_CONFIGS[plan.index_type](distance_type="cosine", num_partitions=plan.num_partitions)
            table.create_index("vector", config=config, replace=True)
            log.info("built %s over %d rows in %.1f s", plan.index_type, table.count_rows(), time.perf_counter() - t0)
        return plan

    def search(self, fingerprint: str, vector: np.ndarray, m: int, plan: IndexPlan | None = None) -> tuple[list[str], np.ndarray]:
        """Top-m ids by cosine similarity (exact when there is no ANN index)."""
        table = self.db.open_table(emb_table(fingerprint))
        query = table.search(np.asarray(vector, np.float32)).metric("cosine").limit(m).select(["id", "_distance"])
        if plan:
            query = query.nprobes(plan.nprobes)
            if plan.ef:
                query = query.ef(plan.ef)
            if plan.refine_factor:
                query = query.refine_factor(plan.refine_factor)
        else:
            query = query.bypass_vector_index()
        res = query.to_arrow()
        return res.column("id").to_pylist(), 1 - res.column("_distance").to_numpy()
