"""Every LanceDB table of a bicascade database: schemas, idempotent batched writes, indexes, compaction."""
from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lancedb.expr import col
from lancedb.index import BTree, IvfFlat, IvfHnswSq, IvfSq

from bicascade.errors import NotIndexedError

log = logging.getLogger("bicascade")

IMAGES = "images"
WARNING_STAGE = "metadata"  # an ingest_errors row of an image indexed all the same (its EXIF block was broken)
SOURCES = "sources"  # every ingested uri -> its image id (duplicates included): the resume ledger
ERRORS = "ingest_errors"
RUNS = "runs"
LADDER = "ladder"  # the ladder the database was indexed with: one row per level, written by the index job

IMAGES_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("uri", pa.string()),
    pa.field("bytes", pa.large_binary()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("caption", pa.string()),
    pa.field("meta", pa.string()),  # JSON of the source's other columns
    # what the file says about its capture (bicascade.exif; null where it says nothing) and what the source says
    pa.field("media_type", pa.string()),
    pa.field("taken", pa.timestamp("us")),  # the camera's wall-clock time
    pa.field("taken_offset", pa.int16()),  # its offset from UTC in minutes, when recorded
    pa.field("camera_make", pa.string()),
    pa.field("camera_model", pa.string()),
    pa.field("lens", pa.string()),
    pa.field("lat", pa.float64()),
    pa.field("lon", pa.float64()),
    pa.field("file_size", pa.int64()),  # of the original, in bytes
    pa.field("modified", pa.timestamp("us", tz="UTC")),  # the file's modification time (folder sources)
    pa.field("keywords", pa.string()),  # the words of its caption, path, camera and metadata (storage/keywords.py)
])
SOURCES_SCHEMA = pa.schema([pa.field("uri", pa.string()), pa.field("id", pa.string()),
                            pa.field("modified", pa.timestamp("us", tz="UTC"))])  # the file's, when listed (sync)
ERRORS_SCHEMA = pa.schema([pa.field("uri", pa.string()), pa.field("stage", pa.string()),
                           pa.field("error", pa.string()), pa.field("run", pa.string())])
RUNS_SCHEMA = pa.schema([pa.field("run", pa.string()), pa.field("source", pa.string()),
                         pa.field("model", pa.string()), pa.field("fingerprint", pa.string()),
                         pa.field("status", pa.string()), pa.field("rows", pa.int64()),
                         pa.field("new_rows", pa.int64()), pa.field("errors", pa.int64()),
                         pa.field("started", pa.float64()), pa.field("finished", pa.float64())])
LADDER_SCHEMA = pa.schema([pa.field("level", pa.int32()), pa.field("ladder", pa.string()),
                           pa.field("model", pa.string()),  # JSON of the level's model spec (name, arch, weights)
                           pa.field("fingerprint", pa.string()), pa.field("dim", pa.int32()),
                           pa.field("recorded", pa.float64())])


def emb_table(fingerprint: str) -> str:
    return f"emb_{fingerprint}"


def emb_schema(dim: int) -> pa.Schema:
    return pa.schema([pa.field("id", pa.string(), nullable=False),
                      pa.field("vector", pa.list_(pa.float32(), dim))])


def cache_schema(dim: int) -> pa.Schema:
    """A cache level's table: the embedding, when it was last hit and how often (what eviction and the live p read)."""
    return emb_schema(dim).append(pa.field("last_hit", pa.float64())).append(pa.field("hits", pa.int64()))


ANN_CONFIGS = {"IVF_FLAT": IvfFlat, "IVF_SQ": IvfSq, "IVF_HNSW_SQ": IvfHnswSq}


@dataclass(frozen=True)
class AnnParams:
    """ANN parameters chosen from the row count (None: exact search is fast enough below `min_rows`).

    Level 0 must keep recall@m_1 high: no later level can recover a candidate it never returned. Defaults were
    chosen by bench/ann.py on 1M x 512 CLIP-shaped vectors with text queries (a cone per modality, no clusters): a
    text query sits off the images' manifold and its top 50 are spread over many partitions. There, sqrt(n)
    partitions and 3% of them probed found 0.61 of the top 50; 3 sqrt(n) partitions with 1/7 of them probed 0.95
    at about 15 ms on 2 cores. Finer partitions lose less per vector scanned."""

    index_type: str
    num_partitions: int
    nprobes: int
    ef: int | None = None  # HNSW only
    refine_factor: int | None = None  # re-score refine_factor * k candidates on the full vectors


