"""The level caches: the LRU front bounded in bytes, pending rows readable until written, one encoding per id for
concurrent misses, and write-back that never writes an id twice."""
import threading
import time
from datetime import timedelta

import numpy as np
import pyarrow as pa

from bicascade.storage import cache, tables


def vec(i: int, dim: int = 8) -> np.ndarray:
    v = np.zeros(dim, np.float32)
    v[i % dim] = 1
    return v


def test_the_front_is_bounded_in_bytes_and_evicts_the_least_recently_used():
    front = cache.LruVectors(max_bytes=10 * 32)  # ten vectors of 8 floats
    front.put({f"i{n}": vec(n) for n in range(10)})
    front.get(["i0"])  # i0 is now the most recently used
    front.put({"new": vec(3)})
    assert len(front) == 10 and front.bytes <= 320
    assert "i1" not in front.items and "i0" in front.items and "new" in front.items


def test_a_row_of_a_batch_does_not_keep_the_batch_alive():
    """The bound counts each vector's bytes, so a row must not be a view that pins the batch it came in."""
    batch = np.ones((1000, 8), np.float32)
    front = cache.LruVectors(max_bytes=10 * 32)
    front.put({"a": batch[0]})
    stored = front.items["a"]
    assert stored.base is None and stored.nbytes == 32 and np.array_equal(stored, batch[0])


def test_pending_rows_stay_readable_whatever_the_front_evicts(tmp_path):
    store = cache.LevelCache(tables.Database(str(tmp_path)), "fp", 8, flush_rows=1000, flush_s=3600, front_bytes=64)
    store.put([f"i{n}" for n in range(20)], np.stack([vec(n) for n in range(20)]))
    assert len(store.memory) <= 2 and len(store.get([f"i{n}" for n in range(20)])) == 20
    assert store.flush() == 20 and store.rows() == 20 and store.flush() == 0
    store.put(["i0", "i1"], np.stack([vec(0), vec(1)]))  # already stored: merge_insert keeps one row per id
    store.flush()
    ids = store.db.column(tables.emb_table("fp"), "id")
    assert len(ids) == len(set(ids)) == 20


def stored(tmp_path, n: int) -> tuple[tables.Database, cache.LevelCache, list[str]]:
    """A cache table holding n committed rows, and a store that batches hit counts until told to apply them."""
    db = tables.Database(str(tmp_path))
    store = cache.LevelCache(db, "fp", 8, flush_rows=1000, flush_s=3600)
    ids = [f"i{k}" for k in range(n)]
    store.put(ids, np.stack([vec(k) for k in range(n)]))
    store.flush()
    return db, store, ids


def test_hit_counts_land_per_id_in_one_commit_and_a_warm_stream_does_not_fragment_the_table(tmp_path):
    """A warm stream writes only hit counts: one commit per batch of them, whatever the counts, and compaction on
    commits of any kind, not only on new rows."""
    db, store, ids = stored(tmp_path, 30)
    for _ in range(3 * cache.COMPACT_EVERY):
        for n, i in enumerate(ids):
            store.hit({i: n % 4 + 1})  # four distinct counts in every round
        version = db.version(store.name)
        store.apply_hits()
        if store.commits:  # no compaction this round
            assert db.version(store.name) == version + 1
    got = db.dataset(store.name).to_table(columns=["id", "hits"]).to_pydict()
    hits = dict(zip(got["id"], got["hits"]))
    assert hits == {i: 3 * cache.COMPACT_EVERY * (n % 4 + 1) for n, i in enumerate(ids)}
    assert len(db.dataset(store.name).get_fragments()) <= cache.COMPACT_EVERY


def test_compaction_drops_old_versions_so_a_long_stream_does_not_pile_them_up(tmp_path, monkeypatch):
    """Every hit-count commit is a version on disk; compaction removes those older than KEEP_VERSIONS (here: all but
    the latest), and the data survives it."""
    monkeypatch.setattr(tables, "KEEP_VERSIONS", timedelta(0))
    db, store, ids = stored(tmp_path, 10)
    for _ in range(2 * cache.COMPACT_EVERY):
        store.hit(dict.fromkeys(ids, 1))
        store.apply_hits()
    kept = len(db.table(store.name).list_versions())
    assert kept <= cache.COMPACT_EVERY + 2, kept  # without the cleanup: over 2 x COMPACT_EVERY
    got = db.dataset(store.name).to_table(columns=["id", "hits"]).to_pydict()
    assert dict(zip(got["id"], got["hits"])) == dict.fromkeys(ids, 2 * cache.COMPACT_EVERY)


def test_concurrent_misses_of_one_id_encode_it_once(tmp_path):
    store = cache.LevelCache(tables.Database(str(tmp_path)), "fp", 8, flush_rows=1000, flush_s=3600)
    inflight = cache.InFlight(store)
    calls: list[list[str]] = []

    def encode(ids):
        calls.append(list(ids))
        time.sleep(0.05)
        return np.stack([vec(int(i[1:])) for i in ids])

    start = threading.Barrier(8)
    results = []

    def query(n: int) -> None:
        start.wait()
        results.append(inflight.encode([f"i{k}" for k in range(n, n + 6)], encode))
    threads = [threading.Thread(target=query, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [i for c in calls for i in c]
    assert len(flat) == len(set(flat)) == 13  # ids i0..i12, each encoded once
    # a query that missed before the first one finished, and asks after: it finds the result, encodes nothing
    before = len(calls)
    again = inflight.encode(["i0", "i12"], encode)
    assert len(calls) == before and np.array_equal(again, np.stack([vec(0), vec(12)]))


def corpus_table(tmp_path, n=200, dim=8, seed=0):
    d = tables.Database(str(tmp_path / "db"))
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ids = [f"{i:032x}" for i in range(n)]
    schema = tables.emb_schema(dim)
    vec = pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), dim)
    d.table(tables.emb_table("l0"), schema).add(pa.Table.from_arrays([pa.array(ids), vec], schema=schema))
    return d, ids, v


def test_the_corpus_in_memory_and_in_the_table_agree_and_follow_new_rows(tmp_path):
    d, ids, v = corpus_table(tmp_path)
    memory, table = cache.Corpus(d, "l0"), cache.Corpus(d, "l0", memory_bytes=0)
    assert memory.in_memory and not table.in_memory
    q = v[7]
    assert memory.search(q, 10)[0] == table.search(q, 10)[0] and memory.search(q, 10)[0][0] == ids[7]
    allowed = ids[100:110]
    got = memory.search(q, 5, memory.allow(allowed))[0]
    assert set(got) <= set(allowed) and len(got) == 5
    assert table.search(q, 5, table.allow(allowed))[0] == got
    new = np.zeros((1, 8), np.float32)
    new[0, 0] = 1
    schema = tables.emb_schema(8)
    d.table(tables.emb_table("l0")).add(pa.Table.from_arrays(
        [pa.array(["f" * 32]), pa.FixedSizeListArray.from_arrays(pa.array(new.ravel()), 8)], schema=schema))
    assert memory.search(new[0], 1)[0] != ["f" * 32]  # the snapshot until refreshed
    assert memory.refresh() and memory.rows == 201 and memory.search(new[0], 1)[0] == ["f" * 32]
    assert not memory.refresh()  # nothing new since