def ann_params(rows: int, min_rows: int = 100_000, index_type: str = "IVF_SQ") -> AnnParams | None:
    if rows < min_rows:
        return None
    partitions = max(16, int(3 * math.sqrt(rows)))
    nprobes = max(8, partitions // 7)
    if index_type == "IVF_FLAT":
        return AnnParams(index_type, partitions, nprobes)
    if index_type == "IVF_SQ":
        return AnnParams(index_type, partitions, nprobes, refine_factor=4)
    return AnnParams(index_type, partitions, nprobes, ef=200, refine_factor=2)


# Lance keeps the manifests and file metadata of every version it reads, up to 1 GiB per session by default, and a
# cache table gets a version every commit: a process following one fills that cache to its bound. Measured here on
# a writer committing hit counts (compaction every 20 commits): +87 MiB to a plateau near 2,500 commits at 64 MiB,
# +24 MiB at 16 MiB. The index cache (ANN partitions) keeps its default.
METADATA_CACHE_BYTES = 16 << 20
# Every commit leaves a version (a manifest, deletion files, replaced fragments) on disk: a cache table gets one every
# flush, so compaction also removes the versions older than this. Kept, they piled up without bound on disk and made
# each commit slower (a writer committing hit counts: 8 s per 250 commits at first, 17 s after 3,000, measured here;
# flat with the cleanup). Readers always open the latest version, which is never removed.
KEEP_VERSIONS = timedelta(minutes=10)


class Database:
    """A LanceDB database as bicascade uses it. Tables are opened once and read at their latest version (a version
    check costs ~0.1 ms; the dataset behind a table is reopened only when another writer committed)."""

    def __init__(self, uri: str, storage_options: dict | None = None) -> None:
        self.uri = uri
        self.db = lancedb.connect(uri, storage_options=storage_options, read_consistency_interval=timedelta(0),
                                  session=lancedb.Session(metadata_cache_size_bytes=METADATA_CACHE_BYTES))
        self._open: dict[str, lancedb.table.Table] = {}
        self._datasets: dict[str, tuple[int, object]] = {}
        self._lock = threading.Lock()

    def table(self, name: str, schema: pa.Schema | None = None) -> lancedb.table.Table:
        """The table `name`, opened once (created empty with `schema` when given and missing; given the columns of
        `schema` it lacks, as nulls, when a database made by an older version is written to)."""
        with self._lock:
            if name not in self._open:
                self._open[name] = (self.db.create_table(name, schema=schema, exist_ok=True) if schema is not None
                                    else self.db.open_table(name))
            table = self._open[name]
            missing = [f for f in schema or [] if f.name not in table.schema.names]
            if missing:
                table.add_columns(pa.schema(missing))
            return table

    def dataset(self, name: str):
        """The Lance dataset of `name` at its latest version (reopened only after a commit)."""
        table = self.table(name)
        version = table.version
        with self._lock:
            cached = self._datasets.get(name)
            if cached is None or cached[0] != version:
                cached = (version, table.to_lance(metadata_cache_size_bytes=METADATA_CACHE_BYTES))
                self._datasets[name] = cached
            return cached[1]

    def version(self, name: str) -> int:
        return self.table(name).version if self.has(name) else 0

    def has(self, name: str) -> bool:
        if name in self._open:  # tables are never dropped under a running process, except by `cache drop`
            return True
        token = None
        while True:  # list_tables is paginated
            page = self.db.list_tables(page_token=token)
            if name in page.tables:
                break
            token = page.page_token
            if not token:
                return False
        try:  # listed while another process creates it (a cache writer's first flush): no table until it commits
            self.table(name)
        except (ValueError, FileNotFoundError):
            return False
        return True

    def names(self) -> list[str]:
        out, token = [], None
        while True:  # list_tables is paginated
            page = self.db.list_tables(page_token=token)
            out += page.tables
            token = page.page_token
            if not token:
                return out

    def drop(self, name: str) -> None:
        self.forget(name)
        self.db.drop_table(name)

    def forget(self, name: str) -> None:
        with self._lock:
            self._open.pop(name, None)
            self._datasets.pop(name, None)

    def column(self, name: str, column: str) -> list:
        if not self.has(name):
            return []
        return self.dataset(name).to_table(columns=[column]).column(column).to_pylist()

    def done_uris(self, embedded: set[str]) -> set[str]:
        """Uris a previous run settled for the model whose embedded ids are `embedded`: ingested (possibly as a
        duplicate) with an embedding in that model's table, or recorded as bad."""
        bad = set()
        if self.has(ERRORS):  # a warning (a broken EXIF block) settles nothing: its image was indexed all the same
            rows = self.dataset(ERRORS).to_table(columns=["uri", "stage"]).to_pylist()
            bad = {r["uri"] for r in rows if r["stage"] != WARNING_STAGE}
        if not self.has(SOURCES):
            return bad
        ledger = self.dataset(SOURCES).to_table(columns=["uri", "id"])
        done = {u for u, i in zip(ledger.column("uri").to_pylist(), ledger.column("id").to_pylist()) if i in embedded}
        return done | bad

    def take(self, name: str, ids: Sequence[str], columns: list[str]) -> pa.Table:
        """Rows of `ids` (those that exist) at the latest version, so other writers' commits are seen."""
        if not ids or not self.has(name):
            return pa.table({c: [] for c in columns})
        return self.dataset(name).to_table(columns=columns, filter=pc.field("id").isin(list(ids)))

    def image_rows(self, ids: Sequence[str], columns: Sequence[str]) -> list[dict]:
        """`images` rows of `ids` (those that exist), columns an older database lacks read as None."""
        have = set(self.dataset(IMAGES).schema.names) if self.has(IMAGES) else set()
        rows = self.take(IMAGES, ids, [c for c in columns if c in have]).to_pylist()
        return [{c: r.get(c) for c in columns} for r in rows]

    def facets(self) -> dict:
        """What the capture filters can offer: cameras and media types with their image counts, and the range of
        capture times (the camera's clock)."""
        have = set(self.dataset(IMAGES).schema.names) if self.has(IMAGES) else set()
        if not {"camera_make", "camera_model", "media_type", "taken"} <= have:
            return {"cameras": [], "media_types": [], "taken": {"min": None, "max": None}}
        t = self.dataset(IMAGES).to_table(columns=["camera_make", "camera_model", "media_type", "taken"])
        camera = pc.utf8_trim_whitespace(pc.binary_join_element_wise(
            pc.fill_null(t["camera_make"], ""), pc.fill_null(t["camera_model"], ""), " "))
        span = pc.min_max(t["taken"])

        def counted(values: pa.ChunkedArray) -> list[dict]:
            counts = pc.value_counts(values).to_pylist()
            return sorted(({"name": c["values"], "count": c["counts"]} for c in counts if c["values"]),
                          key=lambda c: (-c["count"], c["name"]))
        return {"cameras": counted(camera), "media_types": counted(t["media_type"]),
                "taken": {k: None if v is None else v.isoformat() for k, v in span.as_py().items()}}

    def lookup(self, name: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Stored vectors of those `ids` that `name` holds."""
        got = self.take(name, ids, ["id", "vector"])
        if not got.num_rows:
            return {}
        flat = got.column("vector").combine_chunks().flatten().to_numpy().reshape(got.num_rows, -1)
        return dict(zip(got.column("id").to_pylist(), flat))

    def vectors(self, fingerprint: str, ids: Sequence[str]) -> np.ndarray:
        """The stored embeddings of `ids`, in that order."""
        name = emb_table(fingerprint)
        found = self.lookup(name, ids)
        missing = [i for i in ids if i not in found]
        if missing:
            raise NotIndexedError(f"{len(missing)} of {len(ids)} images are not in {self.uri}/{name}")
        return np.stack([found[i] for i in ids])

    def recorded_ladder(self) -> list[dict]:
        """The ladder rows the index job recorded (level order), or [] for a database never indexed."""
        if not self.has(LADDER):
            return []
        return sorted(self.table(LADDER).to_arrow().to_pylist(), key=lambda r: r["level"])

    def record_ladder(self, rows: Sequence[dict]) -> None:
        """Replace the recorded ladder (one writer: the index job, or a migration)."""
        table = self.table(LADDER, LADDER_SCHEMA)
        table.add(pa.Table.from_pylist([{**r, "recorded": time.time()} for r in rows], schema=LADDER_SCHEMA),
                  mode="overwrite")

    def last_source(self) -> str | None:
        """The source of the most recent completed index run."""
        if not self.has(RUNS):
            return None
        runs = self.table(RUNS).to_arrow().to_pylist()
        done = [r for r in runs if r["status"] == "done"]
        return max(done, key=lambda r: r["finished"])["source"] if done else None

    def vector_index(self, name: str) -> str | None:
        """The ANN index over `name`'s vectors (its ANN_CONFIGS name), None when it has none."""
        named = {config.__name__: key for key, config in ANN_CONFIGS.items()}
        return next((named.get(ix.index_type, ix.index_type) for ix in self.table(name).list_indices()
                     if "vector" in ix.columns), None)

    def has_vector_index(self, name: str) -> bool:
        return self.vector_index(name) is not None

    def count(self, name: str) -> int:
        return self.table(name).count_rows() if self.has(name) else 0

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

    def remove_images(self, ids: Sequence[str]) -> dict[str, int]:
        """Remove images by id from every table that holds them: `images`, the ingest ledger, level 0 and every cache
        table (rows deleted are gone from the ANN index's results at once). Table -> rows removed."""
        removed = {}
        for name in [IMAGES, SOURCES, *sorted(n for n in self.names() if n.startswith("emb_"))]:
            if not ids or not self.has(name):
                continue
            before = self.count(name)
            for start in range(0, len(ids), 1000):
                batch = list(ids[start:start + 1000])
                retrying(lambda n=name, b=batch: self.table(n).delete(col("id").isin(b)))
            removed[name] = before - self.count(name)
        return removed

    def forget_uris(self, uris: Sequence[str]) -> None:
        """Take uris out of the ingest ledger and the error log (their files are gone or changed)."""
        for name in (SOURCES, ERRORS):
            if self.has(name):
                for start in range(0, len(uris), 1000):
                    batch = list(uris[start:start + 1000])
                    retrying(lambda n=name, b=batch: self.table(n).delete(col("uri").isin(b)))

    def relocate(self, uris: dict[str, str]) -> None:
        """Point images (id -> uri) at another path their bytes are indexed from."""
        for id_, uri in uris.items():
            retrying(lambda i=id_, u=uri: self.table(IMAGES).update(where=col("id") == i, values={"uri": u}))

    def append(self, name: str, schema: pa.Schema, rows: Sequence[dict]) -> None:
        if rows:
            self.table(name, schema).add(pa.Table.from_pylist(list(rows), schema=schema))

    def compact(self, name: str, attempts: int = 8) -> None:
        """Fold small fragments together and drop versions older than KEEP_VERSIONS. A compaction that races a
        writer's commit is preempted by lance (the writer wins, so nothing it wrote is lost) and is simply retried on
        the newer version."""
        retrying(lambda: self.table(name).optimize(cleanup_older_than=KEEP_VERSIONS), attempts)

    def finish(self, names: Iterable[str]) -> None:
        """Compact the fragments many batched commits leave, and index ids for take-by-id (an index build that a
        concurrent compaction preempts is retried, like a compaction)."""
        for name in names:
            if self.has(name):
                self.compact(name)
                table = self.table(name)
                if table.count_rows() and "id" in table.schema.names:
                    retrying(lambda n=name: self.table(n).create_index("id", config=BTree(), replace=True))

    def build_ann(self, fingerprint: str, min_rows: int = 100_000, index_type: str = "IVF_SQ") -> AnnParams | None:
        table = self.table(emb_table(fingerprint))
        params = ann_params(table.count_rows(), min_rows, index_type)
        if params:
            t0 = time.perf_counter()
            config = ANN_CONFIGS[params.index_type](distance_type="cosine", num_partitions=params.num_partitions)
            table.create_index("vector", config=config, replace=True)
            log.info("built %s over %d rows in %.1f s", params.index_type, table.count_rows(), time.perf_counter() - t0)
        return params

    def search(self, fingerprint: str, vector: np.ndarray, m: int,
               params: AnnParams | None = None) -> tuple[list[str], np.ndarray]:
        """Top-m ids by cosine similarity (exact when there is no ANN index)."""
        table = self.table(emb_table(fingerprint))
        query = table.search(np.asarray(vector, np.float32)).metric("cosine").limit(m).select(["id", "_distance"])
        if params:
            query = query.nprobes(params.nprobes)
            if params.ef:
                query = query.ef(params.ef)
            if params.refine_factor:
                query = query.refine_factor(params.refine_factor)
        else:
            query = query.bypass_vector_index()
        res = query.to_arrow()
        return res.column("id").to_pylist(), 1 - res.column("_distance").to_numpy()


def retrying(commit: Callable[[], object], attempts: int = 8) -> None:
    """Run a lance commit, again on the newer version when a concurrent one preempted it."""
    for attempt in range(attempts):
        try:
            commit()
            return
        except RuntimeError as e:
            if "Retryable commit conflict" not in str(e) or attempt == attempts - 1:
                raise
            time.sleep(0.05 * 2 ** attempt)
